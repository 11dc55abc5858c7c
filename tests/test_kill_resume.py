"""`gemel merge` killed with SIGKILL resumes from its last saved state: nothing is lost beyond
the epoch in progress and the folder is readable after every kill (issue 14, "Runs that hold").

The merge runs as a real subprocess; the test waits for what the run has saved (its files, its
JSON lines), never for a length of time, so a busy machine only makes it slower."""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from gemel_studio.cli import main
from gemel_studio.merging.datasets import ModelData
from gemel_studio.merging.folder import BASELINE, REPORT, ROUND, STATE, MergedFolder
from gemel_studio.merging.plan import RetrainSettings
from gemel_studio.merging.retrain import joint_retrain

from .conftest import SmallNet, tv

WAIT_S = 600.0  # generous: a loaded two-core machine runs this ten times slower than a quiet one


class MergeProcess:
    """`gemel merge ... --json` in a subprocess, its JSON lines collected by a thread."""

    def __init__(self, cmd: list[str]):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "PYTHONUNBUFFERED": "1"})
        self.events: queue.Queue = queue.Queue()
        self.seen: list[dict] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith("{"):
                self.events.put(json.loads(line))

    def wait_for(self, ready, what: str) -> None:
        """Poll `ready()` (and collect events) until it is true; fail if the run ends first."""
        deadline = time.monotonic() + WAIT_S
        while not ready():
            self._drain()
            if self.proc.poll() is not None and self.events.empty() and not ready():
                pytest.fail(f"the merge ended (exit {self.proc.returncode}) before {what}:\n"
                            f"{self.proc.stderr.read()[-2000:]}")
            if time.monotonic() > deadline:
                self.kill()
                pytest.fail(f"no {what} within {WAIT_S:g} s")
            time.sleep(0.02)
        self._drain()

    def _drain(self) -> None:
        while not self.events.empty():
            self.seen.append(self.events.get())

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=60)
        self.proc.stdout.close()
        self.proc.stderr.close()


def assert_readable(out: Path) -> dict[str, object]:
    """Every file the merge left reads whole (writes are atomic: a kill leaves at most a stale
    `.tmp` beside the file it was replacing, which nothing reads). Returns what was read."""
    read: dict[str, object] = {}
    for path in sorted(out.iterdir()):
        if path.name.endswith(".tmp"):
            continue
        if path.suffix == ".json":
            read[path.name] = json.loads(path.read_text())
        elif path.suffix == ".yaml":
            read[path.name] = yaml.safe_load(path.read_text())
        elif path.name in (STATE, ROUND):
            read[path.name] = torch.load(path, map_location="cpu", weights_only=True)
        elif path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:
                read[path.name] = list(f.keys())
    return read


@pytest.mark.timeout(1800)  # three processes that each import torch: minutes on a loaded two-core machine
def test_a_merge_killed_twice_resumes_and_loses_nothing_saved(tmp_path, write_workload):
    entries = [tv(t, "resnet18", num_classes=3, target={"absolute": 1.0},  # unreachable: rounds fail
                  dataset={"kind": "synthetic", "task": t, "samples": 64, "seed": i})
               for i, t in enumerate(("color", "shape"))]
    workload = write_workload(entries, input_size=[3, 16, 16])
    plan, out = tmp_path / "plan.yaml", tmp_path / "merged"
    assert main(["propose", str(workload), "-o", str(plan), "--no-risk"]) == 0
    cmd = [sys.executable, "-m", "gemel_studio.cli", "merge", str(workload), "--plan", str(plan), "--out", str(out),
           "--json", "--epochs", "3", "--batch-size", "8", "--device", "cpu"]

    # Kill 1: in round 1, as soon as its first epoch is saved.
    first = MergeProcess(cmd)
    first.wait_for(lambda: (out / ROUND).exists(), "round checkpoint")
    first.kill()
    files = assert_readable(out)
    baseline = (out / BASELINE).read_bytes()
    saved = files[ROUND]
    assert saved["epoch"] >= 1 and len(saved["history"]) == saved["epoch"]
    assert not first.seen and STATE not in files and REPORT not in files  # no round had finished
    assert MergedFolder(out).can_resume

    # Kill 2: the same command resumes round 1; killed after it reports the round, at a random
    # moment of what follows (round 2's retraining or the write of its state).
    second = MergeProcess(cmd)
    resumed: list[dict] = []  # the first new version of round 1's checkpoint this run wrote

    def round_reported() -> bool:
        if not resumed and (out / ROUND).exists() and (out / ROUND).stat().st_mtime_ns != stamp:
            try:
                resumed.append(torch.load(out / ROUND, map_location="cpu", weights_only=True))
            except (OSError, RuntimeError, EOFError):
                pass  # replaced or deleted while read: the next poll looks again
        second._drain()
        return any(e["event"] == "round" for e in second.seen)

    stamp = (out / ROUND).stat().st_mtime_ns
    second.wait_for(round_reported, "round event")
    delay = random.Random().uniform(0.0, 2.0)
    time.sleep(delay)
    second.kill()
    files = assert_readable(out)
    assert (out / BASELINE).read_bytes() == baseline  # a resume reuses the baseline, never measures again
    rounds = [e for e in second.seen if e["event"] == "round"]
    assert rounds[0]["round"] == 1 and rounds[0]["epochs"] >= saved["epoch"]
    assert rounds[0]["initial_accuracy"] == saved["initial_accuracy"]
    if resumed and resumed[0]["seed"] == saved["seed"]:
        # Round 1 went on from the saved epoch: its epochs before the kill are kept as they were.
        assert resumed[0]["history"][:saved["epoch"]] == saved["history"], f"delay {delay:.2f}"
    banked = files[STATE]["steps"]
    assert [s["round"] for s in banked] == list(range(1, len(banked) + 1))
    assert banked[:len(rounds)] == [{k: v for k, v in e.items() if k != "event"} for e in rounds]
    in_progress = files.get(ROUND)

    # The same command once more finishes; a one-second budget ends the search at once, so the
    # test stays short (the round in progress stays saved, undecided).
    done = subprocess.run(cmd + ["--time-budget", "1"], capture_output=True, text=True, timeout=WAIT_S)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    files = assert_readable(out)
    report = files[REPORT]
    assert report["stopped"] == "time budget" and report["rounds"] == len(report["steps"])
    assert report["steps"][:len(banked)] == banked  # nothing banked before a kill was redone
    assert (out / BASELINE).read_bytes() == baseline
    kept = {g["id"] for g in files["plan.yaml"]["groups"] if g["state"] == "kept"}
    assert kept == set().union(*[set(s["groups"]) for s in report["steps"] if s["outcome"] == "kept"])
    assert set(report["models"]) == {"color", "shape"}
    # The round killed mid-way keeps its saved epochs. (A kill after a round's state was written
    # but before its checkpoint was deleted leaves that finished round's checkpoint: the resume
    # ignores it, another seed, and starts the next round afresh, so there is nothing to keep.)
    if in_progress is not None and ROUND in files and files[ROUND]["seed"] == in_progress["seed"]:
        assert files[ROUND]["epoch"] >= in_progress["epoch"]
    assert MergedFolder(out).has_report and not MergedFolder(out).can_resume


# --- the resume rules of joint_retrain that a kill exposes, without a subprocess ------------------


def _tiny(seed: int) -> tuple[dict, dict]:
    torch.manual_seed(seed)
    x = torch.rand(32, 3, 8, 8)
    y = torch.randint(0, 4, (32,))
    ds = torch.utils.data.TensorDataset(x, y)
    return {"a": SmallNet()}, {"a": ModelData(train=ds, val=ds, num_classes=4)}


SETTINGS = RetrainSettings(epochs=4, optimizer="sgd", lr=0.01, momentum=0.0, weight_decay=0.0, batch_size=8)


def test_a_checkpoint_of_an_earlier_round_is_not_resumed(tmp_path):
    """A kill after the search banked a round and before it deleted the round's checkpoint leaves
    that checkpoint behind; the next round (another seed) starts afresh instead of taking it."""
    ckpt = tmp_path / ROUND
    models, data = _tiny(0)
    joint_retrain(models, data, {"a": 1.0}, SETTINGS.model_copy(update={"epochs": 1}), checkpoint=ckpt, seed=1,
                  early_stop=False)
    assert torch.load(ckpt, weights_only=True)["seed"] == 1
    models, data = _tiny(0)
    result = joint_retrain(models, data, {"a": 1.0}, SETTINGS.model_copy(update={"epochs": 2}), checkpoint=ckpt,
                           seed=2, early_stop=False)
    assert [h.epoch for h in result.history] == [1, 2]  # both epochs ran: nothing was taken from round 1
    assert any("earlier round" in e for e in result.events)
    again = joint_retrain(*_tiny(0), {"a": 1.0}, SETTINGS.model_copy(update={"epochs": 2}), checkpoint=ckpt, seed=2,
                          early_stop=False)
    assert any("resumed" in e for e in again.events) and len(again.history) == 2  # its own round resumes


def test_a_resume_after_the_epoch_that_gave_up_stops_as_that_run_did(tmp_path):
    """Killed after saving the epoch that showed the target out of reach, before the search took
    the result: the resumed retraining gives up too instead of training another epoch."""
    ckpt = tmp_path / ROUND
    models, data = _tiny(0)
    first = joint_retrain(models, data, {"a": 1.0}, SETTINGS, checkpoint=ckpt, seed=1)
    assert first.stopped == "cannot reach target", first.stopped  # random labels: 1.0 is out of reach
    epochs = len(first.history)
    assert torch.load(ckpt, weights_only=True)["epoch"] == epochs
    models, data = _tiny(0)
    resumed = joint_retrain(models, data, {"a": 1.0}, SETTINGS, checkpoint=ckpt, seed=1)
    assert resumed.stopped == "cannot reach target" and len(resumed.history) == epochs
    assert resumed.accuracy == first.accuracy

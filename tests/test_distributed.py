"""Retraining on several processes (`gemel merge --nproc N`, torch.distributed with gloo on this
CPU): the same samples per step on any number of ranks, the same result as one process with the
same global batch, and a killed rank that ends the run with its error instead of a hang."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
import yaml
from safetensors.torch import load_file

from gemel_studio.cli import main
from gemel_studio.errors import GemelError, ProcessFailed
from gemel_studio.merging.datasets import ModelData
from gemel_studio.merging import distributed
from gemel_studio.merging.distributed import GlobalBatchShard
from gemel_studio.merging.plan import RetrainSettings
from gemel_studio.merging.retrain import joint_retrain

from .conftest import tv

WAIT_S = 600.0  # generous: three processes importing torch on a loaded two-core machine


@pytest.mark.parametrize("n,batch,drop_last", [(37, 8, True), (37, 8, False), (64, 16, True), (6, 8, False)])
def test_every_rank_reads_its_part_of_the_batch_one_process_would_read(n, batch, drop_last):
    one = GlobalBatchShard(n, batch, seed=5, drop_last=drop_last, rank=0, world=1).parts
    flat = [i for b in one for i in b]
    assert len(set(flat)) == len(flat) and set(flat) <= set(range(n))  # each sample at most once
    assert len(flat) == (n // batch * batch if drop_last else n)
    for world in (2, 3):
        parts = [GlobalBatchShard(n, batch, 5, drop_last, r, world).parts for r in range(world)]
        assert [sum((p[k] for p in parts), []) for k in range(len(one))] == one
        assert all(len(p) == len(one) for p in parts)  # every rank takes the same number of steps
    assert GlobalBatchShard(n, batch, 6, drop_last, 0, 1).parts != one  # the seed shuffles


def test_a_batch_too_small_to_split_says_so():
    with pytest.raises(GemelError, match="cannot be split among 4 processes"):
        GlobalBatchShard(3, 8, 0, False, 0, 4)


SETTINGS = RetrainSettings(epochs=3, optimizer="sgd", lr=0.05, momentum=0.9, weight_decay=1e-4, batch_size=8,
                           device="cpu")


def _tied_pair():
    """Two small classifiers sharing their first layer; no batch norm, no dropout."""
    torch.manual_seed(0)
    shared = torch.nn.Conv2d(3, 6, 3, padding=1)
    models = {n: torch.nn.Sequential(shared, torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(6 * 8 * 8, 4))
              for n in ("a", "b")}
    data = {}
    for i, n in enumerate(models):
        g = torch.Generator().manual_seed(10 + i)
        ds = torch.utils.data.TensorDataset(torch.rand(36, 3, 8, 8, generator=g), torch.randint(0, 4, (36,), generator=g))
        data[n] = ModelData(train=ds, val=ds, num_classes=4)
    return models, data


def _retrain_on_rank(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        models, data = _tied_pair()
        result = joint_retrain(models, data, {"a": 1.0, "b": 1.0}, SETTINGS, seed=3, early_stop=False)
        torch.save({"weights": {n: m.state_dict() for n, m in models.items()}, "accuracy": result.accuracy,
                    "loss": [h.loss for h in result.history]}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(900)
def test_ddp_over_two_ranks_trains_the_weights_one_process_trains(tmp_path):
    """Shared tensors stay one parameter under DDP; gradients summed over the models and averaged
    over the ranks equal one process's with the same global batch."""
    import torch.multiprocessing as mp

    models, data = _tied_pair()
    alone = joint_retrain(models, data, {"a": 1.0, "b": 1.0}, SETTINGS, seed=3, early_stop=False)
    assert models["a"][0].weight is models["b"][0].weight
    mp.spawn(_retrain_on_rank, args=(2, _free_port(), str(tmp_path / "r")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"r.{r}", weights_only=True) for r in (0, 1)]
    for r in ranks:
        for n, model in models.items():
            for k, v in model.state_dict().items():
                torch.testing.assert_close(r["weights"][n][k], v, rtol=1e-5, atol=1e-6, msg=f"{n}.{k}")
        assert r["weights"]["a"]["0.weight"].equal(r["weights"]["b"]["0.weight"])  # still shared
        assert r["accuracy"] == alone.accuracy
        for mine, theirs in zip(r["loss"], [h.loss for h in alone.history]):  # the mean over the ranks
            assert mine == pytest.approx(theirs, rel=1e-5)
    moved = (models["a"][0].weight - _tied_pair()[0]["a"][0].weight).abs().max().item()
    assert moved > 1e-3  # it trained


def _workload(write_workload, target: float, samples: int = 48) -> Path:
    # SqueezeNet has no batch norm: two ranks' averaged gradient is one process's, up to rounding.
    entries = [tv(t, "squeezenet1_1", num_classes=3, target={"absolute": target},
                  dataset={"kind": "synthetic", "task": t, "samples": samples, "seed": i})
               for i, t in enumerate(("color", "shape"))]
    return write_workload(entries, input_size=[3, 24, 24])


def _plan(workload: Path, tmp_path: Path, check_first: bool = True) -> Path:
    plan = tmp_path / "plan.yaml"
    assert main(["propose", str(workload), "-o", str(plan), "--no-risk"]) == 0
    data = yaml.safe_load(plan.read_text())
    data["retraining"]["check_before_training"] = check_first
    plan.write_text(yaml.safe_dump(data, sort_keys=False))
    return plan


def _merge(workload: Path, plan: Path, out: Path, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "gemel_studio.cli", "merge", str(workload), "--plan", str(plan), "--out", str(out),
           "--json", "--epochs", "2", "--batch-size", "8", "--device", "cpu", "--lr", "0.01", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=WAIT_S, env=_env_with_tmp(out.parent / "tmp"))


def _env_with_tmp(tmp: Path) -> dict[str, str]:
    """The environment with its own temporary folder, to check that the ranks leave nothing there."""
    tmp.mkdir(exist_ok=True)
    return {**os.environ, "TMPDIR": str(tmp)}


@pytest.mark.timeout(1800)
def test_two_processes_keep_the_same_groups_and_weights_as_one(tmp_path, write_workload):
    # A target every model meets: the one round trains one epoch (the check before training is
    # off), then keeps every group. Both runs train the same steps on the same samples.
    workload = _workload(write_workload, target=0.01)
    plan = _plan(workload, tmp_path, check_first=False)
    single = _merge(workload, plan, tmp_path / "one")
    assert single.returncode == 0, single.stderr[-2000:]
    double = _merge(workload, plan, tmp_path / "two", "--nproc", "2")
    assert double.returncode == 0, double.stderr[-2000:]
    assert "Traceback" not in double.stderr
    # Rank 0 alone prints: one final line, as from one process.
    done = [json.loads(ln) for ln in double.stdout.splitlines() if ln.startswith("{")]
    assert [e["event"] for e in done].count("done") == 1

    one, two = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    assert [s["outcome"] for s in two["steps"]] == [s["outcome"] for s in one["steps"]] == ["kept"]
    assert two["steps"][0]["groups"] == one["steps"][0]["groups"]
    assert two["steps"][0]["epochs"] == one["steps"][0]["epochs"] == 1
    for name in ("color", "shape"):  # on the held-out split (9 samples): at most one prediction apart
        for key in ("merged_accuracy", "merged_test_accuracy"):
            assert abs(two["models"][name][key] - one["models"][name][key]) <= 1 / 9 + 1e-9, (name, key)
    w1, w2 = load_file(tmp_path / "one" / "merged.safetensors"), load_file(tmp_path / "two" / "merged.safetensors")
    assert w1.keys() == w2.keys()  # shared tensors stored once, as from one process
    # Not equal: SqueezeNet's dropout draws other masks in two processes (the exact equality of
    # the gradients is the next test's, on models without dropout).
    assert not list((tmp_path / "tmp").iterdir())  # the other rank's private copy is gone, the launcher's logs too


@pytest.mark.timeout(900)
def test_a_killed_rank_ends_the_run_with_its_error(tmp_path, write_workload):
    workload = _workload(write_workload, target=1.0, samples=96)  # unreachable: the search goes on
    plan = _plan(workload, tmp_path)
    cmd = [sys.executable, "-m", "gemel_studio.cli", "merge", str(workload), "--plan", str(plan), "--out",
           str(tmp_path / "out"), "--json", "--epochs", "50", "--batch-size", "8", "--device", "cpu", "--nproc", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=_env_with_tmp(tmp_path / "tmp"))
    try:
        deadline = time.monotonic() + WAIT_S
        victim = None
        while victim is None:
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "the ranks did not start"
            for child in psutil.Process(proc.pid).children(recursive=True):
                try:
                    env, cmdline = child.environ(), " ".join(child.cmdline())
                except (psutil.Error, OSError):
                    continue
                # Rank 1 itself (`python -m gemel_studio.cli merge ...`), not a process it started,
                # which would carry its environment too.
                if env.get("RANK") == "1" and env.get("WORLD_SIZE") == "2" and "gemel_studio.cli" in cmdline:
                    victim = child
            time.sleep(0.2)
        # Let it reach training (the round's checkpoint appears after the first epoch).
        while not (tmp_path / "out" / "search.state.round").exists():
            assert proc.poll() is None, proc.stderr.read()[-2000:]
            assert time.monotonic() < deadline, "no epoch was saved"
            time.sleep(0.2)
        victim.kill()
        killed = time.monotonic()
        out, err = proc.communicate(timeout=300)
        assert time.monotonic() - killed < 300
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode == 1, err[-2000:]  # not the user's error (2): the same command can be run again
    # One line: the rank, what it died of, where the details are, what to do. Not each rank's
    # traceback ([rankN]: ...), nor the elastic launcher's log lines (W1202 12:00:00 ... api.py:1028]).
    lines = err.splitlines()
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, err[-3000:]
    log = tmp_path / "out" / distributed.FAILURE_LOG
    assert errors[0].startswith("error: rank 1 of 2 failed: killed by signal 9 (SIGKILL"), errors[0]
    assert f"details in {log}" in errors[0] and errors[0].endswith("run the same command again to resume")
    assert not [ln for ln in lines if ln.startswith("[rank") or re.match(r"[IWE]\d{4} ", ln)], err[-3000:]
    assert "Traceback" not in err and "torch.distributed" not in err
    detail = log.read_text()  # the whole story: each failed rank, each rank's output, the launcher's log
    assert "== rank 1 (local rank 1, pid " in detail and "exit code -9" in detail
    assert "== rank 1 stderr ==" in detail and "torch.distributed.elastic" in detail
    assert (tmp_path / "out" / "search.state.round").exists()  # the saved epoch is kept for a resume
    # The killed rank ran no clean-up, yet its private copy of the output folder is gone with the
    # launcher's folder (the failure log went to the output folder).
    assert not list((tmp_path / "tmp").iterdir())
    assert not [p for p in psutil.Process().children(recursive=True) if p.pid != os.getpid()
                and "gemel_studio.cli" in " ".join(p.cmdline())]


def _rank_fails(tmp_path: Path, monkeypatch, rank: int, exc: Exception) -> int:
    """A rank `launch` started meets `exc` inside `rank_errors`: its exit code (it prints nothing)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / f"{rank}.json"))
    monkeypatch.setenv(distributed._QUIET_RANK_ENV, "1")
    with pytest.raises(SystemExit) as stop:
        with distributed.rank_errors():
            raise exc
    return stop.value.code


def test_a_failed_rank_is_one_line_that_names_it_and_the_log_holds_the_rest(tmp_path, monkeypatch, capsys):
    """In-process, what `launch` makes of the ranks' failures (the killed-rank test runs the real thing)."""
    from torch.distributed.elastic.multiprocessing.errors import ProcessFailure

    def bad_split():
        raise GemelError("no 'val' split in data/cats; add one or set split")

    # Rank 1 meets an error of the user's; rank 0 then loses it mid-collective (and says so second).
    try:
        bad_split()
    except GemelError as exc:
        assert _rank_fails(tmp_path, monkeypatch, 1, exc) == 2
    lost = distributed.LostPeer("rank 0 lost another process of the retraining (gloo: Connection reset by peer)")
    assert _rank_fails(tmp_path, monkeypatch, 0, lost) == 2
    assert capsys.readouterr().err == ""  # the ranks print nothing: the launcher says it once
    monkeypatch.delenv("RANK")  # back in the launcher
    out, logs = tmp_path / "out", tmp_path / "ranks"
    (logs / "run_x" / "attempt_0" / "1").mkdir(parents=True)
    (logs / "run_x" / "attempt_0" / "1" / "stderr.log").write_text("a warning rank 1 printed\n")
    failures = {r: ProcessFailure(r, 100 + r, 2, str(tmp_path / f"{r}.json")) for r in (0, 1)}
    failures[1].timestamp += 5  # even seen later, the lost peer is not the cause
    error, log = distributed._failed(failures, 2, ["merge", "w.yaml"], logs, ["W launcher line"], out)
    assert log == out / distributed.FAILURE_LOG
    assert type(error) is GemelError and error.exit_code == 2  # the user's error: fix the command
    assert str(error) == (f"rank 1 of 2 failed: no 'val' split in data/cats; add one or set split (the others were "
                    f"stopped; details in {log})")
    text = log.read_text()
    assert "Traceback" in text and "in bad_split" in text and "LostPeer" in text  # each rank's traceback
    assert "a warning rank 1 printed" in text and "W launcher line" in text
    assert "== rank 0 output: printed on the terminal ==" in text

    # A rank killed by a signal (no error file) is the cause; one that crashed says its last words.
    killed = ProcessFailure(1, 101, -9, str(tmp_path / "none.json"))
    # Rank 0, which the launcher then stopped with SIGTERM, can carry the same (whole-second)
    # timestamp: it is not the cause.
    stopped = ProcessFailure(0, 100, -15, str(tmp_path / "none.json"))
    stopped.timestamp = killed.timestamp
    assert distributed._cause({0: stopped, 1: killed})[0] == 1
    assert distributed._cause({0: stopped})[0] == 0  # alone, it is
    error, _ = distributed._failed({0: failures[0], 1: killed}, 2, ["merge"], logs, [], out)
    assert isinstance(error, ProcessFailed) and error.exit_code == 1  # not the user's: run it again
    line = str(error)
    assert line.startswith("rank 1 of 2 failed: killed by signal 9 (SIGKILL, sent by hand, or by the system "
                           "when memory ran out); the others were stopped, details in ")
    assert line.endswith("run the same command again to resume")
    crashed = ProcessFailure(1, 101, 1, str(tmp_path / "none.json"))
    error, _ = distributed._failed({1: crashed}, 2, ["merge"], logs, [], out)
    assert error.exit_code == 1 and str(error).startswith("rank 1 of 2 failed: exit code 1 (a warning rank 1 printed); ")
    # An unexpected error: its type and first line.
    monkeypatch.setenv("RANK", "1")
    assert _rank_fails(tmp_path, monkeypatch, 1, ValueError("shapes differ\nmore")) == 1
    error, _ = distributed._failed({1: ProcessFailure(1, 101, 1, str(tmp_path / "1.json"))}, 2, ["merge"], logs, [],
                                   out)
    assert error.exit_code == 1 and str(error).startswith("rank 1 of 2 failed: ValueError: shapes differ; the others were stopped")


def test_a_rank_started_by_hand_still_raises_its_error(tmp_path, monkeypatch):
    # torchrun by hand: the error goes on as before (gemel prints it), and is in torchrun's error file.
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "e.json"))
    monkeypatch.delenv(distributed._QUIET_RANK_ENV, raising=False)
    with pytest.raises(GemelError, match="bad"):
        with distributed.rank_errors():
            raise GemelError("bad")
    assert json.loads((tmp_path / "e.json").read_text())["message"] == "bad"


def test_each_rank_runs_the_command_without_nproc():
    from gemel_studio.merging.distributed import without_nproc

    argv = ["merge", "w.yaml", "--plan", "p.yaml", "--nproc", "2", "--out", "o", "--nproc=3", "--json"]
    assert without_nproc(argv) == ["merge", "w.yaml", "--plan", "p.yaml", "--out", "o", "--json"]

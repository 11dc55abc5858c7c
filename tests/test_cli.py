"""The `gemel` command: JSON schema, readable tables, and one-line errors with exit code 2."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import get_model

from gemel_studio.analysis import analyze_workload
from gemel_studio.cli import main
from gemel_studio.workload import load_workload

from .conftest import SAMPLES, tv


def test_analyze_json_has_the_documented_fields(capsys):
    assert main(["analyze", str(SAMPLES / "quickstart.yaml"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    expected = analyze_workload(load_workload(SAMPLES / "quickstart.yaml"))
    assert data["workload"] == "quickstart" and data["alignment"] == "structure"
    assert data["total_param_bytes"] == expected.total_param_bytes
    assert data["max_savings_bytes"] == expected.max_savings_bytes
    model = data["models"][0]
    assert {"name", "architecture", "param_bytes", "buffer_bytes", "activation_bytes", "layers"} <= set(model)
    assert {"name", "kind", "signature", "param_bytes", "activation_bytes"} <= set(model["layers"][0])
    group = data["groups"][0]
    assert {"signature", "members", "bytes_per_copy", "savings_bytes"} <= set(group)
    assert set(group["members"][0]) == {"model", "layer"}
    assert sum(g["savings_bytes"] for g in data["groups"]) == data["max_savings_bytes"]


def test_analyze_order_alignment_is_reported(capsys):
    assert main(["analyze", str(SAMPLES / "medium.yaml"), "--json", "--alignment", "order"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["alignment"] == "order"


def test_analyze_table(capsys):
    assert main(["analyze", str(SAMPLES / "quickstart.yaml")]) == 0
    out = capsys.readouterr().out
    assert "all-shareable bound     127.9 MiB (61.2% of the total)" in out
    assert "resnet34" in out and "resnet18" in out


def test_info_without_gpu(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"torch          {torch.__version__}" in out
    if not torch.cuda.is_available():
        assert "no NVIDIA GPU" in out and "device         cpu" in out


def _bad_checkpoint(tmp_path):
    save_file(get_model("resnet18", weights=None, num_classes=4).state_dict(), tmp_path / "r.safetensors")
    return {"name": "c", "num_classes": 7, "source": {"kind": "checkpoint", "architecture": "resnet18",
                                                      "path": "r.safetensors"}}


@pytest.mark.parametrize("case, expected", [
    ("missing", "no such workload file"),
    ("unknown_arch", "unknown torchvision architecture 'resnet19'"),
    ("duplicate", "duplicate model name 'a'"),
    ("bad_checkpoint", "does not fit the architecture"),
    ("corrupt_checkpoint", "corrupt or truncated"),
    ("bad_onnx", "fails the ONNX checker"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, write_workload, capsys, case, expected):
    if case == "missing":
        path = tmp_path / "absent.yaml"
    elif case == "unknown_arch":
        path = write_workload([tv("a", "resnet19")])
    elif case == "duplicate":
        path = write_workload([tv("a", "resnet18"), tv("a", "resnet18")])
    elif case == "bad_checkpoint":
        path = write_workload([_bad_checkpoint(tmp_path)])
    elif case == "corrupt_checkpoint":
        (tmp_path / "x.pt").write_bytes(b"PK\x03\x04" + b"\x00" * 64)
        path = write_workload([{"name": "c", "source": {"kind": "checkpoint", "architecture": "resnet18",
                                                         "path": "x.pt"}}])
    else:
        (tmp_path / "m.onnx").write_bytes(b"")
        path = write_workload([{"name": "o", "source": {"kind": "onnx", "path": "m.onnx"}}])
    assert main(["analyze", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_console_script_prints_no_traceback(tmp_path):
    """The installed `gemel` entry point, in a fresh process, on a bad workload."""
    script = shutil.which("gemel", path=str(Path(sys.executable).parent))
    if script is None:
        pytest.skip("the gemel console script is not installed next to this Python (pip install -e .)")
    bad = tmp_path / "w.yaml"
    bad.write_text("models:\n  - name: a\n    source: {kind: torchvision, architecture: nope}\n")
    proc = subprocess.run([script, "analyze", str(bad)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    return err


def test_workload_that_is_a_folder_is_one_line(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "is a folder; name the workload's YAML file" in _one_line_error(capsys)


def test_propose_into_a_missing_folder_is_one_line(tmp_path, capsys):
    out = tmp_path / "nonexistent" / "dir" / "plan.yaml"
    assert main(["propose", str(SAMPLES / "quickstart.yaml"), "-o", str(out)]) == 2
    assert f"the folder {out.parent} does not exist; create it" in _one_line_error(capsys)
    assert main(["propose", str(SAMPLES / "quickstart.yaml"), "-o", str(tmp_path)]) == 2
    assert "is a folder; name the plan file" in _one_line_error(capsys)


def test_os_errors_are_one_line(tmp_path, write_workload, capsys):
    """A file the user names that the system cannot read: its name and the reason, no traceback."""
    workload = write_workload([tv("a", "resnet18")])
    assert main(["merge", str(workload), "--plan", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert str(tmp_path) in err and "(check the path and its permissions)" in err


def test_ctrl_c_during_merge_saves_the_step_and_the_same_command_resumes(tmp_path, write_workload):
    import os
    import signal

    entries = [tv(t, "resnet18", num_classes=3, target={"absolute": 1.0},  # unreachable: rounds fail and split
                  dataset={"kind": "synthetic", "task": t, "samples": 40, "seed": i})
               for i, t in enumerate(("color", "shape"))]
    workload = write_workload(entries, input_size=[3, 16, 16])
    plan, out = tmp_path / "plan.yaml", tmp_path / "merged"
    assert main(["propose", str(workload), "-o", str(plan)]) == 0
    cmd = [sys.executable, "-m", "gemel_studio.cli", "merge", str(workload), "--plan", str(plan), "--out", str(out),
           "--json", "--epochs", "2", "--batch-size", "8", "--device", "cpu"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    first = json.loads(proc.stdout.readline())  # the first round ended: the second is under way
    assert first["event"] == "round" and first["round"] == 1
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "run the same command again to resume" in err and "Traceback" not in err
    # Round 1 is banked; the round under way is checkpointed at its exact step (unless the
    # signal landed between rounds, when there is nothing of it to keep).
    assert (out / "search.state").exists()

    # Resume; a one-second budget ends the search after the resumed epoch, so the test stays short.
    done = subprocess.run(cmd + ["--time-budget", "1"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["steps"][0] == {k: v for k, v in first.items() if k != "event"}  # round 1 was not redone
    assert report["stopped"] == "time budget"


class _FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_terminal_progress_is_quiet_when_piped_and_draws_a_bar_to_the_total_on_a_terminal():
    from gemel_studio.progress import terminal_progress

    piped = io.StringIO()
    progress = terminal_progress(piped)
    progress.start(3, "training")
    for _ in range(3):
        progress.step("epoch")
    assert piped.getvalue() == ""

    tty = _FakeTerminal()
    progress = terminal_progress(tty)
    progress.start(3, "training")
    for i in range(3):
        progress.step(f"epoch {i + 1}")
    drawn = tty.getvalue()
    assert "3/3" in drawn and "100%" in drawn and drawn.endswith("\n")
    # A second start (the next phase of the work) begins a new bar.
    progress.start(2, "evaluating")
    progress.step()
    progress.step()
    assert tty.getvalue()[len(drawn):].count("2/2") >= 1


def test_training_flags_come_from_the_options_model(tmp_path, capsys):
    from gemel_studio.cli import build_parser
    from gemel_studio.merging.options import FINETUNE_SETTINGS

    args = build_parser().parse_args(["merge", "w.yaml", "--plan", "p.yaml", "--out", "o", "--epochs", "3",
                                      "--time-budget", "5", "--min-savings", "0.5", "--strategy", "gemel"])
    assert (args.epochs, args.time_budget_s, args.min_savings_mib, args.strategy) == (3, 5.0, 0.5, "gemel")
    assert not hasattr(args, "lr")  # unset: the plan's value applies
    help_text = build_parser()._subparsers._group_actions[0].choices["finetune"].format_help()
    assert "--time-budget" not in help_text and f"(default {FINETUNE_SETTINGS.epochs})" in help_text
    # A bad value is one line naming the flag, before any work.
    workload = SAMPLES / "quickstart.yaml"
    assert main(["finetune", str(workload), "--out", str(tmp_path), "--epochs", "0"]) == 2
    assert "--epochs 0: input should be greater than 0" in _one_line_error(capsys)


def test_merge_with_a_plan_for_another_workload_is_one_line_naming_it(tmp_path, write_workload, capsys):
    plan = tmp_path / "plan.yaml"
    assert main(["propose", str(SAMPLES / "quickstart.yaml"), "-o", str(plan), "--no-risk"]) == 0
    capsys.readouterr()
    other = write_workload([tv("a", "resnet18")])
    assert main(["merge", str(other), "--plan", str(plan), "--out", str(tmp_path / "out")]) == 2
    err = _one_line_error(capsys)
    assert "made for workload 'quickstart'" in err and f"gemel propose {other} -o {plan}" in err
    assert not (tmp_path / "out").exists()

"""The package installs like one: declared dependencies and extras that match who installs
what, sample workloads shipped as package data, a wheel whose commands work outside the
source tree, and one-line errors where an extra is missing or a checkpoint is refused."""

from __future__ import annotations

import ast
import functools
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

import pytest
import torch

from gemel_studio.cli import main

from .conftest import ROOT, SAMPLES, run_python_blocking
from .test_bundle import bundle, merged  # noqa: F401  (fixtures: a small merged bundle)

PACKAGE = ROOT / "gemel_studio"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


# --- dependencies: every import is declared, each layer needs only its own extras --------------


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(requirements: list[str]) -> set[str]:
    return {_normalize(re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", r.strip()).group(0)) for r in requirements}


BASE = _requirement_names(PYPROJECT["project"]["dependencies"])
EXTRAS = {name: _requirement_names(reqs) for name, reqs in PYPROJECT["project"]["optional-dependencies"].items()}


def _third_party_imports() -> dict[str, set[str]]:
    """Top-level third-party module -> the files (relative to gemel_studio/) that import it,
    lazy imports inside functions included."""
    found: dict[str, set[str]] = {}
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                modules = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules = [node.module]
            else:
                continue
            for module in modules:
                top = module.split(".")[0]
                if top not in sys.stdlib_module_names and top != "gemel_studio":
                    found.setdefault(top, set()).add(path.relative_to(PACKAGE).as_posix())
    return found


@functools.cache
def _distributions(module: str) -> frozenset[str]:
    # A module that is not installed here maps to its own name (psutil -> psutil, usually right).
    return frozenset(_normalize(d) for d in _installed().get(module, [module]))


@functools.cache
def _installed() -> dict[str, list[str]]:
    return packages_distributions()  # scans every installed distribution: once


def test_every_third_party_import_is_a_declared_dependency():
    imports = _third_party_imports()
    assert {"torch", "onnxruntime", "PySide6", "torchmetrics"} <= set(imports)  # the walk sees lazy imports
    declared = BASE.union(*EXTRAS.values())
    undeclared = [f"{module} (distribution {'/'.join(sorted(_distributions(module)))}, imported by "
                  f"{', '.join(sorted(files))})" for module, files in sorted(imports.items())
                  if not _distributions(module) & declared]
    assert undeclared == [], "imported but not declared in pyproject.toml: " + "; ".join(undeclared)


def _allowed(file: str) -> tuple[str, set[str]]:
    layer = file.split("/")[0]
    if layer == "ui":
        return "base + [studio]", BASE | EXTRAS["studio"]
    if layer in ("merging", "export"):
        return "base + [merge]", BASE | EXTRAS["merge"]
    return "base", BASE


def test_each_layer_needs_only_its_own_extras():
    """The edge side and the core need the base install only; retraining and export may use
    [merge]; only ui/ may use [studio]."""
    offenders = []
    for module, files in sorted(_third_party_imports().items()):
        for file in sorted(files):
            what, allowed = _allowed(file)
            if not _distributions(module) & allowed:
                offenders.append(f"{file} imports {module}, not in {what}")
    assert offenders == []


def test_the_extras_are_the_ones_people_install():
    assert {"torch", "torchvision", "onnx", "onnxruntime", "safetensors", "pydantic", "pyyaml", "numpy",
            "opencv-python-headless", "prometheus-client", "nvidia-ml-py", "psutil"} <= BASE
    assert not BASE & {"pyside6-essentials", "pyqtgraph", "torchmetrics", "pycocotools"}
    assert EXTRAS["studio"] == {"pyside6-essentials", "pyqtgraph"} == EXTRAS["gui"]
    assert {"torchmetrics", "pycocotools"} <= EXTRAS["merge"]
    assert "PySide6-Essentials==6.11.2" in PYPROJECT["project"]["optional-dependencies"]["studio"]
    assert ".[studio,merge,test]" in (ROOT / "dev.sh").read_text()


def test_every_subpackage_and_data_folder_ships():
    """pyproject.toml lists its packages by hand: a new subpackage missing there is missing from the wheel."""
    setuptools = PYPROJECT["tool"]["setuptools"]
    found = {"gemel_studio." + ".".join(p.parent.relative_to(PACKAGE).parts) if p.parent != PACKAGE
             else "gemel_studio" for p in PACKAGE.rglob("__init__.py")}
    mapped = setuptools["package-dir"]
    assert mapped == {"gemel_studio.resources": "resources", "gemel_studio.sample_workloads": "sample_workloads"}
    assert set(setuptools["packages"]) == found | set(mapped)
    for package, folder in mapped.items():
        assert (ROOT / folder / "__init__.py").is_file()
        patterns = setuptools["package-data"][package]
        files = {p.name for p in (ROOT / folder).iterdir() if p.is_file() and p.name != "__init__.py"}
        assert all(any(Path(f).match(pat) for pat in patterns) for f in files), (folder, files, patterns)


BASE_ONLY_BLOCKED = ("PySide6", "shiboken6", "pyqtgraph", "torchmetrics", "pycocotools",
                     "gemel_studio.merging", "gemel_studio.export", "gemel_studio.ui")


def test_gemel_run_works_with_only_the_base_install(bundle):  # noqa: F811
    """An edge box: no Qt, no retraining libraries, no merging/export code; both backends run."""
    body = f"""
import json
from gemel_studio.cli import main
for backend in ('torch', 'onnxruntime'):
    assert main(['run', {str(bundle[1])!r}, '--stream', 'synthetic:5=size', '--policy', 'unlimited',
                 '--backend', backend, '--device', 'cpu', '--duration', '4', '--json']) == 0, backend
"""
    proc = run_python_blocking(BASE_ONLY_BLOCKED, body)
    assert proc.returncode == 0, proc.stderr
    summaries = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [s["backend"] for s in summaries] == ["torch", "onnxruntime"]
    for s in summaries:  # the model ran (on a busy CPU, late frames may still be dropped: not the point here)
        assert s["streams"][0]["frames_in"] >= 3 and s["last_error"] is None, s
        assert s["models"]["size"]["runs"] >= 1 and s["models"]["size"]["mean_infer_ms"] > 0, s


@pytest.mark.parametrize("command", [
    ["merge", str(SAMPLES / "quickstart.yaml"), "--plan", "plan.yaml", "--out", "merged"],
    ["finetune", str(SAMPLES / "quickstart.yaml"), "--out", "tuned"],
], ids=lambda c: c[0])
def test_retraining_without_the_merge_extra_is_one_line_naming_it(command, tmp_path):
    body = f"""
import os
os.chdir({str(tmp_path)!r})
from gemel_studio.cli import main
sys.exit(main({command!r}))
"""
    proc = run_python_blocking(("torchmetrics", "pycocotools"), body)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        f"error: gemel {command[0]} needs the [merge] extra (torchmetrics is missing): "
        "pip install 'gemel-studio[merge]'"]
    assert list(tmp_path.iterdir()) == []  # refused before any work


def test_the_studio_without_its_extra_names_the_studio_extra():
    proc = run_python_blocking(("PySide6", "shiboken6", "pyqtgraph"),
                               "from gemel_studio.cli import main\nsys.exit(main(['studio']))")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the studio needs the GUI extras ("), proc.stderr
    assert lines[0].endswith("is missing): pip install 'gemel-studio[studio]'")


# --- a checkpoint that needs full unpickling: one line, no library warnings first ---------------


@pytest.mark.parametrize("name", ["model.pkl", "model.pt"])
def test_a_full_pickle_checkpoint_is_refused_in_exactly_one_line(name, write_workload, tmp_path):
    """torch warns about the pickle protocol (two lines) before refusing; the user sees one."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / name
    if name.endswith(".pkl"):
        path.write_bytes(pickle.dumps(model, protocol=4))  # torch: 'Detected pickle protocol 4 ...'
    else:
        torch.save(model, path, pickle_protocol=5)  # the whole module, not its state_dict
    workload = write_workload([{"name": "legacy", "num_classes": 3,
                                "source": {"kind": "checkpoint", "architecture": "resnet18", "path": name}}])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # Python's default filters
    proc = subprocess.run([sys.executable, "-m", "gemel_studio.cli", "analyze", str(workload), "--json"],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"error: {path}: refused: this file needs full unpickling")
    assert proc.stdout == ""


# --- the sample workloads: package data, listed and copied by `gemel samples` ------------------


def test_samples_are_package_data_found_through_importlib_resources():
    from gemel_studio import samples
    from gemel_studio.cli import DEFAULT_WORKLOAD

    assert samples.sample_names() == sorted(p.stem for p in SAMPLES.glob("*.yaml"))
    assert DEFAULT_WORKLOAD == samples.DEFAULT_WORKLOAD == samples.sample_path("quickstart")
    assert DEFAULT_WORKLOAD.read_text() == (SAMPLES / "quickstart.yaml").read_text()


def test_gemel_samples_lists_and_copies(tmp_path, capsys):
    assert main(["samples"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"^quickstart +Four classifiers of synthetic shape scenes", out, re.M)
    assert all(re.search(rf"^{p.stem} ", out, re.M) for p in SAMPLES.glob("*.yaml"))

    assert main(["samples", "copy", "quickstart", "low", "--to", str(tmp_path / "new")]) == 0
    assert capsys.readouterr().out.splitlines() == [f"wrote {tmp_path / 'new' / 'quickstart.yaml'}",
                                                    f"wrote {tmp_path / 'new' / 'low.yaml'}"]
    assert (tmp_path / "new" / "low.yaml").read_bytes() == (SAMPLES / "low.yaml").read_bytes()

    (tmp_path / "new" / "quickstart.yaml").write_text("mine")
    assert main(["samples", "copy", "--to", str(tmp_path / "new")]) == 2  # all of them: one is there already
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {tmp_path / 'new' / 'low.yaml'}: already exists; pass --force to "
                   "overwrite it, or copy to another folder with --to DIR"]
    assert (tmp_path / "new" / "quickstart.yaml").read_text() == "mine"
    assert not (tmp_path / "new" / "high.yaml").exists()  # nothing written when one would be overwritten
    assert main(["samples", "copy", "--to", str(tmp_path / "new"), "--force"]) == 0
    assert sorted(p.name for p in (tmp_path / "new").iterdir()) == sorted(p.name for p in SAMPLES.glob("*.yaml"))

    assert main(["samples", "copy", "nope"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: no sample workload named 'nope'; the samples are")


# --- the wheel, installed into a fresh environment, run from another folder --------------------


def _run(cmd: list, cwd: Path, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return proc


STUDIO_SMOKE = """
import json, sys
from PySide6.QtCore import QTimer
from gemel_studio.ui import app
from gemel_studio.ui.main_window import MainWindow

qapp = app.make_app()
seen = {}
def poll():
    windows = [w for w in qapp.topLevelWidgets() if isinstance(w, MainWindow)]
    if windows and windows[0].analysis is not None:
        seen.update(workload=windows[0].workload.name, models=len(windows[0].analysis.models))
        qapp.quit()
timer = QTimer()
timer.timeout.connect(poll)
timer.start(100)
QTimer.singleShot(60000, qapp.quit)
rc = app.run_studio()  # the default workload, as `gemel-studio` opens it
print(json.dumps({"rc": rc, "default": str(app.DEFAULT_WORKLOAD), **seen}), flush=True)
"""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_the_wheel_installs_and_its_commands_work_outside_the_source_tree(tmp_path):
    # Build from a copy: setuptools writes build/ and *.egg-info next to the sources.
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    for name in ("gemel_studio", "resources", "sample_workloads"):
        shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONWARNINGS")}
    env.update(PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")
    pip = [sys.executable, "-m", "pip"]
    proc = _run([*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", tmp_path / "dist", src],
                tmp_path, env, timeout=180)
    assert proc.returncode == 0, proc.stderr
    wheel = next((tmp_path / "dist").glob("gemel_studio-*.whl"))

    # A fresh environment with the wheel alone; installed before the project's .venv is made
    # visible, so that pip sees no other gemel-studio it could replace.
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", venv], tmp_path, env).returncode == 0
    python = venv / "bin" / "python"
    proc = _run([*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel], tmp_path, env)
    assert proc.returncode == 0, proc.stderr
    # Dependencies (torch & co.) from the project's environment, without downloading them again:
    # a plain path line runs no .pth of that folder, so its editable finder stays out.
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     tmp_path, env).stdout.strip())
    assert site.is_relative_to(venv)
    (site / "gemel-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env.update(VIRTUAL_ENV=str(venv), PATH=f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}",
               XDG_CONFIG_HOME=str(tmp_path / "config"), HOME=str(tmp_path / "home"))
    proc = _run([python, "-c", "import gemel_studio, gemel_studio.resources as r, importlib.resources as ir; "
                 "print(gemel_studio.__file__); print(sorted(f.name for f in ir.files(r).iterdir()))"],
                elsewhere, env)
    assert proc.returncode == 0, proc.stderr
    where, resources = proc.stdout.splitlines()
    assert Path(where).is_relative_to(site), where  # the installed wheel, not the source tree
    assert "dark.qss" in resources

    gemel = venv / "bin" / "gemel"
    proc = _run([gemel, "samples"], elsewhere, env)
    assert proc.returncode == 0, proc.stderr
    assert sorted(re.findall(r"^(\w+)  ", proc.stdout, re.M)) == sorted(p.stem for p in SAMPLES.glob("*.yaml"))
    assert f"in {site / 'gemel_studio' / 'sample_workloads'};" in proc.stdout

    proc = _run([gemel, "samples", "copy", "quickstart", "--to", "mine"], elsewhere, env)
    assert proc.returncode == 0, proc.stderr
    proc = _run([gemel, "analyze", "mine/quickstart.yaml", "--json"], elsewhere, env)
    assert proc.returncode == 0, proc.stderr
    analysis = json.loads(proc.stdout)
    stated = re.search(r"bound ([\d,]+) bytes", (SAMPLES / "quickstart.yaml").read_text()).group(1)
    assert len(analysis["models"]) == 4 and analysis["max_savings_bytes"] == int(stated.replace(",", ""))

    studio = venv / "bin" / "gemel-studio"
    proc = _run([studio, "--help"], elsewhere, env)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: gemel studio"), proc.stderr
    headless = {k: v for k, v in env.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY", "QT_QPA_PLATFORM")}
    proc = _run([studio], elsewhere, headless)  # imports the studio (Qt and all), then finds no display
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "no display: run on a desktop, or under xvfb-run, or set QT_QPA_PLATFORM=offscreen"], proc.stderr
    # The real studio start, offscreen, on the default workload of the installed package.
    proc = _run([python, "-c", STUDIO_SMOKE], elsewhere, {**env, "QT_QPA_PLATFORM": "offscreen"}, timeout=120)
    assert proc.returncode == 0, proc.stderr
    smoke = json.loads(proc.stdout.strip().splitlines()[-1])
    assert smoke == {"rc": 0, "default": str(site / "gemel_studio" / "sample_workloads" / "quickstart.yaml"),
                     "workload": "quickstart", "models": 4}

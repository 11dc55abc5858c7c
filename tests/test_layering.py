"""Architecture rules: the core runs without Qt; only gemel_studio/ui imports PySide6/pyqtgraph."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

from .conftest import run_python_blocking

PACKAGE = Path(__file__).resolve().parent.parent / "gemel_studio"
QT = ("PySide6", "pyqtgraph", "shiboken6")


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


def test_no_qt_import_outside_ui():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "ui" not in p.relative_to(PACKAGE).parts[:1] and _imports(p) & set(QT)]
    assert offenders == []


def test_core_and_cli_work_with_qt_absent(tmp_path):
    """A fresh interpreter in which importing any Qt package fails, as on a headless box."""
    body = f"""
from gemel_studio.cli import main
rc = main(['analyze', {str(PACKAGE.parent / 'sample_workloads' / 'quickstart.yaml')!r}, '--json', '--compact'])
assert rc == 0, rc
assert not any(m.split('.')[0] in {QT!r} for m in sys.modules)
rc = main(['studio'])
assert rc == 2, rc
"""
    proc = run_python_blocking(QT, body)
    assert proc.returncode == 0, proc.stderr
    assert '"max_savings_bytes"' in proc.stdout
    assert "the studio needs the GUI extras" in proc.stderr


def test_runtime_imports_neither_merging_nor_ui_nor_qt():
    """The edge runtime installs without the GUI and without the merging code (DESIGN.md)."""
    script = """
import sys
import gemel_studio.runtime
import gemel_studio.runtime.bundle
import gemel_studio.runtime.engine
import gemel_studio.runtime.scheduler
import gemel_studio.runtime.sources
bad = sorted(m for m in sys.modules if m.split('.')[0] in ('PySide6', 'pyqtgraph', 'shiboken6')
             or m.startswith(('gemel_studio.merging', 'gemel_studio.ui', 'gemel_studio.export')))
print(bad)
assert not bad, bad
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_runtime_sources_do_not_import_merging_ui_or_export():
    offenders = []
    for p in (PACKAGE / "runtime").rglob("*.py"):
        tree = ast.parse(p.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                module = ("." * node.level) + (node.module or "")
                if any(part in ("merging", "ui", "export") for part in module.lstrip(".").split(".")[:2]) \
                        or module.startswith(("gemel_studio.merging", "gemel_studio.ui", "gemel_studio.export")):
                    offenders.append(f"{p.name}: {module}")
            elif isinstance(node, ast.Import):
                offenders += [f"{p.name}: {a.name}" for a in node.names
                              if a.name.startswith(("gemel_studio.merging", "gemel_studio.ui", "PySide6"))]
    assert offenders == []


def _lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` with the project's contracts (pyproject.toml), on the package under `root`."""
    exe = Path(sys.executable).with_name("lint-imports")
    return subprocess.run([str(exe), str(root / "pyproject.toml"), "--no-cache", "--no-logo"], cwd=root,
                          capture_output=True, text=True, timeout=300,
                          env={"PATH": str(exe.parent), "PYTHONPATH": str(root)})


def test_the_layering_contracts_hold_on_the_tree():
    proc = _lint_imports(PACKAGE.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert "Contracts: 4 kept, 0 broken." in proc.stdout


def test_the_linter_fails_on_a_runtime_module_that_imports_the_merging_code(tmp_path):
    """The contracts are not vacuous: one deliberate violation breaks two of them, named."""
    import shutil

    shutil.copytree(PACKAGE, tmp_path / "gemel_studio", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(PACKAGE.parent / "pyproject.toml", tmp_path / "pyproject.toml")
    sources = tmp_path / "gemel_studio" / "runtime" / "sources.py"
    sources.write_text(sources.read_text() + "\n\ndef _violation():\n    from ..merging import plan  # noqa\n")
    proc = _lint_imports(tmp_path)
    assert proc.returncode != 0
    assert "The edge runtime installs without the merging code, the exporter and the studio BROKEN" in proc.stdout
    assert "gemel_studio.runtime.sources -> gemel_studio.merging.plan" in proc.stdout
    assert "Contracts: 2 kept, 2 broken." in proc.stdout

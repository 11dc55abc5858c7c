"""What the studio remembers between runs (QSettings) and its themes (resources/*.qss).

Settings are always INI files in the user scope, so tests can point them at a temporary
folder with `QSettings.setPath(IniFormat, UserScope, folder)`. Every read has a default and
a type.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from PySide6.QtCore import QSettings

ORGANIZATION = "GEMEL Studio"
APPLICATION = "gemel-studio"
MAX_RECENT = 10
THEMES = ("dark", "light")
DEFAULT_THEME = "dark"


def studio_settings() -> QSettings:
    return QSettings(QSettings.Format.IniFormat, QSettings.Scope.UserScope, ORGANIZATION, APPLICATION)


def recent_files() -> list[Path]:
    values = studio_settings().value("recent_files", [], type=list) or []
    return [Path(v) for v in values if isinstance(v, str) and v]


def remember_file(path: Path) -> list[Path]:
    """Put `path` first in the recent-files list and return the new list."""
    path = Path(path).resolve()
    paths = [path] + [p for p in recent_files() if p != path]
    paths = paths[:MAX_RECENT]
    studio_settings().setValue("recent_files", [str(p) for p in paths])
    return paths


def forget_file(path: Path) -> None:
    path = Path(path).resolve()
    studio_settings().setValue("recent_files", [str(p) for p in recent_files() if p != path])


def ask_existing(parent, key: str, title: str, file_filter: str | None = None) -> str:
    """Ask for an existing folder (or, with `file_filter`, file), starting where the last answer
    under `key` was; remembers the answer's parent folder. '' when cancelled."""
    from PySide6.QtWidgets import QFileDialog

    start = studio_settings().value(key, "", type=str)
    if file_filter is None:
        chosen = QFileDialog.getExistingDirectory(parent, title, start)
    else:
        chosen, _ = QFileDialog.getOpenFileName(parent, title, start, file_filter)
    if chosen:
        studio_settings().setValue(key, str(Path(chosen).parent))
    return chosen


def saved_theme() -> str:
    theme = studio_settings().value("theme", DEFAULT_THEME, type=str)
    return theme if theme in THEMES else DEFAULT_THEME


def save_theme(theme: str) -> None:
    studio_settings().setValue("theme", theme)


def stylesheet(theme: str) -> str:
    return files("gemel_studio.resources").joinpath(f"{theme}.qss").read_text(encoding="utf-8")


# Colours the code draws with (plots, highlighted rows, matrix cells), per theme; `series`
# colours one curve per model, in the workload's order.
PALETTES = {
    "dark": {"background": "#1e1f22", "foreground": "#d7d9de", "axis": "#a0a4ab", "member": "#3d8fd6",
             "member_text": "#ffffff", "highlight": "#6b5216", "params": "#4e9ee8", "activations": "#e39a3b",
             "savings": "#58c27d", "bound": "#e05d5d", "grid": 60,
             "series": ("#4e9ee8", "#e39a3b", "#58c27d", "#d36bc6", "#e8d44d", "#45c4c4", "#e05d5d", "#a98ce8")},
    "light": {"background": "#ffffff", "foreground": "#1f2328", "axis": "#57606a", "member": "#2f7fc8",
              "member_text": "#ffffff", "highlight": "#ffe08a", "params": "#2f7fc8", "activations": "#d9822b",
              "savings": "#2f9e5a", "bound": "#c93c3c", "grid": 90,
              "series": ("#2f7fc8", "#d9822b", "#2f9e5a", "#b0479f", "#a08a00", "#1d9a9a", "#c93c3c", "#6f52c8")},
}

"""Tables whose less-read columns hide: some columns hidden by default, and a header context
menu that shows or hides any column, the choice kept in settings. The Retraining step log and
the run tables (Live preview, Monitor) use it so that they read whole in a narrow window."""

from __future__ import annotations

from PySide6.QtCore import Qt
from PySide6.QtWidgets import QMenu, QTableView

from . import settings

MENU_HINT = "(right-click the header to show or hide columns)"  # ends the headers' tooltips


def column_menu(view: QTableView, headers: tuple[str, ...], hidden: tuple[str, ...], key: str):
    """Columns `hidden` by default, and a header context menu that shows or hides any column;
    the columns hidden are kept in settings under `key`. A column shown again is fitted to its
    contents (its width while hidden is stale). Returns what builds the menu (a right-click on
    the header opens it), for a test to read."""
    header = view.horizontalHeader()
    chosen = settings.studio_settings().value(key, ",".join(hidden), type=str)
    for column, name in enumerate(headers):
        header.setSectionHidden(column, name in chosen.split(","))

    def toggle(column: int, shown: bool) -> None:
        header.setSectionHidden(column, not shown)
        if shown:
            view.resizeColumnToContents(column)
        settings.studio_settings().setValue(
            key, ",".join(h for c, h in enumerate(headers) if header.isSectionHidden(c)))

    def menu(pos) -> QMenu:
        m = QMenu(view)
        m.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        for column, name in enumerate(headers):
            action = m.addAction(name)
            action.setCheckable(True)
            action.setChecked(not header.isSectionHidden(column))
            # The last column shown stays: a table with no column cannot get its menu back.
            action.setEnabled(header.isSectionHidden(column) or header.hiddenSectionCount() < len(headers) - 1)
            action.toggled.connect(lambda shown, c=column: toggle(c, shown))
        return m

    header.setContextMenuPolicy(Qt.ContextMenuPolicy.CustomContextMenu)
    header.customContextMenuRequested.connect(lambda pos: menu(pos).popup(header.mapToGlobal(pos)))
    return menu


__all__ = ["MENU_HINT", "column_menu"]

"""The module tree: one anywidget that holds every row as data and draws them in the browser."""

from __future__ import annotations

import anywidget
import traitlets

from .rows import COLUMNS, FIELDS, TREE_CSS, TREE_JS, tree_rows

__all__ = ["COLUMNS", "FIELDS", "TreeWidget", "tree_rows"]


class TreeWidget(anywidget.AnyWidget):
    _esm = TREE_JS
    _css = TREE_CSS

    rows = traitlets.List().tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)
    marked = traitlets.Unicode(None, allow_none=True).tag(sync=True)  # the module the capture error is in
    expanded = traitlets.List().tag(sync=True)  # names open when the rows arrive
    column = traitlets.Enum(COLUMNS, "params").tag(sync=True)  # what the number column and its bars show
    sorted = traitlets.Bool(False).tag(sync=True)  # rows ordered by that number within their parent

    def __repr__(self) -> str:
        return f"TreeWidget({len(self.rows)} modules, selected={self.selected!r}, column={self.column!r})"

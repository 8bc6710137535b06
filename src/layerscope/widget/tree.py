"""The module tree: one anywidget that holds every row as data and draws them in the browser."""

from __future__ import annotations

import pathlib

import anywidget
import traitlets

from ..core import Capture
from ..core.records import human
from .text import ROOT_LABEL

_HERE = pathlib.Path(__file__).parent

# the fields of one row of TreeWidget.rows, in order
FIELDS = ("name", "label", "type", "params", "parent", "called", "errors", "warnings")


def tree_rows(cap: Capture, findings=None) -> list[list]:
    """One row per module in ``named_modules()`` order (parents before children), as short lists.

    ``errors``/``warnings`` count the findings (``cap.findings``, or ``findings``: a run's over time) and the
    capture error on a module and below it.
    """
    names = list(cap.modules)
    index = {name: i for i, name in enumerate(names)}
    errors, warnings = [0] * len(names), [0] * len(names)
    marks = [(f.module, f.severity) for f in (cap.findings if findings is None else findings)]
    if cap.error is not None and not any(severity == "error" for _, severity in marks):
        marks.append((cap.error.module, "error"))  # findings name the error already, when there are any
    for module, severity in marks:
        i = index.get(module)
        bucket = errors if severity == "error" else warnings if severity == "warning" else None
        if i is None or bucket is None:
            continue
        bucket[i] += 1
    parents = [index[r.parent] if r.parent is not None else -1 for r in cap.modules.values()]
    for i in range(len(names) - 1, 0, -1):  # children come after their parents: sum bottom-up
        errors[parents[i]] += errors[i]
        warnings[parents[i]] += warnings[i]
    rows = []
    for i, (name, report) in enumerate(cap.modules.items()):
        label = name.rpartition(".")[2] if name else ROOT_LABEL
        rows.append([name, label, report.type_name, human(report.num_params), parents[i], report.called,
                     errors[i], warnings[i]])
    return rows


class TreeWidget(anywidget.AnyWidget):
    _esm = _HERE / "tree.js"
    _css = _HERE / "tree.css"

    rows = traitlets.List().tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)
    marked = traitlets.Unicode(None, allow_none=True).tag(sync=True)  # the module the capture error is in
    expanded = traitlets.List().tag(sync=True)  # names open when the rows arrive

    def __repr__(self) -> str:
        return f"TreeWidget({len(self.rows)} modules, selected={self.selected!r})"

"""The module tree: one anywidget that holds every row as data and draws them in the browser."""

from __future__ import annotations

import pathlib

import anywidget
import traitlets

from ..core import Capture
from ..core.records import human, human_bytes
from .text import ROOT_LABEL

_HERE = pathlib.Path(__file__).parent

# the fields of one row of TreeWidget.rows, in order: the number column shows one of params, flops and memory
# (as text, with the value beside it for the bar and the sort; null when it was not counted)
FIELDS = ("name", "label", "type", "params", "parent", "called", "errors", "warnings", "params_value", "flops",
          "flops_value", "memory", "memory_value")
COLUMNS = ("params", "flops", "memory")  # parameters, forward FLOPs, activation memory (bytes saved for backward)


def tree_rows(cap: Capture) -> list[list]:
    """One row per module in ``named_modules()`` order (parents before children), as short lists.

    ``errors``/``warnings`` count the findings (and the capture error) on a module and below it.
    """
    names = list(cap.modules)
    index = {name: i for i, name in enumerate(names)}
    errors, warnings = [0] * len(names), [0] * len(names)
    marks = [(f.module, f.severity) for f in cap.findings]
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
        flops, memory = report.flops, report.activation_bytes
        rows.append([name, label, report.type_name, human(report.num_params), parents[i], report.called,
                     errors[i], warnings[i], report.num_params, None if flops is None else human(flops), flops,
                     None if memory is None else human_bytes(memory), memory])
    return rows


class TreeWidget(anywidget.AnyWidget):
    _esm = _HERE / "tree.js"
    _css = _HERE / "tree.css"

    rows = traitlets.List().tag(sync=True)
    selected = traitlets.Unicode("").tag(sync=True)
    marked = traitlets.Unicode(None, allow_none=True).tag(sync=True)  # the module the capture error is in
    expanded = traitlets.List().tag(sync=True)  # names open when the rows arrive
    column = traitlets.Enum(COLUMNS, "params").tag(sync=True)  # what the number column and its bars show
    sorted = traitlets.Bool(False).tag(sync=True)  # rows ordered by that number within their parent

    def __repr__(self) -> str:
        return f"TreeWidget({len(self.rows)} modules, selected={self.selected!r}, column={self.column!r})"

"""What the module tree shows, as plain data: one short list per module, and where the tree starts.

Pure Python on records: the notebook's tree widget and the HTML report both read it (no ipywidgets here)."""

from __future__ import annotations

import pathlib

from ..core import Capture
from ..core.records import human, human_bytes
from .text import ROOT_LABEL

# the tree's front end (an anywidget module: ``export default { render }``) and its style, shipped in the package
TREE_JS = pathlib.Path(__file__).with_name("tree.js")
TREE_CSS = pathlib.Path(__file__).with_name("tree.css")
# the fields of one row, in order (tree.js reads them by position): the number column shows one of params, flops
# and memory (as text, with the value beside it for the bar and the sort; null when it was not counted)
FIELDS = ("name", "label", "type", "params", "parent", "called", "errors", "warnings", "params_value", "flops",
          "flops_value", "memory", "memory_value", "infos")
COLUMNS = ("params", "flops", "memory")  # parameters, forward FLOPs, activation memory (bytes saved for backward)


def tree_rows(cap: Capture, findings=None) -> list[list]:
    """One row per module in ``named_modules()`` order (parents before children), as short lists.

    ``errors``/``warnings``/``infos`` count the findings (``cap.findings``, or ``findings``: a run's over time)
    and the capture error on a module and below it, each finding once: a grouped finding counts on every module
    it lists and once on the modules around them.
    """
    names = list(cap.modules)
    index = {name: i for i, name in enumerate(names)}
    parents = [index[r.parent] if r.parent is not None else -1 for r in cap.modules.values()]
    counts = {"error": [0] * len(names), "warning": [0] * len(names), "info": [0] * len(names)}
    marks = [(f.modules, f.severity) for f in (cap.findings if findings is None else findings)]
    if cap.error is not None and not any(severity == "error" for _, severity in marks):
        marks.append(((cap.error.module,), "error"))  # findings name the error already, when there are any
    for modules, severity in marks:
        bucket = counts.get(severity)
        if bucket is None:
            continue
        marked = set()
        for module in modules:
            i = index.get(module, -1)
            while i >= 0 and i not in marked:  # the module and the modules around it, each once
                marked.add(i)
                i = parents[i]
        for i in marked:
            bucket[i] += 1
    errors, warnings, infos = counts["error"], counts["warning"], counts["info"]
    rows = []
    for i, (name, report) in enumerate(cap.modules.items()):
        label = name.rpartition(".")[2] if name else ROOT_LABEL
        flops, memory = report.flops, report.activation_bytes
        rows.append([name, label, report.type_name, human(report.num_params), parents[i], report.called,
                     errors[i], warnings[i], report.num_params, None if flops is None else human(flops), flops,
                     None if memory is None else human_bytes(memory), memory, infos[i]])
    return rows


def start(cap: Capture, keep: str | None = None) -> tuple[str, list[str]]:
    """The module selected first (``keep`` if the capture has it, else the one the capture failed in, else the
    model) and the modules open around it (its ancestors; the model itself at least)."""
    if keep is not None and keep in cap.modules:
        name = keep
    elif cap.error is not None and cap.error.module in cap.modules:
        name = cap.error.module
    else:
        name = ""
    ancestors, up = [], cap[name].parent
    while up is not None:
        ancestors.append(up)
        up = cap[up].parent
    return name, ancestors[::-1] or [""]

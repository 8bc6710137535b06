"""A static view of a capture for places where widgets and scripts cannot run (a saved notebook on GitHub or
nbviewer): the module tree as nested lists and the findings, as plain escaped HTML with no script."""

from __future__ import annotations

import html

from ..core import Capture
from ..widget import rows, text

MAX_ROWS = 400  # modules listed: the tree is cut at the deepest level that keeps within this
MAX_FINDINGS = 100


def _depths(tree: list[list]) -> list[int]:
    depth = [0] * len(tree)
    for i, row in enumerate(tree):
        if row[4] >= 0:
            depth[i] = depth[row[4]] + 1
    return depth


def _item(row: list) -> str:
    _, label, type_name, params, _, called, errors, warnings = row[:8]
    infos = row[13] if len(row) > 13 else 0
    marks = [f"{n} {kind}{'s' * (n > 1)}" for n, kind in ((errors, "error"), (warnings, "warning"), (infos, "info"))
             if n]
    if not called:
        marks.append("never called")
    tail = f" ({', '.join(marks)})" if marks else ""
    return f"<code>{html.escape(label)}</code> {html.escape(type_name)} · {html.escape(params)}{html.escape(tail)}"


def _tree(cap: Capture) -> str:
    tree = rows.tree_rows(cap)
    depth = _depths(tree)
    deepest = max(depth)
    while deepest > 1 and sum(d <= deepest for d in depth) > MAX_ROWS:
        deepest -= 1
    shown = [(row, d) for row, d in zip(tree, depth) if d <= deepest]
    out, previous = ['<ul class="ls-static-tree">'], 0
    for k, (row, d) in enumerate(shown):
        if k and d > previous:
            out.append("<ul>")
        elif k:
            out.append("</li>" + "</ul></li>" * (previous - d))
        out.append(f"<li>{_item(row)}")
        previous = d
    out.append("</li>" + "</ul></li>" * previous + "</ul>")
    cut = len(tree) - len(shown)
    if cut:
        out.append(f"<p>{cut:,} modules deeper than level {deepest} are not listed.</p>")
    return "".join(out)


def _findings(cap: Capture) -> str:
    findings = cap.findings
    if not findings:
        return "<p>No findings: nothing in this pass looked wrong.</p>"
    items = "".join(f"<li>{html.escape(text.finding_line(f))}"
                    + (f"<br><i>{html.escape(f.fix)}</i>" if f.fix else "") + "</li>" for f in findings[:MAX_FINDINGS])
    more = f"<p>and {len(findings) - MAX_FINDINGS:,} more.</p>" if len(findings) > MAX_FINDINGS else ""
    n = len(findings)
    return f"<details open><summary>{n} finding{'s' * (n != 1)}</summary><ol>{items}</ol>{more}</details>"


def static_html(cap: Capture) -> str:
    """The tree and the findings of ``cap`` as HTML with no script (every string from the model escaped)."""
    root = cap.modules[""]
    lead = (f"<p><b>layerscope</b> · {html.escape(root.type_name)} · {len(cap.modules):,} modules · "
            f"{cap.total_params:,} parameters. A static copy of the inspector: run the cell for the "
            f"interactive view.</p>")
    banner = "" if cap.error is None else \
        f"<p><b>{html.escape(text.failed(cap.error))}</b> {html.escape(cap.error.message)}</p>"
    tree = f"<details open><summary>Module tree</summary>{_tree(cap)}</details>"
    return f'<div class="layerscope-static">{lead}{banner}{tree}{_findings(cap)}</div>'


# In JupyterLab and Notebook 7 (trusted outputs keep their style): the static copy hides while the output before it
# holds a live inspector, and hides that output while it holds none (a saved notebook reopened without a kernel
# shows "Error displaying widget: model not found" there).
FALLBACK_STYLE = (
    "<style>"
    ".jp-OutputArea-child:has(.layerscope-inspector) + .jp-OutputArea-child:has(.layerscope-static)"
    "{display:none}"
    ".jp-OutputArea-child:not(:has(.layerscope-inspector)):not(:has(.layerscope-static))"
    ":has(+ .jp-OutputArea-child .layerscope-static){display:none}"
    "</style>"
)


def notebook_fallback(cap: Capture) -> str:
    """The static view as the notebook output after the widget (see ``ModelInspector._ipython_display_``)."""
    return FALLBACK_STYLE + static_html(cap)

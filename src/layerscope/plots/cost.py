"""Where a module's FLOPs and activation memory go: one bar per submodule, side by side."""

from __future__ import annotations

from collections.abc import Sequence

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..core import Capture
from ..core.records import human, human_bytes
from ._common import figure

BAR, HIGHLIGHT = "#4C72B0", "#DD8452"
MAX_BARS = 16


def cost_parts(capture: Capture, module: str = "") -> tuple[str, list[tuple[str, str, int, int]]]:
    """The module whose parts are shown (``module``, its parent when it has no submodules, and from the model
    itself down through wrappers that hold one submodule and run nothing of their own) and, per part,
    (label, name, forward FLOPs, activation bytes): its submodules that cost anything, and '(own)' for the
    FLOPs of its own ops."""
    parent = module if capture[module].children else capture[module].parent or ""
    if not module:
        while len(capture[parent].children) == 1 and not capture[parent].own_flops:
            parent = capture[parent].children[0]
    top = capture[parent]
    parts = [("(own)", parent, top.own_flops or 0, 0)] if top.own_flops else []
    for child in top.children:
        r = capture[child]
        if r.flops or r.activation_bytes:
            parts.append((child.removeprefix(parent + ".") if parent else child, child, r.flops or 0,
                          r.activation_bytes or 0))
    return parent, sorted(parts, key=lambda p: (-p[2], -p[3]))


def cost_breakdown(capture: Capture, module: str = "", *, axes: Sequence[Axes] | None = None) -> Figure:
    """Two bar charts of ``module``'s parts (see ``cost_parts``): their forward FLOPs and the bytes they save
    for the backward, labelled in human units with their share of the module's total; ``module`` itself is
    highlighted when it is one of the parts. Parts beyond the largest few are summed into one bar. ``axes``:
    two axes to draw into (else a new figure)."""
    if capture.flops is None:
        raise ValueError("this capture has no costs: capture it with costs=True")
    parent, parts = cost_parts(capture, module)
    if len(parts) > MAX_BARS:
        rest = parts[MAX_BARS - 1:]
        parts = parts[:MAX_BARS - 1] + [(f"{len(rest)} others", "", sum(p[2] for p in rest),
                                         sum(p[3] for p in rest))]
    if axes is None:
        fig = figure(1.2 + 0.3 * max(3, len(parts)))
        axes = fig.subplots(1, 2, sharey=True)
    fig = axes[0].figure.figure
    top = capture[parent]
    labels = [label for label, *_ in parts]
    colors = [HIGHLIGHT if name == module and module != parent else BAR for _, name, *_ in parts]
    y = list(range(len(parts)))
    for ax, values, total, fmt, what in (
            (axes[0], [p[2] for p in parts], top.flops, human, "Forward FLOPs"),
            (axes[1], [p[3] for p in parts], top.activation_bytes, human_bytes, "Saved for backward")):
        ax.barh(y, values, color=colors)
        for i, n in enumerate(values):
            share = "" if not n or not total else f" ({n / total:.0%})" if n / total >= 0.005 else " (<1%)"
            ax.text(n, i, f" {fmt(n)}{share}", va="center", ha="left", fontsize=8)
        ax.set_xlim(0, max(values, default=0) * 1.35 or 1)
        ax.xaxis.set_major_formatter(lambda v, _, fmt=fmt: fmt(v))
        ax.tick_params(axis="x", labelsize=7)
        ax.spines[["top", "right"]].set_visible(False)
        known = "not counted" if total is None else fmt(total)
        ax.set_title(f"{what}: {known}", loc="left", fontsize=9)
    axes[0].set_yticks(y, labels, fontsize=8)
    axes[0].invert_yaxis()
    where = f" of {parent}" if parent else ""
    fig.suptitle(f"Where the cost{where} goes", x=0.01, ha="left", fontsize=10)
    return fig

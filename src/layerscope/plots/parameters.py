"""Where a model's parameters are: one bar per top-level block."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..core import Capture
from ..core.records import human
from ._common import axes_or_new

BAR = "#4C72B0"
FROZEN = "#A9B8D6"
MAX_BARS = 24


def parameter_blocks(capture: Capture) -> tuple[str, list[tuple[str, int, int]]]:
    """The module whose children are the top-level blocks (the root, or the innermost module reached
    through wrappers that hold a single child and nothing else), and (label, parameters, trainable)
    per block with parameters, parameters the block holds itself under the label '(own)'."""
    parent = ""
    while len(capture[parent].children) == 1 and not capture[parent].num_own_params:
        parent = capture[parent].children[0]
    top = capture[parent]
    if not top.children:
        return parent, [(top.type_name, top.num_params, top.num_trainable)]
    blocks = []
    if top.num_own_params:
        own_trainable = top.num_trainable - sum(capture[c].num_trainable for c in top.children)
        blocks.append(("(own)", top.num_own_params, min(top.num_own_params, max(0, own_trainable))))
    for child in top.children:
        report = capture[child]
        if report.num_params or not top.num_params:
            label = child.removeprefix(parent + ".") if parent else child
            blocks.append((label, report.num_params, report.num_trainable))
    return parent, blocks


def parameter_breakdown(capture: Capture, *, ax: Axes | None = None) -> Figure:
    """Horizontal bars of the parameter count of each top-level block (frozen ones in a lighter shade),
    labelled in human units with their share of the total. Blocks beyond the largest few are summed
    into one bar."""
    parent, blocks = parameter_blocks(capture)
    if len(blocks) > MAX_BARS:
        order = sorted(blocks, key=lambda b: -b[1])
        rest = order[MAX_BARS - 1 :]
        keep = {id(b) for b in order[: MAX_BARS - 1]}
        blocks = [b for b in blocks if id(b) in keep]
        blocks.append((f"{len(rest)} others", sum(b[1] for b in rest), sum(b[2] for b in rest)))
    fig, ax = axes_or_new(ax, 1.0 + 0.3 * max(3, len(blocks)))
    total = capture.total_params
    labels = [label for label, _, _ in blocks]
    trainable = [t for _, _, t in blocks]
    frozen = [n - t for _, n, t in blocks]
    y = list(range(len(blocks)))
    ax.barh(y, trainable, color=BAR, label="trainable")
    if any(frozen):
        ax.barh(y, frozen, left=trainable, color=FROZEN, label="frozen")
        ax.legend(fontsize=8, frameon=False, loc="lower right")
    for i, (_, n, _) in enumerate(blocks):
        share = "" if not n or not total else f" ({n / total:.0%})" if n / total >= 0.005 else " (<1%)"
        ax.text(n, i, f" {human(n)}{share}", va="center", ha="left", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(n for _, n, _ in blocks) * 1.25 or 1)
    ax.xaxis.set_major_formatter(lambda v, _: human(v))
    ax.spines[["top", "right"]].set_visible(False)
    shown = sum(n for _, n, _ in blocks)
    title = f"Parameters by block{f' of {parent}' if parent else ''}: {human(total)} total"
    if shown > total:
        title += f"\n(shared parameters counted in every block using them: bars sum to {human(shown)})"
    ax.set_title(title, loc="left", fontsize=10)
    return fig

"""The classic gradient-flow picture: the gradient norm of every layer with parameters, in execution order."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from ..core import Capture
from ..core.gradflow import flagged, layer_gradients, missing, owns
from ._common import axes_or_new

COLORS = {"normal": "#4C72B0", "vanishing_grad": "#DD8452", "exploding_grad": "#C03030"}
LABELS = {"normal": "gradient norm", "vanishing_grad": "vanishing", "exploding_grad": "exploding"}
MISSING = {
    "zero": ("zero gradient", "#C03030"),
    "nonfinite": ("NaN/Inf gradient", "#7A0000"),
    "none": ("no gradient", "0.45"),
    "frozen": ("frozen", "0.7"),
}
ROW = 0.17  # inches per labelled row: 9 pt names one above the other without touching
HEIGHT = (2.6, 9.0)  # inches: the figure grows with the layers up to this, then the labels are thinned


def label_rows(n: int, height: float, keep: list[int]) -> list[int]:
    """The rows that get a name: every ``step``-th so the names fit in ``height``, with the row nearest to
    ``keep[0]`` (the highlighted block's first layer) moved onto it."""
    fits = max(1, round((height - 1.4) / ROW))
    step = max(1, math.ceil(n / fits))
    rows = list(range(0, n, step))
    if keep and keep[0] not in rows:
        rows[min(range(len(rows)), key=lambda k: abs(rows[k] - keep[0]))] = keep[0]
    return sorted(rows)


def gradient_flow(capture: Capture, *, highlight: str | None = None, ax: Axes | None = None) -> Figure:
    """Per-layer gradient norms on a log axis, one row per layer in execution order from the top (module names
    on the y axis, thinned on large models). Layers named by vanishing/exploding findings are coloured, layers
    whose gradient is zero, missing or frozen are marked at the left edge, and ``highlight`` (a module name, or
    a block containing several layers) is shaded and named."""
    layers = layer_gradients(capture) if capture.backward else []
    height = min(max(HEIGHT[0], 1.4 + ROW * len(layers)), HEIGHT[1])
    fig, ax = axes_or_new(ax, height if layers else 2.6)
    ax.set_title("Gradient flow" + (f" (loss: {capture.loss_kind})" if capture.loss_kind else ""), loc="left")
    if not layers:
        why = "no layer with parameters was called" if capture.backward else "no gradients were computed"
        if capture.error is not None:
            why += f": {capture.error.message}"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_axis_off()
        return fig
    kind_of = flagged(capture, [name for name, _, _ in layers])
    y = np.arange(len(layers))
    norms = np.array([np.nan if n is None else n for _, n, _ in layers])
    positive = (norms > 0) & np.isfinite(norms)
    shown = norms[positive]
    lo, hi = (shown.min() / 3, shown.max() * 3) if len(shown) else (1e-8, 1)  # at least a decade
    kinds = [kind_of.get(name, "normal") for name, _, _ in layers]
    colours = [COLORS[k] for k, p in zip(kinds, positive) if p]
    ax.hlines(y[positive], lo, shown, colors=colours, linewidth=2, alpha=0.45, zorder=1)
    ax.scatter(shown, y[positive], c=colours, s=24, zorder=2)
    ax.set_xscale("log")
    ax.set_xlim(lo, hi)
    handles = [Line2D([], [], color=COLORS[k], marker="o", linestyle="", label=LABELS[k])
               for k in COLORS if k in {k for k, p in zip(kinds, positive) if p}]
    marks: dict[str, list[int]] = {}
    for i, (_, norm, frozen) in enumerate(layers):
        why = missing(norm, frozen)
        if why is not None:
            marks.setdefault(why, []).append(i)
    for key, where in marks.items():
        label, color = MISSING[key]
        ax.scatter([0.015] * len(where), where, marker="x", color=color, transform=ax.get_yaxis_transform(),
                   s=36, zorder=3, clip_on=False)
        handles.append(Line2D([], [], color=color, marker="x", linestyle="", label=label))
    inside = [i for i, (name, _, _) in enumerate(layers) if highlight is not None and owns(highlight, name)]
    if inside:
        ax.axhspan(min(inside) - 0.5, max(inside) + 0.5, color="#F2C14E", alpha=0.35, zorder=0, linewidth=0)
    ticks = label_rows(len(layers), height, inside)
    ax.set_yticks(ticks, [layers[i][0] or "<root>" for i in ticks], fontsize=9)
    ax.set_ylim(len(layers) - 0.5, -0.5)  # the first layer on top
    ax.set_xlabel("L2 norm of the layer's parameter gradients (log scale)")
    ax.grid(axis="x", which="major", color="0.9")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles, fontsize=9, loc="lower right", bbox_to_anchor=(1, 1), ncols=len(handles),
              frameon=False, borderaxespad=0.2)
    return fig

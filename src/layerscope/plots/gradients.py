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
MAX_LABELS = 48


def gradient_flow(capture: Capture, *, highlight: str | None = None, ax: Axes | None = None) -> Figure:
    """Per-layer gradient norms on a log axis, in execution order. Layers named by vanishing/exploding
    findings are coloured, layers whose gradient is zero, missing or frozen are marked at the bottom,
    and ``highlight`` (a module name, or a block containing several layers) is shaded."""
    layers = layer_gradients(capture) if capture.backward else []
    fig, ax = axes_or_new(ax, 3.8)
    ax.set_title("Gradient flow" + (f" (loss: {capture.loss_kind})" if capture.loss_kind else ""), loc="left")
    if not layers:
        why = "no layer with parameters was called" if capture.backward else "no gradients were computed"
        if capture.error is not None:
            why += f": {capture.error.message}"
        ax.text(0.5, 0.5, why, ha="center", va="center", transform=ax.transAxes, wrap=True)
        ax.set_axis_off()
        return fig
    kind_of = flagged(capture, [name for name, _, _ in layers])
    x = np.arange(len(layers))
    norms = np.array([np.nan if n is None else n for _, n, _ in layers])
    positive = (norms > 0) & np.isfinite(norms)
    ax.plot(x[positive], norms[positive], color="0.75", linewidth=1, zorder=1)
    kinds = [kind_of.get(name, "normal") for name, _, _ in layers]
    ax.scatter(x[positive], norms[positive], c=[COLORS[k] for k, p in zip(kinds, positive) if p], s=28, zorder=2)
    ax.set_yscale("log")
    shown = norms[positive]
    ax.set_ylim(*((shown.min() / 3, shown.max() * 3) if len(shown) else (1e-8, 1)))  # at least a decade
    handles = [Line2D([], [], color=COLORS[k], marker="o", linestyle="", label=LABELS[k])
               for k in COLORS if k in {k for k, p in zip(kinds, positive) if p}]
    marks: dict[str, list[int]] = {}
    for i, (_, norm, frozen) in enumerate(layers):
        why = missing(norm, frozen)
        if why is not None:
            marks.setdefault(why, []).append(i)
    for key, where in marks.items():
        label, color = MISSING[key]
        ax.scatter(where, [0.03] * len(where), marker="x", color=color, transform=ax.get_xaxis_transform(),
                   s=36, zorder=3, clip_on=False)
        handles.append(Line2D([], [], color=color, marker="x", linestyle="", label=label))
    if highlight is not None:
        inside = [i for i, (name, _, _) in enumerate(layers) if owns(highlight, name)]
        if inside:
            ax.axvspan(min(inside) - 0.5, max(inside) + 0.5, color="#F2C14E", alpha=0.35, zorder=0, linewidth=0)
    step = max(1, math.ceil(len(layers) / MAX_LABELS))
    ax.set_xticks(x[::step], [name or "<root>" for name, _, _ in layers[::step]], rotation=90, fontsize=7)
    ax.set_xlim(-0.5, len(layers) - 0.5)
    ax.set_ylabel("L2 norm of the layer's\nparameter gradients")
    ax.grid(axis="y", which="major", color="0.9")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles, fontsize=8, loc="best", frameon=False)
    return fig

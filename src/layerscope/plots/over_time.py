"""A module over the sampled steps of a watched run: its activation histograms as a heatmap (the "colorful
dimension" picture, signed values too), its output statistics, gradient norms and update ratio."""

from __future__ import annotations

import math

import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from ..core import Run
from ._common import axes_or_new, figure

CURSOR = "#C03030"
LINES = {"mean": "#4C72B0", "std": "#DD8452", "zero_fraction": "#55A868", "grad_norm": "#4C72B0",
         "output_grad_norm": "#8172B3", "update_ratio": "#C44E52"}
MAX_TICKS = 12
WIDE = 12.0  # inches: the scalars span the whole inspector


def _ticks(ax: Axes, steps: np.ndarray, offset: float = 0.0) -> None:
    """Label the columns 0..n-1 (their centres at i + offset) with their step numbers, at most MAX_TICKS."""
    every = max(1, math.ceil(len(steps) / MAX_TICKS))
    where = np.arange(0, len(steps), every)
    ax.set_xticks(where + offset, [str(s) for s in steps[where]], rotation=0, fontsize=8)


def _cursor(ax: Axes, steps: np.ndarray, step: int | None, offset: float = 0.0) -> None:
    if step is not None and len(steps):
        i = int(np.argmin(np.abs(steps - step)))
        ax.axvline(i + offset, color=CURSOR, linewidth=1.2, alpha=0.8, zorder=5)


def _empty(ax: Axes, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)
    ax.set_axis_off()


def activation_heatmap(run: Run, module: str, *, step: int | None = None, ax: Axes | None = None) -> Figure:
    """The histogram of ``module``'s output at each sampled step as one column (step numbers below, values on
    the run's fixed edges upwards), coloured by the share of the step's values in each bin on a log scale.
    Values beyond the edges fill the top and bottom rows ("> last edge", "< first edge"); the cursor marks
    ``step``."""
    fig, ax = axes_or_new(ax, 3.2)
    steps, edges, counts, under, over = run.histograms(module)
    ax.set_title(f"Output values over the steps: {module or 'the model'}", loc="left", fontsize=10)
    if not len(steps):
        _empty(ax, "no histogram: the module has not run in a sampled step, or has no floating-point output")
        return fig
    table = np.column_stack([under, counts, over]).astype(np.float64)  # [steps, bins + 2], low to high
    totals = table.sum(axis=1, keepdims=True)
    shares = np.divide(table, totals, out=np.zeros_like(table), where=totals > 0).T[::-1]  # high values on top
    sns.heatmap(shares, ax=ax, cmap="magma", norm=LogNorm(vmin=1e-4, vmax=1.0), mask=shares <= 0,
                cbar_kws={"label": "share of values", "pad": 0.01}, xticklabels=False, yticklabels=False)
    ax.set_facecolor("black")
    bins = len(edges) - 1
    y = lambda v: 1 + bins * (edges[-1] - v) / (edges[-1] - edges[0])  # rows: over, the bins from the top, under
    ticks = [(0.5, f"> {edges[-1]:.3g}"), (bins + 1.5, f"< {edges[0]:.3g}")]
    middle = 0.0 if edges[0] < 0 < edges[-1] else (edges[0] + edges[-1]) / 2
    ticks.insert(1, (y(middle), f"{middle:.3g}"))
    if middle == 0.0:
        ax.axhline(y(0.0), color="white", linewidth=0.6, alpha=0.5)
    ax.set_yticks([t for t, _ in ticks], [label for _, label in ticks], fontsize=8, rotation=0)
    _ticks(ax, steps, offset=0.5)
    _cursor(ax, steps, step, offset=0.5)
    ax.set_xlabel("step")
    return fig


def _line(ax: Axes, steps: np.ndarray, values: np.ndarray, label: str, color: str, log: bool = False) -> bool:
    """Values over the columns; on a log axis, exact zeros are marked with an x at the bottom."""
    ok = np.isfinite(values) & ((values > 0) if log else True)
    x = np.arange(len(steps))
    if log and np.any(values == 0):
        ax.scatter(x[values == 0], [0.03] * int(np.sum(values == 0)), marker="x", s=14, color=color,
                   transform=ax.get_xaxis_transform(), clip_on=False, label=f"{label}: exactly 0")
    if not ok.any():
        return bool(log and np.any(values == 0))
    ax.plot(x[ok], values[ok], marker="o", markersize=2.5, linewidth=1.2, color=color, label=label)
    return True


def module_over_time(run: Run, module: str, *, step: int | None = None) -> Figure:
    """Four panels over the sampled steps, one column per step: the activation heatmap, the output's mean and
    standard deviation with its share of zeros, the gradient norms (of its own parameters, of its output) and
    the update ratio ||w after - w before|| / ||w|| with the usual 1e-3 marked. The cursor marks ``step``."""
    fig = figure(8.6)
    heat, stats, grads, updates = fig.subplots(4, 1, gridspec_kw={"height_ratios": [3, 2, 2, 2]})
    activation_heatmap(run, module, step=step, ax=heat)
    series = {field: run.series(module, field) for field in
              ("mean", "std", "zero_fraction", "grad_norm", "output_grad_norm", "update_ratio")}
    steps = series["mean"][0]
    if not len(steps):
        for ax in (stats, grads, updates):
            ax.set_axis_off()
        return fig
    _line(stats, steps, series["mean"][1], "mean", LINES["mean"])
    _line(stats, steps, series["std"][1], "std", LINES["std"])
    stats.set_title("Output statistics", loc="left", fontsize=10)
    zeros = stats.twinx()
    _line(zeros, steps, series["zero_fraction"][1], "share of zeros", LINES["zero_fraction"])
    zeros.set_ylim(-0.02, 1.02)
    zeros.set_ylabel("share of zeros", fontsize=8, color=LINES["zero_fraction"])
    handles = [*stats.get_legend_handles_labels()[0], *zeros.get_legend_handles_labels()[0]]
    if handles:
        stats.legend(handles=handles, fontsize=7, loc="upper left", frameon=False, ncols=3)
    drawn = [_line(grads, steps, series[f][1], label, LINES[f], log=True) for f, label in
             (("grad_norm", "parameters' gradient"), ("output_grad_norm", "output's gradient"))]
    grads.set_title("Gradient norms", loc="left", fontsize=10)
    if any(drawn):
        if any(line.get_xydata().size for line in grads.get_lines()):
            grads.set_yscale("log")
        grads.legend(fontsize=7, loc="upper left", frameon=False, ncols=2)
    else:
        grads.text(0.5, 0.5, "no gradients recorded", ha="center", va="center", transform=grads.transAxes)
    updates.set_title("Update ratio ||Δw|| / ||w||", loc="left", fontsize=10)
    if _line(updates, steps, series["update_ratio"][1], "update ratio", LINES["update_ratio"], log=True):
        if updates.get_lines():
            updates.set_yscale("log")
        updates.axhline(1e-3, color="0.5", linestyle="--", linewidth=0.8)
        updates.text(0.995, 1e-3, "1e-3", transform=updates.get_yaxis_transform(), ha="right", va="bottom",
                     fontsize=7, color="0.4")
    else:
        updates.text(0.5, 0.5, "no update recorded (no optimizer, or no parameters of its own)", ha="center",
                     va="center", transform=updates.transAxes)
    for ax in (stats, grads, updates):
        ax.set_xlim(-0.5, len(steps) - 0.5)
        _ticks(ax, steps)
        _cursor(ax, steps, step)
        ax.spines[["top"]].set_visible(False)
        ax.tick_params(labelsize=8)
    updates.set_xlabel("step")
    return fig


def scalars_over_time(run: Run, names=None, *, step: int | None = None, ax: Axes | None = None) -> Figure:
    """The logged scalars over every step (the loss first), one panel each (at most four), with the cursor at
    ``step``. A positive scalar spanning more than two orders of magnitude gets a log axis."""
    names = [n for n in (names if names is not None else run.scalar_names)]
    names = sorted(names, key=lambda n: n != "loss")[:4]
    if ax is not None or len(names) <= 1:
        fig, ax = axes_or_new(ax, 1.8, WIDE)
        axes = [ax]
    else:
        fig = figure(0.4 + 1.2 * len(names), WIDE)
        axes = list(fig.subplots(len(names), 1, sharex=True))
    if not names:
        _empty(axes[0], "nothing logged yet: run.log(loss=loss) in the loop")
        return fig
    for ax, name in zip(axes, names):
        steps, values = run.scalars(name)
        ok = np.isfinite(values)
        ax.plot(steps[ok], values[ok], linewidth=1.0, color="#4C72B0")
        bad = steps[~ok]
        if len(bad):
            ax.scatter(bad, [0.02] * len(bad), marker="x", color=CURSOR, transform=ax.get_xaxis_transform(), s=16,
                       clip_on=False, label="NaN/Inf")
            ax.legend(fontsize=7, frameon=False, loc="upper right")
        shown = values[ok]
        if len(shown) and shown.min() > 0 and shown.max() / shown.min() > 100:
            ax.set_yscale("log")
        ax.set_ylabel(name, fontsize=9)
        ax.spines[["top", "right"]].set_visible(False)
        ax.tick_params(labelsize=8)
        if step is not None:
            ax.axvline(step, color=CURSOR, linewidth=1.0, alpha=0.8)
    axes[-1].set_xlabel("step")
    return fig

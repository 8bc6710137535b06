"""The distribution of one call's output values."""

from __future__ import annotations

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..core import CallRecord
from ._common import axes_or_new

BAR = "#4C72B0"
WARN = "#C03030"


def _shape(call_record: CallRecord) -> str:
    shape = call_record.output_shapes
    if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape):
        return " x ".join(map(str, shape)) or "scalar"
    return ""


def activation_histogram(call_record: CallRecord, *, title: str | None = None, ax: Axes | None = None) -> Figure:
    """Bars of the recorded histogram of a call's first floating-point output, with mean, std, min,
    max and the share of exact zeros written on the plot, and any NaN/Inf count in red."""
    fig, ax = axes_or_new(ax, 3.2)
    stats, hist = call_record.stats, call_record.histogram
    shape = _shape(call_record)
    ax.set_title(title if title is not None else f"Output values ({shape})" if shape else "Output values", loc="left")
    if stats is None or hist is None:
        ax.text(0.5, 0.5, "no floating-point output to show", ha="center", va="center", transform=ax.transAxes)
        ax.set_axis_off()
        return fig
    edges = hist.edges
    ax.bar(edges[:-1], hist.counts, width=edges[1:] - edges[:-1], align="edge", color=BAR, linewidth=0)
    ax.set_xlim(edges[0], edges[-1])
    ax.set_xlabel("value")
    ax.set_ylabel("count")
    ax.spines[["top", "right"]].set_visible(False)
    zeros = f"{stats.zero_fraction:.1%}" if stats.exact else f"≈{stats.zero_fraction:.1%} (sampled)"
    lines = [
        f"mean {stats.mean:.4g}",
        f"std {stats.std:.4g}",
        f"min {stats.min:.4g}",
        f"max {stats.max:.4g}",
        f"zeros {zeros}",
    ]
    if hist.sampled < stats.numel - stats.nan_count - stats.inf_count:
        lines.append(f"sampled {hist.sampled:,} of {stats.numel:,} values")
    if hist.rebinned:
        lines.append("bins merged across ranks (approx.)")
    # beside the bars, not over them (constrained layout makes room for it)
    ax.text(1.02, 1.0, "\n".join(lines), ha="left", va="top", transform=ax.transAxes, fontsize=10,
            linespacing=1.5, bbox=dict(boxstyle="round", facecolor="white", edgecolor="0.8"))
    if not stats.finite:
        bad = [f"{n:,} {kind}" for n, kind in ((stats.nan_count, "NaN"), (stats.inf_count, "Inf")) if n]
        ax.text(1.0, 1.02, " and ".join(bad) + " values (not binned)", ha="right", va="bottom", transform=ax.transAxes,
                color=WARN, fontsize=10, fontweight="bold")
    return fig

"""The channels of one call's 4-D output (item 0), as a grid of images on one colour scale."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ..core import CallRecord
from ._common import WIDTH, axes_or_new, grid_shape, mosaic, to_numpy

COLS = 8


def feature_maps(call_record: CallRecord, max_channels: int = 16, *, ax: Axes | None = None) -> Figure:
    """The first ``max_channels`` recorded channels of a call's output for the batch's first item, as
    one mosaic with a shared colour scale (diverging around zero when values have both signs) and a colorbar."""
    if call_record.feature_maps is None:
        raise ValueError("this call recorded no feature maps (its output is not a 4-D tensor, or capture() "
                         "ran with feature_maps=False)")
    maps = to_numpy(call_record.feature_maps, "feature_maps")[:max_channels]
    rows, cols = grid_shape(len(maps), COLS)
    h, w = maps.shape[1:]
    fig, ax = axes_or_new(ax, min(10.0, 0.5 + (WIDTH - 1) * rows * h / (cols * w)))
    image, corners = mosaic(list(maps), cols, gap=max(1, round(max(h, w) / 16)))
    lo, hi = float(np.nanmin(maps)), float(np.nanmax(maps))
    if lo < 0 < hi:
        bound = max(-lo, hi)
        cmap, lo, hi = colormaps["RdBu_r"], -bound, bound
    else:
        cmap = colormaps["viridis"]
    if lo == hi:
        lo, hi = lo - 0.5, hi + 0.5
    shown = ax.imshow(image, cmap=cmap.with_extremes(bad=(0, 0, 0, 0)), vmin=lo, vmax=hi, interpolation="nearest")
    for i, (top, left) in enumerate(corners if min(h, w) >= 8 else ()):
        ax.text(left, top, str(i), ha="left", va="top", fontsize=7, color="black",
                bbox=dict(boxstyle="square,pad=0.1", facecolor="white", alpha=0.7, linewidth=0))
    ax.set_axis_off()
    fig.colorbar(shown, ax=ax, shrink=0.9, pad=0.01)
    ax.set_title(_title(call_record, len(maps), h, w), loc="left", fontsize=10)
    return fig


def _title(call_record: CallRecord, shown: int, h: int, w: int) -> str:
    shape = call_record.output_shapes
    text = f"Channels 0–{shown - 1}"
    if isinstance(shape, tuple) and len(shape) == 4 and all(isinstance(d, int) for d in shape):
        text += f" of {shape[1]}, item 0"
        if (shape[2], shape[3]) != (h, w):
            text += f" (averaged from {shape[2]}x{shape[3]} to {h}x{w})"
    return text

"""The weights of a convolution (typically the first layer), one small tile per filter."""

from __future__ import annotations

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from torch import nn

from ._common import WIDTH, axes_or_new, grid_shape, mosaic, to_numpy


def conv_filters(module: nn.Module, *, max_tiles: int = 64, ax: Axes | None = None) -> Figure:
    """Each filter of a 2-D convolution as an RGB tile when it has 3 input channels, otherwise each
    (filter, input channel) pair as a grey tile, one row per filter. All tiles share one scale centred
    on zero (mid-grey is 0), so tiles compare by strength as well as pattern."""
    weight = getattr(module, "weight", None)
    if weight is None or weight.dim() != 4:
        raise ValueError(f"conv_filters needs a module with a 4-D weight (a Conv2d), got {type(module).__name__}")
    w = to_numpy(weight, "weight")
    out_ch, in_ch, kh, kw = w.shape
    bound = float(np.abs(w).max()) or 1.0
    if in_ch == 3:
        tiles = list(w[:max_tiles].transpose(0, 2, 3, 1) / (2 * bound) + 0.5)
        rows, cols = grid_shape(len(tiles), 16)
        what = f"{len(tiles)} of {out_ch} filters (RGB)"
    else:
        per_row = 1 if in_ch == 1 else min(in_ch, 16)
        filters = max(1, max_tiles // per_row)
        tiles = [w[f, c] for f in range(min(out_ch, filters)) for c in range(per_row)]
        rows, cols = grid_shape(len(tiles), 16 if in_ch == 1 else per_row)
        what = f"{min(out_ch, filters)} of {out_ch} filters" + (
            f", input channels 0–{per_row - 1} of {in_ch} (one row per filter)" if in_ch > 1 else "")
    image, _ = mosaic(tiles, cols)
    fig, ax = axes_or_new(ax, min(10.0, 0.8 + WIDTH * rows * kh / (cols * kw) * 0.9))
    if in_ch == 3:
        alpha = ~np.isnan(image[..., :1])
        ax.imshow(np.concatenate([np.nan_to_num(image), alpha], axis=-1), interpolation="nearest")
    else:
        grey = colormaps["gray"].with_extremes(bad=(0, 0, 0, 0))
        shown = ax.imshow(image, cmap=grey, vmin=-bound, vmax=bound, interpolation="nearest")
        fig.colorbar(shown, ax=ax, shrink=0.8, pad=0.01)
    ax.set_axis_off()
    ax.set_title(f"{type(module).__name__} weights {kh}x{kw}: {what}", loc="left", fontsize=10)
    return fig

"""Helpers shared by the plot functions: figures that pyplot does not track, arrays, tiles, units."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure

WIDTH = 8.0  # inches: the width of a notebook cell


def figure(height: float, width: float = WIDTH) -> Figure:
    """A new Figure that pyplot does not know about: nothing to close, nothing left in plt's state."""
    return Figure(figsize=(width, height), layout="constrained")


def axes_or_new(ax: Axes | None, height: float, width: float = WIDTH) -> tuple[Figure, Axes]:
    """The caller's axes and its (root) figure, or one new axes in a new figure."""
    if ax is not None:
        return ax.figure.figure, ax
    fig = figure(height, width)
    return fig, fig.add_subplot()


def to_numpy(x, what: str) -> np.ndarray:
    """A float64 numpy copy of a tensor or array-like (detached, on the CPU)."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    a = np.asarray(x, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"{what} is empty")
    return a


def grid_shape(n: int, max_cols: int) -> tuple[int, int]:
    cols = max(1, min(n, max_cols))
    return math.ceil(n / cols), cols


def mosaic(tiles: Sequence[np.ndarray], cols: int, gap: int = 1) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Tiles of equal shape [h, w] or [h, w, c] laid out in rows of ``cols`` on a NaN background
    (drawn transparent), ``gap`` pixels apart. Returns the mosaic and each tile's top-left (row, col)."""
    h, w = tiles[0].shape[:2]
    rows = math.ceil(len(tiles) / cols)
    shape = (rows * (h + gap) - gap, cols * (w + gap) - gap, *tiles[0].shape[2:])
    out = np.full(shape, np.nan)
    corners = []
    for i, tile in enumerate(tiles):
        r, c = divmod(i, cols)
        top, left = r * (h + gap), c * (w + gap)
        out[top : top + h, left : left + w] = tile
        corners.append((top, left))
    return out, corners


def image_hwc(image, what: str = "image") -> np.ndarray:
    """An image as [H, W, C] (C is 1 or 3) from [C, H, W], [H, W, C], [H, W] or a batch [N, ...] (item 0)."""
    a = to_numpy(image, what)
    if a.ndim == 4:
        a = a[0]
    if a.ndim == 2:
        a = a[:, :, None]
    if a.ndim != 3:
        raise ValueError(f"{what} must have shape [C, H, W], [H, W, C] or [H, W], got {a.shape}")
    if a.shape[0] in (1, 3) and a.shape[-1] not in (1, 3):
        a = a.transpose(1, 2, 0)
    if a.shape[-1] not in (1, 3):
        raise ValueError(f"{what} must have 1 or 3 channels, got shape {a.shape}")
    return a

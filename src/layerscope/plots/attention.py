"""Attention weights as query x key heatmaps, and token relevance over a ViT's image patches."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._common import WIDTH, axes_or_new, figure, grid_shape, to_numpy
from .cam import display_image, overlay, resized

MAX_TICKS = 32  # tick labels per axis of one heatmap
MAX_TICKS_SMALL = 8  # per axis of one small multiple
HEAD_COLS = 4


def _weights(weights) -> np.ndarray:
    """[heads, Lq, Lk] from [Lq, Lk], [heads, Lq, Lk] or [N, heads, Lq, Lk] (item 0)."""
    w = to_numpy(weights, "weights")
    if w.ndim == 4:
        w = w[0]
    if w.ndim == 2:
        w = w[None]
    if w.ndim != 3:
        raise ValueError(f"weights must have shape [heads, Lq, Lk] or [N, heads, Lq, Lk], got {w.shape}")
    return w


def _label_axis(set_ticks, labels: Sequence[str], show: bool, most: int, **text) -> None:
    step = max(1, math.ceil(len(labels) / most))
    positions = np.arange(0, len(labels), step)
    set_ticks(positions + 0.5, [str(labels[i]) for i in positions] if show else [], **text)


def _draw(ax: Axes, w: np.ndarray, tokens: Sequence[str], vmax: float, single: bool, x: bool, y: bool) -> None:
    sns.heatmap(w, ax=ax, vmin=0, vmax=vmax, cmap="rocket", square=w.shape[0] == w.shape[1], cbar=single,
                xticklabels=False, yticklabels=False, cbar_kws={"shrink": 0.8} if single else None)
    keys = tokens[: w.shape[1]]
    size = 8 if max(w.shape) <= 16 else 6
    upright = len(keys) <= 12 and max(len(str(t)) for t in keys) <= 6
    most = MAX_TICKS if single else MAX_TICKS_SMALL
    _label_axis(ax.set_xticks, keys, x, most, fontsize=size, rotation=0 if upright else 90)
    _label_axis(ax.set_yticks, tokens[: w.shape[0]], y, most, fontsize=size, rotation=0)


def attention_heatmap(weights, tokens: Sequence[str] | None = None, head: int | None = None, *,
                      ax: Axes | None = None) -> Figure:
    """Attention weights (query rows, key columns) as a seaborn heatmap labelled with ``tokens``.
    ``weights`` is [heads, Lq, Lk] or [N, heads, Lq, Lk] (item 0), as from ``attention_maps``. With
    ``head`` one head is drawn; with ``head=None`` every head as small multiples on one colour scale
    (or, given a single ``ax``, their mean)."""
    w = _weights(weights)
    heads, lq, lk = w.shape
    labels = list(tokens) if tokens is not None else [str(i) for i in range(max(lq, lk))]
    if len(labels) < max(lq, lk):
        raise ValueError(f"got {len(labels)} tokens for {max(lq, lk)} positions")
    if head is not None or ax is not None or heads == 1:
        if head is not None and not -heads <= head < heads:
            raise ValueError(f"head {head} does not exist: the weights have {heads} heads")
        shown = w[head] if head is not None else w.mean(axis=0)
        title = f"head {head % heads}" if head is not None else "attention" if heads == 1 else f"mean of {heads} heads"
        fig, ax = axes_or_new(ax, min(WIDTH, 1.2 + 4.5 * lq / lk), min(WIDTH, 2.0 + 4.5 * lk / lq))
        _draw(ax, shown, labels, float(shown.max()) or 1.0, True, True, True)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        ax.set_title(title, loc="left", fontsize=10)
        return fig
    rows, cols = grid_shape(heads, HEAD_COLS)
    fig = figure(min(3 * WIDTH, 0.6 + rows * (WIDTH - 0.6) / cols * lq / lk))
    grid = fig.subplots(rows, cols, squeeze=False)
    vmax = float(w.max()) or 1.0
    for i, ax in enumerate(grid.flat):
        if i >= heads:
            ax.set_visible(False)
            continue
        r, c = divmod(i, cols)
        _draw(ax, w[i], labels, vmax, False, r == rows - 1 or i + cols >= heads, c == 0)
        ax.set_title(f"head {i}", fontsize=9)
    fig.colorbar(grid.flat[0].collections[0], ax=grid, shrink=0.6, pad=0.01, label="attention weight")
    fig.supxlabel("key", fontsize=10)
    fig.supylabel("query", fontsize=10)
    return fig


def attention_rollout_overlay(image, relevance, grid: tuple[int, int] | None = None,
                              mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                              alpha: float = 0.5, *, cmap: str = "inferno", ax: Axes | None = None) -> Figure:
    """Token relevance (e.g. from ``attention_rollout``: [L] or [N, L], item 0) over the image patches.
    With ``grid=None`` the first token is the class token and the other L-1 form a square grid (or all
    L do, when L is square); with ``grid=(rows, cols)`` the last rows*cols tokens are the patches (so
    class and register tokens in front are skipped). Scaled to [0, 1] and resized to the image."""
    r = to_numpy(relevance, "relevance")
    if r.ndim == 2:
        r = r[0]
    if r.ndim != 1:
        raise ValueError(f"relevance must have shape [L] or [N, L], got {r.shape}")
    if grid is None:
        side = math.isqrt(len(r) - 1)
        if side * side == len(r) - 1:
            patches = r[1:]
        elif math.isqrt(len(r)) ** 2 == len(r):
            side, patches = math.isqrt(len(r)), r
        else:
            raise ValueError(f"{len(r)} tokens do not form a square grid (with or without a class token): "
                             "pass grid=(rows, cols)")
        grid = (side, side)
    else:
        if grid[0] * grid[1] > len(r):
            raise ValueError(f"grid {grid} needs {grid[0] * grid[1]} patch tokens, relevance has {len(r)}")
        patches = r[len(r) - grid[0] * grid[1]:]
    patches = patches.reshape(grid)
    lo, hi = patches.min(), patches.max()
    patches = (patches - lo) / (hi - lo) if hi > lo else np.zeros_like(patches)
    img = display_image(image, mean, std)
    return overlay(img, resized(patches, img.shape[:2], "relevance"), alpha, cmap, "relevance (rollout)", ax)

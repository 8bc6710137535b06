"""An explanation heatmap over the image it explains, next to the image itself."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from ._common import WIDTH, figure, image_hwc, to_numpy


def display_image(image, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> np.ndarray:
    """[H, W, C] values in [0, 1] for imshow: un-normalised with the per-channel ``mean``/``std`` the
    input was normalised with, 0-255 integers scaled down; anything else out of [0, 1] stretched to fit."""
    integer = isinstance(image, (torch.Tensor, np.ndarray)) and not (
        image.is_floating_point() if isinstance(image, torch.Tensor) else np.issubdtype(image.dtype, np.floating))
    a = image_hwc(image)
    if integer:
        a = a / 255.0
    if std is not None:
        a = a * np.asarray(std, dtype=np.float64)
    if mean is not None:
        a = a + np.asarray(mean, dtype=np.float64)
    if mean is None and std is None:
        lo, hi = a.min(), a.max()
        if lo < 0 or hi > 1:
            a = (a - lo) / (hi - lo) if hi > lo else np.zeros_like(a)
    return np.clip(a, 0.0, 1.0)


def resized(heatmap, size: tuple[int, int], what: str = "heatmap") -> np.ndarray:
    """A [H, W] map (or item 0 of [N, H, W]) bilinearly resized to ``size`` when it differs."""
    h = to_numpy(heatmap, what)
    if h.ndim == 3:
        h = h[0]
    if h.ndim != 2:
        raise ValueError(f"{what} must have shape [H, W] or [N, H, W], got {h.shape}")
    if h.shape != size:
        h = F.interpolate(torch.from_numpy(h)[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        h = h.numpy()
    return h


def overlay(image: np.ndarray, heat: np.ndarray, alpha: float, cmap: str, label: str, ax: Axes | None) -> Figure:
    """Draw ``heat`` (values in [0, 1]) over ``image`` ([H, W, C] in [0, 1]); with no ``ax``, the image
    alone on the left and the overlay on the right."""
    grey = image.shape[-1] == 1
    shown = image[..., 0] if grey else image
    if ax is None:
        h, w = heat.shape
        fig = figure(min(8.0, 0.9 + (WIDTH - 0.8) / 2 * h / w))
        left, ax = fig.subplots(1, 2)
        left.imshow(shown, cmap="gray" if grey else None, vmin=0, vmax=1)
        left.set_title("input", fontsize=10)
        left.set_axis_off()
    else:
        fig = ax.figure.figure
    ax.imshow(shown, cmap="gray" if grey else None, vmin=0, vmax=1)
    layer = ax.imshow(heat, cmap=cmap, vmin=0, vmax=1, alpha=alpha, interpolation="bilinear")
    ax.set_title(label, fontsize=10)
    ax.set_axis_off()
    fig.colorbar(layer, ax=ax, shrink=0.8, pad=0.02)
    return fig


def cam_overlay(image, heatmap, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                alpha: float = 0.5, *, cmap: str = "inferno", ax: Axes | None = None) -> Figure:
    """The input next to the input with ``heatmap`` ([H, W] in [0, 1], e.g. ``grad_cam(...).heatmap[0]``)
    laid over it in a perceptual colour map. ``image`` is [C, H, W] or [H, W, C] (a batch: item 0); pass
    the ``mean``/``std`` it was normalised with to show it as it was. A heatmap of another size is
    resized to the image. With ``ax``, only the overlay is drawn, into it."""
    img = display_image(image, mean, std)
    heat = np.clip(resized(heatmap, img.shape[:2]), 0.0, 1.0)
    return overlay(img, heat, alpha, cmap, "heatmap", ax)

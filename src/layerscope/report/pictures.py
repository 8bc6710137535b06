"""The report's pre-rendered pictures (PNG, as data: URLs): Grad-CAM views, computed while the model was at
hand, drawn by ``layerscope.plots`` and rendered as the inspector renders them. (Everything else in the report
is drawn in the page from the records.)"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence

import torch

from ..core import CAMResult
from ..widget import text

CAM_ITEMS = 4  # items of the batch shown per Grad-CAM
TOP = 5  # predictions listed per item


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def explain(cams: Mapping[int, CAMResult], image: torch.Tensor | None, logits: torch.Tensor | None, *,
            mean: Sequence[float] | None = None, std: Sequence[float] | None = None, class_names=None) -> list[dict]:
    """One view per Grad-CAM (by target class): its layer, the class, and for the first items of the batch the
    overlay and the top predictions. Empty without an image batch [N, C, H, W]."""
    if image is None or image.dim() != 4:
        return []
    from .. import plots

    views = []
    for target, result in cams.items():
        items = []
        for i in range(min(CAM_ITEMS, len(image), len(result.heatmap))):
            fig = plots.cam_overlay(image[i], result.heatmap[i], mean=mean, std=std)
            top = []
            if logits is not None and i < len(logits):
                probs = torch.softmax(logits[i].double(), dim=0)
                best = torch.topk(probs, min(TOP, len(probs)))
                top = [(text.class_label(k, class_names), f"{p:.2%}")
                       for k, p in zip(best.indices.tolist(), best.values.tolist())]
            items.append({"item": i, "image": data_url(text.png(fig)), "top": top})
        views.append({"layer": result.layer, "class": text.class_label(target, class_names), "items": items})
    return views

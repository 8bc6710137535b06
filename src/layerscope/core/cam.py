"""``grad_cam(model, batch)``: which parts of the input a class score comes from (Grad-CAM, Grad-CAM++)."""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .capture import class_indices
from .hooks import HookSession
from .kinds import unwrap
from .nested import call_model, first_float_tensor, iter_tensors, map_tensors

METHODS = ("gradcam", "gradcam++")
MAX_EXTRA_TOKENS = 32  # class, distillation and register tokens in front of the patch tokens


@dataclass(frozen=True, eq=False)
class CAMResult:
    """One explanation per item of the batch. Tensors are detached and on the CPU."""

    heatmap: torch.Tensor  # [N, H, W] in [0, 1] at the input's spatial size (the layer's if the input has none)
    raw: torch.Tensor  # [N, h, w] at the layer's resolution, not normalised
    layer: str  # the named_modules() name of the layer explained
    target: torch.Tensor  # [N] per item: the class (classification, segmentation) or box (detection); score_fn: -1
    scores: torch.Tensor  # [N] the score explained: the class's logit, the box's score, the class's mask summed
    method: str
    task: str = "classification"  # "classification" | "detection" | "segmentation" | "score_fn"
    boxes: torch.Tensor | None = None  # detection: [N, 4] the box explained per item (x1, y1, x2, y2)
    labels: torch.Tensor | None = None  # detection: [N] that box's class


# A layout says how to read a layer's output as maps [N, C, h, w]:
# ("nchw",), ("nhwc",) or ("tokens", seq_first, extra, h, w) for patch tokens after `extra` leading tokens.
Layout = tuple


def _patch_grid(length: int, size: tuple[int, int] | None) -> tuple[int, int, int] | None:
    """(extra, h, w): the largest patch grid that fits in ``length`` tokens, the rest being leading tokens.

    With an image input of size (H, W), the grids considered are those a patch size p gives,
    (H // p) x (W // p); without one, the squares g x g. For 197 tokens from a 224 x 224 image that is
    14 x 14 after 1 class token; for 201 tokens, 14 x 14 after 5 (class + 4 registers); for 196, 14 x 14.
    """
    if size is None:
        g = math.isqrt(length)
        grids = [(g, g)]
    else:
        grids = [(size[0] // p, size[1] // p) for p in range(1, min(size) // 2 + 1)]
    for h, w in grids:  # largest first
        if h >= 2 and w >= 2 and h * w <= length:
            extra = length - h * w
            return (extra, h, w) if extra <= MAX_EXTRA_TOKENS else None
    return None


def layout(shape: tuple[int, ...], n: int, size: tuple[int, int] | None) -> Layout | None:
    """How an output of ``shape`` holds a spatial grid for a batch of ``n``, or None when it does not.

    A 4-D output is [N, C, H, W] unless reading it as [N, H, W, C] gives a grid whose aspect ratio is
    strictly closer to the input's (to 1 without an image input). A 3-D output is tokens [N, L, D]
    (or [L, N, D]) whose last tokens form the patch grid (see ``_patch_grid``). H and W must exceed 1.
    """
    if len(shape) == 4 and shape[0] == n:
        aspect = math.log(size[0] / size[1]) if size else 0.0
        off = lambda h, w: abs(math.log(h / w) - aspect) if h and w else math.inf
        if off(shape[1], shape[2]) < off(shape[2], shape[3]):
            return ("nhwc",) if shape[1] > 1 and shape[2] > 1 else None
        return ("nchw",) if shape[2] > 1 and shape[3] > 1 else None
    if len(shape) == 3:
        seq_first = shape[0] != n and shape[1] == n
        if shape[1 if seq_first else 0] == n:
            grid = _patch_grid(shape[0 if seq_first else 1], size)
            return ("tokens", seq_first, *grid) if grid else None
    return None


def as_maps(t: torch.Tensor, how: Layout) -> torch.Tensor:
    """``t`` read as [N, C, h, w] according to its layout."""
    if how[0] == "nchw":
        return t
    if how[0] == "nhwc":
        return t.permute(0, 3, 1, 2)
    _, seq_first, extra, h, w = how
    tokens = t.transpose(0, 1) if seq_first else t
    return tokens[:, extra:].reshape(tokens.shape[0], h, w, -1).permute(0, 3, 1, 2)


def _input_size(batch: Any) -> tuple[int, int] | None:
    for t in iter_tensors(batch):
        if t.is_floating_point() and t.dim() == 4:
            return (t.shape[-2], t.shape[-1])
    return None


def _layer_name(model: nn.Module, layer: str | nn.Module) -> str:
    names = dict(model.named_modules())
    if isinstance(layer, nn.Module):
        for name, module in names.items():
            if module is layer:
                return name
        raise ValueError(f"the module {type(layer).__name__} given as layer is not part of the model")
    if layer not in names:
        close = difflib.get_close_matches(str(layer), [n for n in names if n], n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"the model has no module named {layer!r}{hint}")
    return layer


@dataclass(frozen=True, eq=False)
class _Score:
    """What is explained, per item: the score tensor [N] (part of the graph) and what it is."""

    values: torch.Tensor
    target: torch.Tensor
    task: str
    classes: int | None = None  # segmentation: the class maps' channels (those outputs are the scores themselves)
    boxes: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def n(self) -> int:
        return self.values.shape[0]


def _describe(output: Any) -> str:
    if isinstance(output, torch.Tensor):
        return f"a tensor of shape {tuple(output.shape)}"
    if isinstance(output, Mapping):
        return f"a {type(output).__name__} with keys {', '.join(map(repr, list(output)[:6]))}"
    if isinstance(output, (tuple, list)):
        return f"a {type(output).__name__} of {len(output)} ({', '.join(_describe(v) for v in output[:3])})"
    return f"a {type(output).__name__}"


def _detections(output: Any) -> bool:
    """A detector's output: one dict per image with per-box "scores" (torchvision's Faster R-CNN and kin)."""
    return isinstance(output, (tuple, list)) and bool(output) and all(
        isinstance(o, Mapping) and isinstance(o.get("scores"), torch.Tensor) and o["scores"].dim() == 1
        for o in output)


def _found(output: Any, key: str, dims: int) -> torch.Tensor | None:
    """``output[key]`` (a dict or a Hugging Face output), or the output itself, when it has ``dims`` dimensions."""
    t = output.get(key) if isinstance(output, Mapping) else output
    if isinstance(output, Mapping) and t is None and key == "logits":
        t = first_float_tensor(output)
    return t if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dim() == dims else None


def _score(output: Any, target: Any, score_fn: Callable | None) -> _Score:
    """The scores to explain: ``score_fn(output)``; else a detected box's score (``target``: box index per
    item, default each item's top box); else a class's logit (class scores [N, classes]); else a class's
    mask (a segmentation map [N, classes, H, W], or a dict holding one as "out"): the class's map summed
    over the pixels predicted as that class (``target``: class per item, default the most frequent)."""
    if score_fn is not None:
        values = score_fn(output)
        if not isinstance(values, torch.Tensor) or not values.is_floating_point() or values.dim() > 1:
            raise ValueError(f"score_fn must return one score per item (a float tensor [N]), got {_describe(values)}")
        values = values.reshape(-1)
        return _Score(values, torch.full((values.shape[0],), -1), "score_fn")
    if _detections(output):
        return _box_score(output, target)
    logits = _found(output, "logits", 2)
    if logits is not None:
        targets = logits.detach().argmax(dim=1) if target is None else class_indices(target, logits)
        return _Score(logits.gather(1, targets[:, None])[:, 0], targets, "classification")
    dense = _found(output, "out", 4)
    if dense is None:
        dense = _found(output, "logits", 4)
    if dense is not None:
        return _mask_score(dense, target)
    raise ValueError(
        f"grad_cam explains class scores [N, classes], detections (one dict per image with 'boxes' and "
        f"'scores'), or a segmentation map [N, classes, H, W] (or a dict holding it as 'out'), but the model "
        f"returns {_describe(output)}. Pass score_fn=, a function of the output that returns one score per "
        f"item, e.g. score_fn=lambda out: out[0][:, 3]"
    )


def _box_score(output: list, target: Any) -> _Score:
    n = len(output)
    picks = torch.as_tensor(-1 if target is None else target).reshape(-1)
    if picks.is_floating_point() or picks.numel() not in (1, n):
        raise ValueError(f"target must be one box index or one per image ({n}), got {target!r}")
    picks = picks.expand(n) if picks.numel() == 1 else picks
    values, chosen, boxes, labels = [], [], [], []
    for i, (detected, pick) in enumerate(zip(output, picks.tolist())):
        scores = detected["scores"]
        if not len(scores):
            raise ValueError(f"image {i} has no detected box to explain (its 'scores' are empty): lower the "
                             f"detector's score threshold (e.g. box_score_thresh) or pass another image")
        if pick == -1:
            pick = int(scores.detach().argmax())
        if not 0 <= pick < len(scores):
            raise ValueError(f"target asks for box {pick} of image {i}, which has {len(scores)} boxes "
                             f"(0 to {len(scores) - 1}, sorted by score)")
        values.append(scores[pick])
        chosen.append(pick)
        if isinstance(detected.get("boxes"), torch.Tensor):
            boxes.append(detected["boxes"][pick].detach().cpu())
        if isinstance(detected.get("labels"), torch.Tensor):
            labels.append(detected["labels"][pick].detach().cpu())
    return _Score(torch.stack(values), torch.tensor(chosen), "detection",
                  boxes=torch.stack(boxes) if len(boxes) == n else None,
                  labels=torch.stack(labels) if len(labels) == n else None)


def _mask_score(dense: torch.Tensor, target: Any) -> _Score:
    n, classes = dense.shape[:2]
    predicted = dense.detach().argmax(dim=1)
    if target is None:
        counts = torch.stack([torch.bincount(p.reshape(-1), minlength=classes) for p in predicted])
        targets = counts.argmax(dim=1)
    else:
        targets = class_indices(target, dense[:, :, 0, 0])
    mask = predicted == targets[:, None, None]
    chosen = dense.gather(1, targets[:, None, None, None].expand(n, 1, *dense.shape[2:]))[:, 0]
    return _Score((chosen * mask).sum(dim=(1, 2)), targets, "segmentation", classes=classes)


class _Call:
    """One module call seen by the automatic pass: its output tensor and that tensor's version then."""

    def __init__(self, name: str, module: nn.Module, tensor: torch.Tensor):
        self.name, self.module, self.tensor, self.version = name, module, tensor, tensor._version


def _channels(t: torch.Tensor, how: Layout) -> int:
    return t.shape[1] if how[0] == "nchw" else t.shape[-1]


def _pick(calls: list[_Call], spatial: list[tuple[int, _Call, Layout]]) -> tuple[_Call, Layout] | None:
    """The last of the ``spatial`` calls (the ones eligible). When its output is tokens (a ViT), the patch
    tokens after the last block no longer reach the class token, so the pick is the last normalisation
    layer with a token output before the last attention layer returned (torchvision's
    ``encoder_layer_11.ln_1``, timm's ``blocks.11.norm1``)."""
    if not spatial:
        return None
    _, last, how = spatial[-1]
    if how[0] != "tokens":
        return last, how
    attention = [i for i, c in enumerate(calls) if "Attention" in type(c.module).__name__]
    norms = [
        (c, h) for i, c, h in spatial
        if h[0] == "tokens" and "Norm" in type(c.module).__name__ and attention and i < attention[-1]
    ]
    return norms[-1] if norms else (last, how)


def _auto_pass(model, batch, session, size, target, score_fn):
    """One forward with every module watched; the layer is picked afterwards: the last module with a spatial
    output that is not a pooling layer's output (nor, for segmentation, the class maps themselves) and
    that the score depends on (one backward to all of them tells). The picked output is used as it is
    when nothing modified it in place later; else (None) the caller runs ``_layer_pass`` on it.
    Returns (name, output or None, layout, score, gradient or None)."""
    calls: list[_Call] = []
    for name, module in model.named_modules():
        def hook(module, args, kwargs, output, name=name):
            t = first_float_tensor(output)
            if t is not None:
                calls.append(_Call(name, module, t))

        session.add_forward_hook(module, hook)
    score = _score(call_model(model, batch), target, score_fn)
    session.remove_forward_hooks()
    pooled = {id(c.tensor) for c in calls if "Pool" in type(c.module).__name__}
    spatial = [(i, c, how) for i, c in enumerate(calls)
               if id(c.tensor) not in pooled and (how := layout(c.tensor.shape, score.n, size))
               and (score.classes is None or _channels(c.tensor, how) != score.classes)]
    grads = None  # nothing in the pass needs a gradient (a frozen model): dependence cannot be told here
    if score.values.requires_grad:
        tensors = list({id(c.tensor): c.tensor for _, c, _ in spatial if c.tensor.requires_grad}.values())
        got = torch.autograd.grad(score.values.sum(), tensors, allow_unused=True) if tensors else []
        grads = {id(t): g for t, g in zip(tensors, got) if g is not None and bool(g.any())}
        spatial = [s for s in spatial if id(s[1].tensor) in grads]
    picked = _pick(calls, spatial)
    if picked is None:
        raise ValueError("no module of the model returns a spatial output ([N, C, H, W], [N, H, W, C] or patch "
                         "tokens [N, L, D] with H, W > 1) that the score depends on; pass layer= to choose one")
    call, how = picked
    if grads is None or call.tensor._version != call.version:
        return call.name, None, None, score, None
    return call.name, call.tensor, how, score, grads[id(call.tensor)]


def _layer_pass(model, batch, session, name: str, target, score_fn) -> tuple[torch.Tensor, _Score]:
    """One forward in which ``name``'s output is swapped for a copy of a fresh leaf tensor: the leaf keeps
    the values as returned (later in-place ops such as ``relu_`` or ``out += identity`` change the copy),
    and the gradient of the score is taken with respect to it (the graph before it is not needed)."""
    seen: dict[str, torch.Tensor] = {}

    def hook(module, args, kwargs, output):
        t = first_float_tensor(output)
        if t is None:
            return None
        leaf = t.detach().requires_grad_(True)
        seen["output"] = leaf
        copy = leaf.clone()
        return map_tensors(output, lambda x: copy if x is t else x)

    module = model.get_submodule(name)
    session.add_forward_hook(module, hook)
    score = _score(call_model(model, batch), target, score_fn)
    session.remove_forward_hooks()
    if "output" not in seen:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) was not called with a floating-point output "
                         "during the forward pass")
    return seen["output"], score


def _weights(maps: torch.Tensor, grads: torch.Tensor, method: str) -> torch.Tensor:
    """Per-channel weights [N, C]: the mean gradient (Grad-CAM), or the Grad-CAM++ weighting (eq. 19 of
    Chattopadhyay et al. 2018, the closed form for an exponential of the score)."""
    if method == "gradcam":
        return grads.mean(dim=(2, 3))
    g2 = grads * grads
    denominator = 2 * g2 + maps.sum(dim=(2, 3), keepdim=True) * g2 * grads
    alpha = torch.where(denominator != 0, g2 / denominator, torch.zeros_like(g2))
    return (alpha * grads.clamp(min=0)).sum(dim=(2, 3))


def _normalised(cam: torch.Tensor) -> torch.Tensor:
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    return torch.where(span > 0, (cam - low) / span.clamp(min=torch.finfo(cam.dtype).tiny), torch.zeros_like(cam))


def grad_cam(
    model: nn.Module,
    batch: Any,
    *,
    layer: str | nn.Module | None = None,
    target: Any = None,
    method: str = "gradcam",
    score_fn: Callable[[Any], torch.Tensor] | None = None,
) -> CAMResult:
    """Grad-CAM (or Grad-CAM++ with ``method="gradcam++"``) of each item's score at ``layer``.

    ``batch`` is passed as in ``capture``. What is explained follows from the model's output:

    - class scores [N, classes] (also a Hugging Face output's ``logits``): the logit of ``target``, a class
      index or one per item (None: each item's top class);
    - detections, one dict per image with "boxes" and "scores" (torchvision's Faster R-CNN): the score of
      box ``target`` of each image (an index into its boxes, sorted by score; None: the top box);
      ``CAMResult.boxes`` and ``labels`` say which box;
    - a segmentation map [N, classes, H, W] (also DeepLabV3's dict, as "out"): the map of class ``target``
      summed over the pixels predicted as that class (None: each item's most frequent class);
    - anything else: pass ``score_fn``, a function of the output returning one score per item [N].

    ``layer`` is a ``named_modules()`` name (or the module); None picks the last module with a spatial
    output that the score depends on, before the pooling (for a ViT, the last block's first normalisation
    layer; for segmentation, before the layer that outputs the class maps), and ``CAMResult.layer`` says
    which. 4-D outputs may be channels-first or channels-last; token outputs [N, L, D] are reshaped to
    their patch grid after dropping the leading class/register tokens. Works under ``torch.no_grad()`` or
    ``torch.inference_mode()`` and in training mode; the model is left as it was (hooks removed; training
    flags, ``requires_grad``, ``.grad`` and buffers restored); a ``torch.compile`` wrapper is run through
    its original module. The scores of all items are summed for one backward pass, so items must not
    interact downstream of the layer (as batch norm in training mode would make them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"grad_cam() needs a torch.nn.Module as model, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    model, _ = unwrap(model)
    name = None if layer is None else _layer_name(model, layer)
    size = _input_size(batch)
    with HookSession(model) as session, torch.inference_mode(False), torch.enable_grad():
        batch = map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)  # made under inference_mode
        output = grads = None
        if name is None:
            name, output, how, score, grads = _auto_pass(model, batch, session, size, target, score_fn)
        if output is None:
            output, score = _layer_pass(model, batch, session, name, target, score_fn)
            how = layout(output.shape, score.n, size)
            if how is None:
                module = model.get_submodule(name)
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) returns shape {tuple(output.shape)}, which has no "
                    "spatial layout: Grad-CAM needs [N, C, H, W], [N, H, W, C] or patch tokens [N, L, D] (H, W > 1)"
                )
        if grads is None and score.values.requires_grad:
            grads = torch.autograd.grad(score.values.sum(), output, allow_unused=True)[0]
    if grads is None:
        raise ValueError(f"the scores do not depend on the output of layer {name!r}")
    maps, grads = as_maps(output.detach(), how).float(), as_maps(grads, how).float()
    raw = F.relu((_weights(maps, grads, method)[:, :, None, None] * maps).sum(dim=1))
    heat = raw if size is None else F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return CAMResult(
        heatmap=_normalised(heat).cpu(),
        raw=raw.cpu(),
        layer=name,
        target=score.target.cpu(),
        scores=score.values.detach().cpu(),
        method=method,
        task=score.task,
        boxes=score.boxes,
        labels=score.labels,
    )

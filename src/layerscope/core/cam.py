"""``grad_cam(model, batch)``: which parts of the input a class score comes from (Grad-CAM, Grad-CAM++)."""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .capture import class_indices
from .hooks import HookSession
from .nested import call_model, first_float_tensor, iter_tensors, map_tensors

METHODS = ("gradcam", "gradcam++")
MAX_EXTRA_TOKENS = 32  # class, distillation and register tokens in front of the patch tokens


@dataclass(frozen=True, eq=False)
class CAMResult:
    """One explanation per item of the batch. Tensors are detached and on the CPU."""

    heatmap: torch.Tensor  # [N, H, W] in [0, 1] at the input's spatial size (the layer's if the input has none)
    raw: torch.Tensor  # [N, h, w] at the layer's resolution, not normalised
    layer: str  # the named_modules() name of the layer explained
    target: torch.Tensor  # [N] class index per item
    scores: torch.Tensor  # [N] the logit of that class
    method: str


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


def _targets(target: Any, logits: torch.Tensor) -> torch.Tensor:
    return logits.detach().argmax(dim=1) if target is None else class_indices(target, logits)


def _logits(output: Any) -> torch.Tensor:
    logits = first_float_tensor(output)
    if logits is None or logits.dim() != 2:
        shape = None if logits is None else tuple(logits.shape)
        raise ValueError(f"grad_cam needs class scores of shape (N, classes) as the model's output, got {shape}")
    return logits


class _Call:
    """One module call seen by the automatic pass: its output tensor and that tensor's version then."""

    def __init__(self, name: str, module: nn.Module, tensor: torch.Tensor):
        self.name, self.module, self.tensor, self.version = name, module, tensor, tensor._version


def _pick(calls: list[_Call], n: int, size: tuple[int, int] | None) -> tuple[_Call, Layout] | None:
    """The last call with a spatial output that is not a pooling layer's output. When that output is
    tokens (a ViT), the patch tokens after the last block no longer reach the class token, so the pick
    is the last normalisation layer with a token output before the last attention layer returned
    (torchvision's ``encoder_layer_11.ln_1``, timm's ``blocks.11.norm1``)."""
    pooled = {id(c.tensor) for c in calls if "Pool" in type(c.module).__name__}
    spatial = [(i, c, how) for i, c in enumerate(calls) if (how := layout(c.tensor.shape, n, size))]
    spatial = [s for s in spatial if id(s[1].tensor) not in pooled]
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


def _auto_pass(model, batch, session, size) -> tuple[str, torch.Tensor | None, Layout | None, torch.Tensor]:
    """One forward with every module watched; the layer is picked afterwards. The picked output is used
    as it is when nothing modified it in place later and it is part of the graph; else (None) the caller
    runs ``_layer_pass`` on the picked layer."""
    calls: list[_Call] = []
    for name, module in model.named_modules():
        def hook(module, args, kwargs, output, name=name):
            t = first_float_tensor(output)
            if t is not None:
                calls.append(_Call(name, module, t))

        session.add_forward_hook(module, hook)
    logits = _logits(call_model(model, batch))
    session.remove_forward_hooks()
    picked = _pick(calls, logits.shape[0], size)
    if picked is None:
        raise ValueError("no module of the model returns a spatial output ([N, C, H, W], [N, H, W, C] or "
                         "patch tokens [N, L, D] with H, W > 1); pass layer= to choose one")
    call, how = picked
    if call.tensor._version != call.version or not call.tensor.requires_grad:
        return call.name, None, None, logits
    return call.name, call.tensor, how, logits


def _layer_pass(model, batch, session, name: str) -> tuple[torch.Tensor, torch.Tensor]:
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
    logits = _logits(call_model(model, batch))
    session.remove_forward_hooks()
    if "output" not in seen:
        raise ValueError(f"layer {name!r} ({type(module).__name__}) was not called with a floating-point output "
                         "during the forward pass")
    return seen["output"], logits


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
) -> CAMResult:
    """Grad-CAM (or Grad-CAM++ with ``method="gradcam++"``) of each item's ``target`` class at ``layer``.

    ``batch`` is passed as in ``capture``; the model must return class scores [N, classes]. ``target``
    is a class index, one per item, or None for each item's top class. ``layer`` is a ``named_modules()``
    name (or the module); None picks the last module with a spatial output before the pooling (for a
    ViT, the last block's first normalisation layer) and ``CAMResult.layer`` says which. 4-D outputs may
    be channels-first or channels-last; token outputs [N, L, D] are reshaped to their patch grid after
    dropping the leading class/register tokens. Works under ``torch.no_grad()`` or ``torch.inference_mode()``
    and in training mode; the model is left as it was (hooks removed; training flags, ``requires_grad``,
    ``.grad`` and buffers restored). The scores of all items are summed for one backward pass, so items
    must not interact downstream of the layer (as batch norm in training mode would make them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"grad_cam() needs a torch.nn.Module as model, got {type(model).__name__}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {', '.join(METHODS)}, got {method!r}")
    name = None if layer is None else _layer_name(model, layer)
    size = _input_size(batch)
    with HookSession(model) as session, torch.inference_mode(False), torch.enable_grad():
        batch = map_tensors(batch, lambda t: t.clone() if t.is_inference() else t)  # made under inference_mode
        output = None
        if name is None:
            name, output, how, logits = _auto_pass(model, batch, session, size)
        if output is None:
            output, logits = _layer_pass(model, batch, session, name)
            how = layout(output.shape, logits.shape[0], size)
            if how is None:
                module = model.get_submodule(name)
                raise ValueError(
                    f"layer {name!r} ({type(module).__name__}) returns shape {tuple(output.shape)}, which has no "
                    "spatial layout: Grad-CAM needs [N, C, H, W], [N, H, W, C] or patch tokens [N, L, D] (H, W > 1)"
                )
        targets = _targets(target, logits)
        scores = logits.gather(1, targets[:, None])[:, 0]
        grads = torch.autograd.grad(scores.sum(), output, allow_unused=True)[0] if scores.requires_grad else None
    if grads is None:
        raise ValueError(f"the class scores do not depend on the output of layer {name!r}")
    maps, grads = as_maps(output.detach(), how).float(), as_maps(grads, how).float()
    raw = F.relu((_weights(maps, grads, method)[:, :, None, None] * maps).sum(dim=1))
    heat = raw if size is None else F.interpolate(raw[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]
    return CAMResult(
        heatmap=_normalised(heat).cpu(),
        raw=raw.cpu(),
        layer=name,
        target=targets.cpu(),
        scores=scores.detach().cpu(),
        method=method,
    )

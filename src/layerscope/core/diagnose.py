"""Plain-sentence explanations of why a forward, loss or backward pass failed."""

from __future__ import annotations

import traceback
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .nested import iter_tensors
from .records import CaptureError


def _shape(t: Any) -> str:
    return str(tuple(t.shape)) if isinstance(t, torch.Tensor) else type(t).__name__


def label(name: str, type_name: str, detail: str = "") -> str:
    """'features.3.squeeze (Conv2d, in_channels=64)': how a module is named in messages."""
    inner = type_name + (f", {detail}" if detail else "")
    return f"{name or '<root>'} ({inner})"


def locate(exc: BaseException, names: Mapping[int, str]) -> tuple[nn.Module, str, tuple] | None:
    """The innermost module of the model whose code is on the traceback, with its name and the
    positional arguments its frame was called with."""
    found = None
    for frame, _ in traceback.walk_tb(exc.__traceback__):
        owner = frame.f_locals.get("self")
        if isinstance(owner, nn.Module) and id(owner) in names:
            code = frame.f_code
            argnames = code.co_varnames[1 : code.co_argcount]
            args = tuple(frame.f_locals[a] for a in argnames if a in frame.f_locals)
            star = frame.f_locals.get("args") if code.co_flags & 0x04 else None  # *args
            if isinstance(star, tuple):
                args = args + star
            if found is None or found[0] is not owner or args:
                found = (owner, names[id(owner)], args)
    return found


def _expectation(module: nn.Module, x: torch.Tensor) -> str | None:
    """What this module expected of its first input, when the input does not fit it."""
    params = [p for p in module.parameters(recurse=False)]
    for p in params:
        if x.device != p.device:
            return f"got input on {x.device}, but its parameters are on {p.device}"
    for p in params:
        if x.is_floating_point() and x.dtype != p.dtype:
            return f"got input of dtype {x.dtype}, but its parameters are {p.dtype}"
    shape = tuple(x.shape)
    if isinstance(module, nn.Linear) and (not shape or shape[-1] != module.in_features):
        return f"got input of shape {shape}, but expects the last dimension to be {module.in_features}"
    if isinstance(module, nn.modules.conv._ConvNd):
        k = len(module.kernel_size)
        if x.dim() not in (k + 1, k + 2):
            return f"got input of shape {shape}, but expects {k + 2} dimensions (N, C, ...)"
        if shape[-k - 1] != module.in_channels:
            return f"got input of shape {shape} with {shape[-k - 1]} channels, but expects {module.in_channels}"
    if isinstance(module, nn.modules.batchnorm._NormBase) and (x.dim() < 2 or shape[1] != module.num_features):
        return f"got input of shape {shape}, but expects {module.num_features} channels in dimension 1"
    if isinstance(module, nn.LayerNorm):
        want = tuple(module.normalized_shape)
        if shape[-len(want):] != want:
            return f"got input of shape {shape}, but expects it to end in {want}"
    if isinstance(module, nn.Embedding) and not x.is_floating_point() and x.numel():
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi >= module.num_embeddings:
            rows = module.num_embeddings
            return f"got indices from {lo} to {hi}, but has {rows} rows (0 to {rows - 1})"
    return None


def _detail(module: nn.Module) -> str:
    for attr in ("in_features", "in_channels", "num_features", "normalized_shape", "num_embeddings"):
        if hasattr(module, attr):
            return f"{attr}={getattr(module, attr)}"
    return ""


def _error(name: str, module: nn.Module, phase: str, exc: BaseException, message: str,
           received: torch.Tensor | None = None) -> CaptureError:
    return CaptureError(
        module=name,
        module_type=type(module).__name__,
        phase=phase,
        message=message,
        exception_type=type(exc).__name__,
        exception_message=str(exc),
        traceback="".join(traceback.format_exception(exc)),
        received=None if received is None else {
            "shape": list(received.shape), "dtype": str(received.dtype).removeprefix("torch."),
            "device": str(received.device)},
        exception=exc,
    )


def forward_error(exc: BaseException, names: Mapping[int, str], model: nn.Module) -> CaptureError:
    where = locate(exc, names)
    module, name, args = where if where else (model, "", ())
    first = next(iter_tensors(args), None)
    what = _expectation(module, first) if first is not None else None
    if what is None:
        got = f"failed on input of shape {_shape(first)}" if first is not None else "failed"
        what = f"{got}: {_first_line(exc)}"
    message = f"{label(name, type(module).__name__, _detail(module))} {what}."
    return _error(name, module, "forward", exc, message, first)


def loss_error(exc: BaseException, model: nn.Module) -> CaptureError:
    return _error("", model, "loss", exc, f"The loss could not be computed: {_first_line(exc)}")


def backward_error(exc: BaseException, name: str, module: nn.Module) -> CaptureError:
    message = f"Backward failed in {label(name, type(module).__name__)}: {_first_line(exc)}"
    return _error(name, module, "backward", exc, message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0].rstrip(".") if text else type(exc).__name__

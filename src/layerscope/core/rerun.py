"""What must run the model again, in one place: a module's full output (feature-map pages past the stored
sample), Grad-CAM and attention maps. Everything else reads records."""

from __future__ import annotations

import functools
from typing import Any

import torch
from torch import nn

from . import cam
from .attention import attention_maps
from .hooks import HookSession
from .kinds import unwrap
from .nested import call_model, first_float_tensor
from .recorder import FEATURE_CHANNELS, pool_maps
from .records import CallRecord, call_key


class _Got(Exception):
    """Raised from the hook once the wanted output is in hand: the rest of the pass is not needed."""


def module_output(model: nn.Module, batch: Any, name: str, call: int = 0) -> torch.Tensor | None:
    """The first floating-point output tensor of call number ``call`` of module ``name``, detached, on
    the CPU (None if it has none). The model is left as it was, buffers such as running means included.
    A ``torch.compile`` wrapper is run through its original module, as ``capture`` records it."""
    model, _ = unwrap(model)
    module = model.get_submodule(name)
    got: list[torch.Tensor | None] = []
    calls = 0

    def hook(module, args, kwargs, output):
        nonlocal calls
        if calls == call:
            t = first_float_tensor(output)
            got.append(None if t is None else t.detach().to("cpu", copy=True))
            raise _Got
        calls += 1

    try:
        with HookSession(model) as session, torch.no_grad():  # also puts back running statistics
            session.add_forward_hook(module, hook)
            call_model(model, batch)
    except _Got:
        pass
    if not got:
        raise LookupError(f"{name} was not called {call + 1} time(s) in this pass")
    return got[0]


def input_size(batch: Any) -> tuple[int, int] | None:
    """(H, W) of the batch's first image tensor [N, C, H, W], or None."""
    t = first_float_tensor(batch)
    return (t.shape[-2], t.shape[-1]) if t is not None and t.dim() == 4 else None


def cam_layer(call: CallRecord | None, n: int, size: tuple[int, int] | None) -> bool:
    """Whether Grad-CAM can explain this call's output as it is (the same test grad_cam's layer pick uses)."""
    shape = call.output_shapes if call is not None else None
    if not (isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)):
        return False
    return cam.layout(shape, n, size) is not None


CAM_CACHE = 32  # Grad-CAMs kept


class Rerun:
    """Runs ``model`` on ``batch`` again on demand, each answer cached until ``forget()``."""

    def __init__(self, model: nn.Module, batch: Any):
        self.model, self.batch = model, batch
        self._output = functools.lru_cache(maxsize=2)(self._fetch_output)
        self._cams: dict[tuple[str | None, int], cam.CAMResult] = {}  # by (layer, target), most recently used last
        self._attention = functools.lru_cache(maxsize=1)(self._compute_attention)

    def forget(self) -> None:
        for cache in (self._output, self._attention):
            cache.cache_clear()
        self._cams.clear()

    def _fetch_output(self, name: str, call: int) -> torch.Tensor:
        return module_output(self.model, self.batch, name, call)

    def feature_maps(self, name: str, call: int, item: int, page: int) -> torch.Tensor:
        """Channels ``page * 16`` to ``page * 16 + 15`` of item ``item`` of a call's output [N, C, H, W], pooled
        as the stored sample is (at most 64 x 64)."""
        first = page * FEATURE_CHANNELS
        return pool_maps(self._output(name, call)[item, first:first + FEATURE_CHANNELS])

    def grad_cam(self, layer: str | None, target: int) -> cam.CAMResult:
        """Grad-CAM at ``layer`` (None: the layer grad_cam picks) for class ``target``."""
        key = (layer, target)
        result = self._cams.pop(key, None)
        if result is None:
            result = cam.grad_cam(self.model, self.batch, layer=layer, target=target)
            while len(self._cams) >= CAM_CACHE:
                del self._cams[next(iter(self._cams))]  # the least recently used
        self._cams[key] = result
        return result

    def computed_cams(self) -> dict[tuple[str | None, int], cam.CAMResult]:
        """The Grad-CAMs computed so far (and not forgotten), by (layer, target)."""
        return dict(self._cams)

    def _compute_attention(self) -> dict:
        return attention_maps(self.model, self.batch)

    def attention_layers(self) -> list[str]:
        """The modules whose attention weights the model's pass yields (first calls, in call order)."""
        return [key for key in self._attention() if " (call " not in key]

    def attention(self, name: str, call: int) -> torch.Tensor | None:
        """The attention weights [N, heads, Lq, Lk] of a call, if the module is an attention layer."""
        return self._attention().get(call_key(name, call))

"""One module's full output, fetched by running the model again with a single hook (for paging)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..core.hooks import HookSession
from ..core.nested import call_model, first_float_tensor


class _Got(Exception):
    """Raised from the hook once the wanted output is in hand: the rest of the pass is not needed."""


def module_output(model: nn.Module, batch: Any, name: str, call: int = 0) -> torch.Tensor | None:
    """The first floating-point output tensor of call number ``call`` of module ``name``, detached, on
    the CPU (None if it has none). The model is left as it was, buffers such as running means included."""
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

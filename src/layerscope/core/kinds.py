"""Kinds of model that need care around a pass: torch.compile wrappers, meta and offloaded parameters,
reentrant activation checkpointing, and outputs that carry their own loss or a cache (Hugging Face)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.nn.parameter import is_lazy

from .nested import _MAX_DEPTH, _children
from .tree import initialised

# Where a language model's output keeps what it hands back for the next step, not a result of this one.
_CACHE_KEYS = frozenset({"past_key_values", "cache", "cache_params", "mems", "encoder_past_key_values"})


def unwrap(model: nn.Module) -> tuple[nn.Module, bool]:
    """(the module hooks can reach, whether it was a ``torch.compile`` wrapper). Compiled code that already ran
    ignores hooks added later, so a compiled model is recorded through its original module (``_orig_mod``),
    run eagerly: the same parameters, buffers and forward code."""
    original = getattr(model, "_orig_mod", None)
    if isinstance(original, nn.Module) and type(model).__module__.startswith("torch._dynamo"):
        return original, True
    return model, False


def offloaded(model: nn.Module, modules: list[nn.Module] | None = None) -> dict[int, torch.Tensor | None]:
    """The parameters whose values accelerate keeps elsewhere (CPU or disk offload: the module holds a meta
    tensor and a dispatch hook swaps the real one in for each call), by id, with the values kept (None when
    they cannot be read). ``modules``: the model's modules, if already walked."""
    found: dict[int, torch.Tensor | None] = {}
    for module in model.modules() if modules is None else modules:
        hook = module.__dict__.get("_hf_hook")
        for h in getattr(hook, "hooks", (hook,)):  # a SequentialHook holds several
            weights = getattr(h, "weights_map", None)
            if not getattr(h, "offload", False) or weights is None:
                continue
            for name, p in module.named_parameters(recurse=bool(getattr(h, "place_submodules", False))):
                if p.is_meta:
                    try:
                        found[id(p)] = weights[name]
                    except Exception:  # noqa: BLE001 - an index we cannot read: no norm, nothing else lost
                        found[id(p)] = None
    return found


def on_meta(model: nn.Module, elsewhere: Mapping[int, Any], modules: list[nn.Module] | None = None) -> bool:
    """Whether the model is a meta model (shapes and counts, no values): every parameter on the meta device
    (buffers may be real, as ``accelerate.init_empty_weights()`` leaves them), apart from offloaded ones.
    A model without parameters is one when all its buffers are on the meta device. ``modules``: as walked."""
    tensors = [p for p in initialised(model, modules) if id(p) not in elsewhere] or list(model.buffers())
    return bool(tensors) and all(t.is_meta for t in tensors)


def buffers_to_meta(model: nn.Module) -> None:
    """Put a meta copy in place of each real buffer, so that a meta model's pass meets meta tensors only.
    A HookSession entered before puts the buffers themselves back afterwards."""
    for module in model.modules():
        for name, b in module._buffers.items():
            if b is not None and not b.is_meta and not is_lazy(b):
                module._buffers[name] = b.to("meta")


def model_loss(output: Any) -> torch.Tensor | None:
    """The loss the model returned itself, as Hugging Face models do when labels are passed (``output.loss``),
    or None."""
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor) and loss.is_floating_point() and loss.numel() == 1:
        return loss.reshape(())
    return None


def _is_cache(key: Any, value: Any) -> bool:
    return (isinstance(key, str) and key in _CACHE_KEYS) or any(
        c.__name__.endswith("Cache") for c in type(value).__mro__)


def result_tensors(output: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """The floating-point tensors of a model's output, without its caches (``past_key_values`` and
    Hugging Face Cache objects: keys and values kept for the next step): what the stand-in loss adds up."""
    if isinstance(output, torch.Tensor):
        if output.is_floating_point():
            yield output
        return
    children = _children(output) if _depth < _MAX_DEPTH else None
    for key, child in children or ():
        if not _is_cache(key, child):
            yield from result_tensors(child, _depth + 1)


def _graph(root) -> Iterator:
    seen, stack = set(), [root]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        yield node
        stack.extend(fn for fn, _ in node.next_functions)


def param_grads(loss: torch.Tensor, params: list[nn.Parameter]) -> dict[int, torch.Tensor | None]:
    """The gradient of ``loss`` for each parameter, by id, leaving every ``.grad`` as it was.

    ``torch.autograd.grad``, unless the graph holds a reentrant checkpoint (``torch.utils.checkpoint`` with
    ``use_reentrant=True``, also Hugging Face's ``gradient_checkpointing_enable()``): its inner backward is
    reached only by a plain ``loss.backward()``, so then the ``.grad`` of the parameters and of the graph's
    other leaves are set aside, ``loss.backward()`` runs, the new ``.grad`` are read and the old ones put back.
    """
    nodes = list(_graph(loss.grad_fn))
    if not any(type(n).__name__ == "CheckpointFunctionBackward" for n in nodes):
        got = torch.autograd.grad(loss, params, allow_unused=True)
        return {id(p): g for p, g in zip(params, got)}
    leaves = {id(p): p for p in params}
    leaves.update((id(n.variable), n.variable) for n in nodes if hasattr(n, "variable"))
    saved = [(t, t.grad) for t in leaves.values()]
    try:
        for t in leaves.values():
            t.grad = None
        loss.backward()
        return {id(p): p.grad for p in params}
    finally:
        for t, grad in saved:
            t.grad = grad

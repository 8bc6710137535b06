"""The static side of a model: names, types, nesting and parameter counts, with no forward pass."""

from __future__ import annotations

from torch import nn
from torch.nn.parameter import is_lazy

from .recorder import device_name, dtype_name, shared


def _nbytes(t) -> int:
    return t.numel() * t.element_size()


def initialised(model: nn.Module, modules: list[nn.Module] | None = None) -> list[nn.Parameter]:
    """The model's parameters, each once, without the lazy ones not yet initialised (``nn.LazyLinear``
    before its first call has no shape yet). ``modules``: the model's modules, if already walked (quicker)."""
    if modules is None:
        return [p for p in model.parameters() if not is_lazy(p)]
    seen: dict[int, nn.Parameter] = {}
    for module in modules:
        for p in module._parameters.values():
            if p is not None and id(p) not in seen and not is_lazy(p):
                seen[id(p)] = p
    return list(seen.values())


def uninitialised(module: nn.Module) -> bool:
    """Whether the module holds a lazy parameter or buffer of its own that has no shape yet."""
    return any(t is not None and is_lazy(t) for t in (*module._parameters.values(), *module._buffers.values()))


def module_tree(entries: list[tuple[str, nn.Module]]) -> dict[str, dict]:
    """For every ``named_modules()`` entry, in that order: the static fields of its ModuleReport, plus
    ``own``: its own parameters as (local name, parameter) pairs, and ``param_ids``: the ids of all its
    parameters, submodules included.

    One bottom-up pass: each module's parameter, buffer, device and dtype sets are its own joined with its
    children's, so a tensor shared or tied at several places is counted once. Lazy parameters and buffers not
    yet initialised are left out of the counts (they have no size yet: see ``uninitialised``).
    """
    children: dict[str, list[str]] = {name: [] for name, _ in entries}
    for name, _ in entries:
        if name:
            children[name.rpartition(".")[0]].append(name)
    params: dict[str, dict[int, object]] = {}
    buffers: dict[str, dict[int, object]] = {}
    places: dict[str, set[tuple[str, str]]] = {}
    tree = {}
    for name, module in reversed(entries):  # children before their parents
        own = [(local, p) for local, p in module._parameters.items() if p is not None and not is_lazy(p)]
        mine = {id(p): p for _, p in own}
        held = {id(b): b for b in module._buffers.values() if b is not None and not is_lazy(b)}
        where = {(device_name(t), dtype_name(t)) for t in (*mine.values(), *module._buffers.values()) if t is not None}
        for child in children[name]:
            mine.update(params[child])
            held.update(buffers[child])
            where |= places[child]
        params[name], buffers[name], places[name] = mine, held, where
        tree[name] = dict(
            name=name,
            type_name=type(module).__name__,
            depth=0 if not name else name.count(".") + 1,
            children=tuple(children[name]),
            num_params=sum(p.numel() for p in mine.values()),
            num_own_params=sum(p.numel() for _, p in own),
            num_trainable=sum(p.numel() for p in mine.values() if p.requires_grad),
            devices=shared(tuple(sorted({d for d, _ in where}))),
            dtypes=shared(tuple(sorted({t for _, t in where}))),
            param_bytes=sum(_nbytes(p) for p in mine.values()),
            buffer_bytes=sum(_nbytes(b) for b in held.values()),
            own=own,
            param_ids=mine.keys(),
        )
    return {name: tree[name] for name, _ in entries}

"""The static side of a model: names, types, nesting and parameter counts, with no forward pass."""

from __future__ import annotations

from torch import nn
from torch.nn.parameter import is_lazy

from .recorder import device_name, dtype_name, shared


def _facts(t, facts: dict[int, tuple]) -> tuple[int, int, int]:
    """(elements, bytes, trainable elements) of a tensor, computed once per tensor."""
    got = facts.get(id(t))
    if got is None:
        n = t.numel()
        got = facts[id(t)] = (n, n * t.element_size(), n if t.requires_grad else 0)
    return got


def _sizes(params: dict, buffers: dict, facts: dict[int, tuple]) -> tuple[int, int, int, int]:
    """(elements, trainable elements, bytes) of the parameters and the bytes of the buffers, each tensor once."""
    rows = [_facts(p, facts) for p in params.values()]
    return (sum(r[0] for r in rows), sum(r[2] for r in rows), sum(r[1] for r in rows),
            sum(_facts(b, facts)[1] for b in buffers.values()))


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
    children's, so a tensor shared or tied at several places is counted once; the sizes are the children's added
    up (each tensor's looked up once), and counted again over the joined set only where a join met a tensor twice.
    Lazy parameters and buffers not yet initialised are left out of the counts (they have no size yet: see
    ``uninitialised``).
    """
    children: dict[str, list[str]] = {name: [] for name, _ in entries}
    for name, _ in entries:
        if name:
            children[name.rpartition(".")[0]].append(name)
    facts: dict[int, tuple] = {}  # id -> (elements, bytes, trainable elements), once per tensor
    params: dict[str, dict[int, object]] = {}
    buffers: dict[str, dict[int, object]] = {}
    places: dict[str, frozenset[tuple[str, str]]] = {}
    sizes: dict[str, tuple[int, int, int, int]] = {}  # (parameters, trainable, parameter bytes, buffer bytes)
    named: dict[frozenset, tuple] = {}  # places -> (devices, dtypes)
    tree = {}
    for name, module in reversed(entries):  # children before their parents
        if module._parameters or module._buffers:
            own = [(local, p) for local, p in module._parameters.items() if p is not None and not is_lazy(p)]
            mine = {id(p): p for _, p in own}
            held = {id(b): b for b in module._buffers.values() if b is not None and not is_lazy(b)}
            where = {(device_name(t), dtype_name(t)) for t in (*mine.values(), *module._buffers.values())
                     if t is not None}
            num, trainable, nbytes, held_bytes = _sizes(mine, held, facts)
        else:  # most modules of a deep model (activations, containers): nothing of their own
            own, mine, held, where = [], {}, {}, set()
            num = trainable = nbytes = held_bytes = 0
        num_own = num
        tied = False  # a join met a tensor counted already: the sizes are counted again over the joined sets
        for child in children[name]:
            known = len(mine) + len(held)
            kid, kid_held = params[child], buffers[child]
            mine.update(kid)
            held.update(kid_held)
            tied = tied or len(mine) + len(held) < known + len(kid) + len(kid_held)
            a, b, c, d = sizes[child]
            num, trainable, nbytes, held_bytes = num + a, trainable + b, nbytes + c, held_bytes + d
            where |= places[child]
        if tied:
            num, trainable, nbytes, held_bytes = _sizes(mine, held, facts)
        where = frozenset(where)
        if where not in named:
            named[where] = (shared(tuple(sorted({d for d, _ in where}))), shared(tuple(sorted({t for _, t in where}))))
        params[name], buffers[name], places[name] = mine, held, where
        sizes[name] = num, trainable, nbytes, held_bytes
        tree[name] = dict(
            name=name,
            type_name=type(module).__name__,
            depth=0 if not name else name.count(".") + 1,
            children=tuple(children[name]),
            num_params=num,
            num_own_params=num_own,
            num_trainable=trainable,
            devices=named[where][0],
            dtypes=named[where][1],
            param_bytes=nbytes,
            buffer_bytes=held_bytes,
            own=own,
            param_ids=mine.keys(),
        )
    return {name: tree[name] for name, _ in entries}

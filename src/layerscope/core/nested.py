"""Walk nested values (tensors inside tuples, lists, dicts, namedtuples, dataclasses, objects)."""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import torch

_MAX_DEPTH = 8


def _children(value: Any) -> Iterator[tuple[Any, Any]] | None:
    """(key, child) pairs of a container, or None for a leaf."""
    if isinstance(value, Mapping):
        return iter(value.items())
    if isinstance(value, (tuple, list)):
        return iter(enumerate(value))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return ((f.name, getattr(value, f.name)) for f in dataclasses.fields(value))
    attrs = getattr(value, "__dict__", None)
    if attrs and not isinstance(value, (torch.nn.Module, type)):
        return iter(attrs.items())
    return None


def iter_tensors(value: Any, _depth: int = 0) -> Iterator[torch.Tensor]:
    """Every tensor in ``value``, depth first, in order."""
    if isinstance(value, torch.Tensor):
        yield value
        return
    if _depth >= _MAX_DEPTH:
        return
    children = _children(value)
    if children is not None:
        for _, child in children:
            yield from iter_tensors(child, _depth + 1)


def shape_tree(value: Any, _depth: int = 0) -> Any:
    """The same nesting as ``value`` with each tensor replaced by its shape (a tuple of ints).

    Tuples, lists and namedtuples become tuples, mappings and objects with tensor attributes
    become dicts, and anything that holds no tensor becomes None.
    """
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if _depth >= _MAX_DEPTH:
        return None
    if isinstance(value, (tuple, list)):
        return tuple(shape_tree(v, _depth + 1) for v in value)
    children = _children(value)
    if children is None:
        return None
    shapes = {str(k): shape_tree(v, _depth + 1) for k, v in children}
    return shapes if any(s is not None for s in shapes.values()) else None


def first_float_tensor(value: Any) -> torch.Tensor | None:
    """The first floating-point tensor in ``value`` (the one a module's statistics describe)."""
    for t in iter_tensors(value):
        if t.is_floating_point():
            return t
    return None


def call_model(model: torch.nn.Module, batch: Any) -> Any:
    """``model(**batch)`` for a mapping, ``model(*batch)`` for a tuple or list, else ``model(batch)``."""
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(*batch)
    return model(batch)


def call_inputs(args: tuple, kwargs: dict) -> Any:
    """What a module was called with, as one value: the lone argument, the args, or the kwargs."""
    if not kwargs:
        return args[0] if len(args) == 1 else args
    if not args:
        return kwargs
    return (*args, kwargs)


def map_tensors(value: Any, fn, _depth: int = 0) -> Any:
    """``value`` with ``fn`` applied to each tensor inside: tuples, lists, dicts, namedtuples, and objects
    holding tensors as attributes or items (dataclasses, Hugging Face's ModelOutput and Cache objects) are
    copied (shallow copies with the mapped entries put in), anything that holds no tensor is returned as it is."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if _depth >= _MAX_DEPTH or isinstance(value, (str, bytes, type, torch.nn.Module)):
        return value
    deeper = lambda v: map_tensors(v, fn, _depth + 1)
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        items = [deeper(v) for v in value]
        return value if _same(items, value) else type(value)(*items)
    if isinstance(value, (tuple, list)):
        items = [deeper(v) for v in value]
        return value if _same(items, value) else type(value)(items)
    if isinstance(value, Mapping):
        items = {k: deeper(v) for k, v in value.items()}
        if _same(items.values(), value.values()):
            return value
        return _copy_with(value, items, MutableMapping) if isinstance(value, MutableMapping) else dict(items)
    attrs = getattr(value, "__dict__", None)
    if not attrs:
        return value
    items = {k: deeper(v) for k, v in attrs.items()}
    return value if _same(items.values(), attrs.values()) else _copy_with(value, items)


def _same(new, old) -> bool:
    return all(a is b for a, b in zip(new, old))


def _copy_with(value: Any, items: dict, mapping=None) -> Any:
    """A shallow copy of ``value`` with ``items`` set as its entries (a mapping) or attributes; ``value``
    itself when it cannot be copied that way (an object that refuses)."""
    try:
        new = copy.copy(value)
        for key, item in items.items():
            if mapping is not None:
                new[key] = item
            else:
                object.__setattr__(new, key, item)
    except Exception:  # noqa: BLE001 - an odd object is passed on as it is rather than failing the caller
        return value
    return new

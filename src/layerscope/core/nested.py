"""Walk nested values (tensors inside tuples, lists, dicts, namedtuples, dataclasses, objects)."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

import torch

_MAX_DEPTH = 6


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


def map_tensors(value: Any, fn) -> Any:
    """A copy of tuples, lists and dicts in ``value`` with ``fn`` applied to each tensor."""
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, Mapping):
        return type(value)((k, map_tensors(v, fn)) for k, v in value.items())
    if isinstance(value, tuple) and hasattr(value, "_fields"):
        return type(value)(*(map_tensors(v, fn) for v in value))
    if isinstance(value, (tuple, list)):
        return type(value)(map_tensors(v, fn) for v in value)
    return value

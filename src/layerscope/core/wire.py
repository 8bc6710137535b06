"""A rank's capture as bytes between the processes of one job (``gather``): compact, fast to read, no pickle.

The store's format (``Capture.save``) names every field of every record, for files that a later release must
still read. Between the ranks of one job, which run the same code, records travel by position instead: each
record type's dataclass fields in their order, as JSON lists, with the bulk numbers as raw arrays (statistics as
float64 rows, histogram counts and edges, feature-map bits). A field added to a record travels as JSON without a
change here. Decoding reads JSON and raw numeric arrays only.

Layout: an 8-byte little-endian length of the JSON document, the document, then the arrays named in it.
"""

from __future__ import annotations

import dataclasses
import json
import operator
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .records import CallRecord, Capture, CaptureError, Finding, InputRecord, ModuleReport, ParamRecord
from .stats import Histogram, TensorStats
from .store import _plain


def _fields(kind, *special: str):
    """The record's fields in their order as a list, None for those written apart (their place is kept, as null)."""
    names = [f.name for f in dataclasses.fields(kind)]
    get, apart = operator.attrgetter(*names), [i for i, n in enumerate(names) if n in special]

    def values(obj) -> list:
        out = list(get(obj))
        for i in apart:
            out[i] = None
        return out

    return values


def _new(kind, names, values):
    """A frozen record from its fields' values, without running its ``__init__`` (the records here have no
    ``__post_init__``): a third of the cost, for thousands of records."""
    record = object.__new__(kind)
    record.__dict__.update(zip(names, values))
    return record


_STATS = [f.name for f in dataclasses.fields(TensorStats)]
_STATS_INT = [n not in ("mean", "m2", "min", "max") for n in _STATS]  # counts, held exactly by float64 rows
_STAT = operator.attrgetter(*_STATS)
_CALL = _fields(CallRecord, "stats", "histogram", "feature_maps", "per_rank")
_PARAM = _fields(ParamRecord, "per_rank")
_MODULE = _fields(ModuleReport, "calls", "params", "traits")
_INPUT = _fields(InputRecord, "stats", "per_rank")
_HEAD = [f.name for f in dataclasses.fields(Capture)
         if f.name not in ("modules", "findings", "inputs", "error", "output", "model", "batch")]
_ARRAYS = {"stats": np.float64, "counts": np.int64, "edges": np.float64, "maps": np.int16}


class _Writer:
    def __init__(self):
        self.stats: list[list[float]] = []
        self.parts: dict[str, list[np.ndarray]] = {"counts": [], "edges": [], "maps": []}

    def stat(self, s: TensorStats | None) -> int:
        if s is None:
            return -1
        self.stats.append(_STAT(s))
        return len(self.stats) - 1

    def call(self, c: CallRecord) -> list:
        h, maps = c.histogram, c.feature_maps
        if h is not None:
            self.parts["counts"].append(h.counts)
            self.parts["edges"].append(h.edges)
            h = [len(h.counts), h.sampled, h.numel, h.under, h.over, h.rebinned]
        if maps is not None:
            bits = maps.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
            self.parts["maps"].append(bits.reshape(-1))
            maps = list(bits.shape)
        return [_CALL(c), self.stat(c.stats), h, maps]

    def module(self, m: ModuleReport) -> list:
        return [_MODULE(m), sorted(m.traits), [self.call(c) for c in m.calls],
                [[k, _PARAM(p)] for k, p in m.params.items()]]


def encode(cap: Capture) -> bytes:
    """A rank's own capture (not a merged one) as bytes; its live objects stay behind."""
    w = _Writer()
    modules = [w.module(m) for m in cap.modules.values()]
    error = None if cap.error is None else {f.name: getattr(cap.error, f.name) for f in dataclasses.fields(CaptureError)
                                            if f.name != "exception"}
    doc = {
        "head": {n: getattr(cap, n) for n in _HEAD},
        "error": error,
        "findings": [dataclasses.asdict(f) for f in cap.findings],
        "inputs": [[_INPUT(i), w.stat(i.stats)] for i in cap.inputs],
        "modules": modules,
    }
    arrays = {"stats": np.asarray(w.stats, dtype=np.float64).reshape(-1, len(_STATS))}
    for name, parts in w.parts.items():
        arrays[name] = np.concatenate(parts).astype(_ARRAYS[name], copy=False) if parts else np.zeros(0, _ARRAYS[name])
    doc["arrays"] = {name: a.size for name, a in arrays.items()}
    text = json.dumps(doc, default=_plain, separators=(",", ":")).encode()
    return b"".join([len(text).to_bytes(8, "little"), text, *(a.tobytes() for a in arrays.values())])


def _tuples(value: Any) -> Any:
    """JSON lists back to tuples, nested ones too (shape trees); dicts kept."""
    if type(value) is list:
        return tuple([_tuples(v) if type(v) in (list, dict) else v for v in value])
    if type(value) is dict:
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _plan(kind) -> tuple[list[str], list[int], list[int], dict[str, int]]:
    """A record's fields, where its JSON list holds flat tuples (of plain values), nested ones (shape trees, Any),
    and the place of each field (for those written apart)."""
    fields = dataclasses.fields(kind)
    kinds = [str(f.type) for f in fields]
    flat = [i for i, k in enumerate(kinds) if k.startswith("tuple[") and k.count("tuple") == 1]
    nested = [i for i, k in enumerate(kinds) if i not in flat and any(w in k for w in ("tuple", "Any", "Mapping"))]
    return [f.name for f in fields], flat, nested, {f.name: i for i, f in enumerate(fields)}


_PLANS = {kind: _plan(kind) for kind in (CallRecord, ParamRecord, ModuleReport, InputRecord)}


def _record(kind, values: list, **apart):
    """The record from its JSON list (changed in place) and the fields written apart."""
    names, flat, nested, index = _PLANS[kind]
    for name, value in apart.items():
        values[index[name]] = value
    for i in flat:
        if values[i] is not None:
            values[i] = tuple(values[i])
    for i in nested:
        if type(values[i]) in (list, dict):
            values[i] = _tuples(values[i])
    return _new(kind, names, values)


def decode(data: bytes) -> Capture:
    """The capture ``encode`` wrote (``output``, ``model`` and ``batch`` None)."""
    size = int.from_bytes(data[:8], "little")
    doc = json.loads(data[8:8 + size])
    arrays, offset = {}, 8 + size
    for name, dtype in _ARRAYS.items():
        n = doc["arrays"][name]
        arrays[name] = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        offset += n * np.dtype(dtype).itemsize
    table = arrays["stats"].reshape(-1, len(_STATS))
    columns = [table[:, i].astype(np.int64 if is_int else np.float64).tolist() for i, is_int in enumerate(_STATS_INT)]
    stats = [_new(TensorStats, _STATS, row) for row in zip(*columns)]
    at = {"counts": 0, "edges": 0, "maps": 0}

    def take(name: str, n: int) -> np.ndarray:
        piece = arrays[name][at[name]:at[name] + n]
        at[name] += n
        return piece

    def call(values, stat, hist, maps) -> CallRecord:
        if hist is not None:
            bins, sampled, numel, under, over, rebinned = hist
            hist = Histogram(counts=take("counts", bins), edges=take("edges", bins + 1), sampled=sampled,
                             numel=numel, under=under, over=over, rebinned=rebinned)
        if maps is not None:
            maps = torch.from_numpy(take("maps", int(np.prod(maps))).reshape(maps).copy()).view(torch.bfloat16)
        return _record(CallRecord, values, stats=None if stat < 0 else stats[stat], histogram=hist,
                       feature_maps=maps)

    modules = {}
    for values, traits, calls, params in doc["modules"]:
        m = _record(ModuleReport, values, traits=frozenset(traits), calls=tuple(call(*c) for c in calls),
                    params=MappingProxyType({k: _record(ParamRecord, p) for k, p in params}))
        modules[m.name] = m
    error = doc["error"]
    return Capture(
        modules=MappingProxyType(modules),
        **doc["head"],
        error=None if error is None else CaptureError(**error),
        findings=tuple(Finding(**f) for f in doc["findings"]),
        inputs=tuple(_record(InputRecord, values, stats=None if s < 0 else stats[s])
                     for values, s in doc["inputs"]),
    )

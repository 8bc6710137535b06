"""A rank's capture as bytes between the processes of one job (``gather``): compact, fast to read, no pickle.

The store's format (``Capture.save``) names every field of every record, for files that a later release must
still read. Between the ranks of one job, which run the same code, records travel by position instead: each
record type's dataclass fields in their order, as JSON lists, with the bulk numbers as raw arrays (statistics as
float64 rows, histogram counts and edges, feature-map bits, and columns of floats such as the norms: writing and
reading floats as text is most of the cost of JSON). A field added to a record travels as JSON without a
change here. Decoding reads JSON and raw numeric arrays only.

When every rank holds the same modules, calls and parameters (``digest``), a rank other than the first sends
only what the merge takes from it (``encode(cap, lean=True)``): the first rank's records give the rest.

Layout: an 8-byte little-endian length of the JSON document, the document, then the arrays named in it.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import operator
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .records import (
    NO_PARAMS,
    CallRecord,
    Capture,
    CaptureError,
    Finding,
    InputRecord,
    ModuleReport,
    ParamRecord,
    build,
)
from .stats import HIST_SCALARS, Histogram, TensorStats
from .store import _plain


def _fields(kind, *apart: str) -> list:
    """A getter for each of the record's fields in their order; None for those written apart (their place is kept,
    as null)."""
    return [None if f.name in apart else operator.attrgetter(f.name) for f in dataclasses.fields(kind)]


def _row(getters: list, obj) -> list:
    return [None if get is None else get(obj) for get in getters]


_STATS = [f.name for f in dataclasses.fields(TensorStats)]
_STATS_INT = [n not in ("mean", "m2", "min", "max") for n in _STATS]  # counts, held exactly by float64 rows
_STAT = operator.attrgetter(*_STATS)
_CALL = _fields(CallRecord, "stats", "histogram", "feature_maps", "per_rank")
_PARAM = _fields(ParamRecord, "per_rank")
_MODULE = _fields(ModuleReport, "calls", "params", "traits")
_INPUT = _fields(InputRecord, "stats", "per_rank")
_HEAD = [f.name for f in dataclasses.fields(Capture)
         if f.name not in ("modules", "findings", "inputs", "error", "output", "model", "batch")]
# "hists": a row of each call's number of bins (-1: no histogram) and HIST_SCALARS
_ARRAYS = {"stats": np.float64, "counts": np.int64, "edges": np.float64, "maps": np.int16, "floats": np.float64,
           "hists": np.int64}
_HIST_ROW = operator.attrgetter(*HIST_SCALARS)
_NO_HIST = (-1,) + (0,) * len(HIST_SCALARS)


class _Writer:
    def __init__(self):
        self.stats: list[list[float]] = []
        self.parts: dict[str, list[np.ndarray]] = {"counts": [], "edges": [], "maps": [], "floats": [], "hists": []}
        self.floats = 0

    def stat(self, s: TensorStats | None) -> int:
        if s is None:
            return -1
        self.stats.append(_STAT(s))
        return len(self.stats) - 1

    def stats_of(self, stats: list[TensorStats | None]) -> list[int]:
        """``stat`` of each."""
        start = len(self.stats)
        self.stats += [_STAT(s) for s in stats if s is not None]
        places = iter(range(start, len(self.stats)))
        return [-1 if s is None else next(places) for s in stats]

    def histograms(self, hists: list[Histogram | None]) -> None:
        """Each one's counts and edges, and its row of "hists"."""
        held = [h for h in hists if h is not None]
        self.parts["counts"] += [h.counts for h in held]
        self.parts["edges"] += [h.edges for h in held]
        rows = [_NO_HIST if h is None else (h.counts.size, *_HIST_ROW(h)) for h in hists]
        self.parts["hists"].append(np.array(rows, dtype=np.int64).reshape(-1, len(_NO_HIST)))

    def float_column(self, column: list[float | None]) -> dict:
        """A column of floats (some None) as raw float64 numbers: where they start, how many, which are None."""
        none = [i for i, v in enumerate(column) if v is None]
        self.parts["floats"].append(np.array([0.0 if v is None else v for v in column], dtype=np.float64))
        self.floats += len(column)
        return {"floats": [self.floats - len(column), len(column)], "none": none}

    def maps(self, maps) -> list | None:
        if maps is None:
            return None
        bits = maps.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
        self.parts["maps"].append(bits.reshape(-1))
        return list(bits.shape)


def _texts(value) -> bool:
    """Whether a tuple or list holds only text (or None), nested ones too."""
    return all(v is None or type(v) is str or (type(v) in (tuple, list) and _texts(v)) for v in value)


def _columns(records: list, getters: list, w: _Writer) -> list:
    """Records' fields as columns; a column whose values are all the same (of one type) as {"same": value}, one of
    floats and None as ``_Writer.float_column``."""
    if not records:
        return []
    out = []
    for get in getters:
        if get is None:
            out.append({"same": None})
            continue
        column = list(map(get, records))
        first = column[0]
        same = column.count(first) == len(column) and len(set(map(type, column))) == 1
        if same and isinstance(first, (tuple, list)) and not _texts(first):  # (8, 512) == (8, 512.0): compare
            same = len(set(map(repr, column))) == 1  # as written (text equals only the same text)
        if same:
            out.append({"same": first})
        elif float in (types := set(map(type, column))) and types <= {float, type(None)}:
            out.append(w.float_column(column))
        else:
            out.append(_coded(column) or column)
    return out


def _coded(column: list) -> dict | None:
    """A column of few distinct texts or tuples of texts (devices, dtypes, traits) as those values and each row's
    number among them; None for other columns (text equals only the same text, so nothing else is merged)."""
    if not column or not _texts(column[:1]):  # (shapes, numbers: at once)
        return None
    try:
        distinct = list(dict.fromkeys(column))
    except TypeError:  # lists or dicts inside
        return None
    if len(distinct) * 4 > len(column) or not _texts(distinct):
        return None
    number = {v: i for i, v in enumerate(distinct)}
    return {"values": distinct, "codes": list(map(number.__getitem__, column))}


def digest(cap: Capture) -> bytes:
    """16 bytes that ranks whose captures hold the same modules in the same order, with as many calls and the same
    parameter names, share (what ``aligned.lined_up`` compares), and others do not."""
    modules = cap.modules
    layout = [list(modules), [len(m.calls) for m in modules.values()], [list(m.params) for m in modules.values()]]
    return hashlib.blake2b(json.dumps(layout, separators=(",", ":")).encode(), digest_size=16).digest()


@functools.cache
def _lean() -> tuple[list, list]:
    """The getters of ``encode(lean=True)`` for calls and modules: the fields the merge of ranks that line up reads
    of every rank but the first (``aligned.Columns``; stats, histograms and traits travel apart)."""
    from .distributed import _LARGEST, _SUMMED, _WHERE_FIELDS

    kept = {CallRecord: {*_WHERE_FIELDS, "grad_output_norm", "dead_units", "input_finite"},
            ModuleReport: {*_SUMMED, *_LARGEST, "devices", "dtypes", "unsupported_ops"}}
    return [_fields(kind, *(f.name for f in dataclasses.fields(kind) if f.name not in kept[kind]))
            for kind in (CallRecord, ModuleReport)]


def encode(cap: Capture, lean: bool = False) -> bytes:
    """A rank's own capture (not a merged one) as bytes; its live objects stay behind. ``lean``: only what the merge
    reads of a rank whose modules line up with the first rank's (``digest``); read with ``columns(data, like)``."""
    w = _Writer()
    call_fields, module_fields = _lean() if lean else (_CALL, _MODULE)
    modules = list(cap.modules.values())
    calls = [c for m in modules for c in m.calls]
    params = [p for m in modules for p in m.params.values()]
    traits = [tuple(sorted(m.traits)) for m in modules]
    error = None if cap.error is None else {f.name: getattr(cap.error, f.name) for f in dataclasses.fields(CaptureError)
                                            if f.name != "exception"}
    doc = {
        "head": {n: getattr(cap, n) for n in _HEAD},
        "error": error,
        "findings": [dataclasses.asdict(f) for f in cap.findings],
        "inputs": [[_row(_INPUT, i), w.stat(i.stats)] for i in cap.inputs],
        "lean": lean,
        "modules": _columns(modules, module_fields, w),
        "traits": _coded(traits) or traits,
        "keys": None if lean else [list(m.params) for m in modules],
        "calls_of": None if lean else [len(m.calls) for m in modules],
        "calls": _columns(calls, call_fields, w),
        "call_parts": [w.stats_of([c.stats for c in calls]), w.histograms([c.histogram for c in calls]),
                       [None] * len(calls) if lean else [w.maps(c.feature_maps) for c in calls]],
        "params": _columns(params, _PARAM, w),
    }
    arrays = {"stats": np.asarray(w.stats, dtype=np.float64).reshape(-1, len(_STATS))}
    for name, parts in w.parts.items():
        arrays[name] = (np.concatenate(parts, axis=None).astype(_ARRAYS[name], copy=False) if parts
                        else np.zeros(0, _ARRAYS[name]))
    doc["arrays"] = {name: a.size for name, a in arrays.items()}
    text = json.dumps(doc, default=_plain, separators=(",", ":")).encode()
    return b"".join([len(text).to_bytes(8, "little"), text, *arrays.values()])  # (the arrays' bytes as they are)


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
    return build(kind, zip(names, values))


def _flat(value):
    return None if value is None else tuple(value)


def _nested(value):
    return _tuples(value) if type(value) in (list, dict) else value


def _expand(column, read, n: int) -> list:
    """The ``n`` values of one of ``_columns``' columns, each read with ``read`` (None: as it is)."""
    if type(column) is not dict:
        return column if read is None else [read(v) for v in column]
    if "values" in column:  # _coded
        values = column["values"] if read is None else [read(v) for v in column["values"]]
        return list(map(values.__getitem__, column["codes"]))
    value = column["same"] if read is None else read(column["same"])
    try:
        hash(value)
        return [value] * n
    except TypeError:  # a dict inside: each record its own
        return [value] * n if read is None else [read(column["same"]) for _ in range(n)]


def _traits(doc: dict) -> list[frozenset]:
    return _expand(doc["traits"], frozenset, 0)


def _records(kind, columns: list, n: int, like: list | None = None, **apart) -> list:
    """The ``n`` records of ``_columns``' columns and the fields written apart (lists of ``n`` values). ``like``:
    another rank's ``n`` records of the kind; where a row holds the very values of its record there, that record is
    taken as it is (a replica's parameter under DDP: one record for both ranks, none built)."""
    names, flat, nested, index = _PLANS[kind]
    if not n:
        return []
    columns = [_expand(column, _flat if i in flat else _nested if i in nested else None, n)
               for i, column in enumerate(columns)]
    for name, values in apart.items():
        columns[index[name]] = values
    if like is None:
        return [build(kind, zip(names, row)) for row in zip(*columns)]
    values = operator.attrgetter(*names)
    return [same if row == values(same) else build(kind, zip(names, row)) for row, same in zip(zip(*columns), like)]


def _read(data: bytes) -> tuple[dict, dict[str, np.ndarray]]:
    """The JSON document and the raw arrays of ``encode``'s bytes (the statistics' rows: ``_stats``)."""
    size = int.from_bytes(data[:8], "little")
    doc = json.loads(bytes(data[8:8 + size]))  # (data may be a memoryview: gather reads its buffers in place)
    arrays, offset = {}, 8 + size
    for name, dtype in _ARRAYS.items():
        n = doc["arrays"][name]
        arrays[name] = np.frombuffer(data, dtype=dtype, count=n, offset=offset)
        offset += n * np.dtype(dtype).itemsize
    arrays["stats"] = arrays["stats"].reshape(-1, len(_STATS))
    arrays["hists"] = arrays["hists"].reshape(-1, len(_NO_HIST))
    floats = arrays["floats"]
    for part in ("modules", "calls", "params"):  # columns of floats back to lists
        for i, column in enumerate(doc[part]):
            if type(column) is dict and "floats" in column:
                start, n = column["floats"]
                values = floats[start:start + n].tolist()
                for k in column["none"]:
                    values[k] = None
                doc[part][i] = values
    return doc, arrays


def _stats(table: np.ndarray, wanted: list[bool] | None = None) -> list[TensorStats | None]:
    """The statistics' records of a table's rows: of every row, or of those ``wanted`` (None for the others)."""
    columns = [table[:, i].astype(np.int64 if is_int else np.float64).tolist() for i, is_int in enumerate(_STATS_INT)]
    if wanted is None:
        return [build(TensorStats, zip(_STATS, row)) for row in zip(*columns)]
    return [build(TensorStats, zip(_STATS, row)) if w else None for w, row in zip(wanted, zip(*columns))]


def _histograms(arrays: dict[str, np.ndarray]) -> list[Histogram | None]:
    hists, at = [], {"counts": 0, "edges": 0}
    for bins, sampled, numel, under, over, rebinned in arrays["hists"].tolist():
        if bins < 0:
            hists.append(None)
            continue
        counts = arrays["counts"][at["counts"]:at["counts"] + bins]
        edges = arrays["edges"][at["edges"]:at["edges"] + bins + 1]
        at["counts"], at["edges"] = at["counts"] + bins, at["edges"] + bins + 1
        hists.append(build(Histogram, counts=counts, edges=edges, sampled=sampled, numel=numel, under=under,
                           over=over, rebinned=bool(rebinned)))
    return hists


def _capture(doc: dict, stats: list[TensorStats], modules: dict) -> Capture:
    error = doc["error"]
    return Capture(
        modules=MappingProxyType(modules),
        **doc["head"],
        error=None if error is None else CaptureError(**error),
        findings=tuple(Finding(**f) for f in doc["findings"]),
        inputs=tuple(_record(InputRecord, values, stats=None if s < 0 else stats[s])
                     for values, s in doc["inputs"]),
    )


def decode(data: bytes) -> Capture:
    """The capture ``encode`` wrote (``output``, ``model`` and ``batch`` None)."""
    doc, arrays = _read(data)
    stats = _stats(arrays["stats"])
    if doc["lean"]:
        raise ValueError("these bytes hold only a part of a capture (encode(lean=True)): read them with columns()")
    stat, _, maps = doc["call_parts"]
    maps, at = list(maps), 0
    for i, shape in enumerate(maps):
        if shape is not None:
            n = int(np.prod(shape))
            bits = arrays["maps"][at:at + n].reshape(shape).copy()
            maps[i], at = torch.from_numpy(bits).view(torch.bfloat16), at + n
    calls = _records(CallRecord, doc["calls"], len(stat), stats=[None if k < 0 else stats[k] for k in stat],
                     histogram=_histograms(arrays), feature_maps=maps)
    params = _records(ParamRecord, doc["params"], sum(map(len, doc["keys"])))
    by_module, by_params, c, p = [], [], 0, 0
    for n, keys in zip(doc["calls_of"], doc["keys"]):
        by_module.append(tuple(calls[c:c + n]))
        by_params.append(MappingProxyType(dict(zip(keys, params[p:p + len(keys)]))) if keys else NO_PARAMS)
        c, p = c + n, p + len(keys)
    reports = _records(ModuleReport, doc["modules"], len(doc["keys"]), traits=_traits(doc),
                       calls=by_module, params=by_params)
    return _capture(doc, stats, {m.name: m for m in reports})


def _column(columns: list, kind, name: str, n: int) -> list:
    """One field of ``n`` records of ``_columns``' columns, read as ``_records`` reads it."""
    _, flat, nested, index = _PLANS[kind]
    i = index[name]
    return _expand(columns[i], _flat if i in flat else _nested if i in nested else None, n)


def columns(data: bytes, like=None):
    """What ``decode`` reads, as the capture's own fields (its ``modules`` empty) and its modules, calls and
    parameters as ``aligned.Columns``, without their records: what ``gather`` merges when the ranks line up.
    ``like``: the Columns of a capture with the same ``digest``, whose module names and layout lean bytes leave out
    (required for those)."""
    from .aligned import Columns
    from .distributed import _LARGEST, _SUMMED, _WHERE_FIELDS

    doc, arrays = _read(data)
    stat = doc["call_parts"][0]
    n, calls = len(stat), doc["calls"]
    call = lambda name: _column(calls, CallRecord, name, n)  # noqa: E731
    traits = _traits(doc)
    module = lambda name: _column(doc["modules"], ModuleReport, name, len(traits))  # noqa: E731
    table = np.full((n, len(_STATS)), np.nan)  # distributed.stats_table(held), from the rows as they came
    rows = np.asarray(stat, dtype=np.int64).reshape(-1)
    table[rows >= 0] = arrays["stats"][rows[rows >= 0]]
    # a call whose statistics are the very numbers of the first rank's, bit for bit (the same batch on replicas),
    # takes its record
    same = [False] * n
    if doc["lean"] and like is not None and like.table.shape == table.shape:
        same = (table.view(np.int64) == np.ascontiguousarray(like.table).view(np.int64)).all(axis=1).tolist()
    wanted = [False] * len(arrays["stats"])  # the rows to build: those of the other calls, and of the inputs
    for k in [*(k for k, s in zip(stat, same) if not s), *(k for _, k in doc["inputs"])]:
        if k >= 0:
            wanted[k] = True
    stats = _stats(arrays["stats"], wanted)
    held = [like.stats[i] if s else None if k < 0 else stats[k] for i, (k, s) in enumerate(zip(stat, same))]
    sizes = np.unique(arrays["hists"][:, 0]).tolist()
    bins = sizes[0] if len(sizes) == 1 and sizes[0] >= 0 else None
    arrays_of = dict(edges=None, counts=None, sums=None, hists=_histograms(arrays)) if bins is None else dict(
        edges=arrays["edges"].reshape(n, bins + 1), counts=arrays["counts"].reshape(n, bins),
        sums=arrays["hists"][:, 1:])
    if doc["lean"]:
        if like is None:
            raise ValueError("lean bytes (encode(lean=True)) are read with the Columns of a rank that lines up")
        names, layout = like.names, like.layout
    else:
        names, layout = module("name"), [(k, tuple(keys)) for k, keys in zip(doc["calls_of"], doc["keys"])]
    columns = Columns(
        names=names, layout=layout, reports=None, calls=None,
        params=_records(ParamRecord, doc["params"], sum(len(keys) for _, keys in layout),
                        like=like.params if doc["lean"] else None),
        where=list(zip(*[call(f) for f in _WHERE_FIELDS])),
        grads=call("grad_output_norm"), dead=call("dead_units"), finite=call("input_finite"), stats=held,
        table=table, bins=bins, **arrays_of, costs=list(zip(*[module(f) for f in _SUMMED + _LARGEST])),
        module_fields=dict(devices=module("devices"), dtypes=module("dtypes"),
                           traits=traits, unsupported_ops=module("unsupported_ops")))
    return _capture(doc, stats, {}), columns

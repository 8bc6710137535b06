"""``Capture.save(path)`` and ``layerscope.load(path)``: one file that holds every record, and nothing that runs.

The format (version 2) is a zip archive with exactly these members:

- ``layerscope.json``: ``{"format": "layerscope.capture", "version": 2, "capture": {...}, "modules": [...]}``,
  every record as JSON (NaN and Inf as JSON's ``NaN``/``Infinity`` tokens; tuples as lists). Each module is
  its ``ModuleReport`` fields, with its ``calls`` as ``CallRecord`` fields (a merged capture's ``per_rank``
  values inline, as lists with null for a rank that has none). A call's histogram and feature maps are not
  inline: they say where their numbers sit in the arrays below (``offset`` and ``bins`` or
  ``shape``).
- ``counts.npy`` (int64), ``edges.npy`` (float64), ``feature_maps.npy`` (int16: the bits of bfloat16 values,
  which numpy has no type for): the histograms' counts and edges and the feature-map samples of all calls,
  one after another, as flat numpy arrays.

Loading reads JSON and raw numpy arrays only (``allow_pickle=False``): a member that holds a pickle, an
array of Python objects, or any member not listed above is refused with a ``FormatError``, before anything
in the file is used. A loaded Capture has ``output``, ``model`` and ``batch`` None, and its error's
``exception`` None (the exception's type name, message and traceback text are kept).

A watched run (``Run.save``) is a zip of the same kind with ``"format": "layerscope.run"`` (version 1): its
``layerscope.json`` holds ``run`` (every, keep, step count, thresholds, parameter counts, pinned steps),
``modules`` (the module tree as ModuleReports without calls), ``edges`` (each module's histogram edges: offset and
length in ``edges.npy``), ``layouts`` (the calls of a step: module index, shapes, dtypes, devices), ``records``
(per sampled step: its step, layout, number of histogram bins, inputs, output size, gradient scale and learning
rates), ``scalars`` (offset and length of each in the scalar arrays) and ``seen`` (each one-pass finding as first
seen, its last step and count). The numbers sit in ``calls.npy``, ``params.npy`` (float64, the rows of
``run.CALL_FIELDS`` and ``run.PARAM_FIELDS``), ``counts.npy`` (int32, held as ``run.compact`` makes them),
``training.npy`` (uint8), ``edges.npy``, ``scalar_values.npy`` (float64) and ``scalar_steps.npy`` (int64), the
records' rows one after another. A run merged from the ranks of a job has ``world_size`` in ``run``, ``ranks`` in
each record and the ranks' rows in ``rank_calls.npy`` and ``rank_params.npy`` (float64), and ``rank_findings``.
``load`` reads the format field and returns a Capture or a Run.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import zipfile
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .records import NO_PARAMS, CallRecord, Capture, CaptureError, Finding, InputRecord, ModuleReport, ParamRecord
from .stats import Histogram, TensorStats

FORMAT, VERSION = "layerscope.capture", 2  # 2: the cost fields (FLOPs and bytes per module); 1 reads as before
RUN_FORMAT, RUN_VERSION = "layerscope.run", 1
_JSON = "layerscope.json"
_ARRAYS = {"counts": np.int64, "edges": np.float64, "feature_maps": np.int16}
_RUN_ARRAYS = {"calls": np.float64, "counts": np.int32, "params": np.float64, "training": np.uint8,
               "edges": np.float64, "scalar_steps": np.int64, "scalar_values": np.float64, "rank_calls": np.float64,
               "rank_params": np.float64}
_FORMATS = {FORMAT: (VERSION, _ARRAYS, "capture"), RUN_FORMAT: (RUN_VERSION, _RUN_ARRAYS, "run")}
_PICKLE_MAGIC = (b"\x80", b"(", b"c")  # protocol 2+ opcode PROTO, and the first opcodes of protocols 0 and 1


class FormatError(ValueError):
    """The file is not a layerscope capture this version can read, or it holds something it must not."""


def _fields(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


class _Writer:
    def __init__(self, arrays: dict = _ARRAYS):
        self.arrays = arrays
        self.parts: dict[str, list[np.ndarray]] = {name: [] for name in arrays}
        self.sizes = dict.fromkeys(arrays, 0)

    def put(self, name: str, values: np.ndarray) -> int:
        flat = np.ascontiguousarray(values, dtype=self.arrays[name]).reshape(-1)
        offset = self.sizes[name]
        self.parts[name].append(flat)
        self.sizes[name] += flat.size
        return offset

    def call(self, c: CallRecord) -> dict[str, Any]:
        d = _fields(c)
        d["stats"] = _stats_fields(c.stats)
        d["per_rank"] = _per_rank(c.per_rank, _stats_fields)
        h = c.histogram
        if h is not None:
            d["histogram"] = dict(bins=len(h.counts), counts=self.put("counts", h.counts),
                                  edges=self.put("edges", h.edges), sampled=h.sampled, numel=h.numel,
                                  under=h.under, over=h.over, rebinned=h.rebinned)
        if c.feature_maps is not None:
            maps = c.feature_maps.detach().to("cpu", torch.bfloat16).view(torch.int16).numpy()
            d["feature_maps"] = dict(shape=list(maps.shape), offset=self.put("feature_maps", maps))
        return d

    def module(self, m: ModuleReport) -> dict[str, Any]:
        d = _fields(m)
        d["calls"] = [self.call(c) for c in m.calls]
        d["params"] = {k: _param_fields(p) for k, p in m.params.items()}
        d["traits"] = sorted(m.traits)
        return d


def _stats_fields(s: TensorStats | None) -> dict | None:
    return None if s is None else _fields(s)


def _param_fields(p: ParamRecord | None) -> dict | None:
    return None if p is None else dict(_fields(p), per_rank=_per_rank(p.per_rank, _param_fields))


def _per_rank(values: tuple | None, fields) -> list | None:
    return None if values is None else [fields(v) for v in values]


def save(cap: Capture, path) -> None:
    """Write ``cap`` to ``path`` (conventionally ``.lsc``; or a binary file object): JSON records and flat numpy
    arrays in one zip."""
    writer = _Writer()
    modules = [writer.module(m) for m in cap.modules.values()]
    live = ("modules", "output", "model", "batch", "summary_text")
    head = {k: v for k, v in _fields(cap).items() if k not in live}
    head["summary_text"] = cap.summary_text if cap.summary_text is not None else cap.__dict__.get("_summary")
    if cap.error is not None:
        head["error"] = {k: v for k, v in _fields(cap.error).items() if k != "exception"}
    head["findings"] = [_fields(f) for f in cap.findings]
    head["inputs"] = [_input(i) for i in cap.inputs]
    _write(path, {"format": FORMAT, "version": VERSION, "capture": head, "modules": modules}, writer)


def _write(path, doc: dict, writer: _Writer) -> None:
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(_JSON, json.dumps(doc, default=_plain, separators=(",", ":")))
        for name, parts in writer.parts.items():
            values = np.concatenate(parts) if parts else np.zeros(0, dtype=writer.arrays[name])
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, values, allow_pickle=False)
            zf.writestr(f"{name}.npy", buffer.getvalue())


def _plain(value: Any) -> Any:
    """JSON for what json does not know: numpy scalars and arrays, frozensets, mapping proxies."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (set, frozenset)):
        return sorted(value)
    if isinstance(value, MappingProxyType):
        return dict(value)
    raise TypeError(f"cannot save a {type(value).__name__} in a layerscope file")


def _read(zf: zipfile.ZipFile) -> tuple[dict, dict[str, np.ndarray]]:
    names = zf.namelist()
    for name in names:
        with zf.open(name) as f:
            head = f.read(1)
        if name.endswith((".pkl", ".pickle", ".pt", ".pth")) or head in _PICKLE_MAGIC:
            raise FormatError(f"the file holds a pickle ({name!r}); layerscope files never do, so it was not loaded "
                              f"(loading a pickle can run any code)")
    if _JSON not in names:
        raise FormatError(f"not a layerscope file: it has no {_JSON}")
    try:
        doc = json.loads(zf.read(_JSON))
    except ValueError as exc:
        raise FormatError(f"{_JSON} is not valid JSON: {exc}") from None
    if not isinstance(doc, dict) or doc.get("format") not in _FORMATS:
        raise FormatError("not a layerscope capture or run (its format field is missing or different)")
    version, spec, what = _FORMATS[doc["format"]]
    if not isinstance(doc.get("version"), int) or doc["version"] > version:
        raise FormatError(f"this {what} has format version {doc.get('version')!r}; this layerscope reads up to "
                          f"version {version}: upgrade layerscope to open it")
    unknown = sorted(set(names) - {_JSON, *(f"{name}.npy" for name in spec)})
    if unknown:
        raise FormatError(f"the file holds {', '.join(map(repr, unknown))}, which a layerscope {what} never has; "
                          f"it was not loaded")
    arrays = {}
    for name, dtype in spec.items():
        member = f"{name}.npy"
        if member not in names:
            arrays[name] = np.zeros(0, dtype=dtype)
            continue
        with zf.open(member) as f:
            try:
                values = np.lib.format.read_array(f, allow_pickle=False)
            except ValueError as exc:  # an object array, which would need a pickle to read
                raise FormatError(f"{member} is not a plain numeric array ({exc}); it was not loaded") from None
        if values.dtype != dtype or values.ndim != 1:
            raise FormatError(f"{member} must be a flat {np.dtype(dtype).name} array, got {values.dtype} "
                              f"{values.shape}")
        arrays[name] = values
    return doc, arrays


def _tuples(value: Any) -> Any:
    """JSON lists back to the tuples they were (shapes, shape trees), dicts kept."""
    if isinstance(value, list):
        return tuple(_tuples(v) for v in value)
    if isinstance(value, dict):
        return {k: _tuples(v) for k, v in value.items()}
    return value


def _slice(arrays: dict, name: str, offset: int, size: int) -> np.ndarray:
    values = arrays[name]
    if not (0 <= offset and offset + size <= values.size):
        raise FormatError(f"a record points past the end of {name}.npy")
    return values[offset:offset + size].copy()


def _stats(d: dict | None) -> TensorStats | None:
    return None if d is None else TensorStats(**d)


def _ranks(values: list | None, read) -> tuple | None:
    return None if values is None else tuple(read(v) for v in values)


def _param(d: dict | None) -> ParamRecord | None:
    if d is None:
        return None
    shard = d.get("shard")
    return ParamRecord(**dict(d, shape=tuple(d["shape"]), placements=tuple(d.get("placements", ())),
                              shard=None if shard is None else tuple(shard),
                              per_rank=_ranks(d.get("per_rank"), _param)))


def _call(d: dict, arrays: dict) -> CallRecord:
    d = dict(d)
    for key in ("input_shapes", "output_shapes", "input_dtypes", "output_dtypes", "input_devices", "output_devices"):
        d[key] = _tuples(d[key])
    d["stats"] = _stats(d["stats"])
    d["per_rank"] = _ranks(d.get("per_rank"), _stats)
    h = d["histogram"]
    if h is not None:
        bins = int(h["bins"])
        d["histogram"] = Histogram(counts=_slice(arrays, "counts", h["counts"], bins),
                                   edges=_slice(arrays, "edges", h["edges"], bins + 1), sampled=h["sampled"],
                                   numel=h["numel"], under=h["under"], over=h["over"],
                                   rebinned=bool(h.get("rebinned", False)))
    fm = d["feature_maps"]
    if fm is not None:
        shape = tuple(int(n) for n in fm["shape"])
        size = int(np.prod(shape))
        bits = torch.from_numpy(_slice(arrays, "feature_maps", fm["offset"], size).reshape(shape))
        d["feature_maps"] = bits.view(torch.bfloat16)
    return CallRecord(**d)


def _module(d: dict, arrays: dict) -> ModuleReport:
    d = dict(d)
    d["children"] = tuple(d["children"])
    d["devices"], d["dtypes"] = tuple(d["devices"]), tuple(d["dtypes"])
    d["calls"] = tuple(_call(c, arrays) for c in d["calls"])
    d["params"] = MappingProxyType({k: _param(p) for k, p in d["params"].items()}) if d["params"] else NO_PARAMS
    d["traits"] = frozenset(d["traits"])
    d["bounds"] = None if d["bounds"] is None else tuple(d["bounds"])
    d["unsupported_ops"] = tuple(d.get("unsupported_ops", ()))
    return ModuleReport(**d)


def load(path):
    """Read a capture written by ``Capture.save`` (a Capture) or a run written by ``Run.save`` (a Run), from a
    path or a binary file object. Reads JSON and numbers only, never a pickle, so a file from someone else cannot
    run code. ``output``, ``model`` and ``batch`` are None on a capture it returns; a loaded run has no model to
    watch."""
    try:
        zf = zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        where = repr(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else "the data"
        raise FormatError(f"{where} is not a layerscope capture (not a zip archive)") from None
    with zf:
        doc, arrays = _read(zf)
    if doc["format"] == RUN_FORMAT:
        return _load_run(doc, arrays)
    try:
        head = dict(doc["capture"])
        modules = {m["name"]: _module(m, arrays) for m in doc["modules"]}
        error = head.get("error")
        head["error"] = None if error is None else CaptureError(**dict(error, received=error.get("received")))
        head["findings"] = tuple(Finding(**f) for f in head["findings"])
        head["inputs"] = tuple(_load_input(i) for i in head["inputs"])
        return Capture(modules=MappingProxyType(modules), **head)
    except (KeyError, TypeError, AttributeError) as exc:
        raise FormatError(f"the capture's records are incomplete or malformed ({type(exc).__name__}: {exc})") from None


def _input(i: InputRecord) -> dict[str, Any]:
    return dict(_fields(i), stats=_stats_fields(i.stats), per_rank=_per_rank(i.per_rank, _stats_fields))


def _load_input(d: dict) -> InputRecord:
    return InputRecord(**dict(d, shape=tuple(d["shape"]), stats=_stats(d["stats"]),
                              per_rank=_ranks(d.get("per_rank"), _stats)))


def save_run(run, path: str | os.PathLike) -> None:
    """Write a Run (its scalars flushed and its steps' one-pass findings taken) to ``path`` (conventionally .lsr)."""
    writer = _Writer(_RUN_ARRAYS)
    structure = run.structure
    modules = [writer.module(m) for m in structure.modules.values()]
    edges = {name: [writer.put("edges", e), len(e)] for name, e in run.edges.items()}
    layouts: list = []
    known: dict[int, int] = {}
    records = []
    for r in run.records:
        if id(r.layout) not in known:
            known[id(r.layout)] = len(layouts)
            layouts.append([list(call) for call in r.layout])
        writer.put("calls", r.calls)
        writer.put("counts", r.counts)
        writer.put("params", r.params)
        writer.put("training", r.training.astype(np.uint8))
        ranks = 0 if r.rank_calls is None else len(r.rank_calls)
        if ranks:
            writer.put("rank_calls", r.rank_calls)
            writer.put("rank_params", r.rank_params)
        records.append(dict(step=r.step, layout=known[id(r.layout)], calls=len(r.calls), bins=r.counts.shape[1],
                            inputs=[_input(i) for i in r.inputs], output_numel=r.output_numel,
                            grad_scale=r.grad_scale, lrs=list(r.lrs), ranks=ranks,
                            findings=[_fields(f) for f in r.findings]))
    scalars = {}
    for name in run.scalar_names:
        steps, values = run.scalars(name)
        scalars[name] = [writer.put("scalar_steps", steps), len(steps)]
        writer.put("scalar_values", values)
    head = dict(every=run.every, keep=run.keep, step_count=run.step_count, thresholds=run.thresholds,
                total_params=structure.total_params, trainable_params=structure.trainable_params,
                pinned=sorted(run._pinned), world_size=run.world_size)
    seen = [[_fields(f), last, count] for f, last, count in run._seen.values()]
    doc = {"format": RUN_FORMAT, "version": RUN_VERSION, "run": head, "modules": modules, "edges": edges,
           "layouts": layouts, "records": records, "scalars": scalars, "seen": seen,
           "rank_findings": [_fields(f) for f in run.rank_findings]}
    _write(path, doc, writer)


def _load_run(doc: dict, arrays: dict):
    from .run import CALL_FIELDS, PARAM_FIELDS, Run, StepRecord, compact, structure_of

    try:
        head = doc["run"]
        modules = {m["name"]: _module(m, arrays) for m in doc["modules"]}
        structure = structure_of(modules, head["total_params"], head["trainable_params"])
        edges = {}
        for name, (offset, size) in doc["edges"].items():
            e = _slice(arrays, "edges", offset, size)
            e.flags.writeable = False
            edges[name] = e
        run = Run(structure, every=head["every"], keep=head["keep"], thresholds=head["thresholds"], edges=edges)
        run.step_count = head["step_count"]
        run._pinned = set(head["pinned"])
        run.world_size = int(head.get("world_size", 1))
        layouts = [tuple((call[0], *(_tuples(v) for v in call[1:])) for call in layout) for layout in doc["layouts"]]
        at = dict.fromkeys(_RUN_ARRAYS, 0)
        params, modules_count = len(run.param_keys), len(structure.modules)

        def take(name: str, size: int) -> np.ndarray:
            values = _slice(arrays, name, at[name], size)
            at[name] += size
            return values

        for r in doc["records"]:
            calls, bins, ranks = int(r["calls"]), int(r["bins"]), int(r.get("ranks", 0))
            by_rank = {}
            if ranks:
                by_rank = dict(
                    rank_calls=take("rank_calls", ranks * calls * len(CALL_FIELDS)).reshape(ranks, calls, -1),
                    rank_params=take("rank_params", ranks * params * len(PARAM_FIELDS)).reshape(ranks, params, -1))
            run.records.append(StepRecord(**by_rank,
                step=int(r["step"]), layout=layouts[r["layout"]],
                calls=take("calls", calls * len(CALL_FIELDS)).reshape(calls, len(CALL_FIELDS)),
                counts=compact(take("counts", calls * bins).reshape(calls, bins)),
                params=take("params", params * len(PARAM_FIELDS)).reshape(params, len(PARAM_FIELDS)),
                training=take("training", modules_count).astype(bool),
                inputs=tuple(_load_input(i) for i in r["inputs"]), output_numel=r["output_numel"],
                grad_scale=r["grad_scale"], lrs=tuple(r["lrs"]),
                findings=tuple(Finding(**f) for f in r.get("findings", ()))))
        for name, (offset, size) in doc["scalars"].items():
            steps, values = _slice(arrays, "scalar_steps", offset, size), _slice(arrays, "scalar_values", offset, size)
            for step, value in zip(steps.tolist(), values.tolist()):
                run._add_scalar(name, step, value)
        for f, last, count in doc["seen"]:
            finding = Finding(**f)
            run._seen[finding.kind, finding.module] = [finding, last, count]
        run.rank_findings = tuple(Finding(**f) for f in doc.get("rank_findings", ()))
        return run
    except (KeyError, TypeError, AttributeError, ValueError, IndexError) as exc:
        raise FormatError(f"the run's records are incomplete or malformed ({type(exc).__name__}: {exc})") from None

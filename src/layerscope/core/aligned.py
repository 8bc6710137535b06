"""The merge of ranks' captures that line up: the same modules in the same order, each with the same number of calls
and the same parameters on every rank (a DDP, FSDP2 or tensor-parallel job whose ranks ran the same code).

``distributed.merge_records`` takes this path when it can. It gives the very records of the general path (which
matches modules by name and calls by number, one module at a time: tests/test_distributed.py checks both on the
same captures), computed a field at a time over all records of every rank: a few list comprehensions and array
operations in place of a few dozen Python lines per module, the bulk of a merge of thousands of modules.

Each rank's capture is first read into ``Columns`` (one list or array per field), which needs nothing of the other
ranks: ``gather`` reads its own while the others are still encoding theirs.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from .distributed import (
    _COSTS,
    _HIST,
    _SUMMED,
    _WHERE,
    _WHERE_FIELDS,
    _histograms,
    _param,
    _union,
    all_of,
    binned,
    costs_of,
    dead_in_job,
    merge_tables,
    stats_table,
    times,
)
from .records import NO_PARAMS, CallRecord, Capture, ModuleReport, ParamRecord, adopt, build
from .stats import HIST_SCALARS, Histogram, TensorStats


class Columns:
    """One rank's capture as the columns a merge reads: its calls and parameters in module order. ``of`` reads a
    Capture's records; ``wire.columns`` reads the bytes a rank sent without building its modules' and calls'
    records (``reports`` and ``calls`` are None then: a merge takes those of its first rank as the base of its
    own)."""

    names: list[str]
    layout: list[tuple[int, tuple[str, ...]]]  # each module's number of calls and parameter names
    reports: list[ModuleReport] | None
    calls: list[CallRecord] | None
    params: list[ParamRecord]
    where: list[tuple]  # each call's _WHERE_FIELDS
    grads: list[float | None]
    dead: list[int | None]
    finite: list[bool | None]
    stats: list[TensorStats | None]
    table: np.ndarray  # stats_table(stats)
    bins: int | None  # every call's histogram has this many bins; then edges, counts, sums as arrays [calls, ...]
    edges: np.ndarray | None
    counts: np.ndarray | None
    sums: np.ndarray | None  # HIST_SCALARS
    costs: list[tuple]  # each module's _COSTS
    module_fields: dict[str, list]  # devices, dtypes, traits, unsupported_ops: each module's

    def __init__(self, hists: list[Histogram | None] | None = None, **fields):
        self.__dict__.update(fields)
        self._hists = hists

    @classmethod
    def of(cls, cap: Capture) -> Columns:
        reports = list(cap.modules.values())
        calls = [c for m in reports for c in m.calls]
        stats = [c.stats for c in calls]
        hists = [c.histogram for c in calls]
        sizes = {None if h is None else h.counts.size for h in hists}
        bins = sizes.pop() if len(sizes) == 1 and None not in sizes else None
        arrays = dict(edges=None, counts=None, sums=None) if bins is None else dict(
            edges=np.stack([h.edges for h in hists]), counts=np.stack([h.counts for h in hists]),
            sums=np.array([_HIST(h) for h in hists], dtype=np.int64).reshape(-1, len(HIST_SCALARS)))
        return cls(
            names=list(cap.modules), layout=[(len(m.calls), tuple(m.params)) for m in reports], reports=reports,
            calls=calls, params=[p for m in reports for p in m.params.values()], where=[_WHERE(c) for c in calls],
            grads=[c.grad_output_norm for c in calls], dead=[c.dead_units for c in calls],
            finite=[c.input_finite for c in calls], stats=stats, table=stats_table(stats), hists=hists, bins=bins,
            **arrays, costs=[_COSTS(m) for m in reports],
            module_fields={field: [getattr(m, field) for m in reports]
                           for field in ("devices", "dtypes", "traits", "unsupported_ops")})

    @property
    def hists(self) -> list[Histogram | None]:
        """Each call's histogram (built from the arrays when read from bytes)."""
        if self._hists is None:
            self._hists = [build(Histogram, counts=c, edges=e, sampled=s, numel=n, under=u, over=o, rebinned=bool(r))
                           for c, e, (s, n, u, o, r) in zip(self.counts, self.edges, self.sums.tolist())]
        return self._hists




def lined_up(ranks: list[Columns]) -> bool:
    """Whether every rank has the first one's modules, in its order, with as many calls and the same parameters."""
    first = ranks[0]
    return all(r.names == first.names and r.layout == first.layout for r in ranks[1:])


def _same(columns: list[list]) -> bool:
    """Whether every rank's column holds the first rank's values."""
    return all(column == columns[0] for column in columns[1:])


def _root_sum_squares(columns: list[list[float | None]]) -> list[float | None]:
    """sqrt(sum of squares) over the ranks of each row's values that are not None; None where every rank's is."""
    known = np.array([[v is not None for v in column] for column in columns])
    values = np.array([[0.0 if v is None else v for v in column] for column in columns], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        roots = np.sqrt(np.square(values).sum(axis=0)).tolist()
    return [r if k else None for r, k in zip(roots, known.any(axis=0).tolist())]


def _histograms_of(ranks: list[Columns]) -> list:
    bins = {r.bins for r in ranks}
    if len(bins) == 1 and None not in bins:  # the usual case: the arrays as they are
        stack = lambda name: np.stack([getattr(r, name) for r in ranks], axis=1)  # noqa: E731
        return binned(stack("edges"), stack("counts"), stack("sums"))
    return _histograms(list(zip(*[r.hists for r in ranks])))


def _calls(ranks: list[Columns]) -> list[CallRecord]:
    """The merged calls, in module order."""
    first = ranks[0].calls
    indexes = [c.index for c in first]
    position = np.empty(len(first), dtype=np.int64)
    position[np.argsort(indexes, kind="stable")] = np.arange(len(first))  # the merged order is the first rank's
    wheres = [r.where for r in ranks]
    if _same(wheres):
        where = [{}] * len(first)
    else:  # dtypes or devices differ between ranks: all of them where they do
        where = [{} if ws.count(ws[0]) == len(ws) else dict(zip(_WHERE_FIELDS, [_union(list(g)) for g in zip(*ws)]))
                 for ws in zip(*wheres)]
    grads = _root_sum_squares([r.grads for r in ranks])  # the norm of all ranks' output gradients together
    dead = [dead_in_job(d, c.units) for d, c in zip(zip(*[r.dead for r in ranks]), first)]
    finite = [all_of(f) for f in zip(*[r.finite for r in ranks])]
    stats = merge_tables([r.table for r in ranks])
    out = []
    for c, i, s, h, g, d, f, p, w in zip(first, position.tolist(), stats, _histograms_of(ranks), grads, dead, finite,
                                          zip(*[r.stats for r in ranks]), where):
        fields = c.__dict__.copy()  # (a copy and a few stores: half the cost of {**fields, ...})
        fields["index"], fields["stats"], fields["histogram"], fields["grad_output_norm"] = i, s, h, g
        fields["dead_units"], fields["input_finite"], fields["per_rank"] = d, f, p
        if w:
            fields.update(w)
        out.append(adopt(CallRecord, fields))
    return out


def _params(ranks: list[Columns]) -> list[ParamRecord]:
    """The merged parameters, in module order."""
    # a plain tensor is a replica on every rank: its norms are the first rank's (as _param finds them, faster)
    out = []
    for row in zip(*[r.params for r in ranks]):
        if row[0].shard is not None:
            out.append(_param(row))
            continue
        fields = row[0].__dict__.copy()
        fields["shard"], fields["checksum"], fields["per_rank"] = None, None, row
        fields["finite"] = all_of([p.finite for p in row])
        out.append(adopt(ParamRecord, fields))
    return out


def modules(ranks: list[Columns]) -> dict[str, ModuleReport]:
    """The merged module reports of ranks that are ``lined_up``, by name in the first rank's order."""
    first, n = ranks[0].reports, len(ranks)
    calls, params = _calls(ranks), _params(ranks)
    rows = [r.costs for r in ranks]
    ops = [r.module_fields["unsupported_ops"] for r in ranks]
    if _same(rows) and _same(ops):  # replicas: n times the sums
        summed = [[v * n for v in column] if set(map(type, column)) == {int} else [times(v, n) for v in column]
                  for column in list(zip(*rows[0]))[:len(_SUMMED)]]
        changes = [dict(zip(_SUMMED, values)) for values in zip(*summed)]
    else:
        changes = [costs_of(r, o) for r, o in zip(zip(*rows), zip(*ops))]
    for field in ("devices", "dtypes", "traits"):
        columns = [r.module_fields[field] for r in ranks]
        if not _same(columns):
            merged = frozenset.intersection if field == "traits" else lambda *groups: _union(list(groups))
            for change, groups in zip(changes, zip(*columns)):
                change[field] = merged(*groups)
    out, c, p = {}, 0, 0
    for m, change in zip(first, changes):
        k, q = len(m.calls), len(m.params)
        fields = m.__dict__.copy()
        fields["calls"] = tuple(calls[c:c + k])
        fields["params"] = MappingProxyType(dict(zip(m.params, params[p:p + q]))) if q else NO_PARAMS
        fields.update(change)
        out[m.name] = adopt(ModuleReport, fields)
        c, p = c + k, p + q
    return out

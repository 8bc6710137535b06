"""The merge of ranks' captures that line up: the same modules in the same order, each with the same number of calls
and the same parameters on every rank (a DDP, FSDP2 or tensor-parallel job whose ranks ran the same code).

``distributed.merge_records`` takes this path when it can. It gives the very records of the general path (which
matches modules by name and calls by number, one module at a time: tests/test_distributed.py checks both on the
same captures), computed a field at a time over all records of every rank: a few list comprehensions and array
operations in place of a few dozen Python lines per module, the bulk of a merge of thousands of modules.
"""

from __future__ import annotations

from types import MappingProxyType

import numpy as np

from .distributed import _COSTS, _SUMMED, _WHERE, _WHERE_FIELDS, _costs, _global, _histograms, _stats_of, _union
from .records import CallRecord, Capture, ModuleReport, ParamRecord, build


def _layout(cap: Capture) -> list[tuple[int, tuple[str, ...]]]:
    return [(len(m.calls), tuple(m.params)) for m in cap.modules.values()]


def lined_up(captures: list[Capture]) -> bool:
    """Whether every capture has the first one's modules, in its order, with as many calls and the same parameters."""
    first = captures[0]
    names, layout = list(first.modules), _layout(first)
    return all(list(c.modules) == names and _layout(c) == layout for c in captures[1:])


def _same(columns: list[list]) -> bool:
    """Whether every rank's column holds the first rank's values."""
    return all(column == columns[0] for column in columns[1:])


def _all_of(flags: tuple) -> bool | None:
    """False when some rank says False, else None when some rank does not know, else True."""
    return False if False in flags else None if None in flags else True


def _root_sum_squares(columns: list[list[float | None]]) -> list[float | None]:
    """sqrt(sum of squares) over the ranks of each row's values that are not None; None where every rank's is."""
    known = np.array([[v is not None for v in column] for column in columns])
    values = np.array([[0.0 if v is None else v for v in column] for column in columns], dtype=np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        roots = np.sqrt(np.square(values).sum(axis=0)).tolist()
    return [r if k else None for r, k in zip(roots, known.any(axis=0).tolist())]


def _calls(calls: list[list[CallRecord]]) -> list[CallRecord]:
    """The merged calls from each rank's calls (``calls[r]``, in module order), in the same order."""
    per_call = list(zip(*calls))
    first = calls[0]
    indexes = [c.index for c in first]
    position = np.empty(len(first), dtype=np.int64)
    position[np.argsort(indexes, kind="stable")] = np.arange(len(first))  # the merged order is the first rank's
    wheres = [[_WHERE(c) for c in rank] for rank in calls]
    if _same(wheres):
        where = [{}] * len(first)
    else:  # dtypes or devices differ between ranks: all of them where they do
        where = [{} if ws.count(ws[0]) == len(ws) else dict(zip(_WHERE_FIELDS, [_union(list(g)) for g in zip(*ws)]))
                 for ws in zip(*wheres)]
    grads = _root_sum_squares([[c.grad_output_norm for c in rank] for rank in calls])  # of all ranks' outputs
    dead = zip(*[[c.dead_units for c in rank] for rank in calls])
    # a unit is dead in the job when it is dead on every rank: known when some rank has none or all are
    dead = [None if None in d else 0 if min(d) == 0 else c.units if min(d) == c.units else None
            for d, c in zip(dead, first)]
    finite = [_all_of(f) for f in zip(*[[c.input_finite for c in rank] for rank in calls])]
    per_rank = zip(*[[c.stats for c in rank] for rank in calls])
    return [build(CallRecord, c.__dict__, index=i, stats=s, histogram=h, grad_output_norm=g, dead_units=d,
                  input_finite=f, per_rank=p, **w)
            for c, i, s, h, g, d, f, p, w in zip(first, position.tolist(), _stats_of(per_call), _histograms(per_call),
                                                  grads, dead, finite, per_rank, where)]


def _params(params: list[list[ParamRecord]]) -> list[ParamRecord]:
    """The merged parameters from each rank's (``params[r]``, in module order), in the same order."""
    out = []
    for held in zip(*params):
        first = held[0]
        if first.shard is None:  # a plain tensor: a replica on every rank, its norms the first rank's
            norm, grad_norm = first.norm, first.grad_norm
        else:
            norm, grad_norm = _global(held, "norm"), _global(held, "grad_norm")
        out.append(build(ParamRecord, first.__dict__, norm=norm, grad_norm=grad_norm, shard=None, checksum=None,
                         finite=_all_of(tuple([p.finite for p in held])), per_rank=held))
    return out


def _times(value, n: int):
    """A number of one rank's summed over n identical ranks (as sum() would add it up)."""
    return value if value is None or n == 1 else value * n if type(value) is int else sum([value] * n)


def modules(captures: list[Capture]) -> dict[str, ModuleReport]:
    """The merged module reports of captures that are ``lined_up``, by name in the first capture's order."""
    reports = [list(c.modules.values()) for c in captures]
    first, n = reports[0], len(reports)
    calls = _calls([[call for m in rank for call in m.calls] for rank in reports])
    params = _params([[p for m in rank for p in m.params.values()] for rank in reports])
    rows = [[_COSTS(m) for m in rank] for rank in reports]
    if _same(rows) and _same([[m.unsupported_ops for m in rank] for rank in reports]):  # replicas: n times the sums
        changes = [dict(zip(_SUMMED, [_times(v, n) for v in row[:len(_SUMMED)]])) for row in rows[0]]
    else:
        changes = [_costs(held) for held in zip(*reports)]
    for field in ("devices", "dtypes", "traits"):
        columns = [[getattr(m, field) for m in rank] for rank in reports]
        if not _same(columns):
            merged = frozenset.intersection if field == "traits" else lambda *groups: _union(list(groups))
            for change, groups in zip(changes, zip(*columns)):
                change[field] = merged(*groups)
    out, c, p = {}, 0, 0
    for m, change in zip(first, changes):
        k, q = len(m.calls), len(m.params)
        out[m.name] = build(ModuleReport, m.__dict__, calls=tuple(calls[c:c + k]),
                            params=MappingProxyType(dict(zip(m.params, params[p:p + q]))), **change)
        c, p = c + k, p + q
    return out

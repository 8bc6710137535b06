"""``gather(run, dst=0)``: one Run of a whole distributed job from the runs ``layerscope.watch`` filled on its ranks.

``watch`` runs no collective: each rank records its own view of the steps it samples. ``gather`` is the one
collective (every rank calls it after its ``with`` block); each rank sends its run in the store's format (JSON and
raw numbers, no pickle) and ``dst`` merges them (``merge_runs``), step by step, as captures merge: the ranks'
captures of a step (``Run.at``) go through ``distributed.merge``, and the merged capture becomes the merged run's
record of that step. So, at each step sampled on every rank:

- activation statistics merged exactly over every rank's outputs, each call keeping each rank's statistics
  (``CallRecord.per_rank`` of ``merged_run.at(step)``); histograms on the ranks' shared range (each rank fixes its
  own edges from its first sampled step, so they are spread onto shared equal bins: approximate);
- parameter, gradient and update norms of sharded parameters as global norms (the square root of the summed
  squares of the distinct shards' norms), each rank's own kept in ``ParamRecord.per_rank``;
- the scalars given to ``run.log`` averaged over the ranks that logged them at each step (DDP and FSDP2 average
  the gradients of the ranks' losses, so the mean loss is the job's loss);
- findings: each rank's one-pass findings of a step with its ``rank`` (a NaN on one rank: that module, that rank,
  that step), the job-wide rules again on the merged records (gradients on global norms, ``rank_desync``), the
  findings over time on the merged run, and those over time that only some ranks show with their ``rank``.
"""

from __future__ import annotations

import dataclasses
import io
import math
import operator
from collections.abc import Sequence
from types import MappingProxyType

import numpy as np

from . import distributed
from .collector import paused
from .records import Capture, Finding, ParamRecord, copy_with
from .run import CALL_FIELDS, PARAM_FIELDS, Run, StepRecord, compact, structure_of
from .stats import TensorStats

_C = {name: i for i, name in enumerate(CALL_FIELDS)}
_P = {name: i for i, name in enumerate(PARAM_FIELDS)}
_STATS = ("numel", "count", "mean", "m2", "min", "max", "zeros", "checked", "nan_count", "inf_count")


def _encode(run: Run) -> bytes:
    buffer = io.BytesIO()
    run.save(buffer)
    return buffer.getvalue()


def _decode(data: bytes) -> Run:
    from .store import load

    return load(io.BytesIO(data))


def gather_run(dist, run: Run, dst: int) -> Run | None:
    """The merged run on ``dst``, None elsewhere (see ``distributed.gather``)."""
    run._flush()
    run._judge()
    runs = distributed.collect(dist, run, dst, _encode, _decode)
    return None if runs is None else merge_runs(runs)


def merge_runs(runs: Sequence[Run]) -> Run:
    """One run of a job from its ranks' runs, in rank order (``runs[r]`` is rank r's); records only, no
    communication: ``gather`` calls it on ``dst``, and it merges runs saved by each rank just as well.

    The merged run holds the steps sampled on every rank; its ``world_size`` is the number of runs."""
    runs = list(runs)
    if not runs or not all(isinstance(r, Run) for r in runs):
        raise TypeError("merge_runs() takes the ranks' Runs, in rank order")
    if any(r.merged for r in runs):
        raise ValueError("merge_runs() takes each rank's own run; one of them is already merged")
    first = runs[0]
    if any(list(r.structure.modules) != list(first.structure.modules) or r.param_keys != first.param_keys
           for r in runs[1:]):
        raise ValueError("merge_runs() takes runs of the same model on every rank; their modules or parameters differ")
    for r in runs:
        r._flush()
        r._judge()
    merged = Run(_structure(runs), every=first.every, keep=max(r.keep for r in runs), thresholds=first.thresholds)
    merged.world_size = len(runs)
    merged.step_count = max(r.step_count for r in runs)
    steps = sorted(set.intersection(*(set(r.steps.tolist()) for r in runs)))
    with paused():  # the job-wide findings of each step come from the merged run's own ``_judge`` below
        jobs = [distributed.merge_records([r.at(step) for r in runs]) for step in steps]
    for job in jobs:  # the run's edges: the merged histograms' (the same at every step: the ranks' edges are fixed)
        for name, call in job.calls:
            if call.histogram is not None and name not in merged.edges:
                edges = np.array(call.histogram.edges, dtype=np.float64)
                edges.flags.writeable = False
                merged.edges[name] = edges
    for step, job in zip(steps, jobs):
        merged._append(_record(merged, job, [r.record(step) for r in runs]))
    merged._pinned = set().union(*(r._pinned for r in runs)) & set(steps)
    _scalars(merged, runs)
    merged.rank_findings = tuple(_rank_trends(runs))
    merged._judge()
    return merged


def _structure(runs: list[Run]) -> Capture:
    """The module tree with each parameter's record merged over the ranks (``per_rank``: each rank's layout)."""
    structures = [r.structure for r in runs]
    first = structures[0]
    modules = {name: dataclasses.replace(report, params=MappingProxyType(
        {k: distributed._param([s[name].params[k] for s in structures]) for k in report.params}))
        for name, report in first.modules.items()}
    return structure_of(modules, first.total_params, first.trainable_params)


_STAT = operator.attrgetter(*_STATS)
_STAT_COLUMNS = [_C[n] for n in _STATS]
_NO_STATS = (math.nan,) * len(_STATS)


def _stats_rows(stats: list[TensorStats | None]) -> np.ndarray:
    return np.array([_NO_STATS if s is None else _STAT(s) for s in stats], dtype=np.float64).reshape(-1, len(_STATS))


def _column(values: list) -> np.ndarray:
    """Numbers as float64, None as NaN."""
    return np.array(values, dtype=np.float64)


def _record(run: Run, job: Capture, held: list[StepRecord]) -> StepRecord:
    """The merged capture of one step as the merged run's record of it."""
    calls = [c for _, c in job.calls]
    bins = max((len(e) - 1 for e in run.edges.values()), default=0)
    table = np.full((len(calls), len(CALL_FIELDS)), np.nan)
    ranks = np.full((len(held), len(calls), len(CALL_FIELDS)), np.nan)
    counts = np.zeros((len(calls), bins), dtype=np.int32)
    table[:, _STAT_COLUMNS] = _stats_rows([c.stats for c in calls])
    for r in range(len(held)):
        ranks[r][:, _STAT_COLUMNS] = _stats_rows([c.per_rank[r] if c.per_rank else None for c in calls])
    for name in ("grad_output_norm", "dead_units", "units", "input_finite", "output_id"):
        table[:, _C[name]] = _column([getattr(c, name) for c in calls])
    layout = []
    for i, (name, c) in enumerate(job.calls):
        layout.append((run._index[name], c.input_shapes, c.output_shapes, c.input_dtypes, c.output_dtypes,
                       c.input_devices, c.output_devices))
        edges, h = run.edges.get(name), c.histogram
        if edges is not None and c.stats is not None:
            if h is not None and not np.array_equal(h.edges, edges):
                h = h.rebin(edges)
            if h is not None:
                counts[i, :len(h.counts)] = h.counts
            table[i, [_C["sampled"], _C["under"], _C["over"]]] = (0, 0, 0) if h is None else (h.sampled, h.under,
                                                                                                h.over)
    rank_params = np.stack([r.params for r in held])
    merged = [job[name].params[local] for name, local in run.param_keys]
    params = np.full((len(merged), len(PARAM_FIELDS)), np.nan)
    params[:, _P["norm"]] = _column([p.norm for p in merged])
    params[:, _P["grad_norm"]] = _column([p.grad_norm for p in merged])
    for name in ("trainable", "group"):
        params[:, _P[name]] = held[0].params[:, _P[name]]
    # a plain tensor's norms are those of its replica on the lowest rank that holds it (``distributed._global``)
    lowest = [next(r for r, q in enumerate(p.per_rank) if q is not None) for p in merged]
    sharded = [row for row, (p, r) in enumerate(zip(merged, lowest)) if p.per_rank[r].shard is not None]
    for name in ("update_norm", "stale_grad"):
        params[:, _P[name]] = rank_params[lowest, np.arange(len(merged)), _P[name]]
        for row in sharded:
            params[row, _P[name]] = _global(merged[row], rank_params[:, row, _P[name]])
    first = held[0]
    return StepRecord(step=first.step, layout=tuple(layout), calls=table, counts=compact(counts), params=params,
                      training=first.training, inputs=job.inputs, output_numel=job.output_numel,
                      grad_scale=first.grad_scale, lrs=first.lrs, rank_calls=ranks, rank_params=rank_params,
                      findings=tuple(distributed.rank_findings(job)))


def _global(p: ParamRecord, values: np.ndarray) -> float:
    """A norm of the whole parameter from the ranks' norms of their pieces (``distributed._global``)."""
    pieces = [copy_with(q, norm=None if v != v else float(v)) for q, v in zip(p.per_rank, values.tolist())
              if q is not None]
    return _number(distributed._global(pieces, "norm"))


def _number(value) -> float:
    return math.nan if value is None else float(value)


def _scalars(merged: Run, runs: list[Run]) -> None:
    """Each logged scalar averaged over the ranks that logged it, at each step (a rank's last value of a step)."""
    names = list(dict.fromkeys(n for r in runs for n in r.scalar_names))
    for name in names:
        by_step: dict[int, list[float]] = {}
        for r in runs:
            if name not in r.scalar_names:
                continue
            steps, values = r.scalars(name)
            for step, value in dict(zip(steps.tolist(), values.tolist())).items():
                by_step.setdefault(step, []).append(value)
        for step in sorted(by_step):
            merged._add_scalar(name, step, float(np.mean(by_step[step])))


def _rank_trends(runs: list[Run]) -> list[Finding]:
    """The findings over time of each rank's own run, with its rank (``ranked`` keeps those the merged run lacks)."""
    from .trends import find_trends

    return [dataclasses.replace(f, rank=r) for r, run in enumerate(runs)
            for f in find_trends(run, **run.thresholds)]


def ranked(found: list[Finding], by_rank: Sequence[Finding], world: int) -> list[Finding]:
    """The merged run's findings over time with the ranks': one seen on only some ranks says the first of them
    (``details["ranks"]`` lists them); one that only ranks show is kept with its rank."""
    where: dict[tuple[str, str], list[Finding]] = {}
    for f in by_rank:
        where.setdefault((f.kind, f.module), []).append(f)
    out = []
    for f in found:
        seen = where.pop((f.kind, f.module), [])
        ranks = sorted({g.rank for g in seen})
        if seen and len(ranks) < world:
            f = dataclasses.replace(f, rank=ranks[0] if len(ranks) == 1 else None, details={**f.details,
                                                                                         "ranks": ranks})
        out.append(f)
    for seen in where.values():
        ranks = sorted({g.rank for g in seen})
        f = seen[0]
        out.append(dataclasses.replace(f, rank=None if len(ranks) == world else f.rank,
                                       details={**f.details, "ranks": ranks}))
    return out

"""``Run.to_tensorboard(logdir)``: a run's records as TensorBoard event files, for people who already use it.

Scalars go under their own names; per module, at every sampled step kept: ``activations/<module>`` (the
histogram on the run's fixed edges, values beyond them in an outer bucket each), ``grad_norm/<module>``,
``param_norm/<module>`` and ``update_ratio/<module>``. The root module is called "model".
"""

from __future__ import annotations

import math


def _writer(logdir):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ImportError("Run.to_tensorboard() needs tensorboard: pip install tensorboard "
                          "(or pip install 'layerscope[tensorboard]')") from None
    return SummaryWriter(str(logdir))


def tag(module: str) -> str:
    return module or "model"


def write(run, logdir, modules=None) -> None:
    names = list(run.structure.modules) if modules is None else list(modules)
    for name in names:
        run._check_module(name)
    writer = _writer(logdir)
    try:
        for scalar in run.scalar_names:
            for step, value in zip(*run.scalars(scalar)):
                writer.add_scalar(scalar, value, int(step))
        for name in names:
            for field in ("grad_norm", "param_norm", "update_ratio"):
                for step, value in zip(*run.series(name, field)):
                    if math.isfinite(value):
                        writer.add_scalar(f"{field}/{tag(name)}", value, int(step))
            _histograms(writer, run, name)
    finally:
        writer.close()


def _histograms(writer, run, name: str) -> None:
    from .run import CALL_FIELDS

    edges = run.edges.get(name)
    if edges is None:
        return
    c = {field: i for i, field in enumerate(CALL_FIELDS)}
    for record in run.records:
        row = run.first_row(record, name)
        if row is None or row[c["count"]] != row[c["count"]]:
            continue
        counts = record.counts[run.first_call_index(record, name), : len(edges) - 1]
        low, high = int(row[c["under"]]), int(row[c["over"]])
        limits, buckets = [float(e) for e in edges[1:]], [int(n) for n in counts]
        lo, hi = float(edges[0]), float(edges[-1])
        if low:  # values under the edges: one bucket from their minimum up to the first edge
            limits.insert(0, lo)
            buckets.insert(0, low)
            lo = min(lo, float(row[c["min"]]))
        if high:  # and one above the last edge, up to their maximum
            hi = max(hi, float(row[c["max"]]))
            limits.append(hi)
            buckets.append(high)
        total = sum(buckets)
        if not total:
            continue
        mean, count = float(row[c["mean"]]), float(row[c["count"]])
        writer.add_histogram_raw(f"activations/{tag(name)}", min=lo, max=hi, num=total, sum=mean * count,
                                 sum_squares=float(row[c["m2"]]) + count * mean * mean, bucket_limits=limits,
                                 bucket_counts=buckets, global_step=record.step)

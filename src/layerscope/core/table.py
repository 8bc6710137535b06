"""``Capture.to_pandas()``: the calls of a pass as a table, one row per call."""

from __future__ import annotations

from .records import Capture

COLUMNS = (
    "module", "type", "call", "index", "input_shapes", "output_shapes", "dtype", "device", "numel", "mean", "std",
    "min", "max", "zero_fraction", "nan_count", "inf_count", "grad_output_norm", "own_params", "params",
)


def to_pandas(cap: Capture):
    """A pandas DataFrame with one row per call, in the order the calls returned (columns: ``COLUMNS``)."""
    try:
        import pandas as pd
    except ImportError:
        raise ImportError("Capture.to_pandas() needs pandas: pip install pandas") from None
    rows = []
    seen: dict[str, int] = {}
    for name, call in cap.calls:
        report = cap[name]
        number = seen[name] = seen.get(name, -1) + 1
        s = call.stats
        rows.append((
            name, report.type_name, number, call.index, call.input_shapes, call.output_shapes,
            ", ".join(call.output_dtypes), ", ".join(call.output_devices),
            *((s.numel, s.mean, s.std, s.min, s.max, s.zero_fraction, s.nan_count, s.inf_count) if s is not None
              else (None,) * 8),
            call.grad_output_norm, report.num_own_params, report.num_params,
        ))
    return pd.DataFrame.from_records(rows, columns=list(COLUMNS))

"""What the report page shows, read from the records: one JSON-ready document and one array of bytes.

The document holds the tree's rows (the same rows the notebook's tree gets), and per module and call the
header, the statistics, the histogram's counts, the gradient norms, as the inspector words them
(``widget.text``), and where the call's feature maps sit in the bytes: each stored sample quantised to
256 levels on one colour scale (diverging around zero when values have both signs, as
``plots.feature_maps`` draws them), drawn in the page with the colour map's 256 colours.
"""

from __future__ import annotations

import base64
import math

import numpy as np

from ..core import CallRecord, Capture, ModuleReport, gradflow
from ..widget import rows, text

COLORMAPS = ("RdBu_r", "viridis")


def _number(value: float) -> float | None:
    """JSON has no NaN or Inf: those become null (the texts beside them say what they were)."""
    value = float(value)
    return value if math.isfinite(value) else None


class _Maps:
    """The feature-map samples of all calls as uint8, one after another."""

    def __init__(self):
        self.parts: list[bytes] = []
        self.size = 0

    def add(self, call: CallRecord) -> dict | None:
        if not call.has_maps:
            return None
        maps = call.feature_maps.detach().cpu().double().numpy()
        finite = maps[np.isfinite(maps)]
        lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
        if lo < 0 < hi:
            bound = max(-lo, hi)
            cmap, lo, hi = "RdBu_r", -bound, bound
        else:
            cmap = "viridis"
        if lo == hi:
            lo, hi = lo - 0.5, hi + 0.5
        scaled = (np.nan_to_num(maps, nan=lo, posinf=hi, neginf=lo) - lo) * (255 / (hi - lo))
        levels = np.clip(np.rint(scaled), 0, 255).astype(np.uint8).tobytes()
        entry = {"offset": self.size, "shape": list(maps.shape), "lo": lo, "hi": hi, "cmap": cmap,
                 "title": f"Channels 0–{len(maps) - 1} of {call.output_shapes[1]}, item 0"}
        self.parts.append(levels)
        self.size += len(levels)
        return entry


def _histogram(call: CallRecord) -> dict | None:
    h, s = call.histogram, call.stats
    if h is None or s is None:
        return None
    edges = np.asarray(h.edges, dtype=np.float64)
    step = (edges[-1] - edges[0]) / (len(edges) - 1)
    uniform = bool(np.abs(np.diff(edges) - step).max() <= 1e-6 * abs(step))
    notes = []
    if h.sampled < s.numel - s.nan_count - s.inf_count:
        notes.append(f"sampled {h.sampled:,} of {s.numel:,} values")
    if h.under or h.over:
        notes.append(f"{h.under:,} below and {h.over:,} above the fixed edges")
    bad = [f"{n:,} {kind}" for n, kind in ((s.nan_count, "NaN"), (s.inf_count, "Inf")) if n]
    shape = call.output_shapes
    dims = text.dims(shape) if isinstance(shape, tuple) and all(isinstance(d, int) for d in shape) else ""
    return {
        "counts": np.asarray(h.counts).tolist(),
        "edges": [_number(edges[0]), _number(edges[-1])] if uniform else [_number(e) for e in edges],
        "title": f"Output values ({dims})" if dims else "Output values",
        "notes": notes,
        "warn": " and ".join(bad) + " values (not binned)" if bad else None,
    }


def _call(cap: Capture, report: ModuleReport, call: CallRecord, maps: _Maps) -> dict:
    return {
        "header": text.header_rows(report, call, cap),
        "stats": text.stats_rows(call),
        "hist": _histogram(call),
        "maps": maps.add(call),
        "grad": text.norm(call.grad_output_norm),
    }


def _module(cap: Capture, report: ModuleReport, maps: _Maps) -> dict:
    return {
        "title": text.display_name(report.name),
        "type": report.type_name,
        "header": text.header_rows(report, None, cap),
        "calls": [_call(cap, report, c, maps) for c in report.calls],
        "grads": text.gradient_rows(report),
        "ratio": text.layer_ratio(report, cap),
    }


def gradient_flow(cap: Capture) -> dict:
    """The gradient-flow chart's data: per layer with parameters, in execution order, [name, gradient norm or
    None, why it has none (gradflow.missing) or None, the vanishing/exploding finding naming it or None]."""
    layers = gradflow.layer_gradients(cap) if cap.backward else []
    kinds = gradflow.flagged(cap, [name for name, _, _ in layers])
    drawn = []
    for name, norm, frozen in layers:
        why = gradflow.missing(norm, frozen)
        drawn.append([name, None if why is not None else norm, why, kinds.get(name)])
    why = "" if layers else "no layer with parameters was called" if cap.backward else "no gradients were computed"
    if why and cap.error is not None:
        why += f": {cap.error.message}"
    return {"title": "Gradient flow" + (f" (loss: {cap.loss_kind})" if cap.loss_kind else ""), "layers": drawn,
            "why": why}


def colormaps() -> dict[str, str]:
    """The colour maps the feature maps use, 256 RGB colours each, base64."""
    from matplotlib import colormaps as registry

    out = {}
    for name in COLORMAPS:
        rgb = registry[name](np.linspace(0.0, 1.0, 256))[:, :3]
        out[name] = base64.b64encode(np.rint(rgb * 255).astype(np.uint8).tobytes()).decode("ascii")
    return out


def document(cap: Capture, *, explain: list[dict] | None = None, title: str | None = None) -> tuple[dict, bytes]:
    """The report's document and its bytes (the feature maps). ``explain`` is Grad-CAM views (see
    ``pictures.explain``)."""
    maps = _Maps()
    modules = [_module(cap, m, maps) for m in cap.modules.values()]
    selected, expanded = rows.start(cap)
    root = cap.modules[""]
    err = cap.error
    doc = {
        "title": title or f"layerscope: {root.type_name}",
        "subtitle": f"{len(cap.modules):,} modules · {cap.total_params:,} parameters"
                    + (f" · loss ({cap.loss_kind}) {cap.loss:.4g}" if cap.loss is not None else "")
                    + (" · meta device: shapes and counts only" if cap.meta else ""),
        "tree": {"rows": rows.tree_rows(cap), "selected": selected, "expanded": expanded,
                 "marked": err.module if err is not None else None},
        "modules": modules,
        "error": None if err is None else {"lead": text.failed(err), "message": err.message, "module": err.module},
        "backward": cap.backward,
        "findings": [{"severity": f.severity, "module": f.module, "kind": f.kind, "message": f.message,
                      "label": text.finding_line(f), "fix": f.fix, "modules": list(f.modules)}
                     for f in cap.findings],
        "summary": cap.summary(),
        "gradient_flow": gradient_flow(cap),
        "explain": explain or [],
        "colormaps": colormaps() if maps.size else {},
    }
    return doc, b"".join(maps.parts)

"""The inspector's HTML fragments. Every value from the model or the user goes through ``html.escape``."""

from __future__ import annotations

import html
import io
from collections.abc import Iterable
from typing import Any

from ..core import CallRecord, Capture, ModuleReport, TensorStats
from ..core.records import human, human_bytes

ROOT_LABEL = "(model)"
RANK_COLUMNS = 8  # a merged capture's stats table shows at most this many ranks side by side


def count(n: int) -> str:
    """The exact parameter count shown in the header: 9280 -> '9,280'."""
    return f"{n:,}"


def shape(value: Any) -> str:
    """(1, 64, 54, 54) -> '(1, 64, 54, 54)'; nested shapes keep their nesting; no tensor -> '-'."""
    return "-" if value is None else str(value)


def dims(value: Any, sep: str = " x ") -> str:
    """A plain shape as its sizes: (1, 64, 55, 55) -> '1 x 64 x 55 x 55' ('1x64x55x55' with sep='x'); () ->
    'scalar'; a nested shape tree as it prints, without spaces; no tensor -> '-'."""
    if isinstance(value, tuple) and all(isinstance(d, int) for d in value):
        return sep.join(map(str, value)) or "scalar"
    return "-" if value is None else str(value).replace(" ", "")


def display_name(name: str) -> str:
    return name or ROOT_LABEL


def png(fig) -> bytes:
    """A matplotlib Figure as PNG bytes, rendered by Agg whatever the notebook's backend is."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=80)
    return buf.getvalue()


def _rows(pairs: Iterable[tuple[str, str]]) -> str:
    return "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in pairs)


def table(pairs: Iterable[tuple[str, str]], cls: str = "") -> str:
    return f'<table class="ls-table {cls}">{_rows(pairs)}</table>'


def note(text: str, cls: str = "ls-note") -> str:
    return f'<div class="{cls}">{html.escape(text)}</div>'


def share(part: float | None, whole: float | None) -> str:
    """'12%' of the model's total ('<1%' for a sliver, '' when there is no total)."""
    if part is None or not whole:
        return ""
    ratio = part / whole
    return "<1%" if 0 < ratio < 0.005 else f"{ratio:.0%}"


def flops(report: ModuleReport, total: int | None) -> str | None:
    """The FLOPs line of the header: own, total, share of the model's, backward, and the ops left out."""
    if report.flops is None:
        return None
    text = f"own {human(report.own_flops)} · total {human(report.flops)}"
    if total:
        text += f" ({share(report.flops, total)} of the model)"
    if report.backward_flops is not None:
        text += f" · backward {human(report.backward_flops)}"
    if report.unsupported_ops:
        text += f" · a lower bound: no formula for {', '.join(report.unsupported_ops)}"
    return text


def memory(report: ModuleReport, total: int | None) -> str:
    """The memory line of the header: activations (with their share of the model's), parameters, gradients,
    buffers, outputs and the CUDA peak, each when known."""
    parts = []
    if report.activation_bytes is not None:
        of = f" ({share(report.activation_bytes, total)} of the model)" if total else ""
        parts.append(f"activations {human_bytes(report.activation_bytes)}{of}")
    parts.append(f"parameters {human_bytes(report.param_bytes)}")
    if report.grad_bytes is not None:
        parts.append(f"gradients {human_bytes(report.grad_bytes)}")
    if report.buffer_bytes:
        parts.append(f"buffers {human_bytes(report.buffer_bytes)}")
    parts.append(f"outputs {human_bytes(report.output_bytes)}")
    if report.peak_bytes is not None:
        parts.append(f"peak {human_bytes(report.peak_bytes)}")
    return " · ".join(parts)


def header_rows(report: ModuleReport, call: CallRecord | None, cap: Capture | None = None) -> list[tuple[str, str]]:
    """The header's rows (label, value) for one call of a module (``call`` None: never called); with the
    capture, the FLOPs and memory rows give shares of the model's totals."""
    devices = sorted({*report.devices, *(call.output_devices if call else ())})
    dtypes = sorted({*report.dtypes, *(call.output_dtypes if call else ())})
    if call is None:
        shapes = "never called"
    elif call.failed:
        shapes = f"{shape(call.input_shapes)} → failed (raised, no output)"
    else:
        shapes = f"{shape(call.input_shapes)} → {shape(call.output_shapes)}"
    failures = sum(c.failed for c in report.calls)
    calls = str(len(report.calls))
    if failures:
        calls += " (failed)" if failures == len(report.calls) else f" ({failures} failed)"
    params = f"own {count(report.num_own_params)} · total {count(report.num_params)} · " \
             f"trainable {count(report.num_trainable)}"
    cost = flops(report, cap.flops if cap is not None else None)
    return [
        ("Parameters", params),
        *([("FLOPs", cost)] if cost is not None else []),
        ("Memory", memory(report, cap.activation_bytes if cap is not None else None)),
        ("Device", ", ".join(devices) or "-"),
        ("Dtype", ", ".join(dtypes) or "-"),
        ("Shapes", shapes),
        ("Calls", calls),
        *([("Loss", loss_line(cap))] if cap is not None and report.name == "" and cap.loss_kind else []),
    ]


LOSSES = {"cross_entropy": "cross-entropy with the target", "loss_fn": "your loss_fn",
          "model_loss": "the loss the model returned", "sum": "the sum of the outputs (no target given)",
          "training": "your training loss"}


def loss_line(cap: Capture) -> str:
    """'2.31 · cross-entropy with the target': the loss the gradients are of, in one line."""
    value = "not computed" if cap.loss is None else f"{cap.loss:.4g}"
    return f"{value} · {LOSSES.get(cap.loss_kind, str(cap.loss_kind))}"


def loss_note(cap: Capture) -> str | None:
    """What the gradients are gradients of, and, for the stand-in sum, how to pass a real loss."""
    if not cap.backward or cap.loss_kind is None:
        return None
    text = f"Gradients of the loss: {loss_line(cap)}."
    if cap.loss_kind == "sum":
        text += (f" With no target, the loss is a stand-in: the sum of the model's {count(cap.output_numel)} output "
                 f"values, so each gradient says how that sum would change. Pass target=labels (class indices, one per "
                 f"item) for cross-entropy, or loss_fn=lambda output, batch: ... for your own loss.")
    return text


def header(report: ModuleReport, call: CallRecord | None, cap: Capture | None = None) -> str:
    title = (
        f'<div class="ls-title"><span class="ls-name">{html.escape(display_name(report.name))}</span> '
        f'<span class="ls-type">{html.escape(report.type_name)}</span></div>'
    )
    return title + table(header_rows(report, call, cap), "ls-header-table")


NO_FLOAT_OUTPUT = "This call has no floating-point output."


NO_FINITE = "no finite values"


def _stat_rows(s: TensorStats) -> list[tuple[str, str]]:
    if s.numel and not s.count:  # every value NaN or Inf: there is nothing to average
        return [("elements", count(s.numel)), *((k, NO_FINITE) for k in ("mean", "std", "min", "max", "zeros")),
                ("NaN", count(s.nan_count)), ("Inf", count(s.inf_count))]
    return [
        ("elements", count(s.numel)),
        ("mean", f"{s.mean:.6g}"),
        ("std", f"{s.std:.6g}"),
        ("min", f"{s.min:.6g}"),
        ("max", f"{s.max:.6g}"),
        ("zeros", f"{s.zero_fraction:.2%}" + ("" if s.exact else " (sampled)")),
        ("NaN", count(s.nan_count)),
        ("Inf", count(s.inf_count)),
    ]


def _rank_stats(call: CallRecord) -> tuple | None:
    """A merged capture's per-rank statistics of the call, when the ranks differ."""
    ranks = call.per_rank
    return ranks if ranks and len({r for r in ranks if r is not None}) > 1 else None


def _pairs(call: CallRecord) -> list[tuple[str, str]]:
    pairs = _stat_rows(call.stats)
    if call.dead_units is not None:
        pairs.append(("dead channels", f"{call.dead_units} of {call.units}"))
    return pairs


def stats_rows(call: CallRecord) -> list[tuple[str, str]] | None:
    """The statistics of one call's output as (label, value) rows; None when it has no floating-point output.
    On a merged capture whose ranks differ, also the mean and std of each rank (the first RANK_COLUMNS)."""
    if call.stats is None:
        return None
    pairs = _pairs(call)
    ranks = _rank_stats(call)
    if ranks:
        for label in ("mean", "std"):
            values = [dict(_stat_rows(r))[label] if r is not None else "-" for r in ranks[:RANK_COLUMNS]]
            pairs.append((f"{label} by rank", " · ".join(values)))
    return pairs


def stats(call: CallRecord) -> str:
    """The call's output statistics; on a merged capture, with a column per rank when the ranks differ."""
    if call.stats is None:
        return note(NO_FLOAT_OUTPUT)
    ranks = _rank_stats(call)
    return _by_rank(_pairs(call), ranks) if ranks else table(_pairs(call), "ls-stats")


def _by_rank(pairs: list[tuple[str, str]], ranks) -> str:
    shown = ranks[:RANK_COLUMNS]
    columns = [dict(_stat_rows(r)) if r is not None else {} for r in shown]
    head = "<tr><th></th><th>all ranks</th>" + "".join(f"<th>rank {i}</th>" for i in range(len(shown))) + "</tr>"
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td>"
                   + "".join(f"<td>{html.escape(c.get(k, '-'))}</td>" for c in columns) + "</tr>" for k, v in pairs)
    more = note(f"First {RANK_COLUMNS} of {len(ranks)} ranks.") if len(ranks) > RANK_COLUMNS else ""
    return f'<table class="ls-table ls-stats ls-ranks">{head}{rows}</table>{more}'


NO_BACKWARD = "No gradients: the capture ran without a backward pass, or the pass failed before it."
NO_OWN_PARAMS = "This module has no parameters of its own."


def norm(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def ratio(grad: float | None, weight: float | None) -> str:
    """A gradient norm over a weight norm, as the findings judge it ('-' when either is missing or 0)."""
    return "-" if grad is None or not weight else f"{grad / weight:.3g}"


def gradient_rows(report: ModuleReport) -> list[tuple[str, str, str, str]]:
    """(parameter, gradient norm, norm, grad/weight ratio) for each parameter the module holds itself."""
    return [(local, norm(p.grad_norm), norm(p.norm), ratio(p.grad_norm, p.norm)) for local, p in report.params.items()]


GRAD_COLUMNS = ("parameter", "grad norm", "norm", "grad / norm")


def layer_ratio(report: ModuleReport, cap: Capture) -> str | None:
    """The module's gradient-to-weight ratio over its own trainable parameters, as the vanishing/exploding
    findings compute it (a "sum" loss divided by the number of outputs it sums); None without gradients."""
    own = [p for p in report.params.values() if p.trainable and p.grad_norm is not None and p.norm is not None]
    if not own:
        return None
    scale = float(cap.output_numel or 1) if cap.loss_kind == "sum" else 1.0
    grad = sum(p.grad_norm ** 2 for p in own) ** 0.5 / scale
    weight = sum(p.norm ** 2 for p in own) ** 0.5
    text = ratio(grad, weight)
    return text + (f" (loss: sum over {scale:,.0f} outputs, divided out)" if scale != 1 else "")


def gradients(report: ModuleReport, call: CallRecord | None, backward: bool, cap: Capture | None = None) -> str:
    if not backward:
        return note(NO_BACKWARD)
    rows = "".join(f"<tr>{''.join(f'<td>{html.escape(v)}</td>' for v in row)}</tr>" for row in gradient_rows(report))
    head = "".join(f"<th>{html.escape(h)}</th>" for h in GRAD_COLUMNS)
    params = f'<table class="ls-table ls-grads"><tr>{head}</tr>{rows}</table>' if rows else note(NO_OWN_PARAMS)
    out = norm(call.grad_output_norm) if call else "-"
    pairs = [("output grad norm", out)]
    layer = layer_ratio(report, cap) if cap is not None else None
    if layer is not None:
        pairs.append(("layer grad / weight (what the findings judge)", layer))
    return params + table(pairs, "ls-out-grad")


def failed_call(call: CallRecord, err=None) -> str:
    """The Activations panel of a call that raised: what it got, and that it returned nothing."""
    kind = f"{', '.join(call.input_dtypes) or '-'} on {', '.join(call.input_devices) or '-'}"
    got = f"{shape(call.input_shapes)} ({kind})"
    why = f" {err.message}" if err is not None else ""
    return note(f"This call failed: it received {got} and raised before returning, so it has no output to "
                f"show.{why}", "ls-note ls-warn ls-failed-call")


def failed(err) -> str:
    """The banner's lead: 'Forward failed:', 'Backward failed:', ..."""
    return f"{err.phase.capitalize()} failed:"


def error(err) -> str:
    """The banner over a failed capture; the message names the module and what went wrong."""
    return f'<div class="ls-error-banner"><b>{html.escape(failed(err))}</b> {html.escape(err.message)}</div>'



def predictions(pairs: Iterable[tuple[int, float]], class_names, truth: int | None = None,
                uniform: bool = False) -> str:
    """The top classes of one item, with their softmax probabilities; the true class when known, and a note when
    the predictions are near uniform (an untrained model)."""
    rows = [(class_label(k, class_names), f"{p:.2%}") for k, p in pairs]
    out = "<b>Top predictions</b>" + table(rows, "ls-top5")
    if truth is not None:
        out += f'<div class="ls-truth">True label (target): <b>{html.escape(class_label(truth, class_names))}</b></div>'
    if uniform:
        out += note("The predictions are close to uniform, as from an untrained model: Grad-CAM then shows what "
                    "random weights react to, not what the model has learned.")
    return out


def class_label(index: int, class_names) -> str:
    if class_names is not None and 0 <= index < len(class_names):
        return f"{index}: {class_names[index]}"
    return str(index)


def _rank(f) -> str:
    return "" if getattr(f, "rank", None) is None else f"rank {f.rank}"


def _where(f) -> str:
    """'conv1', or 'conv1 +8 more' for a grouped finding."""
    modules = getattr(f, "modules", (f.module,))
    return display_name(f.module) + (f" +{len(modules) - 1} more" if len(modules) > 1 else "")


def _step(f) -> str:
    return "" if getattr(f, "step", None) is None else f"step {f.step}"


def finding_label(f) -> str:
    """One short line of plain text for the findings list (a <select> shows it as text, on one line): severity,
    where (and, over a run, the step it was first seen at) and what; the message and the fix line are in
    ``finding``."""
    where = " · ".join(filter(None, [_step(f), _where(f), _rank(f)]))
    return f"{f.severity} · {where} · {str(f.kind).replace('_', ' ')}"


def finding_line(f) -> str:
    """One finding as one line of plain text with its whole message (for lists that wrap: the report, the static
    view)."""
    where = " · ".join(filter(None, [_step(f), _where(f), _rank(f)]))
    return f"{f.severity} · {where} · {f.message}"


def finding(f) -> str:
    """One finding in full: severity, kind, the modules it lists, its message and its fix line (text wraps)."""
    severity = str(f.severity)
    rank = f' <span class="ls-rank">({html.escape(_rank(f))})</span>' if _rank(f) else ""
    step = "" if getattr(f, "step", None) is None else f' <span class="ls-step-of">at step {int(f.step)}</span>'
    modules = getattr(f, "modules", (f.module,))
    listed = "" if len(modules) < 2 else \
        f'<div class="ls-finding-modules">Modules: {html.escape(", ".join(map(display_name, modules)))}</div>'
    fix = f'<div class="ls-fix">{html.escape(str(f.fix))}</div>' if getattr(f, "fix", "") else ""
    return (f'<div class="ls-finding-full"><span class="ls-finding ls-finding-{html.escape(severity)}">'
            f'{html.escape(severity)}</span> <span class="ls-kind">{html.escape(str(f.kind))}</span>{rank}{step} · '
            f'<span class="ls-where">{html.escape(display_name(f.module))}</span>: {html.escape(str(f.message))}'
            f'{listed}{fix}</div>')


def summary(cap: Capture) -> str:
    return f'<pre class="ls-summary">{html.escape(cap.summary())}</pre>'


def largest(cap: Capture, count: int = 8) -> str:
    """Two small tables: the modules without submodules that run the most FLOPs, and that save the most
    memory for the backward, each with its share of the model's total."""
    leaves = [r for r in cap.modules.values() if not r.children and r.called]
    out = ""
    for title, key, fmt, total in (("Most FLOPs", "flops", human, cap.flops),
                                   ("Most activation memory", "activation_bytes", human_bytes, cap.activation_bytes)):
        top = sorted((r for r in leaves if getattr(r, key)), key=lambda r: -getattr(r, key))[:count]
        if not top:
            continue
        rows = "".join(f"<tr><td>{html.escape(display_name(r.name))}</td><td>{html.escape(r.type_name)}</td>"
                       f"<td>{fmt(getattr(r, key))}</td><td>{share(getattr(r, key), total)}</td></tr>" for r in top)
        out += f'<div class="ls-largest"><b>{title}</b><table class="ls-table">{rows}</table></div>'
    return out

"""The gradient flow as data: every called layer with parameters of its own, in execution order, with the
norm of its parameters' gradients and what that shows. ``plots.gradient_flow`` and the report draw it."""

from __future__ import annotations

import math

from .records import Capture

FLAGGED = ("vanishing_grad", "exploding_grad")  # findings that colour the layers they name


def layer_gradients(capture: Capture) -> list[tuple[str, float | None, bool]]:
    """(name, gradient norm, frozen) of every called module with parameters of its own, in the order
    of its first call. The norm is over all its own parameters' gradients; None when none has one."""
    layers = []
    for name, report in capture.modules.items():
        if report.num_own_params and report.calls:
            got = [g for g in report.param_grad_norms.values() if g is not None]
            norm = math.sqrt(sum(g * g for g in got)) if got else None
            frozen = report.num_trainable == 0
            layers.append((report.calls[0].index, name, norm, frozen))
    return [(name, norm, frozen) for _, name, norm, frozen in sorted(layers)]


def missing(norm: float | None, frozen: bool) -> str | None:
    """Why a layer has no gradient norm to plot: "frozen", "none" (no gradient), "zero", "nonfinite"; else None."""
    if norm is None:
        return "frozen" if frozen else "none"
    if not 0 < norm < math.inf:
        return "zero" if norm == 0 else "nonfinite"
    return None


def owns(module: str, name: str) -> bool:
    """Whether layer ``name`` is module ``module`` or inside it."""
    return name == module or bool(module) and name.startswith(module + ".")


def flagged(capture: Capture, names: list[str]) -> dict[str, str]:
    """The layers among ``names`` that a vanishing or exploding gradient finding names (itself or a block
    holding it), with the finding's kind."""
    kind_of = {}
    for finding in capture.findings:
        if finding.kind in FLAGGED:
            for name in names:
                if any(owns(m, name) for m in getattr(finding, "modules", (finding.module,))):
                    kind_of[name] = finding.kind
    return kind_of

"""The debugging checklist, answered from one Capture's records: shapes, devices, dtypes, NaN/Inf, gradients,
dead or saturated activations, frozen, unused or training-mode layers, the loss and the batch.

Everything is read off the records ``capture()`` left (``Capture``, ``ModuleReport``, ``CallRecord``), never
off the live model, so a capture loaded in another process gives the same findings.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from collections.abc import Callable, Iterable

import numpy as np
import torch

from . import cost_findings
from .diagnose import label
from .records import CallRecord, Capture, Finding

SEVERITIES = ("error", "warning", "info")

_OVERFLOW_NEAR = 1e30
_HUGE_GRAD = 1e12  # a finite gradient norm this large next to Inf ones: they overflowed, nothing else went wrong


VANISHING_RATIO, EXPLODING_RATIO = 1e-3, 1e4  # find()'s defaults for the gradient rules


def find(
    cap: Capture,
    *,
    vanishing_ratio: float = VANISHING_RATIO,
    exploding_ratio: float = EXPLODING_RATIO,
    dead_fraction: float = 0.9,
    saturated_fraction: float = 0.5,
    saturated_margin: float = 0.02,
    input_limit: float = 20.0,
    activation_share: float = 0.5,
    activation_floor: int = 256 * 2**20,
) -> list[Finding]:
    """The findings for one capture, sorted by severity (error, warning, info), then by the order the
    modules first ran (modules that never ran last).

    Gradients are judged per layer (a module with trainable parameters of its own) by the ratio
    r = ||gradient|| / ||parameters|| over its own parameters: how far one SGD step with learning rate 1
    would move the layer, relative to its size. With the stand-in loss "sum of all outputs" the gradient
    is first divided by the number of output values, which puts r on the scale of a mean loss. A layer's
    gradients *vanish* when r is below ``vanishing_ratio`` (1e-3) times the median r of the model's
    layers: three orders of magnitude under the typical layer (needs three layers or more; embeddings are
    left out, as a batch only touches a few of their rows). They *explode* when r is above
    ``exploding_ratio`` (1e4), whatever the other layers do: one step with a usual learning rate of 1e-3
    would move the weights by ten times their own size. For scale: in healthy torchvision models no layer
    sits more than 2.2 orders of magnitude under the median, and r stays under 1.5e3 (the largest seen:
    resnet50's first conv in training mode on a batch of 2).

    A ReLU unit (channel) is dead when it is 0 for every item and position of the batch; a ReLU is
    reported when more than ``dead_fraction`` (90%) of its units are dead, beyond what chance gives with
    few values per unit (a healthy unit is 0 on k values with odds about 0.5**k). Only a near-total
    die-off counts: at random initialisation about half the units of a ReLU fed by non-negative inputs
    can be off for a whole batch. A sigmoid/tanh is saturated when more than ``saturated_fraction`` of
    its outputs lie within ``saturated_margin`` (as a share of its output range) of a bound, read off its
    histogram: for a sigmoid, below 0.02 or above 0.98, where its slope is under 8% of its peak. A float
    input whose largest absolute value exceeds ``input_limit`` looks unnormalised (standardised data
    rarely goes past 5).

    With costs counted (``capture(..., costs=True)``): the innermost module holding more than
    ``activation_share`` (half) of the bytes saved for the backward is a checkpointing candidate when the pass
    saves at least ``activation_floor`` bytes (256 MiB; below that memory is not what stands in the way), and every
    aten op that ran with no FLOP formula is named where it ran (the FLOPs around it are a lower bound).

    A capture merged from the ranks of a distributed job (``layerscope.gather``) keeps the findings each rank
    made about its own pass (with the rank); the gradient rules run again on its global norms, the frozen,
    unused and training-mode rules on its merged records, and ``rank_desync`` compares the ranks.
    """
    if cap.merged:
        from .distributed import merged_findings

        return group(merged_findings(cap, vanishing_ratio, exploding_ratio))
    look = _Look(cap)
    batch = look.batch(input_limit)
    bad_batch = any(f.kind == "input_nonfinite" for f in batch)
    nonfinite = [] if bad_batch else look.nonfinite()
    found = [*look.forward_error(), *batch, *nonfinite]
    if not bad_batch and not nonfinite:  # else the loss and the gradients only echo the NaN/Inf
        found += look.loss()
        # a watched step knows its loss only when the loop logged it; its gradients are real either way
        if cap.error is None and cap.loss_kind is not None and (_finite(cap.loss) or cap.loss is None and cap.backward):
            found += look.gradients(vanishing_ratio, exploding_ratio)
    found += [*look.dead(dead_fraction), *look.saturated(saturated_fraction, saturated_margin)]
    found += [*look.frozen(), *look.unused(), *look.train_mode(), *look.model_kind()]
    found += cost_findings.activation_memory(cap, activation_share, activation_floor)
    found += cost_findings.unsupported_ops(cap)
    return group(sorted(found, key=lambda f: (SEVERITIES.index(f.severity), look.position(f.module))))


# kinds found per module that come in near-identical repeats (nine exploding layers): grouped into one finding
GROUPED = ("exploding_grad", "vanishing_grad", "zero_grad", "no_grad", "dead_activation", "saturated_activation",
           "frozen", "unused_module", "train_mode", "uninitialised")
LISTED = 6  # modules a grouped finding's message names before "and N more"


def group(found: list[Finding]) -> list[Finding]:
    """The findings with each set of repeats (one kind of GROUPED, one severity and rank, several modules) as one
    finding at the first of them, in the place of the first: its message is the first one's, followed by the others'
    names; ``details`` are the first one's, with ``modules`` (all of them, in order) and ``each`` (every module's
    own details)."""
    buckets: dict = {}
    for i, f in enumerate(found):
        buckets.setdefault((f.kind, f.severity, f.rank) if f.kind in GROUPED else i, []).append(f)
    out = []
    for same in buckets.values():
        if len(same) == 1:
            out.append(same[0])
            continue
        first = same[0]
        names = list(dict.fromkeys(m for f in same for m in f.modules))
        each = {}
        for f in same:
            each.update(f.details.get("each") or {f.module: dict(f.details)})
        others = [display for display in (m or "<root>" for m in names[1:])]
        listed = ", ".join(others[:LISTED]) + (f" and {len(others) - LISTED} more" if len(others) > LISTED else "")
        message = f"{first.message} The same holds for {_plural(len(others), 'more module')}: {listed}."
        details = {k: v for k, v in first.details.items() if k not in ("modules", "each")}
        out.append(dataclasses.replace(first, message=message, details={**details, "modules": names, "each": each}))
    return out


class _Look:
    """The capture with the lookups the rules share."""

    _STRUCTURE = ("_bottom_up", "_under", "_own")  # what depends only on the modules' names, children and parameters

    def __init__(self, cap: Capture, like: _Look | None = None):
        """``like``: a look at a capture with the same modules, children and parameters (names and
        ``trainable``), whose lookups of that structure this one takes (see ``structure``)."""
        self.cap = cap
        self.modules = cap.modules
        if like is not None:
            self.__dict__.update({key: like.__dict__[key] for key in self._STRUCTURE if key in like.__dict__})

    def structure(self) -> _Look:
        """This look, with its lookups of the modules' structure made (for another look to take them)."""
        for key in self._STRUCTURE:
            getattr(self, key)
        return self

    def position(self, name: str) -> float:
        calls = self.modules[name].calls
        return calls[0].index if calls else math.inf

    def label(self, name: str) -> str:
        return label(name, self.modules[name].type_name)

    def has(self, name: str, trait: str) -> bool:
        return trait in self.modules[name].traits

    def chain(self, name: str) -> Iterable[str]:
        """The module and its ancestors, innermost first."""
        while name is not None:
            yield name
            name = self.modules[name].parent

    def highest(self, relevant: Callable[[str], bool], flagged: Callable[[str], bool]) -> list[str]:
        """The outermost modules all of whose relevant modules (themselves and below) are flagged (``flagged`` is
        asked about relevant modules only)."""
        rel = {n for n in self.modules if relevant(n)}
        flags = {n for n in rel if flagged(n)}
        if not flags:  # no module has all its relevant ones flagged
            return []
        whole: dict[str, bool] = {}
        any_relevant: dict[str, bool] = {}
        for name, children in self._bottom_up:
            here = name in rel
            if children:
                any_relevant[name] = here or any(any_relevant[c] for c in children)
                whole[name] = (not here or name in flags) and all(whole[c] for c in children)
            else:
                any_relevant[name], whole[name] = here, not here or name in flags
        return [n for n in self.modules
                if whole[n] and any_relevant[n] and (not n or not whole[self.modules[n].parent])]

    @functools.cached_property
    def _bottom_up(self) -> list[tuple[str, tuple[str, ...]]]:
        """Each module with its children, children first (they come after their parents)."""
        return [(name, report.children) for name, report in reversed(list(self.modules.items()))]

    @functools.cached_property
    def _under(self) -> dict[str, list[str]]:
        """Each module's name with those of the modules under it (by their dotted names), in their order."""
        under: dict[str, list[str]] = {name: [] for name in self.modules}
        for n in self.modules:
            up = n
            while up:  # the root holds every module: see inside()
                if up in under:
                    under[up].append(n)
                up = up.rpartition(".")[0]
        return under

    def inside(self, name: str) -> list[str]:
        """The module and every module under it, in the order of the modules."""
        return list(self.modules) if name == "" else self._under[name]

    def own_params(self, name: str, trainable: bool | None = None) -> list[str]:
        """The names of the module's own parameters (those with this ``requires_grad``); not to be changed."""
        own = self._own[name]
        return own[0] if trainable is None else own[1] if trainable else own[2]

    @functools.cached_property
    def _own(self) -> dict[str, tuple[list[str], list[str], list[str]]]:
        """Each module's own parameters: all of them, the trainable ones, the frozen ones."""
        out, none = {}, ([], [], [])
        for name, report in self.modules.items():
            if not report.params:
                out[name] = none
                continue
            params = report.params.items()
            out[name] = ([k for k, _ in params], [k for k, p in params if p.trainable],
                         [k for k, p in params if not p.trainable])
        return out

    # -- a failed pass ------------------------------------------------------------------------------

    def forward_error(self) -> list[Finding]:
        err = self.cap.error
        if err is None:
            return []
        text = (err.exception_message.strip().splitlines() or [err.exception_type])[0]
        details = {"exception": err.exception_type, "torch_message": text}
        if err.phase != "forward":
            return [Finding(f"{err.phase}_error", "error", err.module, err.message, details)]
        received = err.received
        report = self.modules[err.module]
        if received is not None:
            details["received"] = dict(received)
        if (received is not None and any(d != received["device"] for d in report.devices)) or "device" in text:
            return [self._mismatch("device_mismatch", err.module, received, details)]
        floats = {d for d in report.dtypes if _is_float(d)}
        if received is not None and floats and received["dtype"] not in floats and re.search("type", text, re.I):
            return [self._mismatch("dtype_mismatch", err.module, received, details)]
        if re.search(r"shape|size|dimension|channel|element|mat1 and mat2|\dD", text, re.I):
            return [Finding("shape_mismatch", "error", err.module, err.message, details)]
        return [Finding("forward_error", "error", err.module, err.message, details)]

    def _mismatch(self, kind: str, failed: str, received: dict | None, details: dict) -> Finding:
        """Name the outermost module that sits wholly on another device (dtype) than the input that reached it."""
        device = kind == "device_mismatch"
        got = None if received is None else received["device"] if device else received["dtype"]
        name = failed
        for up in self.chain(failed):
            held = self.modules[up].devices if device else self.modules[up].dtypes
            if got is None or not held or got in held:
                break
            name = up
        has = ", ".join(self.modules[name].devices if device else self.modules[name].dtypes) or "unknown"
        details.update(module_has=has, failed_in=failed)
        if name == "" and device:
            message = f"The batch is on {got}, but the model's parameters are on {has}: move both to one device."
        elif name == "":
            message = f"The batch is {got}, but the model's weights are {has}: convert the batch to {has}."
        elif device:
            message = (f"{self.label(name)} is on {has}, but the input that reached it is on {got} like the rest "
                       f"of the model (torch stopped in {failed}).")
        else:
            message = (f"{self.label(name)} holds {has} weights, but the input that reached it is {got} like the "
                       f"rest of the model (torch stopped in {failed}); convert it with .to(torch.{got}).")
        if "meta" in has:
            message += " The meta device holds shapes only, no values: load real weights into it."
        return Finding(kind, "error", name, message, details)

    # -- NaN / Inf ----------------------------------------------------------------------------------

    def nonfinite(self) -> list[Finding]:
        bad = [(n, c) for n, c in self.cap.calls if c.stats is not None and not c.stats.finite]
        if not bad:
            return []
        seen, call = bad[0]
        name = self._source(seen, call)
        s = call.stats
        kind = "nan" if s.nan_count else "inf"
        count = s.nan_count if s.nan_count else s.inf_count
        share = f"{count} of {s.numel} values ({count / s.numel:.1%})"
        value = "NaN" if kind == "nan" else "Inf"
        if name == seen:
            message = f"{self.label(name)} turned finite inputs into {value}: {share} of its output."
            bad_params = self._nonfinite_params(name)
            if bad_params:
                message += f" Its parameter {', '.join(bad_params)} already holds NaN/Inf."
        else:
            message = (f"{value} first appeared in the forward code of {self.label(name)} itself, between its "
                       f"submodules: {seen} received it and output {share}.")
        later = list(dict.fromkeys(n for n, _ in bad if n not in (name, seen)))
        details = {"nan_count": s.nan_count, "inf_count": s.inf_count, "numel": s.numel, "first_seen_in": seen,
                   "downstream": later}
        if self.cap.loss is not None and not _finite(self.cap.loss):
            details["loss"] = self.cap.loss
        return [Finding(kind, "error", name, message, details)]

    def _source(self, name: str, call: CallRecord) -> str:
        """The module whose code made the first non-finite values, given the first call that output them."""
        made_here = call.input_finite if call.input_finite is not None else not self._passes_on(name, call)
        if made_here:
            return name
        child = name
        while (parent := self.modules[child].parent) is not None:
            if not self.has(parent, "sequential"):
                return parent  # its own code, between submodule calls, made them
            siblings = [c for c in self.modules[parent].children if self.modules[c].called]
            if min(siblings, key=self.position) != child:
                return name  # its input was the previous layer's finite output: it made them after all
            child = parent
        return name

    def _passes_on(self, name: str, call: CallRecord) -> bool:
        """Whether a layer of this class can only have passed NaN/Inf on (for calls whose inputs were not seen)."""
        if self.has(name, "pass_on"):
            return True
        if not self.has(name, "affine"):
            return False
        s = call.stats
        return not self._nonfinite_params(name) and max(abs(s.min), abs(s.max)) < _OVERFLOW_NEAR

    def _nonfinite_params(self, name: str) -> list[str]:
        return [k for k, p in self.modules[name].params.items() if p.finite is False]

    # -- the loss and the batch ---------------------------------------------------------------------

    def loss(self) -> list[Finding]:
        loss = self.cap.loss
        if loss is None or _finite(loss):
            return []
        how = {"cross_entropy": "cross-entropy with the target", "loss_fn": "your loss_fn",
                "model_loss": "the loss the model returned", "sum": "sum of the outputs",
                "training": "your training loss"}[self.cap.loss_kind]
        message = (f"The loss ({how}) is {loss} although every module's output is finite: the loss computation "
                   f"made it (log of 0 or of a negative number, division by zero, a target out of range).")
        return [Finding("nonfinite_loss", "error", "", message, {"loss": loss, "loss_kind": self.cap.loss_kind})]

    def batch(self, limit: float) -> list[Finding]:
        found = []
        for given in self.cap.inputs:
            s, where = given.stats, given.where
            if s is None or not s.numel:
                continue
            if not s.finite:
                message = (f"The batch{where} holds {s.nan_count} NaN and {s.inf_count} Inf of {s.numel} values: "
                           f"every module it reaches will output NaN/Inf too. Clean or impute the data first.")
                found.append(Finding("input_nonfinite", "error", "", message,
                                     {"input": where, "nan_count": s.nan_count, "inf_count": s.inf_count,
                                      "numel": s.numel}))
            elif max(abs(s.min), abs(s.max)) > limit:
                message = (f"The batch{where} runs from {s.min:.4g} to {s.max:.4g} (mean {s.mean:.4g}): it looks "
                           f"unnormalised; scale it to about 0..1 or standardise it (e.g. divide pixels by 255, "
                           f"then subtract the mean and divide by the std).")
                found.append(Finding("input_range", "warning", "", message,
                                     {"input": where, "min": s.min, "max": s.max, "mean": s.mean, "limit": limit}))
        return found

    # -- gradients ----------------------------------------------------------------------------------

    def gradients(self, vanishing_ratio: float, exploding_ratio: float) -> list[Finding]:
        trainable = {n: own[1] for n, own in self._own.items()}
        got = {n: [g for k in ks if (g := report.params[k].grad_norm) is not None] if (ks := trainable[n]) else []
               for n, report in self.modules.items()}
        received = got.__getitem__  # the gradient norms of a module's own trainable parameters that got one

        found = self._no_grad(trainable)
        broken = [n for n, gs in got.items() if gs and not all(map(_finite, gs))]
        if broken:
            largest = max((g for gs in got.values() for g in gs if _finite(g)), default=0.0)
            return found + [self._nonfinite_grad(broken, largest)]
        flat = self._flat_loss()
        if flat:
            return found + flat
        with_grad = lambda n: bool(received(n))
        for name in self.highest(with_grad, lambda n: not any(received(n))):
            found.append(Finding("zero_grad", "warning", name,
                                 f"Every gradient reaching {self.label(name)} is exactly 0: it will not learn "
                                 f"from this batch (it feeds only dead units, or its output is multiplied by 0).",
                                 {"parameters": self.modules[name].num_trainable}))
        found += self._ratios(received, vanishing_ratio, exploding_ratio)
        return found

    def _flat_loss(self) -> list[Finding]:
        """The stand-in loss (the sum of the outputs) after a softmax or a normalisation layer, whose outputs
        add up to a constant: every gradient before that layer is rounding noise, not worth judging."""
        root = self.modules[""].calls
        if self.cap.loss_kind != "sum" or not root or not root[-1].grad_output_norm:
            return []
        top = root[-1].grad_output_norm
        norms = [(n, c.grad_output_norm) for n, c in self.cap.calls if c.grad_output_norm is not None]
        inner = [g for _, g in norms if g != top]
        name = next(n for n, g in norms if g == top)  # the innermost module whose output the loss sums
        # the output tensor's producer (identities such as Dropout in eval pass on the same tensor, which
        # shares its statistics): a softmax, or a normalisation whose scale is one number, sums to a constant
        same = root[-1].output_id
        producer = next((n for n, c in self.cap.calls if same is not None and c.output_id == same), name)
        if self.has(producer, "sums_to_constant"):
            name = producer
        elif not inner or not 0 < max(inner) < 1e-4 * top:  # exact zeros are real: see zero_grad
            return []
        largest = max(inner, default=0.0)
        message = (f"The stand-in loss, the sum of the outputs, is flat: {self.label(name)} outputs values that "
                   f"always add up to the same total (as softmax and normalisation layers do), so every gradient "
                   f"before it is rounding noise (at most {largest:.2g}, against {top:.3g} at the output). "
                   f"Pass target= or loss_fn= to capture() to judge the gradients.")
        return [Finding("flat_loss", "info", name, message, {"largest_inner_grad": largest, "output_grad": top})]

    def _no_grad(self, trainable: dict) -> list[Finding]:
        params = lambda n: self.modules[n].params
        missing = lambda n: any((p := params(n)[k]).grad_norm is None and not p.offloaded for k in trainable[n])
        relevant = lambda n: bool(trainable[n]) and self.modules[n].called
        found = []
        starved = self.highest(relevant, missing)
        cut = self._cut(starved) if starved else None
        if cut is not None:
            where, why = cut
            n = sum(self.modules[s].num_trainable for s in starved)
            names = ", ".join("the model" if s == "" else s for s in starved[:LISTED])
            more = f" and {len(starved) - LISTED} more" if len(starved) > LISTED else ""
            who = "it" if starved == [where] else f"{names}{more}"
            message = (f"The gradient is cut at {self.label(where)}: {why}. So {who} ran in the forward pass, but "
                       f"{_plural(n, 'trainable parameter value')} received no gradient.")
            return [Finding("no_grad", "warning", where, message,
                            {"parameters": n, "cut_at": where, "modules": starved})]
        for name in starved:
            n = self.modules[name].num_trainable
            what = "the model" if name == "" else self.label(name)
            message = (f"{what} ran in the forward pass, but its {n} trainable parameter values received no "
                       f"gradient: the path from it to the loss is cut (by .detach(), torch.no_grad(), or an "
                       f"operation without a gradient such as argmax or round).")
            found.append(Finding("no_grad", "warning", name, message, {"parameters": n}))
        return found

    def _cut(self, starved: list[str]) -> tuple[str, str] | None:
        """Where the gradient of the ``starved`` modules is cut, and why it looks so, read off which calls' inputs and
        outputs carried gradient: the first outermost module (in execution order, from the first starved call on)
        whose output carries none although its input did or it holds trainable parameters; else the code of the
        innermost module around the last starved one that has code of its own (not an nn.Sequential)."""
        calls = self.cap.calls
        if not calls or all(c.output_requires_grad is None for _, c in calls):
            return None  # a capture recorded before these fields were
        inside = lambda n: any(n == s or not s or n.startswith(s + ".") for s in starved)
        start = min((c.index for n, c in calls if inside(n)), default=math.inf)

        def cuts(n: str, c: CallRecord) -> bool:
            return (c.output_requires_grad is False and not c.failed
                    and (bool(c.input_requires_grad) or self.modules[n].num_trainable > 0))

        flagged = {n for n, c in calls if cuts(n, c)}
        for name, c in calls:
            outer = self.modules[name].parent not in flagged
            if c.index >= start and name in flagged and outer and cuts(name, c):
                why = ("its input carries gradient, its output none (.detach(), torch.no_grad(), or an operation "
                       "without a gradient such as argmax or round)") if c.input_requires_grad else \
                      ("it holds trainable parameters, but its output carries no gradient (it ran under "
                       "torch.no_grad(), or detaches its output)")
                return name, why
        last = max(starved, key=lambda s: max((c.index for n, c in calls if n == s or n.startswith(s + ".")),
                                              default=-1))
        for up in self.chain(self.modules[last].parent) if self.modules[last].parent is not None else ():
            if not self.has(up, "sequential"):
                return up, (f"its own forward code uses the output of {last} without a gradient (.detach(), "
                            f"torch.no_grad(), or an operation such as argmax or round)")
        return None

    def _nonfinite_grad(self, broken: list[str], largest: float) -> Finding:
        name = max(broken, key=self.position)  # closest to the loss: the gradient went bad just after it
        others = f" and {_plural(len(broken) - 1, 'earlier layer')}" if len(broken) > 1 else ""
        details = {"layers": broken, "largest_finite_grad": largest}
        if largest > _HUGE_GRAD:
            message = (f"The gradients of {self.label(name)}{others} are too large to measure (their size "
                       f"overflows to Inf) and the finite ones reach {largest:.2g}: they explode. Lower the initial "
                       f"weights or add normalisation.")
            return Finding("exploding_grad", "error", name, message, details)
        message = (f"The gradients of {self.label(name)}{others} hold NaN/Inf although the forward pass and the "
                   f"loss are finite: an operation right after {name or '<root>'} has no finite derivative there "
                   f"(sqrt or log at 0, a division by a value near 0).")
        return Finding("nonfinite_grad", "error", name, message, details)

    def _ratios(self, received: Callable[[str], list[float]], vanishing: float, exploding: float) -> list[Finding]:
        scale = 1.0
        if self.cap.loss_kind == "sum":
            scale = float(self.cap.output_numel) or 1.0
        ratios = {}
        for name, report in self.modules.items():
            g = received(name)
            if not g:
                continue
            p = [report.params[k].norm for k in self.own_params(name, trainable=True)]
            gnorm, pnorm = _norm(g) / scale, _norm(v for v in p if v is not None)
            if gnorm > 0 and pnorm > 0 and not self.has(name, "embedding"):
                ratios[name] = gnorm / pnorm
        if not ratios:
            return []
        median = float(np.median(list(ratios.values())))
        found = []
        for name, r in ratios.items():
            details = {"ratio": r, "median_ratio": median, "loss_scale": scale}
            if r > exploding:
                message = (f"{self.label(name)} gets gradients {r:.3g} times the size of its weights (limit "
                           f"{exploding:.3g}): one SGD step at learning rate 0.001 would change them "
                           f"{r * 1e-3:.3g} times their own size. Lower the initial weights or add normalisation.")
                found.append(Finding("exploding_grad", "warning", name, message, details))
            elif len(ratios) >= 3 and r < median * vanishing:
                message = (f"{self.label(name)} gets gradients {r:.3g} times the size of its weights, "
                           f"{median / r:.3g} times smaller than the model's typical layer ({median:.3g}): the "
                           f"gradient fades before it gets here, so this layer will barely learn.")
                found.append(Finding("vanishing_grad", "warning", name, message, details))
        return found

    # -- activations --------------------------------------------------------------------------------

    def dead(self, fraction: float) -> list[Finding]:
        found = []
        for name, report in self.cap.modules.items():
            calls = [c for c in report.calls if c.units and c.stats is not None]
            if not calls:
                continue
            call = max(calls, key=lambda c: c.dead_units / c.units)
            share = call.dead_units / call.units
            per_unit = call.stats.numel / call.units
            if share > fraction + (1 - fraction) * 0.5**per_unit:
                message = (f"{self.label(name)} outputs 0 for every item of the batch on {call.dead_units} of its "
                           f"{call.units} units ({share:.0%}): those units pass no signal and get no gradient.")
                details = {"dead_units": call.dead_units, "units": call.units, "fraction": share}
                found.append(Finding("dead_activation", "warning", name, message, details))
        return found

    def saturated(self, fraction: float, margin: float) -> list[Finding]:
        found = []
        for name, report in self.modules.items():
            bounds = report.bounds
            if bounds is None:
                continue
            calls = [c for c in report.calls if c.histogram is not None and c.histogram.sampled]
            if not calls:
                continue
            lo, hi = bounds
            near = margin * (hi - lo)
            share = max(_share_outside(c.histogram.counts, c.histogram.edges, lo + near, hi - near) for c in calls)
            if share > fraction:
                message = (f"{self.label(name)} has {share:.0%} of its outputs within {near:.3g} of its bounds "
                           f"{lo:g} and {hi:g}, where it is nearly flat: little gradient passes through it. "
                           f"Its inputs are too large; normalise them or lower the weights before it.")
                found.append(Finding("saturated_activation", "warning", name, message,
                                     {"fraction": share, "bounds": [lo, hi], "margin": near}))
        return found

    # -- the model's flags --------------------------------------------------------------------------

    def frozen(self) -> list[Finding]:
        found = []
        has_own = lambda n: bool(self.own_params(n))
        for name in self.highest(has_own, lambda n: not self.own_params(n, trainable=True)):
            what = "The whole model" if name == "" else self.label(name)
            message = (f"{what} is frozen: all {self.modules[name].num_params} of its parameter values have "
                       f"requires_grad=False, so training will not change it.")
            found.append(Finding("frozen", "info", name, message, {"parameters": self.modules[name].num_params}))
        return found

    def unused(self) -> list[Finding]:
        if self.cap.error is not None and self.cap.error.phase == "forward":
            return []  # the modules after the failure never got their turn
        found = []
        grads = lambda n: any(g is not None for g in self.modules[n].param_grad_norms.values())
        relevant = lambda n: bool(self.own_params(n)) and not self.has(n, "param_container")
        for name in self.highest(relevant, lambda n: not self.modules[n].called and not grads(n)):
            message = (f"{self.label(name)} holds {self.modules[name].num_params} parameter values but was never "
                       f"called in the forward pass: remove it, or check that forward() uses it.")
            found.append(Finding("unused_module", "info", name, message, {"parameters": self.modules[name].num_params}))
        return found

    def train_mode(self) -> list[Finding]:
        relevant = lambda n: self.has(n, "train_dependent")
        found = []
        for name in self.highest(relevant, lambda n: self.modules[n].training):
            layers = [n for n in self.inside(name) if relevant(n)]
            what = "the model" if name == "" else self.label(name)
            verb = "is" if len(layers) == 1 else "are"
            message = (f"{_plural(len(layers), 'dropout or batch-norm layer')} in {what} {verb} in training mode: "
                       f"dropout zeroes random units and batch norm uses this batch's statistics, so outputs vary "
                       f"between runs. Call model.eval() to see inference behaviour.")
            found.append(Finding("train_mode", "info", name, message, {"layers": len(layers)}))
        return found


    def model_kind(self) -> list[Finding]:
        """What the capture did differently because of what the model is: compiled, lazy, offloaded."""
        found = []
        if self.cap.compiled:
            found.append(Finding("compiled", "info", "", (
                "The model is compiled with torch.compile, whose code ignores hooks added after its first run: this "
                "capture recorded its original module (model._orig_mod), run eagerly with the same weights."), {}))
        lazy = {n for n, r in self.modules.items() if "uninitialised" in r.traits}
        for name in self.highest(lambda n: True, lazy.__contains__) if lazy else ():
            found.append(Finding("uninitialised", "info", name, (
                f"{self.label(name)} is a lazy module that has not been called yet: its parameters have no size, "
                f"so they count as 0 here. Run the model once to initialise them."), {}))
        moved = [(n, k) for n, r in self.modules.items() for k, p in r.params.items() if p.offloaded]
        if moved:
            values = sum(self.modules[n].params[k].numel for n, k in moved)
            found.append(Finding("offloaded", "info", "", (
                f"{_plural(len(moved), 'parameter')} ({values} values) are offloaded by accelerate (the module holds "
                f"a meta tensor, its dispatch hook swaps the real one in for each call): their norms are those of "
                f"the values kept, but their gradients cannot be measured."), {"parameters": len(moved)}))
        return found


def _is_float(dtype: str) -> bool:
    kind = getattr(torch, dtype, None)
    return isinstance(kind, torch.dtype) and kind.is_floating_point


def _plural(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _finite(value: float | None) -> bool:
    return value is not None and math.isfinite(value)


def _norm(values: Iterable[float]) -> float:
    return math.sqrt(sum(v * v for v in values))


def _share_outside(counts: np.ndarray, edges: np.ndarray, low: float, high: float) -> float:
    """Share of a histogram's mass at or below ``low`` or at or above ``high`` (uniform within each bin)."""
    total = counts.sum()
    if not total:
        return 0.0
    left, right = edges[:-1], edges[1:]
    width = np.maximum(right - left, np.finfo(float).tiny)
    below = np.clip((np.minimum(right, low) - left) / width, 0, 1)
    above = np.clip((right - np.maximum(left, high)) / width, 0, 1)
    return float((counts * np.minimum(below + above, 1)).sum() / total)

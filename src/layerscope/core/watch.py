"""``watch(model, optimizer, every=N)``: the capture's records over training steps, while the user's own loop runs.

Nothing runs that the loop would not run anyway: no extra forward or backward pass, no ``.grad`` written, nothing
restored between steps. On a sampled step the hooks of ``capture`` record the step's first training forward
(and its backward), the parameters' gradients as they accumulate, their norms before the optimizer's update and
the size of that update; on the other steps only one forward pre-hook on the model and the optimizer's step
hooks run, and they return at once.
"""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
from torch import nn

from . import distributed, traits
from .capture import _bin_plan, float_inputs
from .collector import Pause
from .hooks import HookSession
from .nested import call_inputs, first_float_tensor, iter_tensors
from .recorder import Recorder, dtype_name, fast_norms, host
from .records import NO_PARAMS, InputRecord, ModuleReport, ParamRecord
from .run import CALL_FIELDS, PARAM_FIELDS, Run, StepRecord, compact, structure_of
from .stats import COLUMNS, Scratch, StatsBatch, local, norm_value, row_stats
from .tree import module_tree
from .trends import DEFAULTS

UPDATE_BLOCK = 16  # a large parameter's update is measured on evenly spaced blocks of this many neighbours
EDGE_MARGIN = 2.0  # automatic histogram edges reach at least this many times the first sampled step's largest value
_C = {name: i for i, name in enumerate(CALL_FIELDS)}
_P = {name: i for i, name in enumerate(PARAM_FIELDS)}
_S = {name: i for i, name in enumerate(COLUMNS)}
_LAYOUTS = 16  # recent call layouts shared between steps


def watch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    every: int = 10,
    scaler: Any = None,
    bins: Any = 64,
    keep: int = 128,
    sample_size: int = 8192,
    **thresholds: float,
) -> Run:
    """Watch ``model`` train: ``with layerscope.watch(model, optimizer=opt, every=10) as run:`` around your loop.

    A step is one ``optimizer.step()``, or, without an optimizer, one ``run.step()``. Steps 0, ``every``,
    2 * ``every``, ... are sampled: for each, the per-module records of ``capture`` (output statistics and
    histograms, output gradient norms, dead ReLU units) of the step's first forward pass with gradients enabled
    and its backward pass, each parameter's norm before the update, the norm of its gradient as accumulated over
    all the step's backward passes (so gradient accumulation counts in full), and, with an optimizer, the update
    ||w after - w before||. ``run.log(loss=..., accuracy=...)`` records scalars at every step.

    - ``scaler``: a ``torch.amp.GradScaler``; gradient norms are unscaled: divided by its scale when read in the
      backward, taken as they are when read at the step after the scaler unscaled them (DDP and FSDP2, whose
      gradients are final only there). An iteration whose ``optimizer.step()`` the scaler skipped (it found Inf/NaN
      in the scaled gradients) is no step: a sampled step records the iteration that stepped.
    - ``bins``: histogram bins per module (64), on edges fixed for the whole run so that steps line up: chosen
      from the module's output at its first sampled step (reaching at least ``EDGE_MARGIN`` times its largest
      value, around 0 for signed outputs, in bins of a power-of-two width; a sigmoid's or tanh's own range), or
      given as edges, or {module: edges}.
    - ``keep``: at most this many sampled steps are kept; beyond it, every other one of the older half is
      dropped (the first step and the first step with NaN/Inf stay), so memory stays bounded however long the
      run. The one-pass findings of a step are taken before it is dropped.
    - ``sample_size``: large tensors are summarised on an evenly strided sample of this many elements (as in
      ``capture``); the update of a parameter with more elements than this is measured on as many elements,
      taken as evenly spaced blocks of ``UPDATE_BLOCK`` neighbours, 64 bytes of float32 (a strided sample of a
      1 MB weight touches most of its cache lines), an odd number of elements apart (not in step with a row's
      length: a weight's rows and columns are all met).
    - ``thresholds``: the findings' thresholds (``layerscope.core.trends.DEFAULTS`` documents each).

    Every hook is removed when the ``with`` block ends, also on an exception. The parameters end bit-identical
    to an unwatched run's: the hooks read tensors and never change one. During a sampled step (from its first
    forward to its optimizer step) Python's cyclic garbage collector is paused, as in ``capture``, and then put
    back as it was (``layerscope.core.collector``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"watch() needs a torch.nn.Module as model, got {type(model).__name__}")
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"every must be a whole number of steps, 1 or more, got {every!r}")
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 4:
        raise ValueError(f"keep must be a whole number of sampled steps, 4 or more, got {keep!r}")
    if scaler is not None and not callable(getattr(scaler, "get_scale", None)):
        raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")
    unknown = sorted(set(thresholds) - set(DEFAULTS))
    if unknown:
        raise TypeError(f"unknown threshold {', '.join(unknown)}; known: {', '.join(DEFAULTS)}")
    bin_plan = _bin_plan(bins)
    run = Run(_structure(model), every=every, keep=keep, thresholds=thresholds)
    run._watcher = _Watcher(run, model, optimizer, scaler, bin_plan, sample_size)
    return run


def _structure(model: nn.Module):
    """The module tree as records without calls (parameter norms unknown until a step is sampled)."""
    modules = {}
    entries = list(model.named_modules())
    for (name, module), info in zip(entries, module_tree(entries).values()):
        own = info.pop("own")
        info.pop("param_ids", None)  # what capture sums gradient bytes over
        modules[name] = ModuleReport(
            **info,
            params=MappingProxyType({local: ParamRecord(shape=tuple(p.shape), dtype=dtype_name(p), device=str(p.device),
                                                        trainable=p.requires_grad, norm=None, **distributed.layout(p))
                                      for local, p in own}) if own else NO_PARAMS,
            training=module.training, traits=traits.class_traits(module), bounds=traits.bounds(module),
        )
    root = modules[""]
    return structure_of(modules, root.num_params, root.num_trainable)


def pick_edges(t: torch.Tensor, bins: int, bounds: tuple[float, float] | None = None) -> np.ndarray | None:
    """Histogram edges for a module's output for the whole run, from its first sampled step: a bounded
    activation's own range; else bins of a power-of-two width (so that binning is exact arithmetic, see
    stats._indices) whose edges reach at least m from 0 upwards for non-negative outputs, downwards for
    non-positive ones, both ways else, m being EDGE_MARGIN times the largest absolute value (1 when all are 0
    or none is finite)."""
    if bounds is not None:
        return np.linspace(bounds[0], bounds[1], bins + 1)
    x = t.detach()
    if x.is_meta or x.is_complex() or x.numel() == 0:
        return None
    x = x.float().reshape(-1)
    lo, hi = torch.aminmax(x)
    lo, hi = torch.stack([lo, hi]).tolist()
    if not (math.isfinite(lo) and math.isfinite(hi)):
        finite = x[torch.isfinite(x)]
        lo, hi = torch.aminmax(finite) if finite.numel() else (torch.tensor(0.0), torch.tensor(0.0))
        lo, hi = float(lo), float(hi)
    top = EDGE_MARGIN * (max(abs(lo), abs(hi)) or 0.5)
    below = 0 if lo >= 0 else bins if hi <= 0 else bins // 2  # bins below 0
    if below == 0 and lo < 0:  # one bin for signed values
        return np.array([-top, top])
    width = 2.0 ** math.ceil(math.log2(top / max(below, bins - below)))
    return width * np.arange(-below, bins - below + 1, dtype=np.float64)


class _Sample:
    """What a sampled step has gathered so far (tensors stay on their device until the step ends)."""

    def __init__(self, session: HookSession):
        self.session = session
        self.recorder: Recorder | None = None
        self.inputs: list = []
        self.training: np.ndarray | None = None
        self.output_numel = 0
        self.backward_seen = False
        self.grads: dict[int, float | torch.Tensor] = {}  # parameter row -> norm of its .grad after the latest backward
        self.stale: dict[int, float | torch.Tensor] = {}  # parameter row -> norm of the .grad left from earlier steps
        self.norms: dict[int, float] = {}
        self.group: np.ndarray | None = None
        self.lrs: tuple[float, ...] = ()
        self.scale = 1.0
        self.grad_scale = 1.0  # what the parameters' gradient norms are divided by: the scale, unless read unscaled
        self.before: list | None = None  # the update samples: [(row, its _kept_sample, holding a copy before the step)]
        self.updates: dict[int, float] = {}
        self.updated = False
        self.iteration = None  # the GradScaler's record of the iteration the sample began in (see _skipped)


class _Watcher:
    """The hooks that fill a Run while the model trains."""

    def __init__(self, run: Run, model: nn.Module, optimizer, scaler, bin_plan, sample_size: int):
        self.run, self.model, self.optimizer, self.scaler = run, model, optimizer, scaler
        self.bins, self.fixed = bin_plan
        self.sample_size = sample_size
        self.active = False
        self.open = False  # a training forward ran in the current step
        self.current: _Sample | None = None
        self.session: HookSession | None = None
        self._marks: dict[int, tuple] | None = None  # each .grad at the end of the step before a sampled one
        self._layouts: dict[tuple, tuple] = {}
        self._binning: dict = {}  # the StatsBatch's checked edges and thresholds, kept from step to step
        self._scratch = Scratch()  # and its work buffers
        self._samples: dict[int, tuple] = {}  # parameter row -> its update sample (see _kept_sample)
        self._pause = Pause()  # the cyclic garbage collector, paused for each sampled step
        self._warned = False

    # -- the with block -------------------------------------------------------------------------------------

    def start(self) -> None:
        if self.active:
            raise RuntimeError("this run is already watching: one `with` block at a time")
        names = [name for name, _ in self.model.named_modules()]
        if names != list(self.run.structure.modules):
            if self.run.records:
                raise ValueError("the model's modules changed since this run recorded its first steps; "
                                 "start a new run with layerscope.watch()")
            self.run.__init__(_structure(self.model), every=self.run.every, keep=self.run.keep,
                              thresholds=self.run.thresholds)
            self.run._watcher = self
        self.names = names
        self.modules = [m for _, m in self.model.named_modules()]
        self.known = {id(m): (m, name, "relu" in traits.class_traits(m)) for name, m in zip(names, self.modules)}
        rows: dict[int, int] = {}
        self.params: list[nn.Parameter] = []
        self.first_row: list[int] = []  # for each parameter row, the row where that tensor first appears
        for module in self.modules:
            for p in module._parameters.values():
                if p is None:
                    continue
                self.first_row.append(rows.setdefault(id(p), len(self.params)))
                self.params.append(p)
        self.unique = sorted(set(self.first_row))
        # DDP and FSDP2 reduce the gradients after the parameters' gradient hooks ran: read .grad at the step
        self.synced = distributed.syncs_in_backward(self.model)
        self.session = HookSession(self.model, restore=False)
        self.session.add_forward_pre_hook(self.model, self._guard(self._on_forward))
        if self.optimizer is not None:
            self.session.add_step_hooks(self.optimizer, self._guard(self._on_step_pre), self._on_step_post)
        self.active, self.open, self.current = True, False, None
        self._marks = self._grad_marks() if self._sampling() else None

    def stop(self) -> None:
        self.active = False
        try:
            self._drop()
        finally:
            self._scratch = Scratch()  # the work buffers (megabytes) are not kept once the block ends
            self._samples = {}
            if self.session is not None:
                self.session.remove()

    def log_step(self) -> int:
        """The step a value logged now belongs to: the current one once its forward ran, else the one that ended."""
        return self.run.step_count if self.open else max(self.run.step_count - 1, 0)

    def step(self) -> None:
        if self.optimizer is not None:
            raise RuntimeError("with an optimizer given to watch(), each optimizer.step() ends a step; run.step() "
                               "is for loops without one")
        try:
            if self._sampling():
                if self.current is None:
                    self._begin()
                self._before_update()
                self._finish()
        except Exception as exc:  # noqa: BLE001 - the training goes on; the step is not recorded
            self._fail(exc)
        finally:
            self._end_step()

    # -- hooks ----------------------------------------------------------------------------------------------

    def _guard(self, hook: Callable) -> Callable:
        """A hook that never lets an error of layerscope's reach the training loop: the step's sample is dropped."""
        def guarded(*args, **kwargs):
            try:
                return hook(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001
                self._fail(exc)
            return None

        return guarded

    def _fail(self, exc: BaseException) -> None:
        self._drop()
        if not self._warned:
            self._warned = True
            warnings.warn(f"layerscope.watch could not record a step ({type(exc).__name__}: {exc}); training goes "
                          f"on, and the steps it cannot record are left out", RuntimeWarning, stacklevel=2)

    def _sampling(self) -> bool:
        return self.run.step_count % self.run.every == 0

    def _on_forward(self, module, args, kwargs) -> None:
        if not torch.is_grad_enabled():
            return  # an evaluation pass inside the loop is not a training step
        self.open = True
        if not self._sampling():
            return
        if self.current is None:
            self._begin()
        elif self.current.recorder is not None and self._skipped():
            self._drop()  # the recorded iteration took no step: this one is recorded instead
            self._begin()
        if self.current.recorder is None:
            self._record_forward(args, kwargs)

    def _drop(self) -> None:
        """The current sample's hooks removed, the sample forgotten and the garbage collector back on."""
        cur, self.current = self.current, None
        try:
            if cur is not None:
                cur.session.remove()
        finally:
            self._pause.end()

    def _begin(self) -> None:
        self._pause.start()
        cur = self.current = _Sample(HookSession(self.model, restore=False))
        cur.iteration = self._scaler_record()
        for row in [] if self.synced else self.unique:
            p = self.params[row]
            if p.requires_grad:
                cur.session.add_grad_hook(p, self._guard(lambda param, row=row: self._on_grad(row, param)))

    def _skipped(self) -> bool:
        """Whether the scaler ended an iteration since the sample began, with no optimizer step: it found Inf/NaN
        in the scaled gradients, skipped ``optimizer.step()`` and lowered its scale (``scaler.update()`` starts
        each iteration's record afresh). That iteration was no training step."""
        return self.scaler is not None and self._scaler_record() is not self.current.iteration

    def _scaler_record(self):
        """GradScaler's record of the current iteration, by optimizer (a new one from each ``scaler.update()``);
        None without a scaler."""
        return getattr(self.scaler, "_per_optimizer_states", None)

    def _on_grad(self, row: int, param: torch.Tensor) -> None:
        """After each backward: the norm of the gradient accumulated so far (the last backward's is the step's)."""
        g = param.grad
        if self.current is not None and g is not None:
            self.current.grads[row] = norm_value(g)  # a DTensor's own shard; on the CPU, a float at once

    def _record_forward(self, args, kwargs) -> None:
        cur = self.current
        stats = StatsBatch(bins=self.bins, sample_size=self.sample_size, edges=self._binning, scratch=self._scratch)
        cur.recorder = rec = Recorder(cur.session, stats, grads=True, feature_maps=False, edges=self._edges_for)
        batch = args[0] if len(args) == 1 and not kwargs else kwargs if not args else args
        cur.inputs = [(where, t, rec.summarise(t)) for where, t in float_inputs(batch)]
        cur.training = np.array([m.training for m in self.modules], dtype=bool)
        try:  # one hook for all modules: nothing to register per module at each sampled step
            cur.session.add_global_forward_hook(self._on_module)
        except TypeError:  # a torch whose global hooks take no kwargs: one hook per module
            for name, module in zip(self.names, self.modules):
                cur.session.add_forward_hook(module, self._guard(rec.hook_for(name, module)))
            cur.session.add_forward_hook(self.model, self._guard(self._after_forward))

    def _on_module(self, module, args, kwargs, output) -> None:
        known = self.known.get(id(module))
        cur = self.current
        if known is None or known[0] is not module or cur is None or cur.recorder is None:
            return  # a module of another model, or the step's record was dropped
        try:
            cur.recorder.record(known[1], call_inputs(args, kwargs), output, known[2])
            if module is self.model:
                self._after_forward(module, args, kwargs, output)
        except Exception as exc:  # noqa: BLE001 - the training goes on; the step is not recorded
            self._fail(exc)

    def _edges_for(self, name: str, t: torch.Tensor) -> np.ndarray | None:
        edges = self.run.edges.get(name)
        if edges is None:
            edges = self.fixed(name)
            if edges is None:
                seen = self.current.recorder.summarised.get(id(t))  # a tensor passed on: share its edges
                if seen is not None and seen[0]() is t and seen[3] is not None:
                    edges = seen[3]
                else:
                    edges = pick_edges(t, self.bins, self.run.structure[name].bounds)
            if edges is None:
                return None
            edges.flags.writeable = False
            self.run.edges[name] = edges
        return edges

    def _after_forward(self, module, args, kwargs, output) -> None:
        cur = self.current
        cur.session.remove_forward_hooks()  # later forwards of the step (accumulation, evaluation) are not recorded
        floats = [t for t in iter_tensors(output) if t.is_floating_point()]
        cur.output_numel = sum(t.numel() for t in floats)
        t = first_float_tensor(output)
        if t is not None and t.requires_grad:
            cur.session.add_tensor_hook(t, self._guard(self._on_backward_start))

    def _grad_marks(self) -> dict[int, tuple]:
        """Each parameter's .grad as it is now, to tell at the next backward whether it was cleared since."""
        marks = {}
        for row in self.unique:
            g = self.params[row].grad
            if g is not None:
                marks[row] = (weakref.ref(g), g._version)
        return marks

    def _on_backward_start(self, grad) -> None:
        """The step's first backward reached the model's output: no gradient has been added to .grad yet."""
        cur = self.current
        if cur is None or cur.backward_seen:
            return
        cur.backward_seen = True
        for row, (ref, version) in (self._marks or {}).items():
            g = self.params[row].grad
            if g is not None and ref() is g and g._version == version:  # the same tensor, unchanged: not cleared
                cur.stale[row] = norm_value(g)

    def _on_step_pre(self, optimizer, args, kwargs) -> None:
        if self._sampling():
            if self.current is None:
                self._begin()
            self._before_update()

    def _on_step_post(self, optimizer, args, kwargs) -> None:
        try:
            if self.current is not None and self.current.before is not None:
                self._after_update()
            if self.current is not None:
                self._finish()
        except Exception as exc:  # noqa: BLE001 - the training goes on; the step is not recorded
            self._fail(exc)
        finally:
            self._end_step()

    # -- parameters and updates ---------------------------------------------------------------------------

    def _before_update(self) -> None:
        cur = self.current
        if self.scaler is not None and getattr(self.scaler, "is_enabled", lambda: True)():
            cur.scale = float(self.scaler.get_scale())
        cur.grad_scale = cur.scale  # read in the backward, scaled
        if self.synced:  # the reduced gradients (FSDP2: this rank's shard of them), as the optimizer sees them
            for row in self.unique:
                if self.params[row].requires_grad:
                    self._on_grad(row, self.params[row])
            cur.grad_scale = 1.0 if self._unscaled() else cur.scale
        cur.norms = fast_norms({row: self.params[row] for row in self.unique})
        cur.group = np.full(len(self.params), np.nan)
        if self.optimizer is None:
            return
        group_of = {id(p): i for i, g in enumerate(self.optimizer.param_groups) for p in g["params"]}
        cur.lrs = tuple(float(g.get("lr", math.nan)) for g in self.optimizer.param_groups)
        cur.group = np.array([group_of.get(id(p), -1) for p in self.params], dtype=np.float64)
        held = [row for row in self.unique if id(self.params[row]) in group_of]
        cur.before = self._update_samples(held)

    def _unscaled(self) -> bool:
        """Whether the scaler has divided the optimizer's gradients by its scale already (``scaler.step`` does it
        before ``optimizer.step()``, and so does the user's ``scaler.unscale_(optimizer)``, to clip them)."""
        states = self._scaler_record()
        if self.optimizer is None or not isinstance(states, dict):
            return False
        stage = states.get(id(self.optimizer), {}).get("stage")
        return getattr(stage, "name", None) == "UNSCALED"

    def _update_samples(self, rows: list[int]) -> list[tuple[int, tuple]]:
        """The sample (see ``_sample_of``) of each of these parameters copied into the buffer kept for it (see
        ``_kept_sample``), before the optimizer's step: one multi-tensor copy."""
        taken = [(row, kept) for row, kept in ((row, self._kept_sample(row)) for row in rows) if kept is not None]
        if taken:
            torch._foreach_copy_([kept[2] for _, kept in taken], [self._now(row, kept) for row, kept in taken])
        return taken

    def _kept_sample(self, row: int) -> tuple | None:
        """(where the parameter's values are, a view of its sample, a buffer of the sample's shape, the square root of
        the parameter's size over the sample's), kept from step to step while the parameter's values stay where
        they are; the view is None when they are not contiguous (the sample is then a copy, taken afresh each time).
        None for a parameter without values to sample."""
        p = local(self.params[row])
        if p.is_meta or not p.is_floating_point() or not p.numel():
            return None
        where = (p.data_ptr(), p.shape, p.stride(), p.dtype, p.device)
        kept = self._samples.get(row)
        if kept is None or kept[0] != where:
            sample = self._sample_of(p)
            kept = self._samples[row] = (where, sample if p.is_contiguous() else None,
                                         torch.empty(sample.shape, dtype=sample.dtype, device=sample.device),
                                         math.sqrt(p.numel() / sample.numel()))
        return kept

    def _now(self, row: int, kept: tuple) -> torch.Tensor:
        """The parameter's sample as its values are now."""
        return kept[1] if kept[1] is not None else self._sample_of(self.params[row])

    def _sample_of(self, p: torch.Tensor) -> torch.Tensor:
        flat = local(p).detach().reshape(-1)  # a DTensor's own shard: reshaping the DTensor may communicate
        n = flat.numel()
        if n <= self.sample_size:
            return flat
        blocks = max(1, self.sample_size // UPDATE_BLOCK)
        width = self.sample_size // blocks
        spacing = max(1, (n - width) // max(1, blocks - 1))  # the last block ends within the tensor
        if spacing % 2 == 0 and spacing > width:  # odd, not in step with the rows of a weight; blocks still apart
            spacing -= 1
        return flat.unfold(0, width, spacing)[:blocks]  # [blocks, width]: a view of a contiguous parameter

    def _after_update(self) -> None:
        """||w after - w before|| of each parameter, from its sample (scaled up by the share it covers): one
        multi-tensor difference (before - after, in the buffers) and norm for all of them (float32 sums: a few parts
        in a million)."""
        cur = self.current
        if cur.before:
            rows, kept = zip(*cur.before)
            buffers = [k[2] for k in kept]
            torch._foreach_sub_(buffers, [self._now(row, k) for row, k in zip(rows, kept)])
            scales = {row: k[3] for row, k in zip(rows, kept)}
            for row, value in fast_norms(dict(zip(rows, buffers))).items():
                cur.updates[row] = value * scales[row]
        cur.before = None
        cur.updated = True

    # -- the end of a step ----------------------------------------------------------------------------------

    def _finish(self) -> None:
        """Turn what the sampled step gathered into a StepRecord (the one copy to the CPU of the step)."""
        cur = self.current
        rec = cur.recorder
        (summaries, _, fixed), finite = rec.finish_columns() if rec is not None else ((None, {}, {}), [])
        calls = rec.calls if rec is not None else []
        deferred = [c["grad"] for c in calls if c["grad"] is not None]
        deferred += [c["dead"] for c in calls if c["dead"] is not None]
        deferred += [*cur.grads.values(), *cur.stale.values()]
        read = iter(host(deferred))
        grads = [next(read) / cur.scale if c["grad"] is not None else math.nan for c in calls]
        dead = [next(read) if c["dead"] is not None else math.nan for c in calls]
        grad_norms = {row: next(read) / cur.grad_scale for row in cur.grads}
        stale = {row: next(read) / cur.scale for row in cur.stale}
        updates = cur.updates

        table = np.full((len(calls), len(CALL_FIELDS)), np.nan)
        slots = [c["slot"] for c in calls]
        rows = [i for i, slot in enumerate(slots) if slot is not None]
        if rows:
            at = np.array([slots[i] for i in rows])
            got = summaries[at]
            table[rows, _C["output_id"]] = np.where(np.isnan(got[:, _S["numel"]]), np.nan, at)  # NaN: no summary
            table[rows, _C["numel"]:_C["inf_count"] + 1] = got[:, _S["numel"]:_S["inf_count"] + 1]
            table[rows, _C["sampled"]:_C["over"] + 1] = got[:, _S["sampled"]:_S["over"] + 1]
        table[:, _C["grad_output_norm"]] = grads
        table[:, _C["dead_units"]] = dead
        table[:, _C["units"]] = [c.get("units", math.nan) for c in calls]
        table[:, _C["input_finite"]] = [math.nan if ok is None else float(ok) for ok in finite]

        bins = max((len(e) - 1 for e in self.run.edges.values()), default=0)
        counts = np.zeros((len(calls), bins), dtype=np.int32)
        layout = []
        for i, c in enumerate(calls):
            name = c["name"]
            layout.append((self.run._index[name], c["input_shapes"], c["output_shapes"], c["input_dtypes"],
                           c["output_dtypes"], c["input_devices"], c["output_devices"]))
            got = fixed.get(c["slot"])
            if got is not None:
                edges = self.run.edges.get(name)
                binned = self._binning.get(id(edges)) if edges is not None else None
                if binned is not None and binned[0] is edges and binned[1] is got[1]:  # on the run's edges
                    counts[i, :len(got[0]) - 4] = got[0][2:-2]  # the bins, without -Inf/NaN, under, over, +Inf/NaN
        layout = tuple(layout)
        if len(self._layouts) >= _LAYOUTS and layout not in self._layouts:
            self._layouts.clear()
        layout = self._layouts.setdefault(layout, layout)

        group = cur.group if cur.group is not None else np.full(len(self.params), np.nan)
        params = np.array([(cur.norms.get(first, math.nan), grad_norms.get(first, math.nan),
                            updates.get(first, math.nan) if cur.updated else math.nan,
                            float(self.params[row].requires_grad), group[row], stale.get(first, 0.0))
                           for row, first in enumerate(self.first_row)],
                          dtype=np.float64).reshape(len(self.params), len(PARAM_FIELDS))
        training = cur.training if cur.training is not None else np.array([m.training for m in self.modules])
        inputs = tuple(InputRecord(where=where, shape=tuple(t.shape), dtype=dtype_name(t), device=str(t.device),
                                   stats=None if np.isnan(summaries[slot, 0]) else row_stats(summaries[slot].tolist()))
                       for where, t, slot in cur.inputs)
        self.run._append(StepRecord(step=self.run.step_count, layout=layout, calls=table, counts=compact(counts),
                                    params=params, training=training, inputs=inputs, output_numel=cur.output_numel,
                                    grad_scale=cur.scale, lrs=cur.lrs))

    def _end_step(self) -> None:
        self._drop()
        self.run.step_count += 1
        self.open = False
        self._marks = self._grad_marks() if self._sampling() else None
        self.run._notify()

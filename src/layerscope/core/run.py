"""A watched training run as records: one compact ``StepRecord`` per sampled step, the logged scalars of every
step, and the findings over time. ``layerscope.watch`` fills a Run while the model trains; ``Run.save`` and
``layerscope.load`` keep it; everything here reads records only, never the model.

A step's numbers sit in a few numpy arrays (``CALL_FIELDS`` per module call, ``PARAM_FIELDS`` per parameter,
the histogram counts on the module's fixed edges), so that hundreds of sampled steps of a model with
thousands of modules fit in a few hundred megabytes; ``Run.at(step)`` turns one back into a ``Capture``.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import weakref
from array import array
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch

from .collector import paused
from .records import NO_PARAMS, CallRecord, Capture, Finding, InputRecord, ModuleReport, build, copy_with
from .stats import Histogram, TensorStats

# One row per call of a sampled step; NaN where the capture's record would say None.
CALL_FIELDS = (
    "output_id", "numel", "count", "mean", "m2", "min", "max", "zeros", "checked", "nan_count", "inf_count",
    "sampled", "under", "over", "grad_output_norm", "dead_units", "units", "input_finite",
)
# One row per parameter (in the order of the modules and their own parameters). ``group`` is the index of the
# optimizer's param group holding it, -1 for none, NaN without an optimizer; ``update_norm`` is ||w after -
# w before|| of the optimizer step; ``stale_grad`` the norm of the gradient left in .grad from earlier steps
# when the step's first backward began (0 when it had been cleared).
PARAM_FIELDS = ("norm", "grad_norm", "update_norm", "trainable", "group", "stale_grad")
_C = {name: i for i, name in enumerate(CALL_FIELDS)}
_P = {name: i for i, name in enumerate(PARAM_FIELDS)}

# What run.series(module, field) knows, and where each comes from.
CALL_SERIES = ("mean", "std", "min", "max", "zero_fraction", "nan_count", "inf_count", "numel", "dead_fraction",
               "output_grad_norm")
PARAM_SERIES = ("grad_norm", "param_norm", "update_ratio")
SERIES = CALL_SERIES + PARAM_SERIES
LOSS = "loss"  # the logged scalar the loss rules read
CACHED_CAPTURES = 4


@dataclasses.dataclass(frozen=True, eq=False)
class StepRecord:
    """One sampled step. ``layout`` holds, per call in the order the calls returned, (module index, input
    shapes, output shapes, input dtypes, output dtypes, input devices, output devices); steps whose calls look
    alike share one layout object. ``counts[i, :bins]`` is call i's histogram on its module's edges."""

    step: int
    layout: tuple
    calls: np.ndarray  # float64 [calls, CALL_FIELDS]
    counts: np.ndarray  # [calls, most bins], of an integer type: the smallest unsigned one that holds them
    params: np.ndarray  # float64 [parameters, PARAM_FIELDS]
    training: np.ndarray  # bool [modules]: each module's training flag during the recorded forward
    inputs: tuple[InputRecord, ...] = ()
    output_numel: int = 0
    grad_scale: float = 1.0  # the GradScaler's scale that the gradient norms were divided by
    lrs: tuple[float, ...] = ()  # the learning rate of each param group
    # a run merged from the ranks of a job (``layerscope.gather``): each rank's statistics of the same calls
    # (float64 [ranks, calls, CALL_FIELDS], NaN where a rank has none) and each rank's parameter rows
    # (float64 [ranks, parameters, PARAM_FIELDS]: its shard's norms); None on one rank's run
    rank_calls: np.ndarray | None = None
    rank_params: np.ndarray | None = None
    findings: tuple[Finding, ...] = ()  # a merged run: the ranks' own one-pass findings of the step, with their rank


def compact(counts: np.ndarray) -> np.ndarray:
    """A StepRecord's histogram counts in the smallest unsigned type that holds them (its largest array, kept for
    many steps: a byte per count for tensors of up to 255 elements), as every producer and ``load`` store them."""
    return counts.astype(np.min_scalar_type(int(counts.max())) if counts.size else np.uint8, copy=False)


def _number(value: float) -> float | None:
    return None if value != value else value


def _count(value: float) -> int | None:
    return None if value != value else int(value)


def _hypot(values: np.ndarray) -> float:
    """sqrt of the sum of squares of the finite-or-Inf values (NaN: no value); NaN when there is none."""
    got = values[~np.isnan(values)]
    return float(np.sqrt(np.square(got).sum())) if got.size else math.nan


class Run:
    """The records of a watched training run (see ``layerscope.watch``).

    ``steps`` are the sampled step numbers still kept (old ones are thinned out, see ``keep``),
    ``series(module, field)`` a module's numbers over them, ``scalars(name)`` what ``log`` recorded at every
    step, ``at(step)`` one sampled step as a ``Capture``, ``findings`` what looked wrong, each with its step.
    """

    def __init__(self, structure: Capture, *, every: int = 10, keep: int = 128, thresholds: Mapping | None = None,
                 edges: Mapping[str, np.ndarray] | None = None):
        self.structure = structure  # the module tree as a Capture with no calls: names, types, parameter counts
        self.every, self.keep = every, keep
        self.thresholds = dict(thresholds or {})
        self.edges: dict[str, np.ndarray] = dict(edges or {})  # fixed histogram edges by module, for the run
        self.records: list[StepRecord] = []
        self.step_count = 0  # steps completed
        self.world_size = 1  # ranks merged into this run (``layerscope.gather``); 1 for one rank's own run
        self.rank_findings: tuple[Finding, ...] = ()  # a merged run: each rank's own findings over time
        names = list(structure.modules)
        self._index = {name: i for i, name in enumerate(names)}
        self.param_keys = tuple((name, local) for name in names for local in structure[name].params)
        rows = collections.defaultdict(list)
        for row, (name, _) in enumerate(self.param_keys):
            rows[name].append(row)
        self._own = {name: np.array(rows.get(name, []), dtype=np.int64) for name in names}
        self._scalars: dict[str, tuple[array, array]] = {}
        self._pending: list[tuple[int, str, torch.Tensor]] = []
        self._seen: dict[tuple[str, str], list] = {}  # (kind, module) -> [first Finding, last step, steps seen]
        self._unjudged: list[StepRecord] = []
        self._pinned: set[int] = set()
        self._first_calls: dict[int, tuple[tuple, np.ndarray]] = {}
        self._captures: collections.OrderedDict[int, Capture] = collections.OrderedDict()
        self._listeners: list[weakref.WeakMethod | Callable] = []
        self._version = 0
        self._found: tuple[int, tuple[Finding, ...]] | None = None
        self._watcher = None  # set by watch(): the hooks that fill this run

    # -- what was recorded ------------------------------------------------------------------------------

    @property
    def merged(self) -> bool:
        """True for the run of a whole distributed job, merged from its ranks' runs by ``layerscope.gather``."""
        return self.world_size > 1

    @property
    def steps(self) -> np.ndarray:
        """The sampled steps kept, in order (int64)."""
        return np.array([r.step for r in self.records], dtype=np.int64)

    @property
    def scalar_names(self) -> tuple[str, ...]:
        self._flush()
        return tuple(self._scalars)

    def scalars(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of a scalar given to ``log``, for every step it was logged at."""
        self._flush()
        if name not in self._scalars:
            raise KeyError(f"no scalar named {name!r} was logged; logged: {', '.join(self._scalars) or 'none'}")
        steps, values = self._scalars[name]
        return np.array(steps, dtype=np.int64), np.array(values, dtype=np.float64)

    def series(self, module: str, field: str) -> tuple[np.ndarray, np.ndarray]:
        """(steps, values) of one number of ``module`` over the sampled steps kept, NaN where it has none.

        Fields of the module's output, first call: "mean", "std", "min", "max", "zero_fraction", "nan_count",
        "inf_count", "numel", "dead_fraction" (ReLU channels zero for every item), "output_grad_norm"; of the
        module's own parameters taken together: "grad_norm", "param_norm" (before the step's update) and
        "update_ratio" (||w after - w before|| / ||w before||, over the parameters the optimizer holds)."""
        self._check_module(module)
        if field not in SERIES:
            raise ValueError(f"unknown field {field!r}; known: {', '.join(SERIES)}")
        values = np.array([self._value(r, module, field) for r in self.records], dtype=np.float64)
        return self.steps, values

    def histograms(self, module: str) -> tuple[np.ndarray, np.ndarray | None, np.ndarray, np.ndarray, np.ndarray]:
        """The activation histograms of ``module``'s first call over the sampled steps it ran in: (steps,
        edges, counts [steps, bins], under [steps], over [steps]). Every step uses the same edges."""
        self._check_module(module)
        edges = self.edges.get(module)
        steps, counts, under, over = [], [], [], []
        if edges is not None:
            bins = len(edges) - 1
            for r in self.records:
                i = self._first_call(r)[self._index[module]]
                if i < 0 or np.isnan(r.calls[i, _C["count"]]):
                    continue
                steps.append(r.step)
                counts.append(r.counts[i, :bins])
                under.append(r.calls[i, _C["under"]])
                over.append(r.calls[i, _C["over"]])
        bins = 0 if edges is None else len(edges) - 1
        return (np.array(steps, dtype=np.int64), edges,
                np.array(counts, dtype=np.int64).reshape(len(steps), bins),
                np.array(under, dtype=np.int64), np.array(over, dtype=np.int64))

    def at(self, step: int) -> Capture:
        """The Capture of a sampled step: every record a one-pass capture has (no feature maps, no live model),
        with that step's one-pass findings (each with its ``step``)."""
        cap = self._captures.get(step)
        if cap is not None:
            self._captures.move_to_end(step)
            return cap
        record = self.record(step)
        cap = self._capture(record)
        self._captures[step] = cap
        while len(self._captures) > CACHED_CAPTURES:
            self._captures.popitem(last=False)
        return cap

    def record(self, step: int) -> StepRecord:
        """The StepRecord of a sampled step that is still kept."""
        steps = self.steps
        i = int(np.searchsorted(steps, step))
        if i < len(steps) and steps[i] == step:
            return self.records[i]
        if not len(steps):
            raise KeyError(f"step {step} was not sampled: no step has been sampled yet")
        near = steps[np.argmin(np.abs(steps - step))]
        raise KeyError(f"step {step} was not sampled (or was thinned out); the nearest sampled step is {near}")

    @property
    def findings(self) -> tuple[Finding, ...]:
        """What looked wrong over the run, worst first: the findings over time (see
        ``layerscope.core.trends``) and the one-pass findings of the sampled steps, each once, at the step it
        was first seen (``details`` say at how many sampled steps and the last one)."""
        if self._found is None or self._found[0] != self._version:
            self._found = (self._version, self.find())
        return self._found[1]

    def find(self, **thresholds) -> tuple[Finding, ...]:
        """The findings with other thresholds than the ones given to ``watch`` (see ``trends.find_trends``)."""
        from .trends import find_trends

        self._judge()
        over_time = find_trends(self, **{**self.thresholds, **thresholds})
        if self.rank_findings:
            from .run_ranks import ranked

            over_time = ranked(over_time, self.rank_findings, self.world_size)
        once = self._once()
        severity = ("error", "warning", "info")
        return tuple(sorted([*over_time, *once], key=lambda f: (severity.index(f.severity), f.step or 0)))

    def _once(self) -> list[Finding]:
        """The one-pass findings of the sampled steps, each once: at its first step, with at how many sampled steps
        it was seen and the last one in its details."""
        self._judge()
        return [dataclasses.replace(f, details={**f.details, "sampled_steps": n, "last_step": last})
                for f, last, n in self._seen.values()]

    # -- live: what watch() and the loop call -----------------------------------------------------------

    def __enter__(self) -> Run:
        if self._watcher is None:
            raise RuntimeError("this run has no model to watch (it was loaded from a file): use layerscope.watch()")
        self._watcher.start()
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self._watcher is not None:
                self._watcher.stop()
        finally:
            self._flush()
            self._notify(done=True)

    @property
    def live(self) -> bool:
        """True while the ``with`` block of ``layerscope.watch`` runs."""
        return self._watcher is not None and self._watcher.active

    def step(self) -> None:
        """End a step, in a loop without an optimizer given to ``watch`` (with one, each ``optimizer.step()``
        ends a step). Call it once per iteration, after the backward pass."""
        if self._watcher is None or not self._watcher.active:
            raise RuntimeError("run.step() counts steps inside the `with layerscope.watch(...)` block only")
        self._watcher.step()

    def log(self, **values) -> None:
        """Record scalars of the current step: ``run.log(loss=loss, accuracy=acc)``. Tensors (one element) stay
        on their device and are copied to the CPU in batches, so logging adds no synchronisation per step.
        A value logged after ``optimizer.step()`` belongs to the step that just ended, until the next forward.
        The loss rules read the scalar named "loss"."""
        step = self._watcher.log_step() if self.live else max(self.step_count - 1, 0)
        for name, value in values.items():
            if isinstance(value, torch.Tensor):
                if value.numel() != 1:
                    raise ValueError(f"log() takes single numbers; {name} has shape {tuple(value.shape)}")
                self._pending.append((step, name, value.detach().reshape(()).clone()))
            else:
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    raise TypeError(f"log() takes numbers or one-element tensors; {name} is "
                                    f"{type(value).__name__}") from None
                self._add_scalar(name, step, number)
        if len(self._pending) >= 512:
            self._flush()

    def on_step(self, callback: Callable[[Run, bool], Any]) -> None:
        """Call ``callback(run, done)`` after every step (done=False) and when the ``with`` block ends
        (done=True). Bound methods are held weakly: a closed inspector stops listening."""
        self._listeners.append(weakref.WeakMethod(callback) if hasattr(callback, "__self__") else callback)

    def save(self, path) -> None:
        """Write this run to one file (see ``layerscope.core.store``); ``layerscope.load`` reads it back."""
        from .store import save_run

        self._flush()
        self._judge()
        save_run(self, path)

    def to_tensorboard(self, logdir, *, modules=None) -> None:
        """Write the scalars, and per module its activation histograms, gradient norm, parameter norm and update
        ratio at the sampled steps, as TensorBoard event files in ``logdir`` (needs ``pip install
        tensorboard``). ``modules``: names to write (default all)."""
        from .tensorboard import write

        write(self, logdir, modules)

    def __repr__(self) -> str:
        state = "live" if self.live else "done"
        return (f"Run({len(self.structure.modules)} modules, {self.step_count} steps, {len(self.records)} sampled "
                f"kept, every={self.every}, {state})")

    # -- filled by the watcher ----------------------------------------------------------------------------

    def _append(self, record: StepRecord) -> None:
        self.records.append(record)
        self._unjudged.append(record)
        self._version += 1
        if len(self._pinned) < 8 and np.any(record.calls[:, _C["nan_count"]] + record.calls[:, _C["inf_count"]] > 0) \
                and not any(f.kind in ("nan", "inf") for f, _, _ in self._seen.values()):
            self._pinned.add(record.step)  # the first step with NaN/Inf is never thinned out
        if len(self.records) > self.keep:
            self._thin()

    def _thin(self) -> None:
        """Drop every other record of the older part (the first and pinned ones stay), keeping the newest
        half of ``keep`` as it is: the oldest history ends up sparsest."""
        self._judge()
        recent = max(1, self.keep // 2)
        old, new = self.records[:-recent], self.records[-recent:]
        kept = [r for i, r in enumerate(old) if i % 2 == 0 or r.step in self._pinned]
        self.records = kept + new
        alive = {r.step for r in self.records}
        for step in [s for s in self._captures if s not in alive]:
            del self._captures[step]
        layouts = {id(r.layout) for r in self.records}
        self._first_calls = {k: v for k, v in self._first_calls.items() if k in layouts}

    def _add_scalar(self, name: str, step: int, value: float) -> None:
        steps, values = self._scalars.setdefault(name, (array("q"), array("d")))
        steps.append(step)
        values.append(value)
        self._version += 1

    def _flush(self) -> None:
        """Copy the logged tensors to the CPU: one copy per device."""
        pending, self._pending = self._pending, []
        by_device: dict[torch.device, list[tuple[int, str, torch.Tensor]]] = {}
        for entry in pending:
            by_device.setdefault(entry[2].device, []).append(entry)
        values: dict[int, float] = {}
        for entries in by_device.values():
            host = torch.stack([t.to(torch.float64) for _, _, t in entries]).cpu().tolist()
            values.update(zip((id(e) for e in entries), host))
        for entry in pending:  # in the order they were logged
            self._add_scalar(entry[1], entry[0], values[id(entry)])

    def _notify(self, done: bool = False) -> None:
        alive = []
        for listener in self._listeners:
            callback = listener() if isinstance(listener, weakref.WeakMethod) else listener
            if callback is not None:
                alive.append(listener)
                callback(self, done)
        self._listeners = alive

    def _judge(self) -> None:
        """The one-pass findings of the sampled steps not looked at yet (before they can be thinned out)."""
        if not self._unjudged:
            return
        self._flush()
        unjudged, self._unjudged = self._unjudged, []
        with paused():  # each step is rebuilt as a Capture: thousands of small records
            for record in unjudged:  # not cached: at() keeps the Captures someone looks at
                cap = self._captures.get(record.step) or self._capture(record, judging=True)
                for f in cap.findings:
                    seen = self._seen.get((f.kind, f.module))
                    if seen is None:
                        self._seen[f.kind, f.module] = [f, f.step, 1]
                    else:
                        seen[1], seen[2] = f.step, seen[2] + 1

    # -- reading the arrays ---------------------------------------------------------------------------------

    def _check_module(self, module: str) -> None:
        if module not in self._index:
            raise KeyError(f"the model has no module named {module!r}")

    def _first_call(self, record: StepRecord) -> np.ndarray:
        """For each module (by index), the row of its first call in the record, -1 if it was not called."""
        known = self._first_calls.get(id(record.layout))
        if known is not None and known[0] is record.layout:
            return known[1]
        first = np.full(len(self._index), -1, dtype=np.int64)
        for i, call in reversed(list(enumerate(record.layout))):
            first[call[0]] = i
        self._first_calls[id(record.layout)] = (record.layout, first)
        return first

    def first_call_index(self, record: StepRecord, module: str) -> int:
        """The row of ``module``'s first call in a record's arrays, -1 if it was not called in that step."""
        return int(self._first_call(record)[self._index[module]])

    def first_row(self, record: StepRecord, module: str) -> np.ndarray | None:
        """The CALL_FIELDS row of ``module``'s first call in a record, None if it was not called."""
        i = self.first_call_index(record, module)
        return None if i < 0 else record.calls[i]

    def _value(self, record: StepRecord, module: str, field: str) -> float:
        if field in PARAM_SERIES:
            rows = record.params[self._own[module]]
            if field == "grad_norm":
                return _hypot(rows[:, _P["grad_norm"]])
            if field == "param_norm":
                return _hypot(rows[:, _P["norm"]])
            updated = rows[~np.isnan(rows[:, _P["update_norm"]])]
            weights = _hypot(updated[:, _P["norm"]])
            return _hypot(updated[:, _P["update_norm"]]) / weights if weights > 0 else math.nan
        i = self._first_call(record)[self._index[module]]
        if i < 0:
            return math.nan
        row = record.calls[i]
        if field == "std":
            count = row[_C["count"]]
            return math.sqrt(max(row[_C["m2"]], 0.0) / count) if count > 0 else (0.0 if count == 0 else math.nan)
        if field == "zero_fraction":
            checked = row[_C["checked"]]
            return row[_C["zeros"]] / checked if checked > 0 else (0.0 if checked == 0 else math.nan)
        if field == "dead_fraction":
            units = row[_C["units"]]
            return row[_C["dead_units"]] / units if units > 0 else math.nan
        return float(row[_C["grad_output_norm" if field == "output_grad_norm" else field]])

    def loss_at(self, step: int) -> float | None:
        """The loss logged at ``step`` (the scalar "loss"), None if none was."""
        self._flush()
        if LOSS not in self._scalars:
            return None
        steps, values = self._scalars[LOSS]
        i = int(np.searchsorted(np.frombuffer(steps, dtype=np.int64), step, side="right")) - 1
        return values[i] if i >= 0 and steps[i] == step else None

    def _capture(self, record: StepRecord, judging: bool = False) -> Capture:
        """The step as a Capture with its one-pass findings. ``judging``: for those findings only, so without the
        histograms they do not read (all but those of saturating activations, which have ``bounds``)."""
        names = list(self.structure.modules)
        binned = self.edges if not judging else {
            name: edges for name, edges in self.edges.items() if self.structure.modules[name].bounds is not None}
        calls: list[list[CallRecord]] = [[] for _ in names]
        ranks = None if record.rank_calls is None else record.rank_calls.tolist()
        for i, (layout, row) in enumerate(zip(record.layout, record.calls.tolist())):
            module, in_shapes, out_shapes, in_dtypes, out_dtypes, in_devices, out_devices = layout
            stats, hist = _stats(row), None
            if stats is not None:
                edges = binned.get(names[module])
                if edges is not None:
                    hist = build(Histogram, counts=record.counts[i, :len(edges) - 1].astype(np.int64), edges=edges,
                                 sampled=int(row[_SAMPLED]), numel=stats.numel, under=int(row[_UNDER]),
                                 over=int(row[_OVER]), rebinned=False)
            finite = row[_FINITE]
            calls[module].append(build(
                CallRecord, _CALL_DEFAULTS,
                index=i, input_shapes=in_shapes, output_shapes=out_shapes, input_dtypes=in_dtypes,
                output_dtypes=out_dtypes, input_devices=in_devices, output_devices=out_devices, stats=stats,
                histogram=hist, grad_output_norm=_number(row[_GRAD]), dead_units=_count(row[_DEAD]),
                units=_count(row[_UNITS]), input_finite=None if finite != finite else bool(finite),
                output_id=_count(row[_OUTPUT_ID]),
                per_rank=None if ranks is None else tuple(_stats(r[i]) for r in ranks),
            ))
        params = record.params.tolist()
        rank_params = None if record.rank_params is None else record.rank_params.tolist()
        modules, row = {}, 0
        for index, (name, report) in enumerate(self.structure.modules.items()):
            own = {}
            for local, p in report.params.items():
                own[local] = _param(p, params[row])
                if rank_params is not None:  # p.per_rank: each rank's own layout (its shard), from its structure
                    own[local] = copy_with(own[local], per_rank=tuple(
                        None if q is None else _param(q, r[row]) for q, r in zip(p.per_rank, rank_params)))
                row += 1
            modules[name] = copy_with(report, calls=tuple(calls[index]),
                                      params=MappingProxyType(own) if own else NO_PARAMS,
                                      training=bool(record.training[index]))
        backward = bool(np.any(~np.isnan(record.params[:, _P["grad_norm"]]))) if len(params) else False
        cap = Capture(modules=MappingProxyType(modules), total_params=self.structure.total_params,
                      trainable_params=self.structure.trainable_params, loss=self.loss_at(record.step),
                      findings=record.findings,
                      loss_kind="training" if backward else None, backward=backward, error=None,
                      inputs=record.inputs, output_numel=record.output_numel, world_size=self.world_size)
        from .findings import find

        found = [dataclasses.replace(f, step=record.step) for f in find(cap) if f.kind != "train_mode"]
        return dataclasses.replace(cap, findings=tuple(found))


# where _capture reads a CALL_FIELDS row, and the CallRecord fields a run does not record
_SAMPLED, _UNDER, _OVER, _FINITE = _C["sampled"], _C["under"], _C["over"], _C["input_finite"]
_GRAD, _DEAD, _UNITS, _OUTPUT_ID = _C["grad_output_norm"], _C["dead_units"], _C["units"], _C["output_id"]
_STATS = slice(_C["numel"], _C["inf_count"] + 1)  # TensorStats' fields, in its order
_STATS_FIELDS = [f.name for f in dataclasses.fields(TensorStats)]
_CALL_DEFAULTS = {f.name: f.default for f in dataclasses.fields(CallRecord) if f.default is not dataclasses.MISSING}
assert tuple(_STATS_FIELDS) == CALL_FIELDS[_STATS]


def _stats(row: list[float]) -> TensorStats | None:
    """The output statistics of a CALL_FIELDS row, None where it has none."""
    if row[_C["count"]] != row[_C["count"]]:
        return None
    numel, count, mean, m2, lo, hi, zeros, checked, nan, inf = row[_STATS]
    return build(TensorStats, numel=int(numel), count=int(count), mean=mean, m2=m2, min=lo, max=hi, zeros=int(zeros),
                 checked=int(checked), nan_count=int(nan), inf_count=int(inf))


def _param(p, row: list[float]):
    """A structure's ParamRecord with the norms of a PARAM_FIELDS row."""
    norm, grad, update, trainable, _, _ = row
    return copy_with(p, trainable=bool(trainable), norm=_number(norm), grad_norm=_number(grad),
                     finite=math.isfinite(norm) if norm == norm or p.device != "meta" else None,
                     update_ratio=update / norm if update == update and norm == norm and norm > 0 else None)


def structure_of(modules: Mapping[str, ModuleReport], total: int, trainable: int) -> Capture:
    """The module tree as a Capture without calls (what a run shows before its first step)."""
    return Capture(modules=MappingProxyType(dict(modules)), total_params=total, trainable_params=trainable,
                   loss=None, loss_kind=None, backward=False, error=None)


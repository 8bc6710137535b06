"""``capture(model, batch)``: one hook-driven forward (and backward) pass, summarised per module."""

from __future__ import annotations

import contextlib
import functools
import gc
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from . import diagnose
from .diagnose import CaptureError
from .findings import find
from .hooks import HookSession
from .nested import call_inputs, call_model, first_float_tensor, iter_tensors, map_tensors, shape_tree
from .stats import Histogram, StatsBatch, TensorStats, norm
from .tree import module_tree

FEATURE_CHANNELS = 16
FEATURE_SIZE = 64
_RELU_FAMILY = (nn.ReLU, nn.ReLU6)


@dataclass(frozen=True, eq=False)
class CallRecord:
    """One invocation of a module. Statistics describe its first floating-point output tensor."""

    index: int  # position among all calls of the pass, in the order they returned
    input_shapes: Any
    output_shapes: Any
    input_dtypes: tuple[str, ...]
    output_dtypes: tuple[str, ...]
    input_devices: tuple[str, ...]
    output_devices: tuple[str, ...]
    stats: TensorStats | None
    histogram: Histogram | None
    grad_output_norm: float | None = None
    dead_units: int | None = None  # ReLU/ReLU6 only: channels (dim 1) that are zero for every item
    units: int | None = None  # how many channels dead_units is out of
    feature_maps: torch.Tensor | None = field(default=None, repr=False)  # [C<=16, H<=64, W<=64], CPU


@dataclass(frozen=True, eq=False)
class ModuleReport:
    name: str
    type_name: str
    depth: int
    children: tuple[str, ...]
    num_params: int
    num_own_params: int
    num_trainable: int
    devices: tuple[str, ...]
    dtypes: tuple[str, ...]
    calls: tuple[CallRecord, ...] = ()
    param_grad_norms: Mapping[str, float | None] = field(default_factory=dict)
    param_norms: Mapping[str, float | None] = field(default_factory=dict)  # own parameters; filled with backward

    @property
    def called(self) -> bool:
        return bool(self.calls)


@dataclass(frozen=True, eq=False)
class Capture:
    """Everything one pass recorded, keyed by ``named_modules()`` names (the root is "")."""

    modules: Mapping[str, ModuleReport]
    total_params: int
    trainable_params: int
    output: Any = field(repr=False)
    loss: float | None
    loss_kind: str | None  # "loss_fn" | "cross_entropy" | "sum"; None when no loss was computed
    backward: bool  # True when gradients were computed
    error: CaptureError | None
    findings: list = field(default_factory=list)
    model: nn.Module | None = field(default=None, repr=False)
    batch: Any = field(default=None, repr=False)

    def __getitem__(self, name: str) -> ModuleReport:
        return self.modules[name]

    @property
    def calls(self) -> list[tuple[str, CallRecord]]:
        """Every call of the pass as (module name, record), in the order the calls returned."""
        pairs = [(name, c) for name, report in self.modules.items() for c in report.calls]
        return sorted(pairs, key=lambda pair: pair[1].index)

    @functools.cached_property
    def _summary(self) -> str:
        from .summary import summary

        return summary(self.model, self.batch)

    def summary(self) -> str:
        """The torchinfo table for the same model and batch (computed once, on first use)."""
        return self._summary


def _check_arguments(model: Any, batch: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"capture() needs a torch.nn.Module as model, got {type(model).__name__}")
    if batch is None:
        raise ValueError("capture() needs a batch: a Tensor, a tuple/list of arguments, or a dict of keyword arguments")
    if not isinstance(batch, (torch.Tensor, Mapping, tuple, list)):
        raise TypeError(
            f"capture() takes a batch as a Tensor (model(batch)), a tuple/list (model(*batch)) or a dict "
            f"(model(**batch)), got {type(batch).__name__}"
        )


def _on_meta(model: nn.Module) -> bool:
    tensors = [*model.parameters(), *model.buffers()]
    return bool(tensors) and all(t.is_meta for t in tensors)


class _Recorder:
    """The forward hooks' state: what each call saw, with statistics deferred to a StatsBatch."""

    def __init__(self, session: HookSession, stats: StatsBatch, grads: bool, feature_maps: bool):
        self.session, self.stats, self.grads, self.feature_maps = session, stats, grads, feature_maps
        self.calls: list[dict] = []
        self.summarised: dict[int, tuple] = {}  # id(tensor) -> (weakref, in-place version, StatsBatch slot)
        self.last_grad_call: dict | None = None  # the call whose output gradient arrived last

    def hook_for(self, name: str, module: nn.Module) -> Callable:
        dead_units = isinstance(module, _RELU_FAMILY)

        def hook(module, args, kwargs, output):
            self._record(name, call_inputs(args, kwargs), output, dead_units)

        return hook

    def _record(self, name: str, inputs: Any, output: Any, dead_units: bool) -> None:
        ins, outs = _tensors(inputs), _tensors(output)
        call = dict(
            name=name,
            index=len(self.calls),
            input_shapes=tuple(inputs.shape) if type(inputs) is torch.Tensor else shape_tree(inputs),
            output_shapes=tuple(output.shape) if type(output) is torch.Tensor else shape_tree(output),
            input_dtypes=_unique(t.dtype for t in ins),
            output_dtypes=_unique(t.dtype for t in outs),
            input_devices=_unique(t.device for t in ins),
            output_devices=_unique(t.device for t in outs),
            slot=None,
            fmap=None,
            grad=None,
            dead=None,
        )
        self.calls.append(call)
        t = first_float_tensor(outs)
        if t is None:
            return
        call["slot"] = self._slot(t)
        if self.feature_maps and t.dim() == 4 and not t.is_meta and t.numel():
            fmap = t.detach()[0, :FEATURE_CHANNELS]
            if fmap.shape[-2] > FEATURE_SIZE or fmap.shape[-1] > FEATURE_SIZE:
                size = (min(fmap.shape[-2], FEATURE_SIZE), min(fmap.shape[-1], FEATURE_SIZE))
                fmap = F.adaptive_avg_pool2d(fmap.float(), size)
            else:
                fmap = fmap.clone()
            call["fmap"] = fmap
        if dead_units and t.dim() >= 2 and not t.is_meta and t.numel():
            dims = [d for d in range(t.dim()) if d != 1]
            call["dead"] = (t.detach().amax(dim=dims) <= 0).sum()
            call["units"] = t.shape[1]
        if self.grads and t.requires_grad:
            def on_grad(g, call=call):
                call["grad"] = norm(g)
                self.last_grad_call = call

            self.session.add_tensor_hook(t, on_grad)

    def _slot(self, t: torch.Tensor) -> int:
        """Summarise ``t``, unless this very tensor was summarised before and not changed in place since
        (containers and identities such as Dropout in eval pass on the tensor they got)."""
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            return self.stats.add(t)
        seen = self.summarised.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == version:
            return seen[2]
        slot = self.stats.add(t)
        self.summarised[id(t)] = (weakref.ref(t), version, slot)
        return slot

    def records(self) -> dict[str, list[CallRecord]]:
        summaries = self.stats.results()
        by_module: dict[str, list[CallRecord]] = {}
        for c in self.calls:
            stats, hist = summaries[c["slot"]] if c["slot"] is not None and summaries[c["slot"]] else (None, None)
            by_module.setdefault(c["name"], []).append(
                CallRecord(
                    index=c["index"],
                    input_shapes=c["input_shapes"],
                    output_shapes=c["output_shapes"],
                    input_dtypes=c["input_dtypes"],
                    output_dtypes=c["output_dtypes"],
                    input_devices=c["input_devices"],
                    output_devices=c["output_devices"],
                    stats=stats,
                    histogram=hist,
                    grad_output_norm=None if c["grad"] is None else float(c["grad"]),
                    dead_units=None if c["dead"] is None else int(c["dead"]),
                    units=c.get("units"),
                    feature_maps=None if c["fmap"] is None else c["fmap"].cpu(),
                )
            )
        return by_module


def _tensors(value: Any) -> list[torch.Tensor]:
    return [value] if type(value) is torch.Tensor else list(iter_tensors(value))


def _unique(items) -> tuple[str, ...]:
    """Sorted unique names of dtypes or devices ('float32', 'cpu')."""
    return tuple(sorted({str(item).removeprefix("torch.") for item in items}))


def class_indices(target: Any, logits: torch.Tensor) -> torch.Tensor:
    """``target`` (one class index, or one per item) as a long tensor [N] checked against logits [N, classes]."""
    n, classes = logits.shape[0], logits.shape[1]
    t = torch.as_tensor(target, device=logits.device)
    if t.dim() == 0:
        t = t.expand(n)
    if t.is_floating_point() or t.shape != (n,):
        raise ValueError(f"target must be one class index or one per item ({n}), got {_describe(t)}")
    lo, hi = int(t.min()), int(t.max())
    if lo < 0 or hi >= classes:
        bad = hi if hi >= classes else lo
        raise ValueError(f"target holds class {bad}, but the output has {classes} classes (0 to {classes - 1})")
    return t.long()


def _loss(output: Any, batch: Any, target: Any, loss_fn: Callable | None) -> tuple[torch.Tensor | None, str]:
    if loss_fn is not None:
        loss = loss_fn(output, batch)
        if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
            raise ValueError(f"loss_fn must return a single-element tensor, got {_describe(loss)}")
        return loss.reshape(()), "loss_fn"
    if target is not None:
        logits = first_float_tensor(output)
        if logits is None or logits.dim() < 2:
            raise ValueError(f"a target needs logits of shape (N, classes), but the output is {_describe(logits)}")
        return F.cross_entropy(logits, class_indices(target, logits)), "cross_entropy"
    parts = [t.float().sum() for t in iter_tensors(output) if t.is_floating_point() and t.requires_grad]
    return (torch.stack(parts).sum() if parts else None), "sum"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return "None" if value is None else type(value).__name__


def _norms(tensors: dict[int, torch.Tensor]) -> dict[int, float]:
    """The norm of each tensor, by key, copied to the CPU once per device."""
    norms: dict[torch.device, dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not t.is_meta:
            norms.setdefault(t.device, {})[key] = norm(t)
    values = {}
    for group in norms.values():
        values.update(zip(group, torch.stack(list(group.values())).cpu().tolist()))
    return values


@contextlib.contextmanager
def _gc_paused():
    """Pause Python's cyclic garbage collector, as it was before, for the length of a capture.

    A capture keeps a few small objects per module call; in a process holding torch's large object graph
    they set off full collections that cost as much as the whole forward pass of a 2,000-module model.
    Reference counting still frees everything at once; only cycle detection waits until the end."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def capture(
    model: nn.Module,
    batch: Any,
    *,
    backward: bool = True,
    target: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    bins: int = 64,
    feature_maps: bool = True,
    sample_size: int = 8192,
) -> Capture:
    """Run ``model`` on ``batch`` once with hooks on every module and summarise what each call saw.

    ``batch`` is passed as ``model(batch)`` (a Tensor), ``model(*batch)`` (a tuple/list) or
    ``model(**batch)`` (a dict). With ``backward`` (the default), a loss is formed from
    ``loss_fn(output, batch)``, else the cross-entropy of the logits with ``target`` (class indices),
    else the sum of all floating-point outputs, and the gradients are computed without touching any
    ``.grad`` of the model. A failure in any phase does not raise: it lands in ``Capture.error``.
    The model is left exactly as it was: hooks removed, training flags, ``requires_grad`` and ``.grad``
    restored, nothing moved. A model whose tensors are all on the meta device gets its batch's tensors
    mirrored on the meta device (shapes, no values, no memory) and no backward.
    """
    _check_arguments(model, batch)
    with _gc_paused():
        return _capture(model, batch, backward, target, loss_fn, bins, feature_maps, sample_size)


def _capture(model, batch, backward, target, loss_fn, bins, feature_maps, sample_size) -> Capture:
    if bins < 1:
        raise ValueError(f"bins must be a positive number, got {bins}")
    tree = module_tree(model)
    names = {id(m): n for n, m in model.named_modules()}
    meta = _on_meta(model)
    if meta:
        batch_run = map_tensors(batch, lambda t: t.to("meta"))
        backward = False
    else:
        batch_run = batch
    output = loss = None
    loss_kind: str | None = None
    error: CaptureError | None = None
    grads: dict[int, torch.Tensor | None] = {}
    phase = "forward"
    with HookSession(model) as session:
        recorder = _Recorder(session, StatsBatch(bins=bins, sample_size=sample_size), backward, feature_maps)
        for name, module in model.named_modules():
            session.add_forward_hook(module, recorder.hook_for(name, module))
        try:
            with torch.enable_grad() if backward else torch.no_grad():
                output = call_model(model, batch_run)
                session.remove_forward_hooks()  # a loss_fn that calls submodules must not add calls to the record
                if backward:
                    phase = "loss"
                    loss, loss_kind = _loss(output, batch, target, loss_fn)
                    params = [p for p in model.parameters() if p.requires_grad]
                    if loss is not None and loss.requires_grad and params:
                        phase = "backward"
                        got = torch.autograd.grad(loss, params, allow_unused=True)
                        grads = {id(p): g for p, g in zip(params, got)}
        except Exception as exc:  # noqa: BLE001 - every failure is reported in Capture.error
            if phase == "forward":
                error = diagnose.forward_error(exc, names, model)
            elif phase == "loss":
                error = diagnose.loss_error(exc, model)
            else:
                last = recorder.last_grad_call
                name = last["name"] if last else ""
                error = diagnose.backward_error(exc, name, model.get_submodule(name))
        finally:
            session.remove()
    records = recorder.records()
    grad_norms = _norms({k: g for k, g in grads.items() if g is not None})
    with torch.no_grad():  # only a backward pass needs them (gradient-to-weight ratios): spare forward-only runs
        param_norms = _norms({id(p): p for p in model.parameters()} if grads else {})
    modules = {}
    for name, info in tree.items():
        own = info.pop("own")
        modules[name] = ModuleReport(
            **info,
            calls=tuple(records.get(name, ())),
            param_grad_norms=MappingProxyType({local: grad_norms.get(id(p)) for local, p in own}),
            param_norms=MappingProxyType({local: param_norms.get(id(p)) for local, p in own}),
        )
    unique = list(model.parameters())
    cap = Capture(
        modules=MappingProxyType(modules),
        total_params=sum(p.numel() for p in unique),
        trainable_params=sum(p.numel() for p in unique if p.requires_grad),
        output=None if output is None else map_tensors(output, lambda t: t.detach()),
        loss=None if loss is None or error is not None and error.phase == "loss" else float(loss.detach()),
        loss_kind=loss_kind,
        backward=bool(grads),
        error=error,
        model=model,
        batch=batch,
    )
    cap.findings.extend(find(cap))
    return cap

"""``capture(model, batch)``: one hook-driven forward (and backward) pass, summarised per module."""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Mapping
from types import MappingProxyType
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import diagnose, distributed, kinds, traits
from .collector import paused
from .costs import Costs
from .findings import find
from .hooks import HookSession
from .nested import call_model, first_float_tensor, iter_tensors, map_tensors
from .recorder import Recorder, device_name, dtype_name, norms
from .records import NO_PARAMS, Capture, CaptureError, InputRecord, ModuleReport, ParamRecord
from .stats import StatsBatch, local
from .tree import initialised, module_tree, uninitialised


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


def _edges(value: Any, what: str) -> np.ndarray:
    edges = np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value, dtype=np.float64)
    if edges.ndim != 1 or len(edges) < 2 or not np.isfinite(edges).all() or not (np.diff(edges) > 0).all():
        raise ValueError(f"{what} must be increasing, finite histogram edges (at least two), got {value!r}")
    return edges


def _bin_plan(bins: Any) -> tuple[int, Callable[[str], np.ndarray | None]]:
    """``bins`` as (equal bins per tensor, fixed edges by module name or None).

    An int: that many equal bins over each output's own range. A sequence of edges: those edges for every
    module. A mapping {module name: edges}: those edges for the modules named, 64 equal bins elsewhere."""
    if isinstance(bins, bool):
        raise TypeError("bins must be a number of bins, a sequence of edges, or a mapping of module names to edges")
    if isinstance(bins, int):
        if bins < 1:
            raise ValueError(f"bins must be a positive number, got {bins}")
        return bins, lambda name: None
    if isinstance(bins, Mapping):
        fixed = {str(name): _edges(e, f"bins[{name!r}]") for name, e in bins.items()}
        return 64, fixed.get
    edges = _edges(bins, "bins")
    return len(edges) - 1, lambda name: edges


def float_inputs(batch: Any) -> list[tuple[str, torch.Tensor]]:
    """The batch's floating-point tensors, each with where it sits ("" for a lone tensor, "[0]", "['image']")."""
    if isinstance(batch, torch.Tensor):
        items = [("", batch)]
    elif isinstance(batch, Mapping):
        items = [(f"[{k!r}]", v) for k, v in batch.items()]
    elif isinstance(batch, (tuple, list)):
        items = [(f"[{i}]", v) for i, v in enumerate(batch)]
    else:
        items = []
    return [(where, t) for where, value in items for t in iter_tensors(value) if t.is_floating_point()]


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
        logits = None if logits is None else local(logits)
        if logits is None or logits.dim() < 2:
            raise ValueError(f"a target needs logits of shape (N, classes), but the output is {_describe(logits)}")
        return F.cross_entropy(logits, class_indices(target, logits)), "cross_entropy"
    own = kinds.model_loss(output)
    if own is not None and own.requires_grad:
        return own, "model_loss"
    parts = [local(t).float().sum() for t in kinds.result_tensors(output) if t.requires_grad]
    return (torch.stack(parts).sum() if parts else None), "sum"


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {str(value.dtype).removeprefix('torch.')} tensor of shape {tuple(value.shape)}"
    return "None" if value is None else type(value).__name__


def capture(
    model: nn.Module,
    batch: Any,
    *,
    backward: bool = True,
    target: Any = None,
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None,
    bins: Any = 64,
    feature_maps: bool = True,
    sample_size: int = 8192,
    costs: bool | None = None,
    progress: Callable[[str, int, int], None] | None = None,
) -> Capture:
    """Run ``model`` on ``batch`` once with hooks on every module and summarise what each call saw.

    ``batch`` is passed as ``model(batch)`` (a Tensor), ``model(*batch)`` (a tuple/list) or
    ``model(**batch)`` (a dict). With ``backward`` (the default), a loss is formed from
    ``loss_fn(output, batch)``, else the cross-entropy of the logits with ``target`` (class indices),
    else the loss the model returned (a Hugging Face output's ``.loss``), else the sum of the
    floating-point outputs (caches left out), and the gradients are computed without touching any
    ``.grad`` of the model (also through reentrant activation checkpointing). A failure in any phase does
    not raise: it lands in ``Capture.error``. The model is left exactly as it was: hooks removed, training
    flags, ``requires_grad``, ``.grad`` and buffers restored, nothing moved (lazy modules called for the
    first time keep the parameters they get). A model whose parameters are all on the meta device gets
    its batch's tensors mirrored on the meta device (shapes, no values, no memory) and no backward. A
    ``torch.compile`` wrapper is recorded through its original module, run eagerly.

    ``bins`` sets the histograms: a number of equal bins over each output's own range (64), a sequence
    of edges used for every module, or a mapping {module name: edges} (64 equal bins for the others).
    Fixed edges make histograms of different passes, steps or ranks mergeable (``Histogram.merge``).

    ``costs=True`` also counts, in the same pass, each module's forward and backward FLOPs, the bytes its
    ops saved for the backward and, on CUDA, its peak memory (see ``layerscope.core.costs``). It is off by
    default (it adds a dispatch step to every op) and on by default for a meta-device model, whose forward
    then records autograd (on shapes only) so that the saved tensors are seen too. Parameter, gradient,
    buffer and output bytes are always recorded.

    ``progress(phase, done, total)``, if given, is told what the pass has done so far: phase "forward" as each
    module's forward ends for the first time (``done`` of ``total`` modules), then "backward" as each module's
    output gradient arrives, then "findings" (0 of 1, then 1 of 1); each phase ends with ``done == total``.
    """
    _check_arguments(model, batch)
    default_bins, edges = _bin_plan(bins)
    with paused():
        return _capture(model, batch, backward, target, loss_fn, default_bins, edges, feature_maps, sample_size,
                        costs, progress)


def _cuda_device(model: nn.Module) -> torch.device | None:
    return next((p.device for p in initialised(model) if p.is_cuda), None)


def _capture(model, batch, backward, target, loss_fn, bins, edges, feature_maps, sample_size, costs,
             progress=None) -> Capture:
    model, compiled = kinds.unwrap(model)
    entries = list(model.named_modules())  # walked once: 2,000-module models make every walk count
    names = {id(m): n for n, m in entries}
    walked = [m for _, m in entries]
    elsewhere = kinds.offloaded(model, walked)
    meta = kinds.on_meta(model, elsewhere, walked)
    if meta:
        batch_run = map_tensors(batch, lambda t: t.to("meta"))
        backward = False
    else:
        batch_run = batch
    counting = meta if costs is None else bool(costs)
    saving = counting and (backward or meta)  # a forward that records autograd: saved tensors are seen
    output = loss = None
    loss_kind: str | None = None
    error: CaptureError | None = None
    grads: dict[int, torch.Tensor | None] = {}
    phase = "forward"
    counter: Costs | None = None
    with distributed.resharded(model), HookSession(model, modules=walked) as session:  # FSDP2: sharded throughout
        present = initialised(model, walked)
        before = [p for p in present if p.requires_grad]
        if meta:
            kinds.buffers_to_meta(model)
        if counting:  # the tensors held anyway: their storages are not activation memory
            counter = Costs([*present, *model.buffers(), *iter_tensors(batch_run)], _cuda_device(model))
        recorder = Recorder(session, StatsBatch(bins=bins, sample_size=sample_size), grads=backward,
                            feature_maps=feature_maps, edges=lambda name, t: edges(name), costs=counter,
                            progress=progress, modules=len(entries),
                            params={id(p): p for p in present} if backward else None)
        inputs = [(where, t, recorder.summarise(t)) for where, t in float_inputs(batch_run)]
        for name, module in entries:
            if counter is not None:
                session.add_forward_pre_hook(module, lambda module, args, kwargs, name=name: counter.enter(name))
            session.add_forward_hook(module, recorder.hook_for(name, module), always_call=True)
        try:
            with torch.enable_grad() if backward or saving else torch.no_grad(), \
                    counter.mode() if counter is not None else contextlib.nullcontext():
                with counter.saving() if saving else contextlib.nullcontext():
                    output = call_model(model, batch_run)
                session.remove_forward_hooks()  # a loss_fn that calls submodules must not add calls to the record
                if progress is not None:
                    progress("forward", len(entries), len(entries))
                if backward:
                    phase = "loss"
                    loss, loss_kind = _loss(output, batch, target, loss_fn)
                    moved = kinds.offloaded(model, walked)  # accelerate's hooks put new meta tensors in after each call
                    params = [p for p in initialised(model, walked) if p.requires_grad and id(p) not in moved]
                    if loss is not None and loss.requires_grad and params:
                        phase = "backward"
                        if distributed.syncs_in_backward(model):  # DDP, FSDP2: the job's gradients
                            grads = distributed.backward(loss, before, batch)
                        else:
                            grads = kinds.param_grads(loss, params)
                        if progress is not None:
                            progress("backward", len(entries), len(entries))
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
    records, summaries = recorder.records()
    tree = module_tree(entries)  # after the pass: lazy modules have their parameters now
    output_bytes: dict[str, int] = {}
    for c in recorder.calls:
        output_bytes[c["name"]] = output_bytes.get(c["name"], 0) + c["out_bytes"]
    cost = counter.results(list(tree), bool(grads), saving) if counter is not None else {}
    elsewhere = kinds.offloaded(model, walked)  # again, as the parameters are new ones after each call
    grad_norms = norms({k: g for k, g in grads.items() if g is not None})
    grad_sizes = {k: g.numel() * g.element_size() for k, g in grads.items() if g is not None}
    # Norms are for gradient-to-weight ratios: only a backward needs them. Without one, whether a parameter
    # holds NaN/Inf is only asked when a call's output does (a rare second look at the parameters).
    nonfinite = any(s is not None and not s[0].finite for s in summaries)
    held = {id(p): p for p in initialised(model, walked)} | {k: w for k, w in elsewhere.items() if w is not None}
    rank, world = distributed.process()
    with torch.no_grad():
        param_norms = norms(held if grads or nonfinite else {}, recorder.param_norms)
        checksums = distributed.checksums(held) if world > 1 else {}  # replicas that disagree, for gather
    finite = {key: math.isfinite(value) for key, value in param_norms.items()}
    constant_sum = traits.sums_to_constant(entries)
    kept: dict = {}  # equal values (sets of traits, byte counts) shared by the records of thousands of modules
    modules = {}
    for (name, module), info in zip(entries, tree.values()):
        own = info.pop("own")
        param_ids = info.pop("param_ids")
        found = traits.class_traits(module)
        if name in constant_sum:
            found = found | {"sums_to_constant"}
        if uninitialised(module):
            found = found | {"uninitialised"}
        found = kept.setdefault(found, found)  # one set for all the modules that have these traits
        size = output_bytes.get(name, 0)
        modules[name] = ModuleReport(
            **info,
            calls=tuple(records.get(name, ())),
            params=MappingProxyType({
                key: ParamRecord(shape=recorder.shape(p.shape), dtype=dtype_name(p), device=device_name(p),
                                 trainable=p.requires_grad, norm=param_norms.get(id(p)) if grads else None,
                                 grad_norm=grad_norms.get(id(p)), finite=finite.get(id(p)),
                                 offloaded=id(p) in elsewhere, checksum=checksums.get(id(p)),
                                 **distributed.layout(p))
                for key, p in own
            }) if own else NO_PARAMS,
            training=module.training,
            traits=found,
            bounds=traits.bounds(module),
            grad_bytes=sum(grad_sizes.get(i, 0) for i in param_ids) if grads else None,
            output_bytes=kept.setdefault(size, size),
            **cost.get(name, {}),
        )
    out_floats = [local(t) for t in kinds.result_tensors(output) if not t.is_meta]
    root = modules[""]
    cap = Capture(
        modules=MappingProxyType(modules),
        total_params=tree[""]["num_params"],
        trainable_params=tree[""]["num_trainable"],
        loss=None if loss is None or error is not None and error.phase == "loss" else float(local(loss).detach()),
        loss_kind=loss_kind,
        backward=bool(grads),
        error=error,
        inputs=tuple(
            InputRecord(where=where, shape=tuple(t.shape), dtype=dtype_name(t), device=str(t.device),
                        stats=summaries[slot][0] if summaries[slot] else None)
            for where, t, slot in inputs
        ),
        output_numel=sum(t.numel() for t in out_floats),
        meta=meta,
        flops=root.flops,
        activation_bytes=root.activation_bytes,
        peak_bytes=root.peak_bytes,
        compiled=compiled,
        rank=rank,
        world_size=world,
        output=None if output is None else map_tensors(output, lambda t: t.detach()),
        model=model,
        batch=batch,
    )
    if progress is not None:
        progress("findings", 0, 1)
    cap = dataclasses.replace(cap, findings=tuple(find(cap)))
    if progress is not None:
        progress("findings", 1, 1)
    return cap

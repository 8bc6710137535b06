"""What the forward hooks record, for one pass (``capture``) and for the sampled steps of a run (``watch``).

A ``Recorder`` keeps one small dict per module call (shapes, dtypes, devices, where its statistics sit in a
StatsBatch, its output gradient's norm, its dead ReLU units), all still on the device until ``finish()``.
"""

from __future__ import annotations

import sys
import weakref
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import traits
from .hooks import HookSession
from .nested import call_inputs, first_float_tensor, iter_tensors, shape_tree
from .records import CallRecord
from .stats import COLUMNS, StatsBatch, local, norm, norm_value

if TYPE_CHECKING:
    from .costs import Costs

FEATURE_CHANNELS = 16
FEATURE_SIZE = 64
FEATURE_DTYPE = torch.bfloat16  # feature maps are pictures: 3 significant digits, float32's range, half the bytes


def pool_maps(maps: torch.Tensor) -> torch.Tensor:
    """Feature maps [C, H, W] averaged down to at most FEATURE_SIZE x FEATURE_SIZE (a float copy either way)."""
    if maps.shape[-2] > FEATURE_SIZE or maps.shape[-1] > FEATURE_SIZE:
        size = (min(maps.shape[-2], FEATURE_SIZE), min(maps.shape[-1], FEATURE_SIZE))
        return F.adaptive_avg_pool2d(maps.float(), size)
    return maps.float().clone() if maps.dtype == torch.float32 else maps.float()


Edges = Callable[[str, torch.Tensor], "np.ndarray | None"]


class Recorder:
    """The forward hooks' state: what each call saw, with statistics deferred to a StatsBatch.

    ``edges(name, tensor)`` gives the fixed histogram edges for a module's output (None: equal bins over
    the tensor's own range). Output-gradient hooks are put on the outputs through ``session`` when
    ``grads`` is true. ``progress(phase, modules done, modules)``, if given, is told as each module's forward
    ends and as each module's output gradient arrives, each module counted once (see ``capture``)."""

    def __init__(self, session: HookSession, stats: StatsBatch, *, grads: bool, feature_maps: bool, edges: Edges,
                 costs: Costs | None = None, progress: Callable[[str, int, int], None] | None = None,
                 modules: int = 0, params: dict[int, nn.Parameter] | None = None):
        self.session, self.stats, self.grads, self.feature_maps, self.edges = session, stats, grads, feature_maps, edges
        self.costs = costs  # capture(costs=True): what the hooks compute is left out of the model's counts
        self.progress, self.modules = progress, modules
        self.ran: set[str] = set()  # modules whose forward ended (progress counts each once)
        self.graded: set[str] = set()  # modules whose output gradient arrived
        self.calls: list[dict] = []
        self.summarised: dict[int, tuple] = {}  # id(tensor) -> (weakref, in-place version, StatsBatch slot, edges)
        self.checks: list[torch.Tensor] = []  # deferred "all finite" flags of inputs nobody summarised
        self.last_grad_call: dict | None = None  # the call whose output gradient arrived last
        self.params = params  # parameters to take the norm of as their module's forward ends (fresh in the cache)
        self.param_norms: dict[int, torch.Tensor] = {}  # id -> norm (see stats.norm), of ``params`` met in the pass
        self.shapes: dict[tuple, tuple] = {}  # see ``shape``
        self.dead_later: list[dict] = []  # calls whose dead units the StatsBatch counts (known after its flush)

    def hook_for(self, name: str, module: nn.Module) -> Callable:
        dead_units = "relu" in traits.class_traits(module)

        def hook(module, args, kwargs, output):
            self.record(name, call_inputs(args, kwargs), output, dead_units)
            if self.params is not None and module._parameters:
                self.norm_params(module)

        costs = self.costs
        if costs is None:
            return hook

        def counted(module, args, kwargs, output):
            costs.leave(name)
            costs.pause()  # what the recorder computes on the outputs is not the model's cost
            try:
                hook(module, args, kwargs, output)
            finally:
                costs.resume()

        return counted

    def record(self, name: str, inputs: Any, output: Any, dead_units: bool) -> None:
        """One call of module ``name`` (``dead_units``: count its dead channels, for ReLUs). Registered with
        ``always_call``, a hook is also called on the way out of a forward that raised, with no output: that call
        is recorded as failed, with its inputs."""
        failed = output is None and sys.exc_info()[1] is not None
        one_in, one_out = type(inputs) is torch.Tensor, type(output) is torch.Tensor  # the common case, made quick
        ins = [inputs] if one_in else list(iter_tensors(inputs))
        outs = [output] if one_out else list(iter_tensors(output))
        if self.progress is not None and name not in self.ran:
            self.ran.add(name)
            self.progress("forward", len(self.ran), self.modules)
        call = dict(
            name=name,
            index=len(self.calls),
            input_shapes=self.shape(inputs.shape) if one_in else shape_tree(inputs),
            output_shapes=self.shape(output.shape) if one_out else shape_tree(output),
            input_dtypes=_one(inputs.dtype) if one_in else unique(t.dtype for t in ins),
            output_dtypes=_one(output.dtype) if one_out else unique(t.dtype for t in outs),
            input_devices=_one(inputs.device) if one_in else unique(t.device for t in ins),
            output_devices=_one(output.device) if one_out else unique(t.device for t in outs),
            inputs=self._inputs(ins, outs),
            out_bytes=output.numel() * output.element_size() if one_out else
            sum(t.numel() * t.element_size() for t in {id(t): t for t in outs}.values()),
            slot=None,
            fmap=None,
            grad=None,
            dead=None,
            failed=failed,
            in_grad=inputs.requires_grad and inputs.is_floating_point() if one_in else
            any(t.requires_grad for t in ins if t.is_floating_point()),
            out_grad=output.requires_grad if one_out else any(t.requires_grad for t in outs),
        )
        self.calls.append(call)
        t = output if one_out and output.is_floating_point() else first_float_tensor(outs)
        if t is None:
            return
        call["slot"] = self.summarise(t, self.edges(name, t), channels=dead_units)
        x = local(t)  # a DTensor's own shard: what this rank holds
        if self.feature_maps and x.dim() == 4 and not x.is_meta and x.numel():
            call["fmap"] = pool_maps(x.detach()[0, :FEATURE_CHANNELS])
        if dead_units and x.dim() >= 2 and not x.is_meta and x.numel():
            if self.stats.counts_dead(call["slot"]):  # with the output's sums, or with its buffer: see finish
                self.dead_later.append(call)
            else:
                dims = [d for d in range(x.dim()) if d != 1]
                call["dead"] = (x.detach().amax(dim=dims) <= 0).sum()
            call["units"] = x.shape[1]
        if self.grads and t.requires_grad:
            def on_grad(g, call=call, costs=self.costs):
                if costs is not None:
                    costs.pause()
                try:
                    call["grad"] = norm_value(g)
                finally:
                    if costs is not None:
                        costs.resume()
                self.last_grad_call = call
                if self.progress is not None and call["name"] not in self.graded:
                    self.graded.add(call["name"])
                    self.progress("backward", len(self.graded), self.modules)

            self.session.add_tensor_hook(t, on_grad)

    def shape(self, size: torch.Size) -> tuple[int, ...]:
        """``size`` as a tuple, one tuple for all the calls and parameters of the pass with that shape (thousands of
        records of a deep model share a few shapes)."""
        shape = tuple(size)
        return self.shapes.setdefault(shape, shape)

    def norm_params(self, module: nn.Module) -> None:
        """The norms of the module's own parameters among ``params`` not taken yet (the very tensors: not the
        copies that FSDP or accelerate put in place for a call)."""
        for p in module._parameters.values():
            if p is not None and id(p) not in self.param_norms and self.params.get(id(p)) is p and not p.is_meta:
                self.param_norms[id(p)] = norm(p)

    def _inputs(self, ins: list[torch.Tensor], outs: list[torch.Tensor]) -> list | None:
        """How to tell whether a call's floating-point inputs were finite: the StatsBatch slots of inputs that
        were summarised as they are (an earlier module's output), and deferred checks for the rest; None when
        it cannot be told (an input the module changed in place, or a meta tensor)."""
        known = []
        for t in ins:
            if not t.is_floating_point():
                continue
            if t.is_meta:
                return None
            seen = self.summarised.get(id(t))
            try:
                version = t._version
            except RuntimeError:  # inference tensors keep no version counter
                version = None
            if seen is not None and seen[0]() is t and seen[1] == version:
                known.append(("slot", seen[2]))
            elif any(t is o for o in outs):
                return None  # changed in place by the module: what it received is gone
            else:
                known.append(("check", len(self.checks)))
                self.checks.append(_range(local(t).detach()))
        return known

    def summarise(self, t: torch.Tensor, edges=None, channels: bool = False) -> int:
        """Summarise ``t`` (its StatsBatch slot), unless this very tensor was summarised before and not changed
        in place since (containers and identities such as Dropout in eval pass on the tensor they got).
        ``channels``: a ReLU's output (see ``StatsBatch.add``)."""
        try:
            version = t._version
        except RuntimeError:  # inference tensors keep no version counter
            return self.stats.add(t, edges, channels)
        seen = self.summarised.get(id(t))
        if seen is not None and seen[0]() is t and seen[1] == version and seen[3] is edges:
            return seen[2]
        slot = self.stats.add(t, edges, channels)
        self.summarised[id(t)] = (weakref.ref(t), version, slot, edges)
        return slot

    def finish(self) -> tuple[list, list[bool | None]]:
        """The StatsBatch summaries (by slot) and, per call, whether its floating-point inputs were all finite
        (None when it cannot be told); everything is copied to the CPU here."""
        summaries = self.stats.results()
        return summaries, self._finite(lambda i: summaries[i][0].finite if summaries[i] else True)

    def finish_columns(self) -> tuple[tuple, list[bool | None]]:
        """``finish`` with the summaries as the StatsBatch's columns (see ``StatsBatch.columns``), not records."""
        columns = self.stats.columns()
        nan, inf = columns[0][:, COLUMNS.index("nan_count")], columns[0][:, COLUMNS.index("inf_count")]
        return columns, self._finite(lambda i: not (nan[i] > 0 or inf[i] > 0))  # no summary (NaN): as finite

    def _finite(self, slot_finite: Callable[[int], bool]) -> list[bool | None]:
        """Per call, whether its floating-point inputs were all finite, from ``slot_finite`` of the inputs that
        were summarised and from the deferred checks of the others; the dead units counted with the buffers."""
        for call in self.dead_later:
            call["dead"] = self.stats.dead[call["slot"]]
        checks = torch.isfinite(torch.stack([c.cpu() for c in self.checks])).all(1).tolist() if self.checks else []

        def finite(inputs: list | None) -> bool | None:
            if inputs is None:
                return None
            return all(slot_finite(i) if how == "slot" else checks[i] if how == "check" else True for how, i in inputs)

        return [finite(c["inputs"]) for c in self.calls]

    def records(self) -> tuple[dict[str, list[CallRecord]], list]:
        """The call records by module, and the StatsBatch summaries (by slot)."""
        summaries, finite = self.finish()
        by_module: dict[str, list[CallRecord]] = {}
        for c, input_finite in zip(self.calls, finite):
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
                    feature_maps=None if c["fmap"] is None else c["fmap"].to("cpu", FEATURE_DTYPE),
                    input_finite=input_finite,
                    output_id=None if stats is None else c["slot"],
                    failed=c["failed"],
                    input_requires_grad=c["in_grad"],
                    output_requires_grad=c["out_grad"],
                )
            )
        return by_module, summaries


_NAMES: dict = {}  # dtype or device -> its name
_ONES: dict = {}  # dtype or device -> (its name,), one tuple for every record that holds it
_SETS: dict = {}  # sorted names of several dtypes or devices -> themselves, as one tuple


def _range(t: torch.Tensor) -> torch.Tensor:
    """[min, max] of ``t`` (both finite exactly when every value is: NaN propagates), [0, 0] when it is empty;
    one pass, and no tensor of flags as ``isfinite(t).all()`` makes."""
    return torch.stack(torch.aminmax(t.reshape(-1))) if t.numel() else t.new_zeros(2)


def _name(item) -> str:
    name = _NAMES.get(item)
    if name is None:
        name = _NAMES[item] = str(item).removeprefix("torch.")
    return name


def _one(item) -> tuple[str]:
    one = _ONES.get(item)
    if one is None:
        one = _ONES[item] = (_name(item),)
    return one


def unique(items: Iterable) -> tuple[str, ...]:
    """Sorted unique names of dtypes or devices ('float32', 'cpu'), as a tuple shared by every record that has them."""
    return shared(tuple(sorted({_name(item) for item in items})))


def shared(names: tuple[str, ...]) -> tuple[str, ...]:
    """One tuple for all the records that hold these names (of dtypes, devices, traits): a few distinct ones in a
    model of thousands of modules."""
    return _SETS.setdefault(names, names)


def dtype_name(t: torch.Tensor) -> str:
    return _name(t.dtype)


def device_name(t: torch.Tensor) -> str:
    return _name(t.device)


def norms(tensors: dict[int, torch.Tensor], taken: dict[int, torch.Tensor] | None = None) -> dict[int, float]:
    """The norm of each tensor, by key, copied to the CPU once per device (see ``stats.norm``); ``taken``: norms
    already computed, by key (those tensors are not read again)."""
    values = {}
    for key, t in tensors.items():
        if not t.is_meta:
            done = None if taken is None else taken.get(key)
            values[key] = norm(t) if done is None else done
    return dict(zip(values, host(list(values.values()))))


def host(values: list[float | torch.Tensor]) -> list[float]:
    """Floats, and scalar tensors as floats, in order: one copy to the CPU per device."""
    by_device: dict[torch.device, list[int]] = {}
    out = [0.0] * len(values)
    for i, t in enumerate(values):
        if isinstance(t, float):
            out[i] = t
        else:
            by_device.setdefault(t.device, []).append(i)
    for index in by_device.values():
        for i, v in zip(index, torch.stack([values[i].double() for i in index]).cpu().tolist()):
            out[i] = v
    return out


def fast_norms(tensors: dict[int, torch.Tensor]) -> dict[int, float]:
    """The norm of each tensor, by key: one multi-tensor reduction and one copy to the CPU per device and dtype
    (float32 accumulation: less exact than ``norms`` on huge tensors, and much faster on many tensors)."""
    groups: dict[tuple, dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        if not t.is_meta:
            t = local(t)  # a DTensor's own shard (see stats.norm)
            groups.setdefault((t.device, t.dtype), {})[key] = t.detach()
    values = {}
    for group in groups.values():
        try:
            got = torch._foreach_norm(list(group.values()))
        except (AttributeError, RuntimeError):  # an older torch, or a dtype without a multi-tensor kernel
            got = [torch.linalg.vector_norm(t.float()) for t in group.values()]
        values.update(zip(group, torch.stack([g.double() for g in got]).cpu().tolist()))
    return values

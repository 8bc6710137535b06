"""The records a pass leaves behind: plain, frozen data keyed by ``named_modules()`` names.

Producers (``capture``) build them; every consumer (findings, plots, the inspector, ``save``/``load``)
reads them and never the live model. In a ``torch.distributed`` job each rank's capture is that rank's own view;
``layerscope.gather`` merges them into one capture of the whole job, whose records keep the ranks' values in
their ``per_rank`` fields. Everything here survives ``Capture.save`` and ``layerscope.load``
except the three live-only fields of a Capture (``output``, ``model``, ``batch``) and the live
exception of a CaptureError, which are None on a loaded capture.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from .fixes import FIXES
from .stats import Histogram, TensorStats

# What ModuleReport.traits can hold: facts about a module's class (and, for "sums_to_constant", its weights)
# that the findings need, recorded while the model was at hand.
TRAITS = (
    "pass_on",  # a built-in layer that cannot turn finite inputs into NaN/Inf (activations, pooling, ...)
    "affine",  # a built-in weighted layer: with finite weights it only makes Inf/NaN by overflowing
    "relu",  # ReLU or ReLU6: its dead units are counted
    "sequential",  # nn.Sequential: no code of its own between its children
    "embedding",  # nn.Embedding / EmbeddingBag: a batch only touches a few rows
    "param_container",  # nn.ParameterList / ParameterDict
    "train_dependent",  # dropout or batch norm: behaves differently in training mode
    "sums_to_constant",  # softmax, or a layer/group norm whose scale is one number: its outputs add up to a constant
    "uninitialised",  # a lazy module (nn.LazyLinear, ...) not called yet: its parameters have no size, counted as 0
)


NO_PARAMS = MappingProxyType({})  # the parameters of every module without any of its own (read-only: one for all)


def build(kind, fields=(), **more):
    """A frozen record of a kind without ``__post_init__`` (CallRecord, ParamRecord, ModuleReport, TensorStats,
    Histogram) from its fields (a mapping or (name, value) pairs, and keywords), without running ``__init__``: a
    third of its cost, for the thousands of records of a merge or a run. Every field must be given."""
    record = object.__new__(kind)
    record.__dict__.update(fields, **more)
    return record


def adopt(kind, fields: dict):
    """``build`` from a dict of every field, which the record takes as its own: no keywords to pack, half the cost of
    ``build`` for the tens of thousands of records of a merge."""
    record = object.__new__(kind)
    object.__setattr__(record, "__dict__", fields)
    return record


def copy_with(record, **changes):
    """``dataclasses.replace`` of such a record (see ``build``): every other field, also one added later, as the
    record has it."""
    return build(type(record), record.__dict__, **changes)


def call_key(name: str, call: int) -> str:
    """'blocks.0.attn' for a module's first call, 'blocks.0.attn (call 2)' for its second, and so on."""
    return name if call == 0 else f"{name} (call {call + 1})"


def _scaled(n: float, units: tuple[str, ...]) -> str:
    value, unit = float(n), units[0]
    for unit in units:
        if abs(value) < 999.5 or unit == units[-1]:
            break
        value /= 1000
    return f"{n:g}{unit}" if unit == units[0] else f"{value:#.3g}".rstrip(".") + unit


def human(n: float) -> str:
    """A count in three significant digits: 950 -> '950', 9280 -> '9.28K', 1235496 -> '1.24M', 3e9 -> '3.00B'.
    The one number format of the tree, the panels and the plots (FLOPs too)."""
    return _scaled(n, ("", "K", "M", "B", "T"))


def human_bytes(n: float) -> str:
    """A size in bytes in three significant digits, in powers of 1000: 950 -> '950 B', 12_345_678 -> '12.3 MB'.
    The one byte format of the tree, the panels and the plots."""
    return _scaled(n, (" B", " kB", " MB", " GB", " TB"))


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
    feature_maps: Any = field(default=None, repr=False)  # bfloat16 tensor [C<=16, H<=64, W<=64] on the CPU
    input_finite: bool | None = None  # all floating-point inputs finite; None when not known (e.g. changed in place)
    output_id: int | None = None  # calls that passed on the very same output tensor share this number
    per_rank: tuple[TensorStats | None, ...] | None = None  # merged capture: each rank's stats (None: not on that rank)
    failed: bool = False  # the call raised: its inputs are recorded, it returned nothing (no output, no stats)
    input_requires_grad: bool | None = None  # a floating-point input carried gradient (None: not recorded)
    output_requires_grad: bool | None = None  # an output carried gradient (None: not recorded)

    @property
    def has_maps(self) -> bool:
        """The stored sample holds feature maps of an (N, C, H, W) output with more than one position."""
        s = self.output_shapes
        return self.feature_maps is not None and isinstance(s, tuple) and len(s) == 4 and \
            all(isinstance(d, int) for d in s) and s[2] * s[3] > 1


@dataclass(frozen=True)
class ParamRecord:
    """One parameter a module holds itself (not through a submodule).

    A DTensor parameter (FSDP2, tensor parallel) has its global ``shape``, and on a rank's capture the norms of
    the rank's own shard; ``placements`` says how it is laid out on its device mesh and ``shard`` which piece
    this rank holds: (index, number of distinct pieces), replicas holding the same index. On a merged capture
    the norms are those of the whole parameter and ``per_rank`` keeps the ranks' own records."""

    shape: tuple[int, ...]
    dtype: str
    device: str
    trainable: bool  # requires_grad
    norm: float | None  # L2 norm, taken when a backward ran (for gradient-to-weight ratios); else None
    grad_norm: float | None = None  # L2 norm of its gradient; None when it got none (or no backward ran)
    finite: bool | None = None  # every value finite; None when not looked at (meta, or nothing in the pass was
    # NaN/Inf in a forward-only capture)
    offloaded: bool = False  # accelerate keeps its values elsewhere (CPU/disk offload): norm of those, no gradient
    placements: tuple[str, ...] = ()  # a DTensor's placements ("Shard(0)", "Replicate()", ...); () for a tensor
    shard: tuple[int, int] | None = None  # a DTensor's piece on this rank: (index, number of pieces)
    checksum: int | None = None  # distributed capture: its bits summed as integers, equal on identical replicas
    per_rank: tuple[ParamRecord | None, ...] | None = None  # merged capture: each rank's own record
    update_ratio: float | None = None  # ||w after - w before|| / ||w before|| of an optimizer step (watch only)

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


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
    params: Mapping[str, ParamRecord] = field(default_factory=dict)  # own parameters by local name
    training: bool = False
    traits: frozenset[str] = frozenset()  # see TRAITS
    bounds: tuple[float, float] | None = None  # the output range of a saturating activation (sigmoid, tanh, ...)
    # Cost (see core/costs.py). FLOPs and activation bytes are None when they were not counted (costs=False). On a
    # merged capture, FLOPs and output bytes are the job's (summed over the ranks), activation and peak bytes
    # the largest rank's.
    flops: int | None = None  # forward FLOPs of all its calls, submodules included
    own_flops: int | None = None  # forward FLOPs of the ops it ran itself, outside its submodules
    backward_flops: int | None = None  # FLOPs of its part of the backward pass; None when no backward ran
    unsupported_ops: tuple[str, ...] = ()  # aten ops with no FLOP formula that ran inside it (counted as 0)
    param_bytes: int = 0  # its parameters, submodules included, each tensor once
    grad_bytes: int | None = None  # the gradients the backward computed for those parameters; None without one
    buffer_bytes: int = 0  # its buffers (running statistics, ...), submodules included
    output_bytes: int = 0  # the tensors its calls returned
    activation_bytes: int | None = None  # tensors its ops saved for the backward, each storage once
    peak_bytes: int | None = None  # CUDA only: the allocator's peak during its forward, above what it found

    @property
    def parent(self) -> str | None:
        """The name of the module holding this one (None for the model itself)."""
        return None if not self.name else self.name.rpartition(".")[0]

    @property
    def called(self) -> bool:
        return bool(self.calls)

    @property
    def param_grad_norms(self) -> dict[str, float | None]:
        return {k: p.grad_norm for k, p in self.params.items()}

    @property
    def param_norms(self) -> dict[str, float | None]:
        return {k: p.norm for k, p in self.params.items()}


@dataclass(frozen=True)
class InputRecord:
    """One floating-point tensor of the batch: where it sits ("" for a lone tensor, "[0]", "['image']")."""

    where: str
    shape: tuple[int, ...]
    dtype: str
    device: str
    stats: TensorStats | None  # None on the meta device
    per_rank: tuple[TensorStats | None, ...] | None = None  # merged capture: each rank's stats


@dataclass(frozen=True, eq=False)
class CaptureError:
    """What went wrong: the innermost module that was running, the phase, the exception (its type name,
    message and traceback as text), and one sentence that names the module and puts what it got next
    to what it expected. ``exception`` is the live exception, None on a loaded capture."""

    module: str
    module_type: str
    phase: str  # "forward" | "loss" | "backward"
    message: str
    exception_type: str
    exception_message: str
    traceback: str = ""
    received: Mapping[str, Any] | None = None  # shape, dtype, device of the first tensor the module got
    exception: BaseException | None = field(default=None, repr=False)

    def __str__(self) -> str:
        return self.message


@dataclass(frozen=True)
class Finding:
    """One answer of the checklist: what (``kind``), how bad (``severity``: "error", "warning" or
    "info"), where (``module``, a ``named_modules()`` name, "" for the whole model or its batch; ``rank``, the
    rank it was found on in a merged capture of a distributed job, None for the whole job or a single process),
    one plain sentence with the numbers that prove it, and those numbers in ``details``. ``step`` is the
    training step it was first seen at, for the findings of a watched run (None for one pass). ``fix`` is one
    short line on what to try ("Try: ..."), by default the kind's line in ``core.fixes.FIXES``. A finding that
    groups near-identical ones of several modules names them all in ``details["modules"]`` (``module`` is the
    first)."""

    kind: str
    severity: str
    module: str
    message: str
    details: Mapping[str, Any] = field(default_factory=dict)
    rank: int | None = None
    step: int | None = None
    fix: str = ""

    def __post_init__(self):
        if not self.fix:
            object.__setattr__(self, "fix", FIXES.get(self.kind, ""))

    @property
    def modules(self) -> tuple[str, ...]:
        """Every module the finding is about: ``module``, and the others of a grouped finding."""
        listed = self.details.get("modules") if isinstance(self.details, Mapping) else None
        if not isinstance(listed, (list, tuple)):
            return (self.module,)
        return tuple(dict.fromkeys([self.module, *map(str, listed)]))


@dataclass(frozen=True, eq=False)
class Capture:
    """Everything one pass recorded, keyed by ``named_modules()`` names (the root is "").

    ``output``, ``model`` and ``batch`` are the live objects of the pass; they are None on a capture
    read back with ``layerscope.load``, where everything else is as it was saved.

    In a ``torch.distributed`` job, ``rank`` and ``world_size`` say whose view this is; a capture merged by
    ``layerscope.gather`` has ``rank`` None and ``world_size`` the number of ranks (``merged`` is True)."""

    modules: Mapping[str, ModuleReport]
    total_params: int
    trainable_params: int
    loss: float | None
    loss_kind: str | None  # "loss_fn" | "cross_entropy" | "model_loss" | "sum" | "training" (a watched step);
    # None when no loss was computed
    backward: bool  # True when gradients were computed
    error: CaptureError | None
    findings: tuple[Finding, ...] = ()
    inputs: tuple[InputRecord, ...] = ()
    output_numel: int = 0  # floating-point values in the model's output, caches left out (the "sum" loss adds them up)
    meta: bool = False  # the model's parameters were on the meta device: shapes and counts only
    compiled: bool = False  # a torch.compile wrapper: its original module was recorded, run eagerly
    summary_text: str | None = None  # the torchinfo table, once computed (kept by save)
    flops: int | None = None  # forward FLOPs of the whole model (the root's flops); None when not counted
    activation_bytes: int | None = None  # bytes the forward saved for the backward (the root's)
    peak_bytes: int | None = None  # CUDA only: the allocator's peak during the forward, above its start
    rank: int | None = None  # the rank that recorded it; None outside a job and on a merged capture
    world_size: int = 1  # ranks in the job
    output: Any = field(default=None, repr=False)
    model: Any = field(default=None, repr=False)
    batch: Any = field(default=None, repr=False)

    def __getitem__(self, name: str) -> ModuleReport:
        return self.modules[name]

    @property
    def merged(self) -> bool:
        """True for the capture of a whole distributed job, merged from its ranks' captures."""
        return self.rank is None and self.world_size > 1

    @functools.cached_property
    def calls(self) -> list[tuple[str, CallRecord]]:
        """Every call of the pass as (module name, record), in the order the calls returned."""
        pairs = [(name, c) for name, report in self.modules.items() for c in report.calls]
        return sorted(pairs, key=lambda pair: pair[1].index)

    @functools.cached_property
    def _summary(self) -> str:
        if self.summary_text is not None:
            return self.summary_text
        if self.model is None:
            return ("No torchinfo summary: it was not computed before this capture was saved (the steps of a watched "
                    "run have none: watch runs no extra pass of the model).")
        from .summary import summary

        return summary(self.model, self.batch)

    def summary(self) -> str:
        """The torchinfo table for the same model and batch (computed once, on first use; on a loaded
        capture, the table saved with it, if it was computed before saving)."""
        return self._summary

    def save(self, path) -> None:
        """Write this capture to one file (see ``layerscope.core.store`` for the format)."""
        from .store import save

        save(self, path)

    def save_html(self, path) -> None:
        """Write the report of this capture to one self-contained HTML file that works like the inspector
        with no kernel and no network: the module tree with its search and badges, and per module the
        header, histogram and statistics, the stored feature maps, gradient norms, the findings and the
        torchinfo summary. (The report is ``layerscope.report``; core only hands it the records.)"""
        from ..report import save_html

        save_html(self, path)

    def to_pandas(self):
        """One row per call: module, type, call number, shapes, dtype, device, the statistics, the
        output gradient norm, own and total parameters. Needs pandas."""
        from .table import to_pandas

        return to_pandas(self)

"""FLOPs and memory per module, counted during the capture's own pass (``capture(..., costs=True)``).

**FLOPs.** Every aten op of the pass goes through one ``TorchDispatchMode`` that applies the formulas of
``torch.utils.flop_counter`` (FlopCounterMode's registry and its convention: matrix products, convolutions and
attention count 2 FLOPs per multiply-add; elementwise ops, norms, pooling, softmax and data movement count 0),
plus ``FORMULAS`` for ops it lacks. An op's FLOPs go to the innermost module running (``own_flops``) and to
every module whose forward is running around it (``flops``). A backward op is charged through the autograd
node that runs it: the node's sequence number falls inside the forward call that created it, so it goes to
that call's module and every module around it (``backward_flops``). An op with no formula that is not of a
kind the convention counts as 0 is *unsupported*: it counts 0 and is listed in ``unsupported_ops``, so the
FLOPs of every module around it are a lower bound.

**Activation memory.** ``torch.autograd.graph.saved_tensors_hooks`` sees each tensor an op saves for the
backward. Its storage (all of it, also when a view was saved) is charged to the innermost module running;
``activation_bytes`` of a module is the size of every distinct storage saved by ops inside it, submodules
included, each counted once however many ops saved it. The storages of the model's parameters and buffers
and of the batch are left out: they are held whether or not a backward follows. Only a pass that records
autograd sees saved tensors (a forward with ``backward=False`` runs under ``no_grad``: None).

**Peak memory** (CUDA only): the allocator's peak while a module's forward ran, above what was allocated when
it started, read at every module boundary (this resets CUDA's peak statistics).

On the meta device the same counts come from shapes alone. They are estimates of the eager run on a real
device wherever the kernel depends on the device: e.g. attention on meta runs the math path, which saves the
attention weights that CPU and CUDA flash kernels do not keep.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict
from collections.abc import Callable, Iterable

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode, _pop_mode, _push_mode
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

aten = torch.ops.aten


# -- formulas for ops FlopCounterMode lacks (its convention: shapes in, FLOPs out) ---------------------------

def cpu_flash_attention_flop(query, key, value, *args, out_shape=None, **kwargs) -> int:
    """``_scaled_dot_product_flash_attention_for_cpu``: what SDPA runs on the CPU; q, k, v are [B, H, L, E]."""
    return sdpa_flop_count(query, key, value)


def cpu_flash_attention_backward_flop(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


def _self_attention(query, key, embed_dim: int, num_heads: int) -> int:
    """An nn.MultiheadAttention forward on batch-first [B, L, E] inputs: the q/k/v and output projections,
    and the attention itself."""
    b, lq, lk = query[0], query[1], key[1]
    projections = 2 * b * embed_dim * embed_dim * (2 * lq + 2 * lk)  # q and out over Lq, k and v over Lk
    d = embed_dim // num_heads
    return projections + sdpa_flop_count((b, num_heads, lq, d), (b, num_heads, lk, d), (b, num_heads, lk, d))


def native_mha_flop(query, key, value, embed_dim, num_head, *args, out_shape=None, **kwargs) -> int:
    """``_native_multi_head_attention``: nn.MultiheadAttention's inference fast path."""
    return _self_attention(query, key, embed_dim, num_head)


def encoder_layer_flop(src, embed_dim, num_heads, qkv_weight, qkv_bias, proj_weight, proj_bias, use_gelu,
                       norm_first, eps, norm_weight_1, norm_bias_1, norm_weight_2, norm_bias_2, ffn_weight_1,
                       *args, out_shape=None, **kwargs) -> int:
    """``_transformer_encoder_layer_fwd``: nn.TransformerEncoderLayer's inference fast path (self-attention,
    then the two linear layers of the feed-forward block)."""
    b, length = src[0], src[1]
    return _self_attention(src, src, embed_dim, num_heads) + 2 * 2 * b * length * embed_dim * ffn_weight_1[0]


FORMULAS: dict = {
    aten._scaled_dot_product_flash_attention_for_cpu: cpu_flash_attention_flop,
    aten._scaled_dot_product_flash_attention_for_cpu_backward: cpu_flash_attention_backward_flop,
    aten._native_multi_head_attention: native_mha_flop,
    aten._transformer_encoder_layer_fwd: encoder_layer_flop,
}
"""Formulas in FlopCounterMode's convention for ops it has none for; ``FlopCounterMode(custom_mapping=FORMULAS)``
counts as layerscope does."""

_REGISTRY = {**flop_registry, **{op: shape_wrapper(f) for op, f in FORMULAS.items() if op not in flop_registry}}

# Kinds of ops that FlopCounterMode's convention counts as 0 FLOPs (besides views, pointwise ops and reductions):
# creation, copies and indexing, normalisation, softmax, pooling, resampling, padding, dropout and random numbers,
# sorting, losses. An op outside these, with no formula, is "unsupported".
_FREE_PREFIXES = (
    "empty", "zeros", "ones", "full", "new_", "arange", "linspace", "scalar_tensor", "lift", "clone",
    "copy", "to_copy", "unsafe_view", "cat", "stack", "split", "unbind", "chunk", "repeat", "flip", "roll", "tril",
    "triu", "pad", "constant_pad", "reflection_pad", "replication_pad", "index", "gather", "scatter", "masked",
    "select", "slice", "take", "put", "where", "embedding", "one_hot", "fill", "zero", "resize", "set_", "alias",
    "local_scalar_dense", "native_layer_norm", "native_batch_norm", "native_batch_norm_legit", "batch_norm",
    "native_group_norm", "fused_rms_norm", "layer_norm", "group_norm", "softmax", "log_softmax", "safe_softmax",
    "max_pool", "avg_pool", "adaptive", "fractional_max_pool", "upsample", "grid_sampler", "pixel_shuffle",
    "pixel_unshuffle", "channel_shuffle", "im2col", "col2im", "native_dropout", "fused_dropout", "dropout",
    "bernoulli", "rand", "normal", "uniform", "exponential", "multinomial", "sort", "topk", "argsort", "argmax",
    "argmin", "max", "min", "cumsum", "cumprod", "nll_loss", "mse_loss", "l1_loss", "smooth_l1_loss",
    "binary_cross_entropy", "huber_loss", "threshold", "hardtanh", "clamp", "isnan", "isinf", "nonzero", "unique",
    "bincount", "histc", "searchsorted", "bucketize", "count_nonzero", "equal", "is_", "item", "sym_", "mean", "sum",
    "var", "std", "norm", "linalg_vector_norm", "logsumexp", "amax", "amin", "all", "any", "prod",
)
# The size and stride queries FlopCounterMode hands back to tensor subclasses that answer them themselves.
_QUERIES = frozenset(getattr(aten, name).default for name in (
    "is_contiguous", "sym_is_contiguous", "is_strides_like_format", "is_non_overlapping_and_dense", "size",
    "sym_size", "stride", "sym_stride", "storage_offset", "sym_storage_offset", "numel", "sym_numel", "dim")
    if hasattr(aten, name)) | {aten.is_contiguous.memory_format, torch.ops.prim.layout.default}
_FREE, _UNSUPPORTED, _DECOMPOSE, _QUERY = "free", "unsupported", "decompose", "query"
_IMPLICIT = torch._C.DispatchKey.CompositeImplicitAutograd
_KINDS: dict[int, Callable | str] = {}  # by id(): op overloads live as long as torch, and hash slowly


# Tags of ops counted as 0 (torch 2.6 has no "reduction" tag: its reductions are among the prefixes above).
_FREE_TAGS = frozenset(getattr(torch.Tag, name) for name in ("pointwise", "reduction", "inplace_view")
                       if hasattr(torch.Tag, name))


def _free(func) -> bool:
    if func.is_view or not _FREE_TAGS.isdisjoint(func.tags):
        return True
    return func._overloadpacket.__name__.lstrip("_").startswith(_FREE_PREFIXES)


def _kind(func) -> Callable | str:
    """What an op is to the counter: its FLOP formula, an op to decompose first (as FlopCounterMode does), an
    op of a kind counted as 0, an unsupported one, or a size query left to tensor subclasses."""
    kind = _KINDS.get(id(func))
    if kind is None:
        if func in _QUERIES:
            kind = _QUERY
        elif func._overloadpacket in _REGISTRY:
            kind = _REGISTRY[func._overloadpacket]
        elif func is not torch.ops.prim.device.default and (
                _IMPLICIT in func.py_kernels or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), _IMPLICIT)):
            kind = _DECOMPOSE
        else:
            kind = _FREE if _free(func) else _UNSUPPORTED
        _KINDS[id(func)] = kind
    return kind


def op_name(func) -> str:
    """'aten.mkldnn_rnn_layer' for any overload of that op."""
    return str(func._overloadpacket)


class _Mode(TorchDispatchMode):
    def __init__(self, costs: Costs):
        super().__init__()
        self.costs = costs

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        costs = self.costs
        if costs.paused:
            return func(*args, **kwargs)
        kind = _kind(func)
        if kind is _FREE:
            return func(*args, **kwargs)
        if kind is _QUERY:
            return NotImplemented
        if kind is _DECOMPOSE:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
            kind = _KINDS[id(func)] = _FREE if _free(func) else _UNSUPPORTED
        out = func(*args, **kwargs)
        if kind is _UNSUPPORTED:
            costs.unsupported(func)
        elif kind is not _FREE:
            try:
                flops = kind(*args, **kwargs, out_val=out)
            except Exception:  # noqa: BLE001 - shapes a formula does not handle (e.g. nested tensors)
                costs.unsupported(func)
            else:
                costs.count(int(flops))
        return out


def _storage(t: torch.Tensor) -> tuple[StorageWeakRef, int] | None:
    try:
        storage = t.untyped_storage()
        return StorageWeakRef(storage), storage.nbytes()
    except (RuntimeError, NotImplementedError, TypeError):  # tensors without a storage of their own
        return None


class Costs:
    """The cost counters of one pass. The capture calls ``enter(name)``/``leave(name)`` around every module
    call (forward pre- and post-hooks) and ``pause()``/``resume()`` around its own hooks' work on the tensors;
    ``mode()`` counts FLOPs (forward and backward) and ``saving()`` sees the tensors saved for the backward."""

    def __init__(self, kept: Iterable[torch.Tensor], cuda: torch.device | None = None):
        self.paused = False
        self._mode = _Mode(self)
        self._popped = False
        self.cuda = cuda
        self.stack: list[int] = []  # the open calls, innermost last
        self.calls: list[list] = []  # per call: [name, parent call or -1, first node seq, end seq, FLOPs before]
        self.entries: list[int] = []  # the first autograd sequence number of each call, in call order
        self.open: dict[str, int] = {}  # calls open per module name (a module may run inside itself)
        self.total = 0
        self.flops: dict[str, int] = defaultdict(int)
        self.own: dict[str, int] = defaultdict(int)
        self.backward: dict[str, int] = defaultdict(int)
        self.ops: dict[int, set[str]] = defaultdict(set)  # unsupported ops by the call they ran in
        self.saved: dict[StorageWeakRef, tuple[int, set[int]]] = {}  # storage -> (bytes, the calls that saved it)
        self.kept = {ref for ref, _ in filter(None, map(_storage, kept))}
        self.peaks: dict[int, list[int]] = {}  # CUDA: call -> [allocated on entry, peak since]

    # -- module calls -------------------------------------------------------------------------------

    def enter(self, name: str) -> None:
        call = len(self.calls)
        seq = torch.autograd._get_sequence_nr()
        self.calls.append([name, self.stack[-1] if self.stack else -1, seq, math.inf, self.total])
        self.entries.append(seq)
        self.stack.append(call)
        self.open[name] = self.open.get(name, 0) + 1
        if self.cuda is not None:
            self._peak()
            self.peaks[call] = [torch.cuda.memory_allocated(self.cuda)] * 2

    def leave(self, name: str) -> None:
        if self.cuda is not None:
            self._peak()
        while self.stack:  # calls still open inside this one raised an exception that was caught
            call = self.stack.pop()
            record = self.calls[call]
            record[3] = torch.autograd._get_sequence_nr()
            self.open[record[0]] -= 1
            if not self.open[record[0]]:
                self.flops[record[0]] += self.total - record[4]
            if record[0] == name:
                break

    def _peak(self) -> None:
        peak = torch.cuda.max_memory_allocated(self.cuda)
        torch.cuda.reset_peak_memory_stats(self.cuda)
        for call in self.stack:
            entry = self.peaks[call]
            entry[1] = max(entry[1], peak)

    # -- ops ----------------------------------------------------------------------------------------

    def mode(self) -> TorchDispatchMode:
        return self._mode

    def pause(self) -> None:
        """Stop counting until ``resume()``: the ops in between are not the model's. Takes the mode off the
        dispatch stack when it is on top (the ops then skip it entirely), else only flags them."""
        self.paused = True
        if _get_current_dispatch_mode() is self._mode:
            _pop_mode()
            self._popped = True

    def resume(self) -> None:
        if self._popped:
            _push_mode(self._mode)
            self._popped = False
        self.paused = False

    def count(self, flops: int) -> None:
        node = torch._C._current_autograd_node()
        if node is None:
            self.total += flops
            if self.stack:
                self.own[self.calls[self.stack[-1]][0]] += flops
            return
        for name in self._around(self._created_in(node._sequence_nr())):
            self.backward[name] += flops

    def unsupported(self, func) -> None:
        if self.stack and torch._C._current_autograd_node() is None:
            self.ops[self.stack[-1]].add(op_name(func))

    def _created_in(self, seq: int) -> int:
        """The innermost call that was running when the autograd node with this sequence number was made."""
        call = bisect.bisect_right(self.entries, seq) - 1
        while call >= 0 and seq >= self.calls[call][3]:
            call = self.calls[call][1]
        return call

    def _around(self, call: int, seen: set[int] | None = None) -> set[str]:
        """The module names of a call and of every call around it."""
        names = set()
        while call >= 0 and (seen is None or call not in seen):
            if seen is not None:
                seen.add(call)
            names.add(self.calls[call][0])
            call = self.calls[call][1]
        return names

    # -- saved tensors ------------------------------------------------------------------------------

    def saving(self):
        return torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)

    def _pack(self, t: torch.Tensor) -> torch.Tensor:
        if not self.paused and self.stack:
            found = _storage(t)
            if found is not None and found[0] not in self.kept:
                ref, size = found
                entry = self.saved.get(ref)
                if entry is None:
                    self.saved[ref] = (size, {self.stack[-1]})
                else:
                    entry[1].add(self.stack[-1])
        return t.detach()  # not t itself: a saved output would hold its own grad_fn in a reference cycle

    # -- results ------------------------------------------------------------------------------------

    def results(self, names: list[str], backward: bool, saving: bool) -> dict[str, dict]:
        """The cost fields of ModuleReport for every module, by name (``names`` in ``named_modules()`` order).

        A module that never ran itself but holds submodules that did (an nn.ModuleList whose layers its parent
        calls) gets their costs: the sum of their FLOPs, the union of their saved storages and unsupported ops.
        Calls still open (the forward raised inside them) count what ran until then."""
        if self.stack:
            self.leave(self.calls[self.stack[0]][0])
        ran = set(self.open)

        def holders(found: set[str]) -> set[str]:  # and the modules around them in the tree that never ran
            for name in list(found):
                while name and (name := name.rpartition(".")[0]) not in ran and name not in found:
                    found.add(name)
            return found

        activation: dict[str, int] = defaultdict(int)
        for size, calls in self.saved.values():
            seen: set[int] = set()
            for name in holders(set().union(*(self._around(c, seen) for c in calls))):
                activation[name] += size
        ops: dict[str, set[str]] = defaultdict(set)
        for call, found in self.ops.items():
            for name in holders(self._around(call)):
                ops[name] |= found
        peaks: dict[str, int] = defaultdict(int)
        for call, (start, peak) in self.peaks.items():
            name = self.calls[call][0]
            peaks[name] = max(peaks[name], peak - start)
        flops, bwd = defaultdict(int, self.flops), defaultdict(int, self.backward)
        for name in reversed(names):  # children before their parents
            parent = name.rpartition(".")[0] if name else None
            if parent is not None and parent not in ran:
                flops[parent] += flops[name]
                bwd[parent] += bwd[name]
                peaks[parent] = max(peaks[parent], peaks[name])
        return {name: dict(
            flops=flops.get(name, 0),
            own_flops=self.own.get(name, 0),
            backward_flops=bwd.get(name, 0) if backward else None,
            unsupported_ops=tuple(sorted(ops.get(name, ()))),
            activation_bytes=activation.get(name, 0) if saving else None,
            peak_bytes=peaks.get(name, 0) if self.cuda is not None else None,
        ) for name in names}


def _unpack(t: torch.Tensor) -> torch.Tensor:
    return t

"""Captures inside ``torch.distributed`` jobs (DDP, FSDP2, DTensor tensor parallel), and ``gather``: one record of
the whole job on one rank.

Each rank's ``capture`` records its own view and runs no collective of its own (the model's run as they would
in training: FSDP2's all-gathers and reduce-scatters, DDP's gradient all-reduce, tensor parallel's all-reduces).
DTensor parameters keep their global shapes (the counts are the model's) and the norms of the rank's shard;
DTensor activations are summarised on their local tensors.

``gather(cap, dst=0)`` is a collective every rank calls: each rank sends its capture (``wire``: JSON and raw
numbers, no pickle) to ``dst`` as one uint8 tensor, point to point, and ``dst`` merges them (``merge``) into one
capture. A 16-byte digest all-gathered first tells whether every rank's modules line up with rank 0's; then, when
rank 0 merges, the others send only what the merge reads of them (``wire.encode(lean=True)``). The merged capture
holds:

- parameter counts from DTensor global shapes; parameter and gradient norms of sharded parameters as global
  norms, the square root of the summed squares of the distinct shards' norms (no parameter is ever sent);
- activation statistics merged exactly (``TensorStats.merge``) over every rank's local outputs, each call keeping
  the ranks' own statistics in ``per_rank``; histograms merged exactly when the ranks binned on the same edges
  (``capture(bins=edges)``), else spread onto shared equal bins (``Histogram.rebin``: approximate);
- findings that say where: what a rank found about its own pass (a NaN, a failed forward, its batch) with its
  ``rank``, the gradient rules run again on the global norms, and ``rank_desync``: replicas that should agree
  but do not.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import operator
import sys
import warnings
from collections.abc import Iterator, Sequence
from types import MappingProxyType

import numpy as np
import torch
from torch import nn

from . import wire
from .collector import paused
from .nested import iter_tensors
from .records import CallRecord, Capture, Finding, InputRecord, ModuleReport, ParamRecord, adopt, build, copy_with
from .stats import HIST_SCALARS, Histogram, TensorStats, local

# The findings computed again on a merged capture, from its merged records (global norms, the model's flags);
# every other kind is a rank's finding about its own pass, kept from that rank's capture.
JOB_WIDE = frozenset({"no_grad", "zero_grad", "flat_loss", "nonfinite_grad", "exploding_grad", "vanishing_grad",
                      "frozen", "unused_module", "train_mode", "rank_desync"})


def _dist():
    """torch.distributed when this process is in an initialised job, else None."""
    dist = torch.distributed
    return dist if dist.is_available() and dist.is_initialized() else None


def process() -> tuple[int | None, int]:
    """(rank, world size) of this process in the default group; (None, 1) outside a job. No communication."""
    dist = _dist()
    return (dist.get_rank(), dist.get_world_size()) if dist else (None, 1)


def _dtensor_type():
    module = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    return None if module is None else module.DTensor


def _placement(p) -> str:
    """A placement as stable text across torch releases: 'Shard(0)', 'Replicate()', 'Partial(sum)'."""
    if p.is_shard():
        return f"Shard({p.dim})"
    if p.is_replicate():
        return "Replicate()"
    if p.is_partial():
        return f"Partial({getattr(p, 'reduce_op', 'sum')})"
    return type(p).__name__


def layout(p: torch.Tensor) -> dict:
    """A DTensor parameter's ``placements`` and ``shard`` (ParamRecord fields); nothing for a plain tensor.

    The shard index counts this rank's coordinates along the mesh dimensions that shard the tensor; along the
    others the rank holds a replica, so ranks with the same index hold the same values."""
    dtensor = _dtensor_type()
    if dtensor is None or not isinstance(p, dtensor):
        return {}
    mesh, placements = p.device_mesh, p.placements
    coordinate = mesh.get_coordinate() or [0] * mesh.ndim
    index, count = 0, 1
    for dim, placement in enumerate(placements):
        if placement.is_shard():
            index, count = index * mesh.size(dim) + coordinate[dim], count * mesh.size(dim)
    return {"placements": tuple(_placement(pl) for pl in placements), "shard": (index, count)}


_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def checksums(tensors: dict[int, torch.Tensor]) -> dict[int, int]:
    """Each floating-point tensor's local values read as integers and summed (int64, wrapping), by key: equal on
    replicas that hold identical values, and changed by any single different value. One copy to the CPU per
    device."""
    sums: dict[torch.device, dict[int, torch.Tensor]] = {}
    for key, t in tensors.items():
        x = local(t).detach()
        if x.is_floating_point() and not x.is_meta:
            bits = x.reshape(-1).view(_BITS[x.element_size()])
            sums.setdefault(x.device, {})[key] = bits.sum(dtype=torch.int64)
    out = {}
    for group in sums.values():
        out.update(zip(group, torch.stack(list(group.values())).cpu().tolist()))
    return out


def _fsdp_type():
    module = sys.modules.get("torch.distributed.fsdp")
    return None if module is None else getattr(module, "FSDPModule", None)


def syncs_in_backward(model: nn.Module) -> bool:
    """Whether the job's gradients only exist after a real backward: DDP and FSDP2 synchronise them from hooks on
    the parameters' gradient accumulation, which ``torch.autograd.grad`` does not run."""
    if not torch.distributed.is_available():
        return False
    kinds = tuple(k for k in (nn.parallel.DistributedDataParallel, _fsdp_type()) if k is not None)
    return any(isinstance(m, kinds) for m in model.modules())


def backward(loss: torch.Tensor, params: list[torch.Tensor], batch) -> dict[int, torch.Tensor | None]:
    """A real backward (the model's own gradient collectives run in it), leaving every ``.grad`` as it was: the
    gradient of each parameter by id (FSDP2: the rank's shard of the reduced gradient; DDP: the averaged one).

    Existing gradients are put back by value too: DDP's gradients may be views of its buckets, which the backward
    overwrites."""
    leaves = [t for t in iter_tensors(batch) if t.requires_grad and t.is_leaf]
    before = [(t, t.grad, None if t.grad is None else t.grad.detach().clone()) for t in [*params, *leaves]]
    restoring = any(values is not None for _, _, values in before)
    for t, _, _ in before:
        t.grad = None
    try:
        loss.backward()
        grads = {id(p): None if p.grad is None else p.grad.detach().clone() if restoring else p.grad.detach()
                 for p in params}
    finally:
        for t, grad, values in before:
            t.grad = grad
            if values is not None:
                with torch.no_grad():
                    grad.copy_(values)
    return grads


@contextlib.contextmanager
def resharded(model: nn.Module) -> Iterator[None]:
    """FSDP2 modules sharded on entry and on exit (a local step: frees gathered copies, no communication).

    FSDP2 keeps the root's parameters gathered after a forward without a backward, registered as plain tensors;
    the capture must see the sharded parameters that the optimizer holds and that receive the gradients."""
    fsdp = _fsdp_type()
    modules = [m for m in model.modules() if isinstance(m, fsdp)] if fsdp is not None else []
    for m in modules:
        m.reshard()
    try:
        yield
    finally:
        for m in modules:
            with contextlib.suppress(Exception):  # after a failed pass FSDP may refuse; its state is its own
                m.reshard()


# -- gather ------------------------------------------------------------------------------------------------------


def gather(cap, dst: int = 0):
    """One capture (or run) of the whole job on rank ``dst``, None on the other ranks: a collective every rank calls
    with its own capture, or its own ``Run`` from ``layerscope.watch`` once its ``with`` block has ended (see
    ``layerscope.core.run_ranks``). Outside an initialised ``torch.distributed`` job it returns ``cap`` itself (one
    rank is the job).

    Each rank sends its capture as bytes (``wire``: JSON and raw numbers, no pickle) in one uint8 tensor, on the
    device its backend needs (CUDA for NCCL); ``dst`` merges them with ``merge``. A rank whose capture cannot be
    encoded still takes part (no rank is left waiting) and raises afterwards, and so does ``dst``."""
    from .run import Run

    if not isinstance(cap, (Capture, Run)):
        raise TypeError(f"gather() takes a Capture (from layerscope.capture) or a Run (from layerscope.watch), got "
                        f"{type(cap).__name__}")
    if cap.merged:
        raise ValueError(f"gather() takes each rank's own {type(cap).__name__.lower()}; this one is already merged")
    if isinstance(cap, Run) and cap.live:
        raise ValueError("gather() takes a run once its `with layerscope.watch(...)` block has ended")
    dist = _dist()
    if dist is None:
        return cap
    world = dist.get_world_size()
    if isinstance(dst, bool) or not isinstance(dst, int) or not 0 <= dst < world:
        raise ValueError(f"dst must be a rank of the job, 0 to {world - 1}, got {dst!r}")
    with paused(settle=True):  # thousands of small records: full collections would cost more than the work
        if isinstance(cap, Run):
            from .run_ranks import gather_run

            return gather_run(dist, cap, dst)
        return _gather(dist, cap, dst)


def _gather(dist, cap: Capture, dst: int) -> Capture | None:
    from .aligned import Columns
    from .findings import _Look

    # When every rank's modules line up with rank 0's (the usual job) and rank 0 merges, the others send only what
    # the merge reads of them, and rank 0 reads it as columns, without building their modules' and calls' records.
    ahead = []

    def early():  # while the digests travel, a rank that sends to rank 0 encodes as if the ranks line up
        if dst == 0 and dist.get_rank() != dst:
            ahead.append(wire.encode(cap, lean=True))  # (an error is raised again by the encode below)

    lean = dst == 0 and _lined_up(dist, cap, early)
    columns, looks = {}, []

    def meanwhile():  # dst reads its own capture into columns while the other ranks encode theirs
        columns[dst] = Columns.of(cap)
        if lean:  # and what the merged findings look up of its modules, which the merged capture shares
            looks.append(_Look(cap).structure())

    encode = (lambda c: ahead[0] if ahead else wire.encode(c, lean=True)) if lean else wire.encode
    received = collect(dist, cap, dst, encode, lambda data: data, meanwhile)
    if received is None:
        return None
    if lean:
        own = columns.get(0) or Columns.of(cap)
        heads, columns = [cap], {0: own}
        for data in received[1:]:
            head, columns[len(heads)] = wire.columns(data, own)
            heads.append(head)
        return _merge(_checked(heads), columns, looks[0] if looks else None)
    captures = [cap if r == dst else wire.decode(data) for r, data in enumerate(received)]
    return _merge(_checked(captures), {dst: columns[dst]} if dst in columns else None)


def _lined_up(dist, cap: Capture, meanwhile) -> bool:
    """Whether every rank's capture has rank 0's modules, calls and parameters (``wire.digest``): a collective.
    ``meanwhile`` runs while the digests travel (its errors are left to the work that follows)."""
    try:
        mine = np.frombuffer(wire.digest(cap), dtype=np.int64).copy()
    except Exception:  # noqa: BLE001 - a capture too broken to digest lines up with no other; encode will say why
        mine = np.array([-1, dist.get_rank()], dtype=np.int64)
    digests = _all_gather(dist, torch.from_numpy(mine).to(_device(dist)), meanwhile)
    return all(torch.equal(d, digests[0]) for d in digests[1:])


def _all_gather(dist, tensor: torch.Tensor, meanwhile=None) -> list[torch.Tensor]:
    """Every rank's ``tensor``, in rank order; ``meanwhile`` runs while they travel (its errors are suppressed: the
    collective must complete on every rank whatever happens there)."""
    out = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    work = dist.all_gather(out, tensor, async_op=True)
    if meanwhile is not None:
        with contextlib.suppress(Exception):
            meanwhile()
    work.wait()
    return out


def _device(dist) -> torch.device:
    """Where the default group's collectives take their tensors: the current CUDA device for NCCL, else the CPU."""
    nccl = "nccl" in str(dist.get_backend())
    return torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")


def collect(dist, record, dst: int, encode, decode, meanwhile=None) -> list | None:
    """Every rank's record on ``dst`` in rank order (its own as it is, the others sent as ``encode``'s bytes and
    read with ``decode``, which is given them as a memoryview), None elsewhere. ``meanwhile``: what dst does while
    the others encode (its errors are left for later: the merge does the same work again and raises them)."""
    rank, failure, payload = dist.get_rank(), None, b""
    if rank != dst:
        try:
            payload = encode(record)
        except Exception as exc:  # noqa: BLE001 - sent to dst, raised below once every rank took part
            failure, payload = exc, f"{type(exc).__name__}: {exc}".encode()
    parts = _exchange(dist, payload, failure is not None, dst, meanwhile if rank == dst else None)
    if failure is not None:
        raise failure
    if parts is None:
        return None
    records = []
    for r, (failed, part) in enumerate(parts):
        if failed:
            raise RuntimeError(f"gather(): rank {r} could not send its {type(record).__name__.lower()} "
                               f"({bytes(part).decode()})")
        records.append(record if r == dst else decode(part))
    return records


def _exchange(dist, payload: bytes, failed: bool, dst: int, meanwhile=None) -> list[tuple[bool, memoryview]] | None:
    """Every rank's (failed, payload) on ``dst``, in rank order (dst's own payload is empty), None elsewhere. Each
    other rank sends dst its payload's size and whether it holds an error, then the payload itself (point to point:
    no rank pads its bytes to the longest, and dst receives each into one buffer it reads in place). ``meanwhile``
    runs on dst once it is ready to receive, before waiting for the others."""
    rank, world = dist.get_rank(), dist.get_world_size()
    device = _device(dist)
    head = torch.tensor([len(payload), int(failed)], dtype=torch.int64, device=device)
    if rank != dst:
        dist.send(head, dst)
        if payload:
            with warnings.catch_warnings():  # the bytes are only read (sent), never written
                warnings.simplefilter("ignore", UserWarning)
                data = torch.frombuffer(payload, dtype=torch.uint8)
            dist.send(data.to(device), dst)
        return None
    others = [r for r in range(world) if r != dst]
    heads = {r: torch.empty_like(head) for r in others}
    works = [dist.irecv(heads[r], src=r) for r in others]
    if meanwhile is not None:
        with contextlib.suppress(Exception):  # the other ranks' messages must be received whatever happens here
            meanwhile()
    for work in works:
        work.wait()
    sizes = {r: heads[r].tolist() for r in others}
    buffers = {r: torch.empty(sizes[r][0], dtype=torch.uint8, device=device) for r in others}
    works = [dist.irecv(buffers[r], src=r) for r in others if sizes[r][0]]
    for work in works:
        work.wait()
    parts = []
    for r in range(world):
        if r == dst:
            parts.append((False, memoryview(b"")))
        else:
            parts.append((bool(sizes[r][1]), memoryview(buffers[r].cpu().numpy())))
    return parts


# -- merge -------------------------------------------------------------------------------------------------------


def merge(captures: Sequence[Capture]) -> Capture:
    """One capture of a job from its ranks' captures, in rank order (``captures[r]`` is rank r's); records only,
    no communication: ``gather`` calls it on ``dst``, and it merges captures saved by each rank just as well.

    Modules are matched by name and calls by their number within the module; what a rank lacks is None in the
    ``per_rank`` fields. The merged capture has ``rank`` None and ``world_size`` the number of captures; its
    shapes, feature maps and call order are those of the lowest rank that has them."""
    return _merge(_checked(captures))


def _checked(captures: Sequence[Capture]) -> list[Capture]:
    captures = list(captures)
    if not captures or not all(isinstance(c, Capture) for c in captures):
        raise TypeError("merge() takes the ranks' Captures, in rank order")
    for r, c in enumerate(captures):
        if c.merged or c.rank not in (None, r):
            raise ValueError(f"merge() takes each rank's own capture in rank order; capture {r} is "
                             f"{'already merged' if c.merged else f'from rank {c.rank}'}")
    return captures


def _merge(captures: list[Capture], columns: dict | None = None, like=None) -> Capture:
    """``merge``; ``like``: a ``findings._Look`` at the first capture, when the captures line up (its lookups of
    the modules' structure hold for the merged capture too)."""
    from .findings import EXPLODING_RATIO, VANISHING_RATIO, find, group

    with paused(settle=True):
        cap = merge_records(captures, columns)
        if like is None or not cap.merged:  # (one rank: find's own rules)
            return dataclasses.replace(cap, findings=tuple(find(cap)))
        found = merged_findings(cap, VANISHING_RATIO, EXPLODING_RATIO, like)
        return dataclasses.replace(cap, findings=tuple(group(found)))


def merge_records(captures: list[Capture], columns: dict | None = None) -> Capture:
    """``merge`` of the ranks' own captures (as ``merge`` checks them) without running the findings: the merged
    capture holds the ranks' own findings only (``rank_findings`` puts them in the order ``find`` gives).
    ``columns``: ranks' captures already read as ``aligned.Columns``, by rank."""
    from . import aligned

    ranks = [(columns or {}).get(r) or aligned.Columns.of(c) for r, c in enumerate(captures)]
    # (columns read from bytes, whose captures here have no modules, come only from ranks that line up)
    modules = aligned.modules(ranks) if aligned.lined_up(ranks) else _modules(captures)
    first = captures[0]
    losses = [c.loss for c in captures if c.loss is not None]
    failed = next(((r, c.error) for r, c in enumerate(captures) if c.error is not None), None)
    error = None if failed is None else dataclasses.replace(failed[1], message=f"Rank {failed[0]}: {failed[1].message}")
    cap = Capture(
        modules=MappingProxyType(modules),
        total_params=first.total_params,
        trainable_params=first.trainable_params,
        loss=sum(losses) / len(losses) if losses else None,  # what DDP and FSDP2 average the gradients of
        loss_kind=first.loss_kind,
        backward=all(c.backward for c in captures),
        error=error,
        findings=tuple(_rank_findings(captures)),
        inputs=tuple(_inputs(captures)),
        output_numel=sum(c.output_numel for c in captures),
        meta=any(c.meta for c in captures),
        summary_text=first.summary_text,
        rank=None,
        world_size=len(captures),
        **_costs(captures),
    )
    return cap


def _modules(captures: list[Capture]) -> dict[str, ModuleReport]:
    """The merged module reports, modules matched by name (in the order the ranks hold them) and calls by their
    number within the module; what a rank lacks is None in the ``per_rank`` fields."""
    names = list(dict.fromkeys(name for c in captures for name in c.modules))
    reports = {name: [c.modules.get(name) for c in captures] for name in names}
    order = []  # (position of the call on the lowest rank that made it, that rank, module, call number, each rank's)
    for name, held in reports.items():
        for k in range(_calls_of(held)):
            per_rank = tuple([m.calls[k] if m is not None and k < len(m.calls) else None for m in held])
            low = next(r for r, c in enumerate(per_rank) if c is not None)
            order.append((per_rank[low].index, low, name, k, per_rank))
    order.sort(key=operator.itemgetter(0, 1))
    per_call = [row[4] for row in order]
    ranks = list(zip(*per_call)) if per_call else []
    stats = merge_tables([stats_table([None if c is None else c.stats for c in rank]) for rank in ranks])
    hists = _histograms([[None if c is None else c.histogram for c in calls] for calls in per_call])
    merged_calls = dict(zip([(name, k) for _, _, name, k, _ in order],
                            map(_call, per_call, range(len(order)), stats, hists)))
    return {name: _module(held, [merged_calls[name, k] for k in range(_calls_of(held))])
            for name, held in reports.items()}


def _first(values: Sequence):
    return next(v for v in values if v is not None)


def _present(values: Sequence) -> list[tuple[int, object]]:
    return [(r, v) for r, v in enumerate(values) if v is not None]


def _calls_of(held: list[ModuleReport | None]) -> int:
    return max(len(m.calls) for m in held if m is not None)


def _module(held: list[ModuleReport | None], calls: list[CallRecord]) -> ModuleReport:
    present = [m for m in held if m is not None]
    first = present[0]
    keys = first.params.keys()
    if any(m.params.keys() != keys for m in present):
        keys = dict.fromkeys(k for m in present for k in m.params)
    params = {key: _param([None if m is None else m.params.get(key) for m in held]) for key in keys}
    return copy_with(first, devices=_union([m.devices for m in present]), dtypes=_union([m.dtypes for m in present]),
                     calls=tuple(calls), params=MappingProxyType(params),
                     traits=frozenset.intersection(*[m.traits for m in present]), **_costs(present))


_SUMMED = ("flops", "own_flops", "backward_flops", "output_bytes")
_LARGEST = ("activation_bytes", "peak_bytes", "grad_bytes")
_N_SUMMED = len(_SUMMED)
_COSTS = operator.attrgetter(*_SUMMED, *_LARGEST)


def _costs(present: Sequence) -> dict:
    """The job's costs from the ranks' (reports or captures): FLOPs and output bytes add up over the ranks'
    batches; activation and peak bytes are per device, the largest rank's."""
    if isinstance(present[0], Capture):
        flops = [c.flops for c in present if c.flops is not None]
        largest = {key: max(values) if (values := [getattr(c, key) for c in present if getattr(c, key) is not None])
                   else None for key in ("activation_bytes", "peak_bytes")}
        return dict(flops=sum(flops) if flops else None, **largest)
    return costs_of([_COSTS(m) for m in present], [m.unsupported_ops for m in present])


def times(value, n: int):
    """One rank's number summed over n identical ranks (as sum() would add it up); None stays None."""
    return value if value is None or n == 1 else value * n if type(value) is int else sum([value] * n)


def all_of(flags: Sequence[bool | None]) -> bool | None:
    """Whether something holds on every rank: False when some rank says False, else None when some rank does not
    know, else True."""
    return False if False in flags else None if None in flags else True


def dead_in_job(dead: Sequence[int | None], units: int | None) -> int | None:
    """A ReLU's dead units in the job from each rank's count: a unit is dead when it is dead on every rank, known
    when some rank has none dead (0) or every rank has all of them dead, or there is one rank; None otherwise."""
    if None in dead:
        return None
    return dead[0] if len(dead) == 1 else 0 if min(dead) == 0 else units if min(dead) == units else None


def costs_of(rows: Sequence[tuple], ops: Sequence[tuple[str, ...]]) -> dict:
    """``_costs`` of a module from each rank's ``_COSTS`` row and unsupported ops."""
    n, first = len(rows), rows[0]
    if rows.count(first) == n:  # the same on every rank (replicas): n times the sums
        summed = [times(v, n) for v in first[:_N_SUMMED]]
        out = dict(zip(_SUMMED + _LARGEST, summed + list(first[_N_SUMMED:])))
    else:
        out = {}
        for i, (key, values) in enumerate(zip(_SUMMED + _LARGEST, zip(*rows))):
            if None in values:
                values = [v for v in values if v is not None]
            out[key] = None if not values else sum(values) if i < _N_SUMMED else max(values)
    out["unsupported_ops"] = ops[0] if ops.count(ops[0]) == n else tuple(sorted(set().union(*ops)))
    return out


def _union(groups: list[tuple[str, ...]]) -> tuple[str, ...]:
    first = groups[0]
    if groups.count(first) == len(groups):
        return first
    return tuple(sorted({item for group in groups for item in group}))


def _merge_stats(stats: Sequence[TensorStats | None]) -> TensorStats | None:
    present = [s for s in stats if s is not None]
    if not present:
        return None
    merged = present[0]
    for s in present[1:]:
        merged = merged.merge(s)
    return merged


def _histograms(per_call: list[Sequence[Histogram | None]]) -> list[Histogram | None]:
    """Each call's histogram of all ranks' outputs (``per_call[i][r]``: rank r's histogram of call i): summed where
    the ranks binned on the same edges, else every rank's counts spread onto equal bins over the union of their
    ranges (``Histogram.rebin``: approximate). Calls whose every rank has a histogram of one number of bins are
    done together in a few array operations (``binned``)."""
    out: list[Histogram | None] = [None] * len(per_call)
    batch: dict[int, tuple[list[int], list[Sequence[Histogram]]]] = {}  # bins -> the calls done together, theirs
    flat = [h for hists in per_call for h in hists]
    if per_call and None not in flat and len(sizes := {h.counts.size for h in flat}) == 1:  # the usual case
        batch[sizes.pop()] = (list(range(len(per_call))), per_call)
    else:
        for i, hists in enumerate(per_call):
            sizes = [0 if h is None else h.counts.size for h in hists]
            if sizes[0] and sizes.count(sizes[0]) == len(sizes):
                rows, row_hists = batch.setdefault(sizes[0], ([], []))
                rows.append(i)
                row_hists.append(hists)
            else:
                out[i] = _histogram([h for h in hists if h is not None])
    for bins, (rows, hists) in batch.items():
        flat, shape = [h for row in hists for h in row], (len(rows), len(hists[0]))
        merged = binned(np.stack([h.edges for h in flat]).reshape(*shape, bins + 1),
                        np.stack([h.counts for h in flat]).reshape(*shape, bins),
                        np.array([_HIST(h) for h in flat], dtype=np.int64).reshape(*shape, len(HIST_SCALARS)))
        for i, h in zip(rows, merged):
            out[i] = h
    return out


def binned(edges: np.ndarray, counts: np.ndarray, sums: np.ndarray) -> list[Histogram]:
    """Calls' histograms of every rank merged, from arrays [calls, ranks, ...] of their edges, counts and
    ``HIST_SCALARS`` (one number of bins for all): summed where the ranks share their edges, spread onto shared
    equal bins where they do not (``_histograms``)."""
    calls, ranks, bins = counts.shape
    out: list[Histogram | None] = [None] * calls
    shared = (edges == edges[:, :1]).all(axis=(1, 2))
    summed, first = counts.sum(axis=1), edges[:, 0].copy()  # first: a row per call, not every rank's edges kept
    totals = sums.sum(axis=1)
    for j, (sampled, numel, under, over, rebinned) in zip(np.flatnonzero(shared).tolist(), totals[shared].tolist()):
        out[j] = adopt(Histogram, {"counts": summed[j], "edges": first[j], "sampled": sampled, "numel": numel,
                                   "under": under, "over": over, "rebinned": rebinned > 0})
    if shared.all():
        return out
    other = np.flatnonzero(~shared)
    if len(other) < calls:  # (each rank on its own batch: every call, and no copy)
        edges, counts = edges[other], counts[other]
    lo, hi = edges[..., 0], edges[..., -1]
    width = (hi - lo) / bins
    off = np.diff(edges, axis=2)  # how far each bin's width is from equal (in place: megabytes, see _spread)
    off -= width[..., None]
    even = (np.abs(off, out=off) <= 1e-9 * (hi - lo)[..., None]).all(axis=(1, 2)).tolist()
    new = np.linspace(lo.min(1), hi.max(1), bins + 1, axis=1)  # [calls, bins + 1], as Histogram.rebin's edges
    at = _spread(counts, lo, width, new)  # [calls, ranks, bins + 1]: counts below each new edge
    spread = np.diff(at, axis=2).sum(axis=1).astype(np.int64)
    below = at[..., 0].sum(axis=1).astype(np.int64).tolist()
    above = (counts.sum(axis=2) - at[..., -1]).sum(axis=1).astype(np.int64).tolist()
    for k, (j, (sampled, numel, under, over, _)) in enumerate(zip(other.tolist(), totals[other].tolist())):
        if even[k]:
            out[j] = adopt(Histogram, {"counts": spread[k], "edges": new[k], "sampled": sampled, "numel": numel,
                                       "under": under + below[k], "over": over + above[k], "rebinned": True})
        else:
            out[j] = _histogram([Histogram(counts=counts[k, r], edges=edges[k, r], sampled=int(sums[j, r, 0]),
                                           numel=int(sums[j, r, 1]), under=int(sums[j, r, 2]), over=int(sums[j, r, 3]),
                                           rebinned=bool(sums[j, r, 4])) for r in range(ranks)])
    return out


_HIST = operator.attrgetter(*HIST_SCALARS)


def _spread(counts: np.ndarray, lo: np.ndarray, width: np.ndarray, new: np.ndarray) -> np.ndarray:
    """How many of each row's values lie below each new edge, in whole numbers, for equal-width bins starting at
    ``lo``: the cumulative counts interpolated linearly within a bin (np.interp, for all rows at once). Arrays of
    megabytes (calls x ranks x edges): worked on in place, as each new one is fresh memory to fault in."""
    bins = counts.shape[-1]
    position = new[:, None, :] - lo[..., None]  # [calls, ranks, bins + 1], in bins
    position /= width[..., None]
    k = np.floor(position)
    np.clip(k, 0, bins - 1, out=k)
    position -= k
    frac = np.clip(position, 0, 1, out=position)  # where each new edge lies within its bin k
    below = np.zeros(counts.shape[:-1] + (bins + 1,), np.int64)
    np.cumsum(counts, axis=-1, out=below[..., 1:])  # the values below each old edge
    rows = np.arange(math.prod(counts.shape[:-1])).reshape(counts.shape[:-1] + (1,))
    at = k.astype(np.int64)
    at += rows * (bins + 1)  # flat indices into below: np.take_along_axis, several times faster
    start = below.reshape(-1)[at]
    at -= rows  # and into counts
    frac *= counts.reshape(-1)[at]
    frac += start
    return np.round(frac, out=frac)


def _histogram(hists: list[Histogram]) -> Histogram | None:
    """One call's histograms merged, one by one (see _histograms)."""
    if not hists:
        return None
    first = hists[0]
    if any(not np.array_equal(h.edges, first.edges) for h in hists[1:]):
        lo, hi = min(h.edges[0] for h in hists), max(h.edges[-1] for h in hists)
        edges = np.linspace(lo, hi, max(len(h.counts) for h in hists) + 1)
        hists = [h.rebin(edges) for h in hists]
        first = hists[0]
    for h in hists[1:]:
        first = first.merge(h)
    return first


_WHERE_FIELDS = ("input_dtypes", "output_dtypes", "input_devices", "output_devices")
_WHERE = operator.attrgetter(*_WHERE_FIELDS)


def _call(per_rank: Sequence[CallRecord | None], index: int, stats: TensorStats | None,
          histogram: Histogram | None) -> CallRecord:
    calls = [c for c in per_rank if c is not None] if None in per_rank else per_rank
    first = calls[0]
    changes = {}
    if len(calls) > 1:
        where = [_WHERE(c) for c in calls]
        if where.count(where[0]) != len(where):  # dtypes or devices differ between ranks: all of them
            changes = dict(zip(_WHERE_FIELDS, [_union(list(group)) for group in zip(*where)]))
    grads = [c.grad_output_norm for c in calls if c.grad_output_norm is not None]
    dead = [c.dead_units for c in calls]
    finite = [c.input_finite for c in calls]
    return copy_with(
        first,
        index=index,
        stats=stats,
        histogram=histogram,
        grad_output_norm=math.sqrt(sum(g * g for g in grads)) if grads else None,  # of all ranks' outputs together
        dead_units=dead_in_job(dead, first.units),
        input_finite=all_of(finite),
        per_rank=tuple([None if c is None else c.stats for c in per_rank]),
        **changes,
    )


def stats_table(stats: Sequence[TensorStats | None]) -> np.ndarray:
    """Statistics as a float64 table [len(stats), fields], a row of NaN for each None (``merge_tables``)."""
    absent = (math.nan,) * len(_STATS)
    return np.array([absent if s is None else _STAT(s) for s in stats], np.float64).reshape(-1, len(_STATS))


def merge_tables(tables: Sequence[np.ndarray]) -> list[TensorStats | None]:
    """Each row's statistics of all ranks together, from each rank's ``stats_table``: merged in rank order as
    ``TensorStats.merge`` does it, for all rows at once; None where no rank has any."""
    if not tables:
        return []
    acc = tables[0]
    for b in tables[1:]:
        a = acc
        has_a, has_b = ~np.isnan(a[:, 0]), ~np.isnan(b[:, 0])
        ca, cb = a[:, _COUNT], b[:, _COUNT]
        n = ca + cb
        with np.errstate(invalid="ignore", divide="ignore"):
            delta = b[:, _MEAN] - a[:, _MEAN]
            merged = a + b  # numel, count and the zero, NaN and Inf counts add up
            merged[:, _MEAN] = a[:, _MEAN] + delta * (cb / n)
            merged[:, _M2] = a[:, _M2] + b[:, _M2] + delta * delta * (ca / n * cb)
        merged[:, _MIN] = np.minimum(a[:, _MIN], b[:, _MIN])
        merged[:, _MAX] = np.maximum(a[:, _MAX], b[:, _MAX])
        one_empty = (ca == 0) | (cb == 0)  # the moments and range of the one with values (b when both are empty)
        full = np.where((ca != 0)[:, None], a, b)[:, _MOMENTS]
        merged[:, _MOMENTS] = np.where(one_empty[:, None], full, merged[:, _MOMENTS])
        acc = np.where(has_a[:, None], np.where(has_b[:, None], merged, a), b)
    present = (~np.isnan(acc[:, 0])).tolist()
    values = [np.nan_to_num(acc[:, i]).astype(np.int64).tolist() if is_int else acc[:, i].tolist()
              for i, is_int in enumerate(_STATS_INT)]
    return [build(TensorStats, zip(_STATS, row)) if has else None for has, row in zip(present, zip(*values))]


_STATS = [f.name for f in dataclasses.fields(TensorStats)]
_STAT = operator.attrgetter(*_STATS)
_STATS_INT = [n not in ("mean", "m2", "min", "max") for n in _STATS]
_COUNT, _MEAN, _M2, _MIN, _MAX = (_STATS.index(n) for n in ("count", "mean", "m2", "min", "max"))
_MOMENTS = [_MEAN, _M2, _MIN, _MAX]


def _param(per_rank: Sequence[ParamRecord | None]) -> ParamRecord:
    held = [p for p in per_rank if p is not None] if None in per_rank else per_rank
    return adopt(ParamRecord, {**held[0].__dict__, "norm": _global(held, "norm"),
                               "grad_norm": _global(held, "grad_norm"), "shard": None, "checksum": None,
                               "finite": all_of([p.finite for p in held]), "per_rank": tuple(per_rank)})


def _global(held: list[ParamRecord], attr: str) -> float | None:
    """The norm of the whole parameter from the ranks' norms: sqrt of the sum of squares over its distinct pieces
    (replicas count once, from the lowest rank); None when a piece is missing or the pieces are partial sums."""
    first = held[0]
    if first.shard is None:  # a plain tensor: a replica on every rank
        return getattr(first, attr)
    pieces: dict[int, float] = {}
    for p in held:
        value = getattr(p, attr)
        if value is None:
            return None
        pieces.setdefault(p.shard[0] if p.shard else 0, value)
    if len(pieces) < first.shard[1] or any(pl.startswith("Partial") for pl in first.placements):
        return None
    return math.sqrt(sum(v * v for v in pieces.values()))


def _inputs(captures: list[Capture]) -> list[InputRecord]:
    out = []
    for i in range(max(len(c.inputs) for c in captures)):
        per_rank = [c.inputs[i] if i < len(c.inputs) else None for c in captures]
        first = _first(per_rank)
        stats = [None if r is None else r.stats for r in per_rank]
        out.append(dataclasses.replace(first, stats=_merge_stats(stats), per_rank=tuple(stats)))
    return out


def _rank_findings(captures: list[Capture]) -> list[Finding]:
    """The ranks' findings about their own passes, one per (kind, module): with the first rank that found it, or
    rank None when every rank did; ``details["ranks"]`` lists them all."""
    found: dict[tuple[str, str], list[tuple[int, Finding]]] = {}
    for r, c in enumerate(captures):
        for f in c.findings:
            if f.kind not in JOB_WIDE:
                found.setdefault((f.kind, f.module), []).append((r, f))
    out = []
    for where in found.values():
        ranks = sorted({r for r, _ in where})
        r, f = where[0]
        out.append(dataclasses.replace(f, rank=None if len(ranks) == len(captures) else r,
                                       details={**f.details, "ranks": ranks}))
    return out


# -- findings of a merged capture --------------------------------------------------------------------------------


def merged_findings(cap: Capture, vanishing_ratio: float, exploding_ratio: float, like=None) -> list[Finding]:
    """``find()`` of a merged capture: the ranks' own findings as its records hold them, and the job-wide rules
    on the merged records: gradients (global norms), frozen, unused and training-mode layers, ``rank_desync``.
    ``like``: a look whose ``structure()`` this capture shares (see ``_merge``)."""
    from .findings import _finite, _Look

    kept = [f for f in cap.findings if f.kind not in JOB_WIDE]
    # the gradients are those of one rank's loss (DDP and FSDP2 average over ranks): scale by one rank's outputs
    look = _Look(dataclasses.replace(cap, output_numel=cap.output_numel // cap.world_size), like)
    echo = any(f.kind in ("input_nonfinite", "nan", "inf") for f in kept)  # the gradients only echo the NaN/Inf
    found = list(kept)
    if not echo and cap.error is None and cap.loss_kind is not None and _finite(cap.loss):
        found += look.gradients(vanishing_ratio, exploding_ratio)
    found += [*look.frozen(), *look.unused(), *look.train_mode(), *desync(cap, look)]
    return _in_order(found, look)


def _in_order(found: list[Finding], look) -> list[Finding]:
    from .findings import SEVERITIES

    return sorted(found, key=lambda f: (SEVERITIES.index(f.severity), look.position(f.module),
                                        -1 if f.rank is None else f.rank))


def rank_findings(cap: Capture) -> list[Finding]:
    """What ``find`` gives of a merged capture's ranks' own findings (every kind but the job-wide ones), without
    running the job-wide rules."""
    from .findings import _Look, group

    return group(_in_order([f for f in cap.findings if f.kind not in JOB_WIDE], _Look(cap)))


def _replicated_plain(cap: Capture) -> bool:
    """Whether plain (non-DTensor) parameters are meant to be equal on every rank: under DDP, or next to DTensor
    parameters (FSDP2, tensor parallel), where a plain parameter is a replica that nothing keeps in step."""
    return cap[""].type_name == "DistributedDataParallel" or any(
        p.placements for m in cap.modules.values() for p in m.params.values())


def _differs(p: ParamRecord, q: ParamRecord) -> bool:
    if p.checksum is not None and q.checksum is not None:
        return p.checksum != q.checksum
    return p.norm is not None and q.norm is not None and p.norm != q.norm


def _odd_ranks(p: ParamRecord, plain: bool) -> tuple[int, list[int]] | None:
    """(reference rank, the ranks whose replica differs from it) for a merged parameter, None when all agree."""
    if not p.per_rank or (not p.placements and not plain):
        return None
    if not p.placements and None not in p.per_rank:  # a replica on every rank: each against rank 0's
        ref = p.per_rank[0]
        odd = [r for r, q in enumerate(p.per_rank) if r and _differs(ref, q)]
        return (0, odd) if odd else None
    groups: dict[int, list[tuple[int, ParamRecord]]] = {}
    for r, q in _present(p.per_rank):
        groups.setdefault(q.shard[0] if q.shard else 0, []).append((r, q))
    for members in groups.values():
        ref_rank, ref = members[0]
        odd = [r for r, q in members[1:] if _differs(ref, q)]
        if odd:
            return ref_rank, odd
    return None


def desync(cap: Capture, look) -> list[Finding]:
    """``rank_desync``: replicated parameters whose values differ between ranks (by their checksums); and, under
    DDP with the very same batch on every rank, the first module whose output differs between ranks."""
    plain = _replicated_plain(cap)
    odd: dict[str, dict[str, tuple[int, list[int]]]] = {}  # the modules with parameters that differ
    for name, report in cap.modules.items():
        for k, p in report.params.items():
            ranks = p.per_rank  # (one record on every rank: a replica that agrees, as gather reads one)
            if ranks and ranks.count(ranks[0]) != len(ranks) and (o := _odd_ranks(p, plain)):
                odd.setdefault(name, {})[k] = o
    relevant = lambda n: any(p.per_rank for p in cap[n].params.values())  # noqa: E731
    found = []
    for name in look.highest(relevant, odd.__contains__) if odd else []:
        inside = [(n, k, o) for n in look.inside(name) for k, o in odd.get(n, {}).items()]
        ranks = sorted({r for _, _, (_, rs) in inside for r in rs})
        n, k, (ref, odd_ranks) = inside[0]
        p = cap[n].params[k].per_rank
        a, b = p[ref].norm, p[odd_ranks[0]].norm
        norms = f"; {n + '.' if n else ''}{k} has norm {b:.6g} on rank {odd_ranks[0]}, {a:.6g} on rank {ref}" \
            if a is not None and b is not None else ""
        what = "The model" if name == "" else look.label(name)
        count = f"{len(inside)} parameter{'s' if len(inside) > 1 else ''}"
        message = (f"{what} holds other parameter values on rank {_ranks(ranks)} than on rank {ref} ({count}"
                   f"{norms}): replicas that must stay identical have drifted apart. Look for weights loaded or "
                   f"changed on one rank after DDP or FSDP was set up, a rank that skipped an optimizer step, or "
                   f"parameters that nothing synchronises.")
        details = {"reference_rank": ref, "ranks": ranks, "parameters": [f"{n}.{k}" if n else k for n, k, _ in inside]}
        found.append(Finding("rank_desync", "error", name, message, details, rank=ranks[0] if len(ranks) == 1
                             else None))
    if not found and cap[""].type_name == "DistributedDataParallel":
        found += _output_desync(cap, look)
    return found


def _alike(stats: Sequence[TensorStats]) -> bool:
    """Whether the statistics are the very same finite numbers (then std is finite too): ``_agree`` at once."""
    a = stats[0]
    same = a.__dict__  # every field equal (a comparison of the records' dicts, which == would make tuples of)
    for s in stats[1:]:
        if s.__dict__ != same:
            return False
    return math.isfinite(a.mean + a.m2 + a.min + a.max)


def _agree(stats: list[TensorStats]) -> bool:
    """Whether the ranks' statistics of one output are the same up to rounding."""
    if _alike(stats):
        return True  # no need to weigh the rounding
    a = stats[0]
    scale = max(a.std, abs(a.mean), abs(a.min), abs(a.max), 1e-30) * 1e-5
    return all(s.count == a.count and s.nan_count == a.nan_count and s.inf_count == a.inf_count
               and all(abs(x - y) <= scale for x, y in ((s.mean, a.mean), (s.std, a.std), (s.min, a.min),
                                                        (s.max, a.max))) for s in stats[1:])


def _output_desync(cap: Capture, look) -> list[Finding]:
    same_batch = cap.inputs and all(i.per_rank and None not in i.per_rank and _agree(list(i.per_rank))
                                    for i in cap.inputs)
    if not same_batch:
        return []
    differ = [(name, c) for name, m in cap.modules.items() for c in m.calls
              if c.per_rank and (None in c.per_rank or not _alike(c.per_rank))]
    for name, call in sorted(differ, key=lambda pair: pair[1].index):  # the first in the order of the calls
        per_rank = call.per_rank
        held = _present(per_rank)
        if len(held) > 1 and not _agree([s for _, s in held]):
            ref, a = held[0]
            ranks = [r for r, s in held[1:] if not _agree([a, s])]
            b = call.per_rank[ranks[0]]
            message = (f"Every rank got the same batch and holds the same parameters, but the output of "
                       f"{look.label(name)} differs on rank {_ranks(ranks)} (mean {b.mean:.6g}, std {b.std:.6g}) "
                       f"from rank {ref} (mean {a.mean:.6g}, std {a.std:.6g}): the replicas compute differently "
                       f"(nondeterministic kernels, or code that depends on the rank).")
            return [Finding("rank_desync", "warning", name, message, {"reference_rank": ref, "ranks": ranks},
                            rank=ranks[0] if len(ranks) == 1 else None)]
    return []


def _ranks(ranks: list[int]) -> str:
    return ", ".join(map(str, ranks[:8])) + (f" and {len(ranks) - 8} more" if len(ranks) > 8 else "")

"""Summaries of tensors computed where the tensors live, keeping only small, mergeable results.

A summary is a set of sufficient statistics (count, mean, M2, min, max, zeros, NaN and Inf counts) that
``TensorStats.merge`` combines exactly (Chan et al.'s parallel formula): the stats of two parts of a tensor,
or of two passes, steps or ranks, merge into the stats of the whole. Histograms merge when their edges agree;
``StatsBatch.add(t, edges)`` bins a tensor on fixed edges so that histograms of different passes line up.

Tensors of up to ``small`` elements are copied and stacked into a buffer with tensors of the same
shape, and each full buffer is summarised at once by row-wise reductions: a few ops for many tensors,
exactly (every element counts, the histogram too; M2 is summed around each row's mean). Larger tensors are
summarised on the spot in three passes (aminmax, sum, dot; two more around the mean when it dwarfs the
spread), with the histogram and the share of zeros read off a bounded, evenly strided sample of their
elements. Reductions accumulate in float32 (float64 is about 12x slower on CPU), float64 tensors in float64;
float16, bfloat16 and integers of up to 16 bits are widened to float32, wider integers to float64. Values
whose squares could overflow or underflow in float32 (a magnitude above 2**50, or a span below 2**-30: values
near float32's maximum, for instance) are summed in float64 instead. Only a large tensor's handful of sums is
copied to the CPU on the spot; everything else waits for ``results()``.

Tolerance, against float64 numpy on the same values (tests/test_stats_exact.py checks it on large offsets,
values near the dtype's limits, float16, bfloat16, constants, integers and tensors with a few NaN/Inf):
count, NaN and Inf counts, min and max are exact (integers up to 2**53); |mean - numpy's| <= 1e-6 std +
1e-12 |mean|; |std - numpy's| <= 1e-5 std (1e-4 for tensors of more than ``small`` elements, whose sum of
squares is taken by float32 dots: see norm) + 1e-12 |mean|; a merge adds float64 rounding only. Zeros and the
histogram are exact over the values they read (all of a small tensor, the strided sample of a large one), binned as
numpy does but for values within 1e-5 of a bin's width from an edge, which may land in the bin next to it; on
fixed edges, exactly as numpy does (see _indices)."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import numpy as np
import torch

# Sums of float32 values run in float64 instead when a value's magnitude exceeds _WIDE (squares of values
# near float32's maximum overflow) or when the values' span is below _NARROW (squares of deviations underflow).
_WIDE, _NARROW = 2.0**50, 2.0**-30

# A summary's fields, in this order (see _summary).
_FIELDS = ("count", "mean", "m2", "min", "max", "zeros", "checked", "nan_count", "inf_count", "lo", "hi", "binned")
# StatsBatch.columns: the tensor's size, its summary, and its histogram's sampled, under and over
COLUMNS = ("numel", *_FIELDS, "sampled", "under", "over")
_SUMMARY = slice(1, 1 + len(_FIELDS))  # where the _FIELDS are in COLUMNS
_SAMPLED = 1 + len(_FIELDS)  # and the histogram's sampled, under and over


@dataclass(frozen=True)
class TensorStats:
    """Sufficient statistics of one tensor (or of several merged). ``count``, ``mean``, ``m2`` (the sum of
    squared deviations from the mean), ``min`` and ``max`` are over the finite values; ``zeros`` counts the
    exact zeros among the ``checked`` finite values: all of them, or an evenly strided sample of a large
    tensor. ``min`` and ``max`` are 0.0 when there is no finite value."""

    numel: int
    count: int
    mean: float
    m2: float
    min: float
    max: float
    zeros: int
    checked: int
    nan_count: int
    inf_count: int

    @property
    def std(self) -> float:
        """Population standard deviation (numpy's default, ddof=0) of the finite values."""
        return math.sqrt(max(self.m2, 0.0) / self.count) if self.count else 0.0

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.checked if self.checked else 0.0

    @property
    def exact(self) -> bool:
        """True when every finite element was looked at for zeros (False: zero_fraction is sampled)."""
        return self.checked == self.count

    @property
    def finite(self) -> bool:
        return self.nan_count == 0 and self.inf_count == 0

    def merge(self, other: TensorStats) -> TensorStats:
        """The statistics of both tensors together (Chan, Golub and LeVeque's pairwise update)."""
        a, b = self, other
        n = a.count + b.count
        if a.count == 0 or b.count == 0:
            full = a if a.count else b
            mean, m2, lo, hi = full.mean, full.m2, full.min, full.max
        else:
            delta = b.mean - a.mean
            mean = a.mean + delta * (b.count / n)
            m2 = a.m2 + b.m2 + delta * delta * (a.count / n * b.count)
            lo, hi = min(a.min, b.min), max(a.max, b.max)
        return TensorStats(numel=a.numel + b.numel, count=n, mean=mean, m2=m2, min=lo, max=hi,
                           zeros=a.zeros + b.zeros, checked=a.checked + b.checked,
                           nan_count=a.nan_count + b.nan_count, inf_count=a.inf_count + b.inf_count)

    @classmethod
    def of(cls, values) -> TensorStats:
        """Exact statistics of an array or tensor, in float64 on the CPU (the slow reference)."""
        if isinstance(values, torch.Tensor):
            values = values.detach().to("cpu", torch.float64).numpy()
        a = np.asarray(values, dtype=np.float64).reshape(-1)
        finite = a[np.isfinite(a)]
        nan = int(np.isnan(a).sum())
        if finite.size == 0:
            return cls(a.size, 0, 0.0, 0.0, 0.0, 0.0, 0, 0, nan, a.size - nan)
        mean = float(finite.mean())
        return cls(numel=a.size, count=finite.size, mean=mean, m2=float(np.square(finite - mean).sum()),
                   min=float(finite.min()), max=float(finite.max()), zeros=int((finite == 0).sum()),
                   checked=finite.size, nan_count=nan, inf_count=a.size - finite.size - nan)


HIST_SCALARS = ("sampled", "numel", "under", "over", "rebinned")  # Histogram's fields besides its two arrays


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of finite values in the bins between ``edges`` (numpy's convention: [e0, e1), ..., and the
    last bin closed [e(k-1), ek]). Equal bins over the tensor's own range, or edges fixed by the caller;
    finite values outside fixed edges are counted in ``under`` and ``over``, NaN and Inf never.

    ``sampled`` is how many finite values were binned (``counts.sum() + under + over``): all finite elements
    of small tensors, an evenly strided sample (less any non-finite elements) of large ones. ``rebinned``: the
    counts were spread onto these edges from other ones (see ``rebin``), so they are approximate.

    The edges of a capture's equal bins are made when first read, from the two ends kept in their place (see
    ``own``): thousands of records keep two numbers each instead of an array of edges."""

    counts: np.ndarray
    edges: np.ndarray
    sampled: int
    numel: int
    under: int = 0
    over: int = 0
    rebinned: bool = False

    @classmethod
    def own(cls, counts: np.ndarray, lo: float, hi: float, sampled: int, numel: int) -> Histogram:
        """Counts in equal bins over [lo, hi], whose edges are made when first read, as numpy's
        ``linspace(lo, hi, bins + 1)`` computes them (``i * ((hi - lo) / bins) + lo``, the last edge ``hi``)."""
        record = object.__new__(cls)
        for key, value in (("counts", counts), ("_lo", lo), ("_hi", hi), ("sampled", sampled), ("numel", numel),
                           ("under", 0), ("over", 0), ("rebinned", False)):
            object.__setattr__(record, key, value)  # one by one: the class's shared-key dict, a third of a dict's bytes
        return record

    def __getattr__(self, name: str):  # only for a name not in the record's __dict__: the edges of ``own``
        known = self.__dict__
        if name != "edges" or "_lo" not in known:
            raise AttributeError(f"'Histogram' object has no attribute {name!r}")
        lo, hi = known["_lo"], known["_hi"]
        bins = len(self.counts)
        edges = np.arange(bins + 1) * ((hi - lo) / bins) + lo
        edges[-1] = hi
        self.__dict__["edges"] = edges
        return edges

    def merge(self, other: Histogram) -> Histogram:
        """The histogram of both together; only defined when the two share their edges."""
        if not np.array_equal(self.edges, other.edges):
            raise ValueError(
                f"cannot merge histograms with different edges ({_describe(self.edges)} and "
                f"{_describe(other.edges)}); bin both on the same fixed edges to make them mergeable"
            )
        return Histogram(counts=self.counts + other.counts, edges=self.edges, sampled=self.sampled + other.sampled,
                         numel=self.numel + other.numel, under=self.under + other.under, over=self.over + other.over,
                         rebinned=self.rebinned or other.rebinned)

    def rebin(self, edges) -> Histogram:
        """These counts spread onto other ``edges``, each bin's count shared out in proportion to its overlap with
        the new bins (as if the values were uniform within a bin): approximate, and marked ``rebinned``. What falls
        outside the new edges joins ``under`` and ``over``; the total stays an exact integer."""
        edges = np.asarray(edges, dtype=np.float64)
        cumulative = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.float64)
        at = np.round(np.interp(edges, self.edges, cumulative))  # counts below each new edge, whole numbers
        total = int(cumulative[-1])
        return Histogram(counts=np.diff(at).astype(np.int64), edges=edges, sampled=self.sampled, numel=self.numel,
                         under=self.under + int(at[0]), over=self.over + total - int(at[-1]), rebinned=True)


def _describe(edges: np.ndarray) -> str:
    return f"{len(edges) - 1} bins over [{edges[0]:.6g}, {edges[-1]:.6g}]" if len(edges) else "no edges"


def local(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this process holds: a DTensor's local shard (no communication), any other tensor itself.
    Statistics, norms and checks run on it: an op on a DTensor itself may run collectives."""
    if type(t) is torch.Tensor:
        return t
    dtensor = sys.modules.get("torch.distributed.tensor")  # not imported: no DTensor can exist
    return t.to_local() if dtensor is not None and isinstance(t, dtensor.DTensor) else t


def _to_float(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` in the dtype its summary is computed in: float32 and float64 as they are, float16, bfloat16 and
    integers of up to 16 bits widened to float32 (exactly), wider integers to float64 (exact up to 2**53)."""
    t = local(t)
    if t.is_complex() or t.is_meta or t.numel() == 0:
        return None
    t = t.detach()
    if t.dtype in (torch.float32, torch.float64):
        return t
    return t.double() if not t.is_floating_point() and t.element_size() >= 4 else t.float()


def _wide(lo: float, hi: float) -> bool:
    """True when float32 sums over values in [lo, hi] could overflow or underflow (see _WIDE)."""
    return max(hi, -lo) > _WIDE or 0 < hi - lo < _NARROW


def _flat_counts(counts: torch.Tensor, flat: torch.Tensor, n) -> torch.Tensor:
    """``counts`` [k, bins] with each row whose values are all equal replaced by numpy's answer: all ``n`` of
    them in the middle bin of [value - 0.5, value + 0.5]. No copy to the CPU."""
    middle = torch.zeros_like(counts[0])
    middle[counts.shape[1] // 2] = n
    return torch.where(flat[:, None], middle, counts)


_VIEWS = 64  # views a Scratch keeps for reuse


class Scratch:
    """Work buffers kept from one use to the next: a new tensor of megabytes on the CPU is fresh memory from the
    system each time (malloc maps large blocks), and writing it first costs more than the reductions that read
    it. ``get`` hands out a view of a kept buffer, valid until the next ``get`` of the same name."""

    def __init__(self):
        self._kept: dict[tuple, torch.Tensor] = {}
        self._views: dict[tuple, torch.Tensor] = {}  # the views handed out, by name, shape, dtype and device

    def get(self, name: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        key = (name, shape, dtype, device)
        view = self._views.get(key)
        if view is not None and view.shape == shape:  # the steps of a run ask for the same shapes every time
            return view
        n = math.prod(shape)
        flat = self._kept.get((name, dtype, device))
        if flat is None or flat.numel() < n:
            flat = self._kept[name, dtype, device] = torch.empty(n, dtype=dtype, device=device)
            self._views = {k: v for k, v in self._views.items() if k[0] != name or k[2:] != (dtype, device)}
        if len(self._views) >= _VIEWS:
            self._views.clear()
        view = self._views[key] = flat[:n].view(shape)
        return view


def _rows(m: torch.Tensor, bins: int, span: tuple | None = None, histogram: bool = True,
          scratch: Scratch | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The sums of each row of ``m`` [k, n] (all values finite) that ``_summary`` turns into its statistics, a
    [k, 4] float64 tensor (each row's mean rounded to the dtype, the sum of the values less it, the sum of their
    squares, the zeros), and [k, bins] histogram counts (None without ``histogram``: rows binned on fixed edges).
    ``span`` = (min, max) [k] tensors sets the histogram range instead of the rows' own range. ``scratch``: where
    to keep the work buffers."""
    k, n = m.shape
    scratch = scratch or Scratch()
    shift = m.sum(1) / n  # each row's mean, rounded to its dtype: summing around it, nothing cancels
    work = torch.sub(m, shift[:, None], out=scratch.get("work", (k, n), m.dtype, m.device))  # reused below
    total = work.sum(1)  # what the rounding of the mean left over
    squares = work.square_().sum(1)
    if n < 1 << 24:  # zeros as 0/1 in the float buffer, exact in its sums: three times faster than bools
        sums = torch.stack([shift, total, squares, torch.eq(m, 0, out=work).sum(1)], 1).double()
    else:
        sums = torch.stack([shift.double(), total.double(), squares.double(), (m == 0).sum(1).double()], 1)
    counts = None
    if histogram:
        mn, mx = (m.amin(1), m.amax(1)) if span is None else span  # row-wise aminmax is several times slower on CPU
        counts = _own_counts(m, work, mn, mx, mx <= mn, bins, scratch)
    return sums, counts


def _summary(count: np.ndarray, sums: np.ndarray, lo: np.ndarray, hi: np.ndarray, nan: int = 0,
             inf: int = 0) -> np.ndarray:
    """Rows' statistics, [r, len(_FIELDS)] float64 in the order of _FIELDS, from their sums (see _rows: [r, 4];
    ``count`` values each, all binned) and ranges: the mean is the shift plus the mean of what is left, M2 the
    squares less what the shift missed."""
    shift, total, squares, zeros = sums.T
    flat = hi <= lo  # numpy's range for equal values: [value - 0.5, value + 0.5]
    return np.column_stack([count, shift + total / count, np.maximum(squares - total * total / count, 0.0), lo, hi,
                            zeros, count, np.full_like(count, nan), np.full_like(count, inf),
                            np.where(flat, lo - 0.5, lo), np.where(flat, hi + 0.5, hi), count])


def _own_counts(m: torch.Tensor, work: torch.Tensor, mn: torch.Tensor, mx: torch.Tensor, flat: torch.Tensor,
                bins: int, scratch: Scratch) -> torch.Tensor:
    """Counts [k, bins] of each row of ``m`` in equal bins over [mn, mx] (``work``: scratch of m's shape)."""
    k, n = m.shape
    scale = torch.where(flat, 0, bins / (mx - mn))  # flat rows: all in bin 0 here, moved by _flat_counts
    index = torch.int32 if k * bins < 1 << 31 else torch.long  # int32: a quarter of the time of int64, here
    idx = scratch.get("index", (k, n), index, m.device)
    idx.copy_(torch.sub(m, mn[:, None], out=work).mul_(scale[:, None]).clamp_(0, bins - 1))
    idx += torch.arange(0, k * bins, bins, dtype=index, device=m.device)[:, None]
    return _flat_counts(torch.bincount(idx.view(-1), minlength=k * bins).view(k, bins), flat, n)


def _with_non_finite(x: torch.Tensor, bins: int) -> tuple[dict, torch.Tensor]:
    """The statistics (by _FIELDS) and histogram counts of one flat tensor holding NaN/Inf: its finite values
    summarised, the others counted."""
    finite = x[torch.isfinite(x)]
    nan, inf = torch.stack([torch.isnan(x).sum(), torch.isinf(x).sum()]).tolist()
    if not finite.numel():
        return dict(zip(_FIELDS, (0, 0.0, 0.0, 0.0, 0.0, 0, 0, nan, inf, -0.5, 0.5, 0))), \
            torch.zeros(bins, dtype=torch.long, device=x.device)
    lo, hi = torch.stack(torch.aminmax(finite)).tolist()
    if finite.dtype == torch.float32 and _wide(lo, hi):
        finite = finite.double()
    sums, counts = _rows(finite[None], bins)
    row = _summary(np.array([finite.numel()], dtype=np.float64), sums.cpu().numpy(), np.array([lo]), np.array([hi]),
                   nan, inf)
    return dict(zip(_FIELDS, row[0].tolist())), counts[0]


def _check_edges(edges) -> np.ndarray:
    """A read-only float64 copy of histogram edges, after checking they are usable."""
    e = np.array(edges.cpu() if isinstance(edges, torch.Tensor) else edges, dtype=np.float64)
    if e.ndim != 1 or len(e) < 2 or not np.isfinite(e).all() or not (np.diff(e) > 0).all():
        raise ValueError(f"histogram edges must be a 1-D increasing, finite sequence of two or more, got {edges!r}")
    e.flags.writeable = False
    return e


def _thresholds(edges: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Boundaries in the values' own dtype such that the number of them strictly below a value x is:
    0 for -Inf, 1 for x < e0 (under), 2 + j for x in bin j, k + 2 for x > ek (over), k + 3 for +Inf;
    NaN lands on 0 or k + 3 (either end), k being the number of bins. Exact against the float64 edges
    (numpy compares in float64 too): x >= e holds exactly when
    x > (the largest value of the dtype below the smallest value of the dtype >= e)."""
    kind = np.float32 if dtype == torch.float32 else np.float64
    inf = kind(np.inf)
    with np.errstate(over="ignore"):  # edges beyond float32's range round to +-Inf, and step back from it
        rounded = edges.astype(kind)
        up = np.where(rounded < edges, np.nextafter(rounded, inf), rounded)  # smallest value >= each edge
        last = rounded[-1] if rounded[-1] <= edges[-1] else np.nextafter(rounded[-1], -inf)  # largest <= ek
        below = np.nextafter(up[:-1], -inf)
    return np.concatenate([[-inf], below, [last, np.finfo(kind).max]]).astype(kind)


def _uniform(edges: np.ndarray) -> tuple[float, float, bool] | None:
    """(first edge, bins per unit, aligned) of equally spaced edges (to within 1e-9 of a bin), else None;
    aligned: the bins' width is a power of two and the edges its multiples, exactly (see _indices)."""
    k = len(edges) - 1
    width = (edges[-1] - edges[0]) / k
    steps = np.arange(k + 1)
    if np.abs(edges - (edges[0] + width * steps)).max() > 1e-9 * width:
        return None
    aligned = (np.frexp(width)[0] == 0.5 and float(edges[0] / width).is_integer() and abs(edges[0] / width) < 2**52
               and np.array_equal(edges, edges[0] + width * steps))
    return float(edges[0]), 1 / width, bool(aligned)


_SEARCHED = 2048  # _indices searches up to this many values rather than computing their bins


def _indices(m: torch.Tensor, bounds: torch.Tensor, uniform: list | None,
             scratch: Scratch | None = None, stride: int = 0, inside: bool = False) -> torch.Tensor:
    """For each value of ``m`` [r, n], how many of its row's ``bounds`` [r, k + 3] (see _thresholds) lie strictly
    below it: ``torch.searchsorted(bounds, m)``, plus ``stride`` times the row's number (so that the indices of all
    rows can be counted at once). With ``uniform`` (each row's _uniform, and every value of ``m`` finite), past
    _SEARCHED values, arithmetically instead, several times faster, and the same to the last value. Aligned edges
    and float32 values: value / width is exact in float64, so its floor is the bin (a value on the last edge is in
    the last bin). Other uniform edges: the bin is read off the value's position in float64, and the values within
    1e-6 of a bin's width from an edge, whose position may round across it, are compared with the bounds next to
    it. ``inside``: every value of a row is known to lie from its first edge to below its last one (from its range,
    taken already): on aligned edges its bin is then the floor alone, with nothing to clamp and none on the last
    edge."""
    r, k = len(m), bounds.shape[1] - 3
    if m.numel() <= _SEARCHED:
        uniform = None  # so few values: one search costs less than the dozen ops of the arithmetic
    if uniform is not None and m.dtype == torch.float32 and all(u[2] for u in uniform):
        scratch = scratch or Scratch()
        # Per row, from its (first edge, 1 / width): the first edge over the width (a whole number), the last one,
        # and what to take off the floor of value / width to get the index. A width from 2**-126 to 1 scales by
        # 2**p, 0 <= p <= 126: exact in float32 too (no rounding to 0; beyond float32's range +-Inf, which lands in
        # under or over), and the indices are small integers: half the bytes to write and read.
        rows = [(scale, first * scale) for first, scale, _ in uniform]
        wide = any(scale < 1 or scale > 2.0**126 or abs(start) + k + 2 + r * stride >= 1 << 24
                   for scale, start in rows)
        kind = torch.float64 if wide else torch.float32
        if r == 1 and not wide:  # as Python numbers: exact in float32, and no tensors to make
            (scale, start), = rows
            scale, last, low, shift = scale, start + k, start - 1, start - 2
        else:  # through numpy: a third of the time torch.tensor takes for hundreds of nested rows
            consts = np.array([(scale, start + k, start - 1, start - 2 - i * stride)
                               for i, (scale, start) in enumerate(rows)], dtype=np.float64)
            scale, last, low, shift = torch.from_numpy(consts[:, :, None]).to(m.device, kind).unbind(1)  # [r, 1]
        place = torch.mul(m, scale, out=scratch.get("place", m.shape, kind, m.device))  # exact: 2**-p
        if inside:
            place.floor_().sub_(shift)
        else:  # (bool results, and clamp_ to tensors, cost several times these ops on the CPU)
            end = torch.eq(place, last, out=scratch.get("end", m.shape, kind, m.device))  # numpy's closed last bin
            place.floor_().clamp_min_(low).clamp_max_(last).sub_(shift).sub_(end)
        small = m.device.type == "cpu" and m.numel() * (k + 4) < 1 << 31  # bincount's int32: fewer bytes to read
        idx = scratch.get("index", m.shape, torch.int32 if small else torch.long, m.device)
        return idx.copy_(place)  # under e0: 1; bin j: j + 2; over ek: k + 2 (plus the row's offset)
    if uniform is None:
        idx = torch.searchsorted(bounds, m.contiguous())  # (a strided sample: copied, as searchsorted would, silently)
    else:
        first, scale, _ = torch.tensor(uniform, dtype=torch.float64, device=m.device).T[:, :, None]
        place = torch.sub(m, first).mul_(scale)  # float64 (first is), a new tensor: m is the caller's
        idx = place.floor()
        off = place.sub_(idx)
        near = ((off < 1e-6) | (off > 1 - 1e-6)).nonzero(as_tuple=True)
        idx = idx.clamp_(-1, k).long().add_(2)  # under e0: 1; bin j: j + 2; over ek: k + 2
        if len(near[0]):
            x, at = m[near], idx[near]
            rows = near[0]
            at += (x > bounds[rows, at]).long() - (x <= bounds[rows, at - 1]).long()
            idx[near] = at
    if stride and r > 1:
        idx += torch.arange(0, r * stride, stride, dtype=idx.dtype, device=idx.device)[:, None]
    return idx


def _bin(values: torch.Tensor, bounds: torch.Tensor, uniform: tuple[float, float, bool] | None = None,
         inside: bool = False) -> torch.Tensor:
    """Counts [k + 4] of ``values`` (all finite when ``uniform`` is given, see _indices; ``inside`` too) against
    _thresholds: -Inf/NaN, under, the k bins, over, +Inf/NaN."""
    idx = _indices(values.reshape(1, -1), bounds[None], None if uniform is None else [uniform], inside=inside)
    return _count(idx.reshape(-1), len(bounds) + 1)


def _within(edges: np.ndarray, lo: float, hi: float) -> bool:
    """Whether values from ``lo`` to ``hi`` all lie from the first edge to below the last (see _indices' inside)."""
    return edges[0] <= lo and hi < edges[-1]


def _count(flat: torch.Tensor, total: int) -> torch.Tensor:
    """How many times each of 0 .. total - 1 occurs in ``flat``, on its device."""
    if flat.device.type == "cpu":
        return torch.bincount(flat, minlength=total)
    counts = torch.zeros(total, dtype=torch.long, device=flat.device)  # no sync, unlike bincount
    return counts.scatter_add_(0, flat.long(), torch.ones_like(flat, dtype=torch.long))


# norm(): one float32 dot up to _ONE_DOT values (rounding within 3e-5 relative), else dots over rows of _ROW values
# added in float64 (a batched matmul costs 0.1 ms more than one dot: worth it only for large tensors)
_ONE_DOT, _ROW = 1 << 20, 1 << 14


def norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a tensor as a float64 scalar on its device (see ``norm_value``)."""
    value = norm_value(t)
    return torch.tensor(value, dtype=torch.float64) if isinstance(value, float) else value


def norm_value(t: torch.Tensor) -> float | torch.Tensor:
    """The L2 norm of a tensor: a float where it is known at once (a CPU tensor of up to a million values), else a
    float64 scalar on its device, to be read with others (no sync for each).

    On CPU a float64 reduction is about 12x slower than a float32 one, so there the sum of squares is a float32
    BLAS dot, whose rounding grows with its length in some BLAS builds (a relative error of 2e-4 over 8 million
    values from 0 to 255 with OpenBLAS on AVX2): past a million values, dots over rows of 16,384 values (one
    batched matmul, about as fast as one dot there) whose sums are added in float64 (1e-5). Redone in float64
    only when it overflowed (a norm above ~1.8e19). Elsewhere, one float64 vector_norm: no copy to the CPU, no
    sync. Of a DTensor, the norm of this process's shard."""
    flat = local(t).detach().reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        if flat.numel() <= _ONE_DOT:
            squares = float(torch.dot(flat, flat))
            if squares < math.inf:
                return math.sqrt(squares)
        else:
            rows = flat.numel() // _ROW
            tail = flat[rows * _ROW:]
            block = flat[: rows * _ROW].view(rows, 1, _ROW)
            squares = torch.bmm(block, block.transpose(1, 2)).double().sum() + torch.dot(tail, tail).double()
            if torch.isfinite(squares):
                return squares.sqrt()
    return torch.linalg.vector_norm(flat, dtype=torch.float64)


def _channel_sums(x: torch.Tensor) -> torch.Tensor:
    """Sums over every dim but 1 (the channels). Of a contiguous tensor of 3 dims or more, each (item, channel)
    row is summed, then the items: memory read in order, about the cost of one flat sum (one reduction over dims
    0, 2, 3 strides through it and costs 1.4-1.7x that on CPU)."""
    if x.dim() >= 3 and x.is_contiguous():
        n, c = x.shape[:2]
        return x.view(n * c, -1).sum(1).view(n, c).sum(0)
    return x.sum(dim=[d for d in range(x.dim()) if d != 1])


def _take(m: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """The rows of ``m`` at these increasing indices: a view when they follow each other, else a copy."""
    if rows[-1] - rows[0] + 1 == len(rows):
        return m if len(rows) == len(m) else m[rows[0]:rows[-1] + 1]
    return m[rows]


def row_stats(row: list[float]) -> TensorStats:
    """The TensorStats of a row of ``StatsBatch.columns``' table (as a list of floats)."""
    numel, count, mean, m2, lo, hi, zeros, checked, nan, inf = row[:10]
    return TensorStats(int(numel), int(count), mean, m2, lo, hi, int(zeros), int(checked), int(nan), int(inf))


class _Group:
    """Flat copies of tensors of one size waiting to be summarised row by row (a clone is cheaper than copying into
    a row of a buffer: no view to make)."""

    def __init__(self, rows: int):
        self.rows = rows
        self.copies: list[torch.Tensor] = []
        self.slots: list[int] = []
        self.channels: list[tuple[int, torch.Size]] = []  # (row, shape) of the rows whose dead channels to count

    def full(self) -> bool:
        return len(self.slots) == self.rows


class StatsBatch:
    """Collects tensors during a pass; ``results()`` gives one (TensorStats, Histogram) per ``add``."""

    def __init__(self, bins: int = 64, small: int = 1 << 16, budget: int = 1 << 20, sample_size: int = 8192,
                 edges: dict | None = None, scratch: Scratch | None = None):
        self.bins, self.small, self.budget, self.sample_size = bins, small, budget, sample_size
        self._slots: list = []  # per add: None, or [numel, sums, row, counts, fixed-edges counts or None]: see results
        self._groups: dict[tuple, _Group] = {}
        # id(edges) -> (edges, checked copy, {(device, dtype): bounds}, _uniform of them); ``edges`` shares it
        # between batches (the sampled steps of a run bin on the same edges every time)
        self._edges: dict[int, tuple] = {} if edges is None else edges
        self._scratch = scratch or Scratch()  # shared too: a run's steps reuse the same buffers
        self.dead: dict[int, torch.Tensor] = {}  # slot -> channels holding only zeros (see ``add``), on the device
        self._counted: set[int] = set()  # slots whose dead channels ``flush`` counts

    def add(self, t: torch.Tensor, edges=None, channels: bool = False) -> int:
        """Queue ``t`` for summary; returns its slot in ``results()``. With ``edges`` (increasing float64
        edges), its histogram uses exactly those edges instead of equal bins over its own range. With
        ``channels`` (a ReLU's output, of 2 dims or more), ``dead[slot]`` counts the channels (dim 1) whose values
        are all 0 or less: the ReLU's dead units. Of a tensor of more than ``small`` elements (non-negative values)
        from its sums, taken per channel, at no extra pass; of a smaller one with the rest of its buffer, once the
        buffer is summarised (``flush``)."""
        slot = len(self._slots)
        x = _to_float(t)
        if x is None:
            self._slots.append(None)
        elif x.numel() <= self.small:
            # fixed edges: binned with the rest of its buffer (see _summarise), against these thresholds
            fixed = None if edges is None else [None, *self._bounds(x, edges)]
            self._slots.append([x.numel(), None, None, None, fixed])
            key = (x.device, x.dtype, x.numel())  # rows of one length, whatever the shapes: fewer groups, fewer ops
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(max(1, self.budget // x.numel()))
            # a widened x is a copy already; else a copy, as the tensor may change in place after this call
            copy = x if x.dtype != t.dtype else x.clone(memory_format=torch.contiguous_format)
            if channels and x.dim() >= 2:
                group.channels.append((len(group.slots), x.shape))
                self._counted.add(slot)
            group.copies.append(copy.reshape(-1))
            group.slots.append(slot)
            if group.full():
                self._summarise(self._groups.pop(key))
        else:
            self._slots.append(self._summarise_large(x, edges, slot if channels and x.dim() >= 2 else None))
        return slot

    def counts_dead(self, slot: int) -> bool:
        """Whether ``dead[slot]`` holds, or after ``flush`` will hold, the slot's dead channels (see ``add``)."""
        return slot in self.dead or slot in self._counted

    def flush(self) -> None:
        """Summarise the buffers not full yet (``results`` does it first)."""
        for group in self._groups.values():
            self._summarise(group)
        self._groups.clear()

    def _dead_rows(self, m: torch.Tensor, group: _Group) -> None:
        """The dead channels of the buffer's rows that asked for them: one reduction per shape among them."""
        by_shape: dict[torch.Size, list[int]] = {}
        for row, shape in group.channels:
            by_shape.setdefault(shape, []).append(row)
        for shape, rows in by_shape.items():
            part = _take(m, rows).view(len(rows), *shape)
            dead = (part.amax(dim=[d for d in range(1, part.dim()) if d != 2]) <= 0).sum(1)
            for row, count in zip(rows, dead):
                self.dead[group.slots[row]] = count
        group.channels.clear()

    def _bounds(self, values: torch.Tensor, edges) -> tuple[np.ndarray, torch.Tensor, tuple | None]:
        """The edges as checked float64, their _thresholds in the values' dtype on their device, and their
        _uniform spacing (cached)."""
        known = self._edges.get(id(edges))
        if known is None or known[0] is not edges:  # keeping ``edges`` referenced keeps its id unique
            checked = _check_edges(edges)
            known = self._edges[id(edges)] = (edges, checked, {}, _uniform(checked))
        bounds = known[2].get((values.device, values.dtype))
        if bounds is None:
            bounds = torch.from_numpy(_thresholds(known[1], values.dtype)).to(values.device)
            known[2][values.device, values.dtype] = bounds
        return known[1], bounds, known[3]

    def _fixed(self, values: torch.Tensor, edges, span: tuple[float, float] | None = None
               ) -> tuple[torch.Tensor, np.ndarray, int]:
        """Counts of finite ``values`` on fixed edges (on the device, see _bin) as the one row of a [1, k + 4]
        tensor, the edges as float64, and that row's number, 0 (as a buffer's rows are kept, see _bin_rows).
        ``span``: (min, max) known to hold every value."""
        checked, bounds, uniform = self._bounds(values, edges)
        inside = span is not None and _within(checked, *span)
        return _bin(values, bounds, uniform, inside)[None], checked, 0

    def _bin_rows(self, m: torch.Tensor, slots: list[int], finite: list[bool], lows: list[float],
                  highs: list[float]) -> None:
        """The fixed-edges histograms of a buffer's rows: one search (see _indices) and one count for all rows
        whose edges have the same number of bins, arithmetic when their edges are uniform and values finite (the
        rows' ranges, ``lows`` and ``highs``, tell whether all are inside their edges)."""
        by_size: dict[int, list[int]] = {}
        for i, slot in enumerate(slots):
            fixed = self._slots[slot][4]
            if fixed is not None:
                by_size.setdefault(fixed[2].shape[0], []).append(i)
        for size, rows in by_size.items():
            fixed = [self._slots[slots[i]][4] for i in rows]
            bounds = torch.stack([f[2] for f in fixed])
            uniform = [f[3] for f in fixed]
            if any(u is None for u in uniform) or not all(finite[i] for i in rows):
                uniform = None
            inside = uniform is not None and all(_within(f[1], lows[i], highs[i]) for i, f in zip(rows, fixed))
            idx = _indices(_take(m, rows), bounds, uniform, self._scratch, size + 1, inside)
            counts = _count(idx.reshape(-1), len(rows) * (size + 1)).view(len(rows), size + 1)
            for row, (i, f) in enumerate(zip(rows, fixed)):
                self._slots[slots[i]][4] = (counts, f[1], row)  # its row of the counts, no view per row

    def _summarise(self, group: _Group) -> None:
        """Rows of finite values at once; rows near float32's limits (see _WIDE) in float64; rows holding NaN
        or Inf one by one. One copy to the CPU (which rows are which) besides the results."""
        first = group.copies[0]
        m = self._scratch.get("rows", (len(group.copies), first.numel()), first.dtype, first.device)
        m = torch.stack(group.copies, out=m)
        group.copies.clear()
        if group.channels:
            self._dead_rows(m, group)
        mn, mx = m.amin(1), m.amax(1)
        lows, highs = torch.stack([mn, mx]).tolist()
        finite = [math.isfinite(lo) and math.isfinite(hi) for lo, hi in zip(lows, highs)]
        if m.dtype == torch.float32:
            wide = [ok and _wide(lo, hi) for ok, lo, hi in zip(finite, lows, highs)]
        else:
            wide = [False] * len(m)
        self._bin_rows(m, group.slots, finite, lows, highs)
        own = [self._slots[slot][4] is None for slot in group.slots]  # rows binned on their own range
        for narrow in (True, False):
            good = [i for i, (ok, w) in enumerate(zip(finite, wide)) if ok and w != narrow]
            if not good:
                continue
            everything = len(good) == len(finite)
            rows = _take(m, good)
            span = (mn, mx) if everything and narrow else None
            sums, counts = _rows(rows if narrow else rows.double(), self.bins, span, any(own[i] for i in good),
                                 self._scratch)
            for row, i in enumerate(good):
                self._slots[group.slots[i]][1:4] = [sums, (row, lows[i], highs[i]), counts]
        for i, ok in enumerate(finite):
            if not ok:
                known, counts = _with_non_finite(m[i], self.bins)
                self._slots[group.slots[i]][1:4] = [None, known, counts]

    def _passes(self, flat: torch.Tensor, per_channel: torch.Tensor | None = None) -> tuple[list[float], torch.Tensor]:
        """The three passes (aminmax, sum, dot; the sum given as ``per_channel`` sums) and the zeros of an evenly
        strided sample, copied to the CPU at once (NaN/Inf show up in the range); and the sample."""
        step = max(1, flat.numel() // self.sample_size) | 1  # odd stride: avoids lining up with power-of-two dims
        sample = flat[::step][: self.sample_size]
        total = flat.sum() if per_channel is None else per_channel.sum()
        lo, hi = torch.aminmax(flat)
        root = norm_value(flat)  # on the CPU, a float at once (up to a million values)
        # in the values' own dtype (the sample's zeros too: at most sample_size), one conversion for all of them
        sums = torch.stack([lo, hi, total, (sample == 0).sum().to(flat.dtype)])
        if isinstance(root, float):
            lo, hi, total, zeros = sums.tolist()
        else:
            lo, hi, total, zeros, root = torch.cat([sums.double(), root.reshape(1)]).tolist()
        return [lo, hi, total, root, zeros], sample

    def _summarise_large(self, x: torch.Tensor, edges, dead_slot: int | None = None) -> list:
        """Three passes over the tensor (aminmax, sum, dot; two more, rarely, see below) and a few small ops
        on a strided sample; one copy to the CPU. ``dead_slot``: sum per channel, count the all-zero ones there."""
        n = x.numel()
        flat = x.reshape(-1)
        per_channel = None
        if dead_slot is not None:
            per_channel = _channel_sums(x)
            self.dead[dead_slot] = (per_channel == 0).sum()  # non-negative values: a sum of 0 is all zeros
        (lo, hi, total, root, zeros), sample = self._passes(flat, per_channel)
        nan = inf = 0
        if not (math.isfinite(lo) and math.isfinite(hi)):  # the rare, slower path
            nan, inf = torch.stack([torch.isnan(flat).sum(), torch.isinf(flat).sum()]).tolist()
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                known = dict(count=0, mean=0.0, m2=0.0, min=0.0, max=0.0, zeros=0, checked=0, nan_count=nan,
                             inf_count=inf, lo=-0.5, hi=0.5, binned=0)
                counts = torch.zeros(self.bins, dtype=torch.long, device=x.device)
                return [n, None, known, counts, None if edges is None else self._fixed(flat, edges)]
            (lo, hi, total, root, zeros), sample = self._passes(flat)
        if flat.dtype == torch.float32 and _wide(lo, hi):  # the rare, slower path: sums in float64
            flat = flat.double()
            total, root = torch.stack([flat.sum(), norm(flat)]).tolist()
        m = flat.numel()
        shift, squares = 0.0, root * root
        if 0 < squares < math.inf and math.isfinite(total) and squares - total * total / m <= squares / 4:
            # Most of the sum of squares is the mean's (a mean above about 1.7 std, or a constant): its
            # rounding would swamp M2. Sum again around the mean rounded to the dtype, for such tensors only.
            shift = torch.tensor(total / m, dtype=flat.dtype).item()
        if shift:  # squared in place and summed pairwise: more exact than a dot, and this buffer is ours
            shifted = flat - shift
            total = shifted.sum()
            total, squares = torch.stack([total.double(), shifted.square_().sum().double()]).tolist()
        left, right = (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)
        if edges is None and hi > lo:  # the sample binned in float64 as numpy places values (before its corrections)
            place = sample.double().sub_(lo).div_(hi - lo).mul_(self.bins).clamp_(0, self.bins - 1)
            counts, fixed = _count(place.to(torch.int32), self.bins), None
        elif edges is None:  # all equal: numpy's answer, as _flat_counts
            counts, fixed = torch.zeros(self.bins, device=x.device), None
            counts[self.bins // 2] = sample.numel()
        else:
            counts, fixed = None, self._fixed(sample, edges, (lo, hi))
        known = dict(count=m, mean=shift + total / m, m2=max(squares - total * total / m, 0.0), min=lo, max=hi,
                     zeros=zeros, checked=sample.numel(), nan_count=nan, inf_count=inf, lo=left, hi=right,
                     binned=sample.numel())
        return [n, None, known, counts, fixed]

    def _fixed_on_cpu(self) -> list[tuple[list[int], np.ndarray]]:
        """Every fixed-edges histogram on the CPU, one copy per device and number of bins: [(slots, their counts as
        the rows of an int64 array)]. A slot holds (counts [rows, k + 4], edges, its row of them)."""
        groups: dict[tuple, list[int]] = {}
        for i, slot in enumerate(self._slots):
            if slot is not None and slot[4] is not None:
                groups.setdefault((slot[4][0].device, slot[4][0].shape[1]), []).append(i)
        out = []
        for slots in groups.values():
            first: dict[int, int] = {}  # id(counts) -> where its rows start among the parts
            parts, rows, total = [], [], 0
            for i in slots:
                counts, _, row = self._slots[i][4]
                start = first.get(id(counts))
                if start is None:
                    start = first[id(counts)] = total
                    parts.append(counts)
                    total += len(counts)
                rows.append(start + row)
            out.append((slots, torch.cat(parts).cpu().numpy().astype(np.int64)[rows]))
        return out

    def columns(self) -> tuple[np.ndarray, dict[int, np.ndarray], dict[int, tuple[np.ndarray, np.ndarray]]]:
        """Every summary moved to the CPU (one copy per buffer, per large tensor's histogram, and per device and
        number of bins for the fixed-edges histograms) as numbers: a [slots, len(COLUMNS)] float64 table (NaN for a
        slot without a summary), the counts of each histogram on its own range by slot, and the counts (-Inf/NaN,
        under, the bins, over, +Inf/NaN) and checked edges of each on fixed edges by slot."""
        self.flush()
        table = np.full((len(self._slots), len(COLUMNS)), np.nan)
        fixed: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        for slots, counts in self._fixed_on_cpu():
            table[slots, _SAMPLED:] = np.column_stack([counts[:, 1:-1].sum(1), counts[:, 1], counts[:, -2]])
            fixed.update(zip(slots, zip(counts, (self._slots[i][4][1] for i in slots))))
        own: dict[int, np.ndarray] = {}
        on_cpu: dict[int, np.ndarray] = {}  # counts as int64 arrays of numpy's own (records keep them, not the tensor)
        known: list[tuple[int, list]] = []  # (slot, its row): large tensors and tensors holding NaN/Inf
        buffers: dict[int, tuple[torch.Tensor, list]] = {}  # id(sums) -> (sums, [(slot, numel, row, min, max)])
        for i, slot in enumerate(self._slots):
            if slot is None:
                continue
            numel, sums, row, counts, edges = slot
            whole = type(row) is dict  # all known already but the histogram
            if whole:
                known.append((i, [numel, *(row[k] for k in _FIELDS)]))
            else:  # a row of a buffer: (its row in the sums, min, max)
                buffer = buffers.get(id(sums))
                if buffer is None:
                    buffer = buffers[id(sums)] = (sums, [])
                buffer[1].append((i, numel, *row))
            if edges is None:
                got = on_cpu.get(id(counts))
                if got is None:
                    got = on_cpu[id(counts)] = counts.cpu().numpy().astype(np.int64)
                own[i] = got if whole else got[row[0]]
        if known:
            slots, rows = zip(*known)
            table[list(slots), :_SAMPLED] = rows
        if buffers:  # every buffer's rows summarised at once
            rows = [row for _, rows in buffers.values() for row in rows]
            sums = np.concatenate([sums.cpu().numpy()[[row[2] for row in rows]] for sums, rows in buffers.values()])
            slots, numel, _, lo, hi = (np.array(column) for column in zip(*rows))
            table[slots, 0] = numel
            table[slots, _SUMMARY] = _summary(numel.astype(np.float64), sums, lo, hi)
        if own:
            slots = np.fromiter(own, dtype=np.int64, count=len(own))
            table[slots, _SAMPLED] = table[slots, _SAMPLED - 1]  # sampled: all it binned ("binned"), none outside
            table[slots, _SAMPLED + 1:] = 0
        return table, own, fixed

    def results(self) -> list[tuple[TensorStats, Histogram] | None]:
        """One (TensorStats, Histogram) per ``add``, None for a tensor without a summary (see ``columns``)."""
        table, own, fixed = self.columns()
        out: list = []
        # Equal numbers as one object: a row's numel, count, checked and binned are mostly one number, its
        # histogram's ends its min and max (records of thousands of modules: ~130 bytes each)
        ints: dict[int, int] = {}

        def one(value: float) -> int:
            number = int(value)
            return ints.setdefault(number, number)

        for i, (slot, row) in enumerate(zip(self._slots, table.tolist())):
            if slot is None:
                out.append(None)
                continue
            numel, count, mean, m2, lo, hi, zeros, checked, nan, inf, left, right, binned, sampled, under, over = row
            numel = one(numel)  # as row_stats, without a slice per slot
            stats = TensorStats(numel, one(count), mean, m2, lo, hi, int(zeros), one(checked), int(nan), int(inf))
            if i in own:
                left, right = lo if left == lo else left, hi if right == hi else right
                out.append((stats, Histogram.own(own[i], left, right, one(binned), numel)))
            else:
                counts, edges = fixed[i]
                out.append((stats, Histogram(counts=counts[2:-2], edges=edges, sampled=one(sampled), numel=numel,
                                             under=int(under), over=int(over))))
        return out

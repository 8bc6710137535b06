"""Summaries of tensors computed where the tensors live, keeping only small results.

Tensors of up to ``small`` elements are copied into a row of a buffer shared with tensors of the same
size, and each full buffer is summarised at once by row-wise reductions: a few ops for many tensors,
exactly (every element counts, the histogram too). Larger tensors are summarised on the spot in three
passes (aminmax, sum, dot) with the histogram and the share of zeros read off a bounded, evenly
strided sample of their elements. Reductions accumulate in the tensor's own dtype (float64 is about
12x slower on CPU); nothing is copied to the CPU until ``results()``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

_FIELDS = ("mean", "std", "min", "max", "zero_fraction", "nan_count", "inf_count", "lo", "hi", "binned")


@dataclass(frozen=True)
class TensorStats:
    """Statistics of one tensor. mean/std/min/max/zero_fraction are over its finite values; std is
    the population std (numpy's default, ddof=0). ``exact`` is False when zero_fraction was read off a
    sample of the elements rather than all of them."""

    numel: int
    mean: float
    std: float
    min: float
    max: float
    zero_fraction: float
    nan_count: int
    inf_count: int
    exact: bool = True

    @property
    def finite(self) -> bool:
        return self.nan_count == 0 and self.inf_count == 0


@dataclass(frozen=True, eq=False)
class Histogram:
    """Counts of finite values in equal bins between ``edges[0]`` and ``edges[-1]``.

    ``sampled`` is how many elements were binned: all finite elements of small tensors, an evenly
    strided sample (less any non-finite elements) of large ones."""

    counts: np.ndarray
    edges: np.ndarray
    sampled: int
    numel: int


def _to_float(t: torch.Tensor) -> torch.Tensor | None:
    if t.is_complex() or t.is_meta or t.numel() == 0:
        return None
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _range(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram range: [min, max], widened by 0.5 either side when all values are equal (numpy's rule)."""
    flat = mx <= mn
    return torch.where(flat, mn - 0.5, mn), torch.where(flat, mx + 0.5, mx)


def _rows(m: torch.Tensor, bins: int, span: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact summaries of each row of ``m`` [k, n] (all values finite): a [k, 10] float64 vector per
    row in the order of _FIELDS, and [k, bins] histogram counts. ``span`` = (min, max) [k] tensors
    sets the histogram range instead of the rows' own range."""
    k, n = m.shape
    mn, mx = torch.aminmax(m, dim=1) if span is None else span
    mean = m.sum(1).double() / n
    sumsq = (m * m).sum(1).double()
    std = (sumsq / n - mean * mean).clamp_min(0).sqrt()
    zeros = (m == 0).sum(1).double() / n
    lo, hi = _range(mn, mx)
    scale = bins / (hi - lo)
    idx = ((m - lo[:, None]) * scale[:, None]).long().clamp_(0, bins - 1)
    idx += torch.arange(0, k * bins, bins, device=m.device)[:, None]
    counts = torch.bincount(idx.view(-1), minlength=k * bins).view(k, bins)
    none = torch.zeros_like(mean)
    vec = torch.stack([mean, std, mn.double(), mx.double(), zeros, none, none, lo.double(), hi.double(),
                       none + n], dim=1)
    return vec, counts


def _with_non_finite(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """_rows for one flat tensor holding NaN/Inf: summarise its finite values, count the others."""
    finite = x[torch.isfinite(x)]
    if finite.numel():
        vec, counts = _rows(finite[None], bins)
        vec, counts = vec[0].clone(), counts[0]
    else:
        vec = torch.tensor([0, 0, 0, 0, 0, 0, 0, -0.5, 0.5, 0], dtype=torch.float64, device=x.device)
        counts = torch.zeros(bins, dtype=torch.long, device=x.device)
    vec[5], vec[6] = torch.isnan(x).sum(), torch.isinf(x).sum()
    return vec, counts


def norm(t: torch.Tensor) -> torch.Tensor:
    """The L2 norm of a tensor as a float64 scalar on its device.

    On CPU a float64 reduction is about 12x slower than a float32 one, so there the sum of squares is a
    float32 BLAS dot (about 10x more accurate than float32 vector_norm), redone in float64 only when it
    overflowed (a norm above ~1.8e19). Elsewhere, one float64 vector_norm: no copy to the CPU, no sync."""
    flat = t.detach().reshape(-1)
    if flat.device.type == "cpu" and flat.dtype in (torch.float32, torch.float64):
        squares = torch.dot(flat, flat)
        if torch.isfinite(squares):
            return squares.double().sqrt()
    return torch.linalg.vector_norm(flat, dtype=torch.float64)


class _Group:
    """A buffer of same-size flattened tensors waiting to be summarised row by row."""

    def __init__(self, rows: int, numel: int, like: torch.Tensor):
        self.buffer = torch.empty(rows, numel, dtype=like.dtype, device=like.device)
        self.slots: list[int] = []

    def full(self) -> bool:
        return len(self.slots) == self.buffer.shape[0]


class StatsBatch:
    """Collects tensors during a pass; ``results()`` gives one (TensorStats, Histogram) per ``add``."""

    def __init__(self, bins: int = 64, small: int = 1 << 16, budget: int = 1 << 20, sample_size: int = 8192):
        self.bins, self.small, self.budget, self.sample_size = bins, small, budget, sample_size
        self._slots: list = []  # per add: None, or [numel, exact, vec, row, counts]
        self._groups: dict[tuple, _Group] = {}

    def add(self, t: torch.Tensor) -> int:
        slot = len(self._slots)
        x = _to_float(t)
        if x is None:
            self._slots.append(None)
        elif x.numel() <= self.small:
            self._slots.append([x.numel(), True, None, None, None])
            key = (x.device, x.dtype, x.numel())
            group = self._groups.get(key)
            if group is None:
                group = self._groups[key] = _Group(max(1, self.budget // x.numel()), x.numel(), x)
            group.buffer[len(group.slots)].copy_(x.reshape(-1))
            group.slots.append(slot)
            if group.full():
                self._summarise(self._groups.pop(key))
        else:
            self._slots.append(self._summarise_large(x))
        return slot

    def _summarise(self, group: _Group) -> None:
        m = group.buffer[: len(group.slots)]
        mn, mx = torch.aminmax(m, dim=1)
        finite = torch.isfinite(mn + mx).tolist()
        good = [i for i, ok in enumerate(finite) if ok]
        if good:
            rows = m if len(good) == len(finite) else m[good]
            vec, counts = _rows(rows, self.bins, None if len(good) < len(finite) else (mn, mx))
            for row, i in enumerate(good):
                self._slots[group.slots[i]][2:] = [vec, row, counts]
        for i, ok in enumerate(finite):
            if not ok:
                vec, counts = _with_non_finite(m[i], self.bins)
                self._slots[group.slots[i]][2:] = [vec, None, counts]

    def _summarise_large(self, x: torch.Tensor) -> list:
        """Three passes over the tensor (aminmax, sum, dot) and a few small ops on a strided sample."""
        n = x.numel()
        flat = x.reshape(-1)
        lo, hi = torch.stack(torch.aminmax(flat)).tolist()  # one copy to the CPU; NaN/Inf show up in it
        nan = inf = 0
        if not (math.isfinite(lo) and math.isfinite(hi)):  # the rare, slower path
            nan, inf = torch.stack([torch.isnan(flat).sum(), torch.isinf(flat).sum()]).tolist()
            flat = flat[torch.isfinite(flat)]
            if flat.numel() == 0:
                vec, counts = _with_non_finite(x.reshape(-1)[:1], self.bins)
                vec[5], vec[6] = nan, inf
                return [n, True, vec, None, counts]
            lo, hi = torch.stack(torch.aminmax(flat)).tolist()
        m = flat.numel()
        step = max(1, m // self.sample_size) | 1  # odd stride: avoids lining up with power-of-two dims
        sample = flat[::step][: self.sample_size]
        left, right = (lo - 0.5, hi + 0.5) if hi <= lo else (lo, hi)
        counts = torch.histc(sample, self.bins, left, right)
        sums = torch.stack([flat.sum().double(), norm(flat) ** 2, (sample == 0).sum().double()])
        known = dict(n=m, min=lo, max=hi, nan=nan, inf=inf, lo=left, hi=right, binned=sample.numel())
        return [n, m <= self.sample_size, sums, known, counts]

    def results(self) -> list[tuple[TensorStats, Histogram] | None]:
        """Move every summary to the CPU (one copy per buffer) and build the records."""
        for group in self._groups.values():
            self._summarise(group)
        self._groups.clear()
        on_cpu: dict[int, np.ndarray] = {}

        def cpu(t: torch.Tensor, row: int | None) -> np.ndarray:
            if id(t) not in on_cpu:
                on_cpu[id(t)] = t.cpu().numpy()
            return on_cpu[id(t)] if row is None else on_cpu[id(t)][row]

        out = []
        for slot in self._slots:
            if slot is None:
                out.append(None)
                continue
            numel, exact, vec, row, counts = slot
            if isinstance(row, dict):  # a large tensor: sums on the device, the rest known already
                f, (total, sumsq, zeros) = row, cpu(vec, None).tolist()
                mean = total / f["n"]
                f.update(mean=mean, std=math.sqrt(max(sumsq / f["n"] - mean * mean, 0.0)),
                         zero_fraction=zeros / f["binned"], nan_count=f["nan"], inf_count=f["inf"])
                row = None
            else:
                f = dict(zip(_FIELDS, cpu(vec, row).tolist()))
            stats = TensorStats(numel=numel, mean=f["mean"], std=f["std"], min=f["min"], max=f["max"],
                                zero_fraction=f["zero_fraction"], nan_count=int(f["nan_count"]),
                                inf_count=int(f["inf_count"]), exact=exact)
            edges = np.linspace(f["lo"], f["hi"], self.bins + 1)
            hist = Histogram(counts=cpu(counts, row).astype(np.int64), edges=edges, sampled=int(f["binned"]),
                             numel=numel)
            out.append((stats, hist))
        return out

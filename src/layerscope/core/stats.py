"""Summaries of tensors computed where the tensors live, keeping only small results.

Tensors of up to ``small`` elements are copied into a pending batch and summarised together, a few
vectorised ops for many tensors, exactly (every element counts, including the histogram). Larger
tensors are summarised at once, in a handful of passes (aminmax, sum, vector norm) with the histogram
and the share of zeros read off a bounded, evenly strided sample of their elements.
"""

from __future__ import annotations

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

    ``sampled`` is how many elements were binned: all finite elements for small tensors, an evenly
    strided sample of at most ``sample_size`` elements (less any non-finite ones) for large ones."""

    counts: np.ndarray
    edges: np.ndarray
    sampled: int
    numel: int


def _to_float(t: torch.Tensor) -> torch.Tensor | None:
    if t.is_complex() or t.is_meta or t.numel() == 0:
        return None
    t = t.detach()
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _sample(x: torch.Tensor, size: int) -> torch.Tensor:
    flat = x.reshape(-1)
    step = max(1, flat.numel() // size) | 1  # odd stride: avoids lining up with power-of-two dims
    return flat[::step][:size]


def _bin_index(values: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    return ((values - lo) * (bins / (hi - lo))).long().clamp_(0, bins - 1)


def _range(mn: torch.Tensor, mx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Histogram range: [min, max], widened by 0.5 either side when all values are equal (numpy's rule)."""
    flat = mx <= mn
    return torch.where(flat, mn - 0.5, mn), torch.where(flat, mx + 0.5, mx)


class StatsBatch:
    """Collects tensors during a pass; ``results()`` gives one (TensorStats, Histogram) per ``add``."""

    def __init__(self, bins: int = 64, small: int = 1 << 16, budget: int = 1 << 21, sample_size: int = 8192):
        self.bins, self.small, self.budget, self.sample_size = bins, small, budget, sample_size
        self._slots: list = []  # per add: None, or (numel, exact, vec_tensor, row, counts_tensor)
        self._pending: dict[torch.device, list[tuple[int, torch.Tensor]]] = {}
        self._pending_numel = 0

    def add(self, t: torch.Tensor) -> int:
        slot = len(self._slots)
        x = _to_float(t)
        if x is None:
            self._slots.append(None)
        elif x.numel() <= self.small:
            self._slots.append((x.numel(), True))
            self._pending.setdefault(x.device, []).append((slot, x.reshape(-1).to(torch.float64, copy=True)))
            self._pending_numel += x.numel()
            if self._pending_numel > self.budget:
                self._flush()
        else:
            self._slots.append(self._summarise_large(x))
        return slot

    def _summarise_large(self, x: torch.Tensor) -> tuple:
        n = x.numel()
        mn, mx = torch.aminmax(x)
        if not bool(torch.isfinite(mn + mx)):  # NaN/Inf present: the rare, slower path
            finite = torch.isfinite(x)
            nan, inf = torch.isnan(x).sum(), torch.isinf(x).sum()
            x = x[finite]
            if x.numel() == 0:
                zero = torch.zeros((), dtype=torch.float64, device=x.device)
                vec = torch.stack([zero] * 5 + [nan.double(), inf.double(), zero, zero + 1, zero])
                return (n, True, vec, None, torch.zeros(self.bins, dtype=torch.long, device=x.device))
            mn, mx = torch.aminmax(x)
        else:
            nan = inf = torch.zeros((), dtype=torch.float64, device=x.device)
        m = x.numel()
        total = x.sum(dtype=torch.float64)
        sumsq = torch.linalg.vector_norm(x, dtype=torch.float64) ** 2
        mean = total / m
        std = (sumsq / m - mean * mean).clamp_min(0).sqrt()
        lo, hi = _range(mn.double(), mx.double())
        sample = _sample(x, self.sample_size)
        counts = torch.bincount(_bin_index(sample.double(), lo, hi, self.bins), minlength=self.bins)
        zero_frac = (sample == 0).sum() / sample.numel()
        binned = torch.tensor(float(sample.numel()), dtype=torch.float64, device=x.device)
        vec = torch.stack([mean, std, mn.double(), mx.double(), zero_frac.double(), nan.double(), inf.double(),
                           lo, hi, binned])
        return (n, m <= self.sample_size, vec, None, counts)

    def _flush(self) -> None:
        for device, items in self._pending.items():
            slots = [s for s, _ in items]
            sizes = torch.tensor([v.numel() for _, v in items], device=device)
            flat = torch.cat([v for _, v in items])
            k, bins = len(items), self.bins
            seg = torch.repeat_interleave(torch.arange(k, device=device), sizes)
            finite = torch.isfinite(flat)
            nan = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, seg, torch.isnan(flat).double())
            inf = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, seg, torch.isinf(flat).double())
            cnt = sizes.double() - nan - inf
            vals = torch.where(finite, flat, 0.0)
            mean = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, seg, vals) / cnt.clamp_min(1)
            dev = torch.where(finite, flat - mean[seg], 0.0)
            var = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, seg, dev * dev) / cnt.clamp_min(1)
            big = torch.finfo(torch.float64).max
            mn = torch.full((k,), big, dtype=torch.float64, device=device).scatter_reduce_(
                0, seg, torch.where(finite, flat, big), "amin")
            mx = torch.full((k,), -big, dtype=torch.float64, device=device).scatter_reduce_(
                0, seg, torch.where(finite, flat, -big), "amax")
            none_finite = cnt == 0
            mn, mx = torch.where(none_finite, 0.0, mn), torch.where(none_finite, 0.0, mx)
            zeros = torch.zeros(k, dtype=torch.float64, device=device).index_add_(0, seg, (flat == 0).double())
            lo, hi = _range(mn, mx)
            idx = torch.where(finite, _bin_index(vals, lo[seg], hi[seg], bins), bins)  # non-finite: spill bin
            counts = torch.bincount(seg * (bins + 1) + idx, minlength=k * (bins + 1)).view(k, bins + 1)[:, :bins]
            vec = torch.stack([mean, var.sqrt(), mn, mx, zeros / cnt.clamp_min(1), nan, inf, lo, hi, cnt], dim=1)
            for row, slot in enumerate(slots):
                numel, exact = self._slots[slot]
                self._slots[slot] = (numel, exact, vec, row, counts)
        self._pending.clear()
        self._pending_numel = 0

    def results(self) -> list[tuple[TensorStats, Histogram] | None]:
        """Move every summary to the CPU (one copy per batch of vectors) and build the records."""
        self._flush()
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
            f = dict(zip(_FIELDS, cpu(vec, row).tolist()))
            stats = TensorStats(numel=numel, mean=f["mean"], std=f["std"], min=f["min"], max=f["max"],
                                zero_fraction=f["zero_fraction"], nan_count=int(f["nan_count"]),
                                inf_count=int(f["inf_count"]), exact=exact)
            hist = Histogram(counts=cpu(counts, row).copy(), edges=np.linspace(f["lo"], f["hi"], self.bins + 1),
                             sampled=int(f["binned"]), numel=numel)
            out.append((stats, hist))
        return out

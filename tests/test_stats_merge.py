"""Merged statistics equal the statistics of the whole, checked against float64 numpy.

Each case cuts a random tensor into parts at random points (empty parts included; NaN/Inf in some, one part
all NaN in some), summarises every part with StatsBatch (parts of up to 65,536 elements on the exact batched
path, larger ones on the sampled per-tensor path) and merges the parts' stats and histograms.

Tolerances against numpy's float64 stats of the whole: numel, count, NaN/Inf counts, min and max exact; for
float32 (and float16) inputs the mean within 1e-5 x (|mean| + std) and std and M2 within a relative 1e-5 (2e-5
for M2) (seen: 2e-6 at worst, from float32 sums of squares of large tensors); for float64 inputs 1e-12 (seen: 1e-14).
Zeros and checked are exact: over all finite values of a small part, over the documented strided sample of a
large one. Histograms on shared fixed edges are exact: np.histogram of the binned values, which for small
parts are all the finite values of the whole.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch

from layerscope.core.stats import Histogram, StatsBatch, TensorStats

SMALL = 1 << 16  # StatsBatch's default: parts up to this size are summarised exactly
SAMPLE = 8192  # StatsBatch's default sample size for larger parts


def _tolerance(dtype) -> float:
    return 1e-12 if dtype == np.float64 else 1e-5


def _binned(part: np.ndarray) -> np.ndarray:
    """The values StatsBatch looks at for zeros and bins: every finite value of a small part, an evenly
    strided sample (odd stride, at most SAMPLE values) of the finite values of a large one."""
    finite = part.reshape(-1)[np.isfinite(part.reshape(-1))]
    if part.size <= SMALL:
        return finite
    step = max(1, finite.size // SAMPLE) | 1
    return finite[::step][:SAMPLE]


def _assert_stats(stats: TensorStats, x: np.ndarray, tol: float) -> None:
    """``stats`` against numpy's float64 statistics of ``x`` (every finite value)."""
    a = x.astype(np.float64).reshape(-1)
    finite = a[np.isfinite(a)]
    assert stats.numel == a.size and stats.count == finite.size
    assert stats.nan_count == np.isnan(a).sum() and stats.inf_count == np.isinf(a).sum()
    assert stats.finite == (finite.size == a.size)
    if finite.size == 0:
        assert (stats.mean, stats.m2, stats.std, stats.min, stats.max) == (0, 0, 0, 0, 0)
        return
    mean, std = finite.mean(), finite.std()
    assert stats.min == finite.min() and stats.max == finite.max()
    scale = abs(mean) + std
    assert abs(stats.mean - mean) <= tol * scale, (stats.mean, mean)
    spread = max(std, 1e-2 * tol * scale)  # a constant's std is 0: then within float rounding of the values
    assert abs(stats.std - std) <= tol * spread, (stats.std, std)
    assert abs(stats.m2 - std * std * finite.size) <= 2 * tol * spread**2 * finite.size, (stats.m2, std)


def _data(rng: np.random.Generator, n: int, kind: str, dtype) -> np.ndarray:
    if kind == "normal":
        x = rng.normal(size=n) * rng.choice([1e-3, 1.0, 40.0]) + rng.choice([0.0, 0.5, -2.0])
    elif kind == "far":  # a mean hundreds of stds from zero: rounding in sums of squares would show
        x = 300 + 0.01 * rng.normal(size=n)
    elif kind == "relu":
        x = np.maximum(rng.normal(size=n) + 0.2, 0)
    elif kind == "sparse":
        x = rng.normal(size=n) * (rng.random(n) < 0.7)
    elif kind == "integers":  # ties, exact zeros, values on integer edges
        x = rng.integers(-3, 4, size=n).astype(np.float64)
    else:
        x = np.full(n, 2.5)
    return x.astype(dtype)


def _edges(rng: np.random.Generator, x: np.ndarray, kind: str) -> np.ndarray:
    """Unevenly spaced edges over part of the data's range, so that some values fall under and over."""
    finite = x[np.isfinite(x)].astype(np.float64)
    if kind == "integers":
        edges = np.unique(rng.integers(-3, 4, size=int(rng.integers(2, 8))).astype(np.float64))
    else:
        lo, hi = np.quantile(finite, [0.03, 0.97]) if finite.size else (-1.0, 1.0)
        edges = np.unique(rng.uniform(lo, hi, size=int(rng.integers(2, 40))))
    if len(edges) < 2:
        edges = np.array([edges[0] - 1, edges[0] + 0.5]) if len(edges) else np.array([-1.0, 1.0])
    return edges


def _case(seed: int):
    """A random tensor (numpy, float64 reference values in the tensor's dtype) and its parts."""
    rng = np.random.default_rng(seed)
    dtype = np.float64 if seed % 5 == 0 else np.float16 if seed % 7 == 3 else np.float32
    kind = ["normal", "far", "relu", "sparse", "integers", "normal", "constant"][seed % 7]
    large = seed % 2 == 0  # half of the cases are big enough for parts on the per-tensor path
    n = int(rng.integers(70_000, 600_000)) if large else int(rng.integers(1, 60_000))
    x = _data(rng, n, kind if dtype != np.float16 or kind != "far" else "normal", dtype)
    if seed % 3 != 1:  # NaN and Inf scattered about
        rate = rng.choice([1e-4, 0.01, 0.2])
        for value in (np.nan, np.inf, -np.inf):
            x[rng.random(n) < rate] = value
    cuts = np.sort(rng.integers(0, n + 1, size=int(rng.integers(1, 6))))
    if rng.random() < 0.5:
        cuts = np.sort(np.append(cuts, cuts[0]))  # a repeated cut: an empty part
    parts = np.split(x, cuts)
    if seed % 3 == 2:  # one part all NaN (small or large)
        parts.insert(int(rng.integers(0, len(parts) + 1)), np.full(int(rng.choice([1, 300, 80_000])), np.nan, dtype))
    if seed % 4 == 1 and parts[0].size % 4 == 0 and parts[0].size:  # a part with a shape, not just a row
        parts[0] = parts[0].reshape(2, 2, -1)
    return rng, kind, dtype, parts


def _summarise(parts, edges=None, **kw):
    batch = StatsBatch(bins=16, **kw)
    slots = [batch.add(torch.from_numpy(p), edges) for p in parts]
    results = batch.results()
    out = []
    for slot, p in zip(slots, parts):
        if p.size == 0:
            assert results[slot] is None  # nothing to summarise: an empty part merges as TensorStats.of([])
            empty = np.zeros(0 if edges is None else len(edges) - 1, dtype=np.int64)
            out.append((TensorStats.of(p), Histogram(empty, edges, 0, 0)))
        else:
            out.append(results[slot])
    return out


@pytest.mark.parametrize("seed", range(96))
def test_merged_parts_equal_the_whole(seed):
    rng, kind, dtype, parts = _case(seed)
    whole = np.concatenate([p.reshape(-1) for p in parts])
    fixed = seed % 3 != 0
    edges = _edges(rng, whole, kind) if fixed else None
    summaries = _summarise(parts, edges)
    tol = _tolerance(dtype)
    for (stats, hist), p in zip(summaries, parts):
        _assert_stats(stats, p, tol)
        binned = _binned(p)
        assert stats.checked == binned.size and stats.zeros == (binned == 0).sum()
        assert stats.exact == (binned.size == stats.count)
        assert hist.sampled == binned.size and hist.numel == p.size
    merged = functools.reduce(TensorStats.merge, [s for s, _ in summaries])
    _assert_stats(merged, whole, tol)
    assert merged.exact == all(s.exact for s, _ in summaries)
    binned = np.concatenate([_binned(p) for p in parts])
    assert merged.checked == binned.size and merged.zeros == (binned == 0).sum()
    if all(p.size <= SMALL for p in parts):  # every finite value was looked at
        finite = whole[np.isfinite(whole)]
        assert merged.exact and merged.checked == finite.size and merged.zeros == (finite == 0).sum()
    if fixed:
        hist = functools.reduce(Histogram.merge, [h for _, h in summaries])
        reference, _ = np.histogram(binned.astype(np.float64), bins=edges)
        np.testing.assert_array_equal(hist.counts, reference)
        assert hist.under == (binned < edges[0]).sum() and hist.over == (binned > edges[-1]).sum()
        assert hist.sampled == binned.size == hist.counts.sum() + hist.under + hist.over
        assert hist.numel == whole.size
        assert np.array_equal(hist.edges, edges) and hist.counts.dtype == np.int64
    else:
        ranges = {(h.edges[0], h.edges[-1]) for s, h in summaries if s.count}
        if len(ranges) > 1:  # each part binned over its own range: nothing to merge on
            with pytest.raises(ValueError, match="different edges"):
                functools.reduce(Histogram.merge, [h for s, h in summaries if s.count])


@pytest.mark.parametrize("seed", range(6))
def test_merge_is_associative_up_to_rounding(seed):
    _, _, _, parts = _case(seed)
    stats = [s for s, _ in _summarise(parts)] + [TensorStats.of(np.zeros(0)), TensorStats.of(np.full(3, np.nan))]
    rng = np.random.default_rng(seed)
    rng.shuffle(stats)
    left = functools.reduce(TensorStats.merge, stats)
    right = functools.reduce(lambda a, b: b.merge(a), reversed(stats))

    def tree(items):
        return items[0] if len(items) == 1 else tree(items[: len(items) // 2]).merge(tree(items[len(items) // 2:]))

    for other in (right, tree(stats)):
        for field in ("numel", "count", "zeros", "checked", "nan_count", "inf_count", "min", "max"):
            assert getattr(other, field) == getattr(left, field)
        assert other.mean == pytest.approx(left.mean, rel=1e-12, abs=1e-12 * (abs(left.mean) + left.std))
        assert other.m2 == pytest.approx(left.m2, rel=1e-10, abs=1e-300)


def test_merging_with_empty_and_all_nan_parts():
    x = TensorStats.of(np.array([1.0, -2.0, 0.0, 4.0]))
    empty, nan = TensorStats.of(np.zeros(0)), TensorStats.of(np.array([np.nan, np.inf, np.nan]))
    assert (nan.count, nan.nan_count, nan.inf_count, nan.min, nan.max, nan.std) == (0, 2, 1, 0.0, 0.0, 0.0)
    for merged in (x.merge(empty), empty.merge(x), x.merge(nan), nan.merge(x), empty.merge(nan).merge(x)):
        assert (merged.count, merged.min, merged.max, merged.zeros) == (4, -2.0, 4.0, 1)
        assert merged.mean == x.mean and merged.m2 == x.m2
    both = x.merge(nan)
    assert (both.numel, both.nan_count, both.inf_count, both.finite, x.finite) == (7, 2, 1, False, True)
    assert empty.merge(nan).count == 0 and empty.merge(nan).numel == 3 and empty.merge(empty).exact
    sampled = TensorStats(numel=10, count=10, mean=0.0, m2=1.0, min=-1.0, max=1.0, zeros=0, checked=4,
                          nan_count=0, inf_count=0)
    assert x.exact and not sampled.exact and not x.merge(sampled).exact and sampled.zero_fraction == 0.0


def test_of_equals_numpy():
    rng = np.random.default_rng(0)
    for x in (rng.normal(size=1000) * 3 + 1, np.array([0.0, 0.0, 5.0]), np.array([7.5]),
              np.array([np.nan, 1.0, np.inf, -np.inf, 0.0, 3.0]), rng.integers(-5, 5, size=(3, 4, 5))):
        s = TensorStats.of(x)
        finite = x.reshape(-1)[np.isfinite(x.reshape(-1))].astype(np.float64)
        assert (s.numel, s.count, s.checked) == (x.size, finite.size, finite.size) and s.exact
        assert s.mean == pytest.approx(finite.mean(), rel=1e-14, abs=1e-15)
        assert s.m2 == pytest.approx(((finite - finite.mean()) ** 2).sum(), rel=1e-12, abs=1e-15)
        assert s.std == pytest.approx(finite.std(), rel=1e-12, abs=1e-15)
        assert (s.min, s.max, s.zeros) == (finite.min(), finite.max(), (finite == 0).sum())
        assert s.zero_fraction == pytest.approx((finite == 0).mean())
        assert (s.nan_count, s.inf_count) == (np.isnan(x).sum(), np.isinf(x).sum())
    t = torch.tensor([1.5, -2.25, 0.0, float("nan")], dtype=torch.bfloat16)
    s = TensorStats.of(t)
    assert (s.count, s.mean, s.min, s.max, s.zeros, s.nan_count) == (3, -0.25, -2.25, 1.5, 1, 1)
    assert TensorStats.of(torch.arange(4)).mean == 1.5 and TensorStats.of(np.zeros(0)).count == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", [1, 200_000])  # the batched path, and the per-tensor path (sampling everything)
def test_fixed_edges_bin_like_numpy_on_and_around_every_edge(dtype, size):
    edges = np.array([-2.5, -0.1, 0.0, 1 / 3, 0.7, 1.0, 10.0])  # uneven; -0.1, 1/3 and 0.7 not float32 values
    kind = np.float32 if dtype == torch.float32 else np.float64
    near = []
    for e in edges:
        v = kind(e)
        near += [v, np.nextafter(v, kind(-np.inf)), np.nextafter(v, kind(np.inf))]
    values = np.array(near + [-1e30, -3.0, 0.5, 5.0, 11.0, 1e30], dtype=kind)
    x = np.tile(values, size)
    special = np.tile(np.array([np.nan, np.inf, -np.inf], dtype=kind), size)
    batch = StatsBatch(bins=4, sample_size=1 << 30)
    batch.add(torch.from_numpy(np.concatenate([x, special])), edges)
    stats, hist = batch.results()[0]
    reference, _ = np.histogram(x.astype(np.float64), bins=edges)
    np.testing.assert_array_equal(hist.counts, reference)
    assert hist.under == (x < edges[0]).sum() and hist.over == (x > edges[-1]).sum()
    assert hist.sampled == x.size and hist.numel == x.size + special.size
    assert stats.count == x.size and stats.nan_count == size and stats.inf_count == 2 * size


def test_fixed_edges_beyond_float32_and_large_sampled_tensors():
    batch = StatsBatch()
    x = torch.randn(300_000)
    x[::5] = float("nan")
    wide = np.array([-1e39, -1.0, 0.0, 1e39])  # outer edges beyond float32's range: every value inside
    big, tiny = batch.add(x, wide), batch.add(torch.tensor([3.0, -1e38, 1e38]), wide)
    results = batch.results()
    _, hist = results[big]
    sample = _binned(x.numpy())
    reference, _ = np.histogram(sample.astype(np.float64), bins=wide)
    np.testing.assert_array_equal(hist.counts, reference)
    assert hist.under == hist.over == 0 and hist.sampled == sample.size < 240_000
    np.testing.assert_array_equal(results[tiny][1].counts, [1, 0, 2])


def test_histograms_merge_only_on_the_same_edges():
    batch = StatsBatch(bins=6)
    a = torch.linspace(-1, 1, 100)
    edges = np.linspace(-1, 1, 9)
    one, two, own, other = (batch.add(a, edges), batch.add(a * 2, edges), batch.add(a), batch.add(a * 3))
    results = batch.results()
    merged = results[one][1].merge(results[two][1])
    assert merged.counts.sum() == 150 and merged.under == 25 and merged.over == 25 and merged.sampled == 200
    with pytest.raises(ValueError, match="different edges"):
        results[one][1].merge(results[own][1])  # the same range, split in 8 and in 6
    with pytest.raises(ValueError, match="6 bins over"):
        results[own][1].merge(results[other][1])
    same = StatsBatch(bins=8)
    first, second = same.add(a), same.add(a.flip(0))
    h = same.results()
    assert (h[first][1].merge(h[second][1]).counts == 2 * h[first][1].counts).all()  # same range: same edges


@pytest.mark.parametrize("edges", [[1.0], [2.0, 1.0], [0.0, 0.0, 1.0], [0.0, float("nan")], [[0.0, 1.0]]])
def test_unusable_edges_are_refused(edges):
    with pytest.raises(ValueError, match="edges"):
        StatsBatch().add(torch.randn(10), np.array(edges))


def test_far_from_zero_tensors_keep_their_spread():
    """Summed around zero in float32, the squares of 1000 + 0.001 * noise would leave nothing of its spread."""
    g = torch.Generator().manual_seed(0)
    tensors = [1000 + 0.001 * torch.randn(500_000, generator=g), torch.full((100_000,), -7.25),
               -50 + torch.rand(70_000, generator=g)]
    tensors += [1000 + k / 7 + 0.001 * torch.randn(5000, generator=g) for k in range(10)]  # the batched path
    batch = StatsBatch()
    for x in tensors:
        batch.add(x)
    results = batch.results()
    for (stats, _), x in zip(results, tensors):
        _assert_stats(stats, x.numpy(), 1e-5)
    assert results[1][0].m2 == 0 and results[1][0].mean == -7.25

"""Every summary field against float64 numpy on hard inputs, on both code paths: tensors of up to 65,536
elements (copied into shared buffers, summarised row by row) and larger ones (summarised on the spot, the
histogram and zeros from a strided sample). The tolerances are the ones stats.py's docstring promises."""

import numpy as np
import pytest
import torch
from torch import nn

from layerscope import capture
from layerscope.core.stats import StatsBatch

SMALL, LARGE = [1, 2, 7, 1000, 4096, 65536], [65537, 300_001, 2_000_000]
F32_MAX = float(torch.finfo(torch.float32).max)


def _hard(kind: str, n: int, gen: torch.Generator) -> torch.Tensor:
    """One tensor of a hard kind: n values, built from the seeded generator."""
    z = torch.randn(n, generator=gen)
    u = torch.rand(n, generator=gen)
    if kind == "offset 1e4 + N(0, 1)":
        return 1e4 + z
    if kind == "offset 1000 + 0.01 N(0, 1)":
        return 1000 + 0.01 * z
    if kind == "near float32 max":
        return F32_MAX * (0.5 + 0.5 * u)
    if kind == "both float32 limits":
        return F32_MAX * (2 * u - 1)
    if kind == "tiny spread":
        return 3e-20 * z
    if kind == "float16":
        return (100 + z).half()
    if kind == "float16 near its max":
        return (65504 * u).half()
    if kind == "bfloat16 offset":
        return (1e4 + 30 * z).bfloat16()
    if kind == "bfloat16 near its max":
        return (F32_MAX * u).bfloat16()
    if kind == "all equal":
        return torch.full((n,), 7.1)
    if kind == "all equal, huge":
        return torch.full((n,), 3e38)
    if kind == "int64 past 2**24":
        return torch.randint(2**40, 2**40 + 1000, (n,), generator=gen)
    if kind == "int32":
        return torch.randint(-(2**31), 2**31 - 1, (n,), generator=gen, dtype=torch.int32)
    if kind == "uint8":
        return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8)
    if kind == "relu, many zeros":
        return torch.relu(z + 0.3)
    if kind == "a few NaN/Inf":
        x = 1e4 + z
        x[torch.randint(0, n, (max(1, n // 1000),), generator=gen)] = float("nan")
        x[torch.randint(0, n, (max(1, n // 2000),), generator=gen)] = float("inf")
        x[torch.randint(0, n, (max(1, n // 3000),), generator=gen)] = -float("inf")
        return x
    raise ValueError(kind)


KINDS = ["offset 1e4 + N(0, 1)", "offset 1000 + 0.01 N(0, 1)", "near float32 max", "both float32 limits",
         "tiny spread", "float16", "float16 near its max", "bfloat16 offset", "bfloat16 near its max", "all equal",
         "all equal, huge", "int64 past 2**24", "int32", "uint8", "relu, many zeros", "a few NaN/Inf"]


def _sample(a: np.ndarray, size: int = 8192) -> np.ndarray:
    """The evenly strided sample StatsBatch bins for a large tensor (of its finite values)."""
    finite = a[np.isfinite(a)]
    step = max(1, finite.size // size) | 1
    return finite[::step][:size]


def _near_edges(values: np.ndarray, edges: np.ndarray) -> int:
    """How many values lie so close to an inner edge (1e-5 of a bin) that rounding may put them either side."""
    width = edges[1] - edges[0]
    gaps = np.abs(values[:, None] - edges[None, 1:-1]) if values.size * len(edges) < 5e7 else None
    if gaps is None:
        idx = np.clip(np.searchsorted(edges, values), 1, len(edges) - 1)
        gaps = np.minimum(np.abs(values - edges[idx - 1]), np.abs(values - edges[idx]))[:, None]
    return int((gaps.min(1) <= 1e-5 * width).sum())


def check(stats, hist, t: torch.Tensor):
    """Every field against float64 numpy, within the documented tolerance."""
    a = t.double().numpy().reshape(-1)  # half, bfloat16 and integer values are exact in float64
    finite = a[np.isfinite(a)]
    assert stats.numel == a.size and stats.count == finite.size
    assert stats.nan_count == np.isnan(a).sum() and stats.inf_count == np.isinf(a).sum()
    assert np.isfinite([stats.mean, stats.std, stats.m2]).all()
    sampled = a.size > 65536
    if finite.size == 0:
        assert stats.mean == stats.std == stats.min == stats.max == stats.zeros == stats.checked == 0
        assert hist.counts.sum() == hist.sampled == 0
        return
    mean, std = finite.mean(), finite.std()
    assert abs(stats.mean - mean) <= 1e-6 * std + 1e-12 * abs(mean)
    assert abs(stats.std - std) <= (1e-4 if sampled else 1e-5) * std + 1e-12 * abs(mean)
    assert stats.min == finite.min() and stats.max == finite.max()
    binned = _sample(a) if sampled else finite
    assert stats.checked == binned.size and stats.zeros == (binned == 0).sum()
    assert hist.sampled == binned.size == hist.counts.sum() and hist.under == hist.over == 0
    lo, hi = (finite.min(), finite.max()) if finite.max() > finite.min() else (finite.min() - 0.5, finite.max() + 0.5)
    np.testing.assert_array_equal(hist.edges, np.linspace(lo, hi, len(hist.counts) + 1))
    reference, _ = np.histogram(binned, bins=hist.edges)
    assert np.abs(hist.counts - reference).sum() <= 2 * _near_edges(binned, hist.edges)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("path", ["buffered", "on the spot"])
def test_every_field_matches_float64_numpy(kind, path):
    gen = torch.Generator().manual_seed(len(kind))
    for seed, n in enumerate(SMALL if path == "buffered" else LARGE):
        gen.manual_seed(seed * 1000 + len(kind))
        tensors = [_hard(kind, n, gen) for _ in range(2 if path == "on the spot" else 3)]  # rows sharing a buffer
        batch = StatsBatch(bins=16 + seed)
        for t in tensors:
            batch.add(t)
        for t, (stats, hist) in zip(tensors, batch.results()):
            check(stats, hist, t)


@pytest.mark.parametrize("n", [3000, 200_000])
def test_one_buffer_of_mixed_rows(n):
    """Plain, near-limit, constant and non-finite tensors of one size: each row comes out right."""
    gen = torch.Generator().manual_seed(n)
    kinds = ["relu, many zeros", "near float32 max", "all equal", "a few NaN/Inf", "tiny spread",
             "offset 1e4 + N(0, 1)", "all equal, huge"] * 3
    tensors = [_hard(kind, n, gen) for kind in kinds]
    batch = StatsBatch()
    for t in tensors:
        batch.add(t)
    for t, (stats, hist) in zip(tensors, batch.results()):
        check(stats, hist, t)


def test_random_shapes_and_offsets():
    """Property-style: many seeds, shapes, offsets and spreads, either path."""
    rng = np.random.default_rng(0)
    for seed in range(40):
        shape = tuple(int(s) for s in rng.integers(1, 90, size=rng.integers(1, 4)))
        if seed % 5 == 0:
            shape = (int(rng.integers(65537, 400_000)),)
        offset, spread = float(10 ** rng.uniform(-3, 6)) * rng.choice([-1, 1]), float(10 ** rng.uniform(-4, 3))
        dtype = [torch.float32, torch.float16, torch.bfloat16][seed % 3]
        gen = torch.Generator().manual_seed(seed)
        t = (offset + spread * torch.randn(shape, generator=gen)).to(dtype)
        if seed % 4 == 0:
            t[(0,) * t.dim()] = float("nan")
        batch = StatsBatch(bins=int(rng.integers(4, 80)))
        batch.add(t)
        stats, hist = batch.results()[0]
        check(stats, hist, t)


@pytest.mark.parametrize("kind", ["offset 1e4 + N(0, 1)", "near float32 max", "a few NaN/Inf", "bfloat16 offset"])
def test_merged_parts_match_the_whole(kind):
    """Stats of parts of either path, merged (Chan's formula), against numpy on the whole tensor; fixed-edge
    histograms of small parts merge into numpy's histogram of the whole."""
    gen = torch.Generator().manual_seed(1)
    whole = _hard(kind, 400_000, gen)
    sizes = [100_000, 7, 65536, 1, 34_456, 200_000]
    edges = np.linspace(-3e38, 3e38, 9) if "max" in kind else np.linspace(9990, 10010, 21)
    batch = StatsBatch()
    parts = whole.split(sizes)
    for p in parts:
        batch.add(p, edges)
    results = batch.results()
    merged = results[0][0]
    for stats, _ in results[1:]:
        merged = merged.merge(stats)
    a = whole.double().numpy()
    finite = a[np.isfinite(a)]
    assert merged.count == finite.size and merged.nan_count == np.isnan(a).sum()
    assert merged.inf_count == np.isinf(a).sum()
    assert abs(merged.mean - finite.mean()) <= 1e-6 * finite.std() + 1e-12 * abs(finite.mean())
    assert merged.std == pytest.approx(finite.std(), rel=1e-5)
    assert merged.min == finite.min() and merged.max == finite.max()
    small = [i for i, p in enumerate(parts) if p.numel() <= 65536]
    hist = results[small[0]][1]
    for i in small[1:]:
        hist = hist.merge(results[i][1])
    values = np.concatenate([parts[i].double().numpy() for i in small])
    values = values[np.isfinite(values)]
    reference, _ = np.histogram(values, bins=edges)
    np.testing.assert_array_equal(hist.counts, reference)
    assert hist.under == (values < edges[0]).sum() and hist.over == (values > edges[-1]).sum()


@pytest.mark.parametrize("size", [4, 40])  # 4: every output buffered; 40: the linear's input is on the spot
def test_capture_of_a_model_with_a_large_offset(size):
    """Through the call site: a layer whose outputs sit at 1e4 with spread 1, against its cloned output."""
    lin = nn.Linear(3 * size * size, 64)
    with torch.no_grad():
        lin.bias.fill_(1e4)
        lin.weight.mul_(0.01)
    model = nn.Sequential(nn.Flatten(), lin, nn.ReLU())
    batch = torch.randn(32, 3, size, size) + 1e4
    cap = capture(model, batch, backward=False)
    with torch.no_grad():
        flat = batch.flatten(1)
        out = lin(flat)
    for name, t in [("0", flat), ("1", out), ("2", out)]:
        call = cap[name].calls[0]
        check(call.stats, call.histogram, t)


@pytest.mark.parametrize("seed", range(24))
def test_fixed_edges_count_values_on_and_next_to_every_edge(seed):
    """Uniform fixed edges are binned arithmetically (see stats._indices): values on each edge, one float step
    either side of it, outside the edges and random ones land where numpy's float64 comparisons put them, in
    float32 and float64, on both paths, for aligned edges (down to subnormal widths), other uniform ones and
    non-uniform ones (a binary search)."""
    rng = np.random.default_rng(seed)
    dtype = [torch.float32, torch.float64][seed % 2]
    lo = rng.choice([-3.0, 0.0, 1000.0, -1e30, 1e-20])
    width = abs(lo) * 10.0 ** rng.uniform(-6, 0) if lo else 10.0 ** rng.uniform(-3, 3)
    bins = int(rng.integers(1, 70))
    if seed % 3 == 2:  # aligned: a power-of-two width, the edges its multiples (watch's own edges)
        width = 2.0 ** int(rng.integers(-140, 20))
        lo = width * int(rng.integers(-70, 10))
    edges = lo + width * np.arange(bins + 1) if seed % 4 < 3 else np.sort(lo + width * rng.uniform(0, bins, bins + 1))
    edges = np.unique(edges)
    if len(edges) < 2:
        edges = np.array([lo, lo + width])
    kind = np.float32 if dtype == torch.float32 else np.float64
    on = edges.astype(kind)
    values = np.concatenate([on, np.nextafter(on, kind(np.inf)), np.nextafter(on, kind(-np.inf)),
                             (edges[0] + (edges[-1] - edges[0]) * rng.uniform(-0.2, 1.2, 5000)).astype(kind)])
    for n in (len(values), 70_000):  # the buffer path, and the large path (strided sample)
        binned_like_numpy(torch.from_numpy(np.resize(rng.permutation(values), n).astype(kind)).to(dtype), edges)


def binned_like_numpy(x: torch.Tensor, edges: np.ndarray) -> None:
    """Every value of ``x`` binned on the fixed ``edges`` (a sample of all of them) where numpy's float64 comparisons
    put it, and those outside counted as under and over."""
    batch = StatsBatch(sample_size=x.numel())
    slot = batch.add(x, edges)
    _, hist = batch.results()[slot]
    seen = x.double().numpy()
    counts, _ = np.histogram(seen, bins=edges)
    np.testing.assert_array_equal(hist.counts, counts)
    assert (hist.under, hist.over) == ((seen < edges[0]).sum(), (seen > edges[-1]).sum())


@pytest.mark.parametrize("power", [-149, -140, -127, -126, -125, -60, -1, 0, 1, 10, 30])
@pytest.mark.parametrize("first", [-70, -32, 0, 5, (1 << 24) - 40])
def test_float32_values_on_aligned_edges_of_every_width(power, first):
    """Aligned edges (watch's own: a power-of-two width, its multiples) bin float32 values in float32 where that is
    exact (widths from 2**-126 to 1, bin numbers below 2**24) and in float64 elsewhere: on each edge, one float step
    either side, far outside (to float32's limits) and between, counted as numpy counts them in float64."""
    rng = np.random.default_rng([power + 200, first + 100])
    width = 2.0**power
    edges = width * np.arange(first, first + 41, dtype=np.float64)
    on = edges.astype(np.float32)
    big = np.finfo(np.float32).max
    values = np.concatenate([on, np.nextafter(on, np.float32(np.inf)), np.nextafter(on, np.float32(-np.inf)),
                             np.array([-big, big, 0.0, -0.0, 1e-45, -1e-45], dtype=np.float32),
                             (edges[0] + (edges[-1] - edges[0]) * rng.uniform(-0.2, 1.2, 3000)).astype(np.float32)])
    binned_like_numpy(torch.from_numpy(rng.permutation(values)), edges)


@pytest.mark.parametrize("seed", range(12))
def test_values_inside_aligned_edges_are_binned_by_their_floor(seed):
    """Rows whose values all lie from their first aligned edge to below their last (watch's common case, binned with
    no clamp, see stats._indices): values on every edge but the last, one float step either side, just below the
    last edge and random ones, in buffers of several rows with edges of their own and on the large path, counted as
    numpy counts them, none under or over."""
    rng = np.random.default_rng(seed + 500)
    batch = StatsBatch()
    expected = []
    for n in [4096] * 4 + [1000] * 3 + [70_000]:
        width = 2.0 ** int(rng.integers(-20, 10))
        edges = width * np.arange(-32, 33, dtype=np.float64) if rng.random() < 0.5 else width * np.arange(0, 65.0)
        on = edges.astype(np.float32)
        values = np.concatenate([on[:-1], np.nextafter(on[:-1], np.float32(np.inf)),
                                 np.nextafter(on[1:], np.float32(-np.inf)),
                                 (edges[0] + (edges[-1] - edges[0]) * rng.uniform(0, 1, n)).astype(np.float32)])
        values = np.minimum(values, np.nextafter(on[-1], np.float32(-np.inf)))  # below the last edge, every one
        x = np.resize(rng.permutation(values), n).astype(np.float32)
        if n > 65536:  # the large path bins a strided sample of sample_size values: all of them here
            batch = StatsBatch(sample_size=n)
        expected.append((batch.add(torch.from_numpy(x), edges), x, edges, batch))
    owners = {id(owner): owner for *_, owner in expected}
    results = {key: owner.results() for key, owner in owners.items()}
    for slot, x, edges, owner in expected:
        _, hist = results[id(owner)][slot]
        np.testing.assert_array_equal(hist.counts, np.histogram(x.astype(np.float64), bins=edges)[0])
        assert (hist.under, hist.over, hist.sampled) == (0, 0, len(x))

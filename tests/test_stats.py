"""Recorded statistics against numpy on the very tensors the modules produced."""

import numpy as np
import pytest
import torch
from torch import nn

from layerscope import capture
from layerscope.core.stats import StatsBatch


def _outputs(model, batch):
    """Each module's output, cloned at the moment it was produced (the slow reference)."""
    seen = {}
    handles = [
        m.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, out.detach().clone()))
        for name, m in model.named_modules()
    ]
    try:
        with torch.no_grad():
            model(batch)
    finally:
        for h in handles:
            h.remove()
    return seen


def _check(stats, hist, x: np.ndarray, exact: bool):
    finite = x[np.isfinite(x)]
    assert stats.numel == x.size and stats.count == finite.size
    assert stats.nan_count == np.isnan(x).sum() and stats.inf_count == np.isinf(x).sum()
    assert stats.mean == pytest.approx(finite.mean(dtype=np.float64), rel=1e-5, abs=1e-6)
    assert stats.std == pytest.approx(finite.std(dtype=np.float64), rel=1e-4, abs=1e-6)
    assert stats.m2 == pytest.approx(finite.var(dtype=np.float64) * finite.size, rel=2e-4, abs=1e-6)
    assert stats.min == finite.min() and stats.max == finite.max()
    assert stats.exact is exact
    assert hist.under == hist.over == 0  # equal bins over the tensor's own range hold every binned value
    if exact:
        assert stats.checked == finite.size and stats.zeros == (finite == 0).sum()
        assert stats.zero_fraction == pytest.approx((finite == 0).mean())
        assert hist.counts.sum() == finite.size == hist.sampled
        span = (hist.edges[0], hist.edges[-1])
        reference, _ = np.histogram(finite.astype(np.float64), bins=len(hist.counts), range=span)
        assert np.abs(hist.counts - reference).sum() <= 2  # values exactly on an edge may fall either side
    else:
        assert stats.checked == hist.sampled < finite.size and 0 <= stats.zeros <= stats.checked
        assert stats.zero_fraction == pytest.approx((finite == 0).mean(), abs=0.03)
        assert hist.edges[0] == finite.min() and hist.edges[-1] == pytest.approx(finite.max())
        assert hist.counts.sum() == hist.sampled <= 8192


@pytest.mark.parametrize("size", [6, 40])  # 6: every tensor is small (exact); 40: the conv outputs are sampled
def test_stats_and_histograms_equal_numpy(size):
    model = nn.Sequential(nn.Conv2d(3, 48, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(48 * size * size, 10))
    batch = torch.randn(4, 3, size, size) + 0.5
    cap = capture(model, batch, backward=False)
    reference = _outputs(model, batch)
    for name in ["0", "1", "2", "3", ""]:
        x = reference[name].numpy()
        call = cap[name].calls[0]
        _check(call.stats, call.histogram, x, exact=x.size <= 1 << 16)
    relu = cap["1"].calls[0]
    assert relu.stats.min == 0 and relu.stats.zero_fraction > 0.2


def test_non_finite_values_are_counted_and_left_out():
    for n in (1000, 200_000):  # the batched path and the per-tensor path
        x = torch.randn(n)
        x[::7] = float("nan")
        x[1::11] = float("inf")
        x[2::13] = -float("inf")
        x[3::5] = 0.0
        batch = StatsBatch(bins=16)
        batch.add(x)
        stats, hist = batch.results()[0]
        _check(stats, hist, x.numpy(), exact=n <= 1 << 16)


def test_constant_and_all_nan_tensors():
    batch = StatsBatch(bins=4)
    batch.add(torch.full((10,), 3.0))
    batch.add(torch.full((100_000,), float("nan")))
    batch.add(torch.zeros(0))
    const, nan, empty = batch.results()
    assert const[0].std == 0 and const[0].min == const[0].max == 3.0
    np.testing.assert_allclose(const[1].edges[[0, -1]], [2.5, 3.5])  # numpy's range for a constant
    assert const[1].counts.sum() == 10
    assert nan[0].nan_count == 100_000 and nan[1].counts.sum() == 0
    assert empty is None


def test_integer_and_half_outputs_are_summarised():
    batch = StatsBatch()
    batch.add(torch.arange(10))
    batch.add(torch.linspace(-1, 1, 100, dtype=torch.float16))
    ints, halves = batch.results()
    assert ints[0].mean == 4.5 and ints[0].max == 9
    assert halves[0].min == -1 and halves[0].max == 1


def test_feature_maps_are_bounded_and_on_cpu():
    model = nn.Sequential(nn.Conv2d(3, 32, 3, padding=1))
    batch = torch.randn(3, 3, 100, 80)
    cap = capture(model, batch, backward=False)
    fmap = cap["0"].calls[0].feature_maps
    assert fmap.shape == (16, 64, 64) and fmap.device.type == "cpu"
    with torch.no_grad():
        full = model(batch)[0, :16]
    expected = nn.functional.adaptive_avg_pool2d(full, (64, 64))
    assert fmap.dtype == torch.bfloat16  # a picture: three significant digits
    torch.testing.assert_close(fmap, expected.bfloat16(), rtol=0, atol=0)


@pytest.mark.parametrize("size", [5, 100])  # a small output (buffered) and a large one (per-channel sums)
@pytest.mark.parametrize("inplace", [False, True])
def test_dead_units_counted_per_channel(size, inplace):
    conv = nn.Conv2d(3, 8, 1)
    with torch.no_grad():
        conv.bias[:3] = -100.0  # three channels can never be positive
        conv.weight[3:5] = 0.0
        conv.bias[3:5] = torch.tensor([0.0, 1e-30])  # all exactly 0 (dead), all tiny and positive (alive)
    x = torch.randn(2, 3, size, size)
    cap = capture(nn.Sequential(conv, nn.ReLU(inplace=inplace)), x, backward=False)
    call = cap["1"].calls[0]
    with torch.no_grad():
        expected = int((torch.relu(conv(x)).double().numpy().max(axis=(0, 2, 3)) <= 0).sum())
    assert (call.dead_units, call.units) == (expected, 8) and expected == 4
    assert call.stats.mean == pytest.approx(torch.relu(conv(x)).double().mean().item(), rel=1e-6)


def test_a_tensor_passed_on_unchanged_is_summarised_once_and_inplace_changes_are_seen():
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 4, 3), nn.Dropout(0.5)), nn.ReLU(inplace=True))
    cap = capture(model.eval(), torch.randn(2, 3, 9, 9) - 0.5, backward=False)
    conv, drop, inner, relu, root = (cap[n].calls[0] for n in ["0.0", "0.1", "0", "1", ""])
    assert conv.stats is drop.stats and drop.stats is inner.stats  # dropout in eval returns its input
    assert conv.stats.min < 0 and relu.stats.min == 0  # the in-place ReLU bumped the version: summarised anew
    assert relu.stats is root.stats


def test_norm_does_not_overflow_and_matches_float64():
    from layerscope.core.stats import norm

    huge = torch.full((1000,), 1e20)
    assert float(norm(huge)) == pytest.approx(1e20 * 1000**0.5, rel=1e-6)
    x = torch.randn(300_000)
    assert float(norm(x)) == pytest.approx(float(x.double().norm()), rel=1e-5)
    assert float(norm(x.half())) == pytest.approx(float(x.half().double().norm()), rel=1e-5)


@pytest.mark.parametrize("n", [16_383, 2**20, 2**20 + 16_384 * 3 + 5, 8_000_000])
def test_norm_of_many_large_values_stays_within_float32_rounding(n):
    """A single float32 dot over millions of values of one sign rounds by 2e-4 in some BLAS builds (OpenBLAS on
    AVX2), 3e-5 up to a million: past that norm() adds dots over rows in float64. (The norm's error is half the
    sum of squares'.)"""
    from layerscope.core.stats import norm

    x = torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n), dtype=torch.uint8).float()
    want = float(np.sqrt(np.square(x.double().numpy()).sum()))
    assert float(norm(x)) == pytest.approx(want, rel=2e-5)
    assert float(norm(x.view(-1, 1).expand(-1, 2).t())) == pytest.approx(want * 2**0.5, rel=2e-5)  # not contiguous

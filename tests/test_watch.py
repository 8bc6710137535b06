"""layerscope.watch on real training loops: the parameters end as without it, every hook goes, the numbers match
plain hooks and numpy, each finding over time comes from a real bug, accumulation, param groups and AMP count
right, memory stays bounded, and a run survives save/load and TensorBoard."""

from __future__ import annotations

import copy
import gc
import importlib
import math
from collections import OrderedDict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

import layerscope
from layerscope import capture, load, watch
from layerscope.core.findings import find
from test_records import same


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return (x - x.mean()) / x.std(), torch.tensor(d.target)


def cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 8, 3, padding=1)), ("bn", nn.BatchNorm2d(8)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(8, 16, 3, padding=1)), ("relu2", nn.ReLU()), ("pool", nn.AdaptiveAvgPool2d(2)),
        ("flatten", nn.Flatten()), ("drop", nn.Dropout(0.2)), ("fc", nn.Linear(64, 32)), ("relu3", nn.ReLU()),
        ("head", nn.Linear(32, 10)),
    ]))


def batches(x, y, steps: int, size: int = 32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (size,), generator=g)
        yield x[idx], y[idx]


def train(model, opt, data, run=None, zero_grad=True):
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        if zero_grad:
            opt.zero_grad()
        loss.backward()
        opt.step()
        if run is not None:
            run.log(loss=loss)


def hooks_left(model: nn.Module, opt=None) -> list[str]:
    left = []
    for name, m in model.named_modules():
        for kind in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks"):
            if getattr(m, kind):
                left.append(f"{name}:{kind}")
    for name, p in model.named_parameters():
        if p._post_accumulate_grad_hooks or p._backward_hooks:
            left.append(f"param {name}")
    if opt is not None and (opt._optimizer_step_pre_hooks or opt._optimizer_step_post_hooks):
        left.append("optimizer")
    return left


# -- training goes on -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("every", [1, 3])
@pytest.mark.parametrize("optimizer", [torch.optim.Adam, torch.optim.SGD])
def test_a_watched_run_ends_bit_identical_to_an_unwatched_one(digits, every, optimizer):
    x, y = digits
    ends = []
    for watched in (False, True):
        model = cnn().train()
        opt = optimizer(model.parameters(), lr=1e-2, **({"momentum": 0.9} if optimizer is torch.optim.SGD else {}))
        torch.manual_seed(1)  # dropout draws from the global generator: the same draws with and without watch
        if watched:
            with watch(model, opt, every=every) as run:
                train(model, opt, batches(x, y, 12), run)
            assert run.step_count == 12 and len(run.steps) == len(range(0, 12, every))
        else:
            train(model, opt, batches(x, y, 12))
        ends.append({**model.state_dict(), **{f"opt.{k}": v for k, v in _flat(opt.state_dict()).items()}})
    plain, watched = ends
    assert plain.keys() == watched.keys()
    for key in plain:
        assert torch.equal(plain[key], watched[key]), key


def _flat(state: dict) -> dict:
    return {f"{i}.{k}": v for i, s in state["state"].items() for k, v in s.items() if isinstance(v, torch.Tensor)}


def test_every_hook_is_removed_when_the_block_ends_also_on_an_exception(digits):
    x, y = digits
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=1) as run:
        train(model, opt, batches(x, y, 3), run)
    assert hooks_left(model, opt) == []
    assert not run.live
    assert gc.isenabled()
    with pytest.raises(ZeroDivisionError):
        with watch(model, opt, every=1) as run:
            loss = F.cross_entropy(model(x[:8]), y[:8])  # a sampled step is half-way: its hooks are all on
            assert hooks_left(model, opt)
            assert not gc.isenabled()  # the cyclic collector waits until the sampled step ends
            loss.backward()
            raise ZeroDivisionError
    assert hooks_left(model, opt) == []
    assert gc.isenabled()
    gc.disable()  # a user's own choice is kept
    try:
        with watch(model, opt, every=2) as run:
            train(model, opt, batches(x, y, 3), run)
        assert not gc.isenabled()
    finally:
        gc.enable()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    train(model, opt, batches(x, y, 1))  # and the model trains on as before
    assert any(not torch.equal(grads[n], p.grad) for n, p in model.named_parameters())


def test_grad_is_never_written_and_a_failing_hook_does_not_stop_training(digits, monkeypatch):
    x, y = digits
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt, every=1) as run:
        loss = F.cross_entropy(model(x[:16]), y[:16])
        loss.backward()
        expected = {n: p.grad.clone() for n, p in model.named_parameters()}
        ids = {n: id(p.grad) for n, p in model.named_parameters()}
        opt.step()
        assert all(torch.equal(expected[n], p.grad) and id(p.grad) == ids[n] for n, p in model.named_parameters())
        def broken(tensors):
            raise RuntimeError("boom")

        # the next steps cannot be recorded
        monkeypatch.setattr(importlib.import_module("layerscope.core.watch"), "fast_norms", broken)
        with pytest.warns(RuntimeWarning, match="training goes on"):
            train(model, opt, batches(x, y, 2))
    assert run.step_count == 3 and list(run.steps) == [0]


# -- the numbers ------------------------------------------------------------------------------------------------


def test_series_match_plain_hooks_and_numpy(digits):
    x, y = digits
    model = cnn().eval()  # no dropout draws, batch norm on its running statistics: the steps repeat exactly
    model.bn.train()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    names = ["conv1", "bn", "relu1", "relu2", "fc", "head"]
    outputs, out_grads = {}, {}

    def keep(name):
        def hook(module, args, out):
            outputs[name] = out.detach().double().numpy().copy()
            out.register_hook(lambda g: out_grads.__setitem__(name, float(g.double().norm())))
        return hook

    handles = [model.get_submodule(n).register_forward_hook(keep(n)) for n in names]
    expected = []
    with watch(model, opt, every=2) as run:
        for step, (xb, yb) in enumerate(batches(x, y, 6)):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            grads = {n: p.grad.double().clone() for n, p in model.named_parameters()}
            opt.step()
            run.log(loss=loss)
            if step % 2 == 0:
                expected.append((dict(outputs), dict(out_grads), before, grads,
                                 {n: p.detach().double() for n, p in model.named_parameters()}))
    for h in handles:
        h.remove()
    assert list(run.steps) == [0, 2, 4]
    for name in names:
        module = model.get_submodule(name)
        own = [local for local, _ in module.named_parameters(recurse=False)]
        got = {field: run.series(name, field)[1] for field in layerscope.core.run.SERIES}
        for i, (outs, ograds, before, grads, after) in enumerate(expected):
            out = outs[name]
            assert got["mean"][i] == pytest.approx(out.mean(), rel=1e-6, abs=1e-7)
            assert got["std"][i] == pytest.approx(out.std(), rel=1e-5)
            assert got["min"][i] == pytest.approx(out.min(), rel=1e-6) and got["max"][i] == pytest.approx(out.max())
            assert got["zero_fraction"][i] == (out == 0).mean()
            assert got["output_grad_norm"][i] == pytest.approx(ograds[name], rel=1e-5)
            if name.startswith("relu"):
                dead = (out.max(axis=(0, 2, 3)) <= 0).mean()
                assert got["dead_fraction"][i] == dead
            if own:
                keys = [f"{name}.{local}" for local in own]
                hyp = lambda d, keys=keys: math.sqrt(sum(float(d[k].norm()) ** 2 for k in keys))
                assert got["grad_norm"][i] == pytest.approx(hyp(grads), rel=1e-5)
                assert got["param_norm"][i] == pytest.approx(hyp(before), rel=1e-6)
                delta = math.sqrt(sum(float((after[k] - before[k]).norm()) ** 2 for k in keys))
                assert got["update_ratio"][i] == pytest.approx(delta / hyp(before), rel=1e-4)
            else:
                assert np.isnan(got["grad_norm"][i]) and np.isnan(got["update_ratio"][i])
    steps, loss = run.scalars("loss")
    assert list(steps) == list(range(6)) and np.isfinite(loss).all()


def test_a_sampled_step_is_the_capture_of_the_same_pass(digits):
    """The record of step 0 equals capture() of the same model, batch and loss, binned on the run's edges."""
    x, y = digits
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(144, 10))
    start = copy.deepcopy(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    xb, yb = x[:16], y[:16]
    with watch(model, opt, every=5) as run:
        loss = F.cross_entropy(model(xb), yb)
        loss.backward()
        opt.step()
        run.log(loss=loss)
    step = run.at(0)
    ref = capture(start, xb, target=yb, bins=run.edges, feature_maps=False)
    assert step.loss == pytest.approx(ref.loss) and step.loss_kind == "training"
    for name, report in ref.modules.items():
        got = step[name]
        assert [c.output_shapes for c in got.calls] == [c.output_shapes for c in report.calls]
        for a, b in zip(got.calls, report.calls):
            same(a.stats, b.stats, name)
            same(a.histogram, b.histogram, name)
            assert a.grad_output_norm == pytest.approx(b.grad_output_norm, rel=1e-6)
            assert (a.dead_units, a.units, a.input_finite) == (b.dead_units, b.units, b.input_finite)
        for local, p in report.params.items():
            assert got.params[local].norm == pytest.approx(p.norm, rel=1e-6)
            assert got.params[local].grad_norm == pytest.approx(p.grad_norm, rel=1e-5)
            assert got.params[local].update_ratio == pytest.approx(0.1 * p.grad_norm / p.norm, rel=1e-4)
    assert [f.kind for f in find(step)] == [f.kind for f in step.findings]


def check_updates(model, opt, digits, steps: int, layers: tuple[str, ...], between=lambda step: None):
    """Train ``steps`` watched steps (``between(step)`` first at each); every layer's update ratio as the run
    recorded it against ||w after - w before|| / ||w before|| in float64: within 5% for a weight measured on a
    sample (more than 8,192 elements), 1e-4 for the others."""
    x, y = digits
    expected = []
    with watch(model, opt, every=1) as run:
        for step in range(steps):
            between(step)
            xb, yb = x[step * 64:(step + 1) * 64], y[step * 64:(step + 1) * 64]
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad()
            loss.backward()
            before = {n: p.detach().double().clone() for n, p in model.named_parameters()}
            opt.step()
            expected.append({n: float((p.detach().double() - before[n]).norm() / before[n].norm())
                             for n, p in model.named_parameters()})
    for i, step in enumerate(run.steps):
        record = run.at(step)
        for name in layers:
            for local, p in record[name].params.items():
                rel = 0.05 if p.numel > 8192 else 1e-4
                assert p.update_ratio == pytest.approx(expected[i][f"{name}.{local}"], rel=rel), (step, name, local)


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_the_update_of_a_large_weight_is_measured_on_a_sample_close_to_the_whole(digits, optimizer):
    """A weight with more elements than sample_size has its update ||w after - w before|| / ||w before|| measured on
    8,192 of them (evenly spaced blocks meeting every row and column): within 5% of the whole update's, also with
    half the layer's units dead (whole rows of its gradient 0) and Adam's per-element steps."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 512), nn.ReLU(), nn.Linear(512, 384), nn.ReLU(),
                          nn.Linear(384, 10))
    with torch.no_grad():
        model[3].bias[::2] = -100.0  # half of the second layer's units never fire: their rows get no gradient
    opt = torch.optim.SGD(model.parameters(), lr=0.05) if optimizer == "sgd" else \
        torch.optim.Adam(model.parameters(), lr=1e-3)
    assert model[3].weight.numel() > 8192 and model[1].weight.numel() > 8192
    check_updates(model, opt, digits, 3, ("1", "3", "5"))


def test_the_update_is_measured_where_the_parameters_are_now(digits):
    """The update samples are views kept from step to step: a parameter whose values were replaced (``p.data = ...``)
    or made channels_last between sampled steps is measured on its new values, not on memory it left."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(), nn.Flatten(),
                          nn.Linear(128, 96), nn.ReLU(), nn.Linear(96, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    assert model[5].weight.numel() > 8192  # measured on a sample

    def between(step):
        if step == 1:  # new tensors for the large weight and a bias (the optimizer holds the Parameters)
            model[5].weight.data = model[5].weight.data.clone()
            model[7].bias.data = model[7].bias.data.clone()
        if step == 2:
            model.to(memory_format=torch.channels_last)
            assert not model[2].weight.is_contiguous()

    check_updates(model, opt, digits, 4, ("0", "2", "5", "7"), between)


def test_histograms_share_fixed_edges_over_the_steps_and_count_everything(digits):
    x, y = digits
    model = cnn().eval()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with watch(model, opt, every=1, bins=16) as run:
        train(model, opt, batches(x, y, 5), run)
    for name in ("conv1", "relu1", "head"):
        steps, edges, counts, under, over = run.histograms(name)
        assert list(steps) == [0, 1, 2, 3, 4] and len(edges) == 17 and counts.shape == (5, 16)
        numel = run.series(name, "numel")[1]
        assert np.array_equal(counts.sum(axis=1) + under + over, numel)  # small tensors: every value is binned
        merged = run.at(0)[name].calls[0].histogram.merge(run.at(4)[name].calls[0].histogram)
        assert np.array_equal(merged.counts, counts[0] + counts[4])
    assert run.edges["relu1"][0] == 0.0  # non-negative output: edges from 0
    lo, hi = run.edges["conv1"][[0, -1]]
    top = 2 * max(abs(run.series("conv1", "min")[1][0]), abs(run.series("conv1", "max")[1][0]))
    width = hi / 8  # signed: 8 of the 16 bins each side of 0, of the smallest power-of-two width reaching 2x the top
    assert lo == -hi and hi >= top > hi / 2 and np.log2(width).is_integer()
    assert np.array_equal(run.edges["conv1"], width * np.arange(-8, 9))


def test_scalars_stay_on_the_device_until_read_and_belong_to_their_step(digits):
    x, y = digits
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    losses = []
    with watch(model, opt, every=4) as run:
        for xb, yb in batches(x, y, 10):
            loss = F.cross_entropy(model(xb), yb)
            run.log(before_step=loss)  # during the step
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(loss=loss, lr=opt.param_groups[0]["lr"])  # after it: still this step's
            losses.append(loss.item())
        assert len(run._pending) == 20  # tensors wait on their device: no copy (or sync) per step
    steps, values = run.scalars("loss")
    assert list(steps) == list(range(10)) and values.tolist() == losses
    assert run.scalars("before_step")[1].tolist() == losses and run.scalars("lr")[1].tolist() == [0.1] * 10
    assert run.at(4).loss == losses[4] and set(run.scalar_names) == {"loss", "before_step", "lr"}
    with pytest.raises(KeyError, match="no scalar named 'acc'"):
        run.scalars("acc")
    with pytest.raises(ValueError, match="single numbers"):
        run.log(bad=torch.ones(3))


def test_gradient_accumulation_reports_the_accumulated_gradient(digits):
    x, y = digits
    model = cnn().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    accumulated = []
    with watch(model, opt, every=1) as run:
        data = batches(x, y, 12, size=8)
        for _ in range(4):
            for _ in range(3):  # three micro-batches per optimizer step
                xb, yb = next(data)
                (F.cross_entropy(model(xb), yb) / 3).backward()
            accumulated.append(float(model.fc.weight.grad.double().norm()))
            opt.step()
            opt.zero_grad()
    assert run.step_count == 4
    assert run.series("fc", "grad_norm")[1] == pytest.approx(
        [math.hypot(a, float(b)) for a, b in zip(accumulated, _bias_norms(run))], rel=1e-5)
    assert not [f for f in run.findings if f.kind == "grad_accumulating"]
    assert run.series("conv1", "numel")[1].tolist() == [8 * 8 * 8 * 8] * 4  # the first micro-batch's forward


def _bias_norms(run):
    return [run.at(int(s))["fc"].params["bias"].grad_norm for s in run.steps]


def test_several_param_groups_and_their_learning_rates(digits):
    x, y = digits
    model = cnn().eval()
    body = [p for n, p in model.named_parameters() if not n.startswith("head")]
    opt = torch.optim.SGD([{"params": body, "lr": 0.01}, {"params": model.head.parameters(), "lr": 30.0}])
    with watch(model, opt, every=1) as run:
        train(model, opt, batches(x, y, 3), run)
    record = run.record(0)
    assert record.lrs == (0.01, 30.0)
    groups = dict(zip(run.param_keys, record.params[:, layerscope.core.run.PARAM_FIELDS.index("group")]))
    assert groups[("head", "weight")] == 1 and groups[("conv1", "weight")] == 0
    ratio = lambda n: float(np.median(run.series(n, "update_ratio")[1]))
    assert ratio("head") > 100 * ratio("fc")
    large = [f for f in run.findings if f.kind == "update_too_large"]
    assert [f.module for f in large] == ["head"] and "(30)" in large[0].message


def outputs_of(module: nn.Module) -> tuple[list[float], list[float]]:
    """The mean of each output of ``module`` and the norm of its gradient, in float64, by plain hooks."""
    means, grads = [], []

    def keep(module, args, out):
        means.append(float(out.detach().double().mean()))
        out.register_hook(lambda g: grads.append(float(g.double().norm())))

    module.register_forward_hook(keep)
    return means, grads


def test_autocast_bfloat16_with_a_grad_scaler_reports_unscaled_gradient_norms(digits):
    x, y = digits
    model = cnn().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    unscaled = []
    _, out_grads = outputs_of(model.head)
    with watch(model, opt, every=1, scaler=scaler) as run:
        for xb, yb in batches(x, y, 3):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                out = model(xb)
                loss = F.cross_entropy(out.float(), yb)
            opt.zero_grad()
            scale = scaler.get_scale()
            scaler.scale(loss).backward()
            unscaled.append(float(model.fc.weight.grad.double().norm()) / scale)
            out_grads[-1] /= scale
            scaler.step(opt)
            scaler.update()
            run.log(loss=loss)
    assert run.at(0)["fc"].calls[0].output_dtypes == ("bfloat16",)
    assert run.record(0).grad_scale == 2.0**12
    weights = [run.at(int(s))["fc"].params["weight"].grad_norm for s in run.steps]
    assert weights == pytest.approx(unscaled, rel=1e-5)
    assert run.series("head", "output_grad_norm")[1] == pytest.approx(out_grads, rel=1e-5)
    assert np.isfinite(run.series("relu1", "mean")[1]).all()


def test_an_iteration_whose_step_the_grad_scaler_skipped_is_not_recorded(digits):
    """fp16 training starts with a scale too large: GradScaler skips the optimizer step of iterations whose scaled
    gradients overflow. The sampled step is the iteration that stepped: its forward, its gradients, its scale."""
    x, y = digits
    model = cnn().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    fc_means, fc_grads = outputs_of(model.fc)
    with watch(model, opt, every=1, scaler=scaler) as run:
        for i, (xb, yb) in enumerate(batches(x, y, 2)):
            opt.zero_grad()
            loss = F.cross_entropy(model(xb), yb)
            scale = scaler.get_scale()
            scaler.scale(loss * (math.inf if i == 0 else 1.0)).backward()  # iteration 0: an overflow
            weights = float(model.fc.weight.grad.double().norm()) / scale
            before = model.fc.weight.detach().clone()
            scaler.step(opt)
            assert torch.equal(before, model.fc.weight) == (i == 0)
            scaler.update()
    assert run.step_count == 1 and list(run.steps) == [0]
    assert scale == 2.0**9 and run.record(0).grad_scale == scale  # lowered after the skipped iteration
    cap = run.at(0)
    assert cap["fc"].calls[0].stats.mean == pytest.approx(fc_means[1], rel=1e-6)
    assert fc_means[0] != pytest.approx(fc_means[1], rel=1e-3)  # the iterations differ: the test can fail
    assert cap["fc"].calls[0].grad_output_norm == pytest.approx(fc_grads[1] / scale, rel=1e-5)
    assert cap["fc"].params["weight"].grad_norm == pytest.approx(weights, rel=1e-5)
    assert math.isfinite(cap["fc"].params["weight"].update_ratio)


def test_a_loop_without_optimizer_counts_run_step(digits):
    x, y = digits
    model = cnn().eval()
    with watch(model, every=2) as run:
        for xb, yb in batches(x, y, 5):
            F.cross_entropy(model(xb), yb).backward()
            with torch.no_grad():
                model(xb)  # an evaluation pass does not start or record a step
                for p in model.parameters():
                    p -= 0.1 * p.grad
            model.zero_grad()
            run.step()
    assert run.step_count == 5 and list(run.steps) == [0, 2, 4]
    assert np.isnan(run.series("fc", "update_ratio")[1]).all()
    assert np.isfinite(run.series("fc", "grad_norm")[1]).all() and run.record(0).lrs == ()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with watch(model, opt) as run, pytest.raises(RuntimeError, match="optimizer.step"):
        run.step()
    with pytest.raises(RuntimeError, match="inside the"):
        run.step()


def test_bad_arguments_get_clear_errors():
    model = nn.Linear(2, 2)
    with pytest.raises(TypeError, match="nn.Module"):
        watch("model")
    with pytest.raises(TypeError, match="Optimizer"):
        watch(model, optimizer="sgd")
    with pytest.raises(ValueError, match="every"):
        watch(model, every=0)
    with pytest.raises(ValueError, match="keep"):
        watch(model, keep=2)
    with pytest.raises(TypeError, match="unknown threshold update_hgh"):
        watch(model, update_hgh=1.0)
    run = watch(model)
    with pytest.raises(KeyError, match="no module named 'nope'"):
        run.series("nope", "mean")
    with pytest.raises(ValueError, match="unknown field"):
        run.series("", "average")
    with pytest.raises(KeyError, match="no step has been sampled"):
        run.at(0)


# -- findings over time, each from a real bug ---------------------------------------------------------------------


def kinds(run) -> dict[str, list]:
    out: dict[str, list] = {}
    for f in run.findings:
        out.setdefault(f.kind, []).append(f)
    return out


def test_a_healthy_run_has_no_finding_over_time(digits):
    x, y = digits
    model = cnn().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    with watch(model, opt, every=5) as run:
        train(model, opt, batches(x, y, 120), run)
    assert [(f.kind, f.module) for f in run.findings] == []
    steps, loss = run.scalars("loss")
    assert loss[-10:].mean() < 0.5 * loss[:10].mean()


def test_a_learning_rate_a_hundred_times_too_high_kills_the_relus(digits):
    x, y = digits
    model = cnn().train()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    with watch(model, opt, every=5) as run:
        train(model, opt, batches(x, y, 60), run)
    found = kinds(run)
    diverged = found["loss_diverged"][0]
    assert diverged.severity == "error" and diverged.step == int(np.argmax(run.scalars("loss")[1] > 10 *
                                                                           run.scalars("loss")[1][0]))
    dead = {f.module: f for f in found["dead_units_growing"]}
    assert "relu3" in dead or "" in dead
    first, last = run.series("relu3", "dead_fraction")[1][[0, -1]]
    assert last - first >= 0.25


def test_nan_in_training_names_the_step_and_the_first_module(digits):
    x, y = digits
    model = cnn().eval()
    opt = torch.optim.SGD(model.parameters(), lr=1e4)
    with watch(model, opt, every=1) as run:
        train(model, opt, batches(x, y, 8), run)
    found = kinds(run)
    diverged = found["loss_diverged"][0]
    nan = [f for f in run.findings if f.kind in ("nan", "inf")][0]
    assert diverged.details["first_nonfinite_step"] == nan.step
    assert diverged.module == nan.module == diverged.details["first_nonfinite_module"]
    assert nan.step in run._pinned and nan.details["sampled_steps"] >= 1


def test_a_sampled_step_says_which_parameters_hold_nan():
    model = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2))
    with watch(model, every=1) as run:
        for step in range(2):
            if step == 1:
                with torch.no_grad():
                    model[2].weight[0, 1] = float("nan")
            model(torch.randn(5, 4)).sum().backward()
            run.step()
    finite = [{f"{m}.{k}".lstrip("."): p.finite for m, r in run.at(s).modules.items() for k, p in r.params.items()}
              for s in (0, 1)]
    assert all(finite[0].values())
    assert finite[1] == {name: bool(torch.isfinite(p).all()) for name, p in model.named_parameters()}
    assert finite[1]["2.weight"] is False


def test_a_learning_rate_far_too_low_is_too_small_and_flat(digits):
    x, y = digits
    model = cnn().eval()
    opt = torch.optim.SGD(model.parameters(), lr=1e-7)
    with watch(model, opt, every=10, flat_window=20) as run:
        train(model, opt, batches(x, y, 40), run)
    found = kinds(run)
    assert [f.module for f in found["update_too_small"]] == [""]
    assert found["update_too_small"][0].details["update_ratio"] < 1e-5
    assert found["loss_flat"][0].step == 20
    assert not [f for f in run.find(flat_window=21) if f.kind == "loss_flat"]  # needs 42 logged steps


def test_a_forgotten_zero_grad_is_grad_accumulating(digits):
    x, y = digits
    model = cnn().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, every=3) as run:
        train(model, opt, batches(x, y, 7), run, zero_grad=False)
    stale = kinds(run)["grad_accumulating"][0]
    assert stale.step == 3 and stale.module == "" and stale.severity == "error"
    assert stale.details["parameters"] == len(list(model.parameters()))
    # zeroed in place (set_to_none=False) counts as cleared: no finding
    opt2 = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt2, every=1) as run:
        for xb, yb in batches(x, y, 3):
            opt2.zero_grad(set_to_none=False)
            F.cross_entropy(model(xb), yb).backward()
            opt2.step()
    assert "grad_accumulating" not in kinds(run)


def test_a_layer_left_out_of_the_optimizer(digits):
    x, y = digits
    model = cnn().eval()
    head = model.head
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if not n.startswith("head")], lr=0.05)
    before = head.weight.detach().clone()
    with watch(model, opt, every=2) as run:
        train(model, opt, batches(x, y, 4), run)
    missing = kinds(run)["param_not_in_optimizer"]
    assert [f.module for f in missing] == ["head"] and missing[0].details["parameters"] == ["head.weight", "head.bias"]
    assert torch.equal(head.weight, before)


def test_training_in_eval_mode(digits):
    x, y = digits
    model = cnn().eval()  # forgot model.train(): dropout off, batch norm frozen
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, every=2) as run:
        train(model, opt, batches(x, y, 3), run)
    found = kinds(run)["eval_mode_training"]
    assert [f.module for f in found] == [""] and found[0].details["layers"] == 2 and found[0].step == 0
    model.train()
    with watch(model, opt, every=2) as run:
        train(model, opt, batches(x, y, 3), run)
    assert "eval_mode_training" not in kinds(run)


def test_one_pass_findings_are_kept_once_with_their_steps(digits):
    x, y = digits
    model = cnn().eval()
    with torch.no_grad():
        model.fc.bias.fill_(-50.0)  # relu3 is dead from the start
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    with watch(model, opt, every=1, keep=4) as run:
        train(model, opt, batches(x, y, 12), run)
    dead = [f for f in run.findings if f.kind == "dead_activation"]
    assert [(f.module, f.step) for f in dead] == [("relu3", 0)]
    assert dead[0].details["sampled_steps"] == 12 and dead[0].details["last_step"] == 11  # also the thinned steps
    assert len(run.records) <= 4 and run.steps[0] == 0



def test_the_judged_findings_are_those_of_each_steps_capture():
    """The run judges each sampled step on a lean rebuild (only the histograms of saturating activations): its
    findings are those of the step's full capture, a saturated sigmoid's (read off its histogram) among them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 2))
    with torch.no_grad():
        model[0].weight.mul_(40.0)  # the sigmoid's inputs are far from 0: most of its outputs sit at 0 or 1
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    with watch(model, opt, every=1) as run:
        train(model, opt, [(x, y)] * 3, run)
    found = {(f.kind, f.module) for f in run.findings if "sampled_steps" in f.details}  # the one-pass ones
    assert ("saturated_activation", "1") in found
    assert found == {(f.kind, f.module) for step in run.steps for f in run.at(step).findings}


# -- records: bounded, saved, exported ------------------------------------------------------------------------------


def test_memory_stays_bounded_by_thinning_old_steps():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x, y = torch.randn(4, 8), torch.randint(0, 2, (4,))
    sizes = []
    with watch(model, opt, every=1, keep=16) as run:
        for step in range(300):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            run.log(loss=loss)
            if step in (99, 299):
                sizes.append(sum(r.calls.nbytes + r.counts.nbytes + r.params.nbytes for r in run.records))
    steps = run.steps
    assert len(steps) <= 16 and steps[0] == 0 and steps[-1] == 299
    assert list(steps[-8:]) == list(range(292, 300))  # the newest half as it was
    assert np.all(np.diff(steps) > 0) and sizes[1] <= sizes[0]
    assert len(run.scalars("loss")[0]) == 300  # scalars: every step


def test_save_and_load_keep_every_record(digits, tmp_path):
    x, y = digits
    model = cnn().train()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    with watch(model, opt, every=2, keep=8, dead_growth=0.3) as run:
        train(model, opt, batches(x, y, 20), run)
    path = tmp_path / "run.lsr"
    run.save(path)
    loaded = load(path)
    assert isinstance(loaded, layerscope.Run) and not loaded.live
    assert (loaded.step_count, loaded.every, loaded.keep, loaded.thresholds) == (20, 2, 8, {"dead_growth": 0.3})
    assert list(loaded.steps) == list(run.steps) and loaded.scalar_names == run.scalar_names
    for a, b in zip(run.records, loaded.records):
        same(a, b, f"step {a.step}")
    for step in run.steps:
        same(run.at(int(step)), loaded.at(int(step)), f"at({step})")
    same(run.findings, loaded.findings, "findings")
    same(run.structure, loaded.structure, "structure")
    with pytest.raises(RuntimeError, match="loaded from a file"):
        with loaded:
            pass


def test_tensorboard_event_file_holds_the_scalars_and_histograms(digits, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    x, y = digits
    model = cnn().eval()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with watch(model, opt, every=2) as run:
        train(model, opt, batches(x, y, 5), run)
    run.to_tensorboard(tmp_path, modules=["", "relu1", "fc"])
    events = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0, "histograms": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["histograms"]) == {"activations/model", "activations/relu1", "activations/fc"}
    assert {"loss", "grad_norm/fc", "param_norm/fc", "update_ratio/fc"} <= set(tags["scalars"])
    steps, loss = run.scalars("loss")
    assert [(e.step, e.value) for e in events.Scalars("loss")] == [
        (int(s), pytest.approx(v, rel=1e-6)) for s, v in zip(steps, loss)]
    assert [e.value for e in events.Scalars("update_ratio/fc")] == pytest.approx(
        run.series("fc", "update_ratio")[1].tolist(), rel=1e-6)
    hist = events.Histograms("activations/relu1")
    steps, edges, counts, under, over = run.histograms("relu1")
    assert [h.step for h in hist] == list(steps)
    first = hist[0].histogram_value
    assert first.num == counts[0].sum() + under[0] + over[0] == run.series("relu1", "numel")[1][0]
    assert list(first.bucket)[: len(counts[0])] == counts[0].tolist() or over[0] or under[0]
    assert first.min >= 0 and first.max == pytest.approx(max(edges[-1], run.series("relu1", "max")[1][0]))

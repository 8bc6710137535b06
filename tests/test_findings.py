"""Findings: one small broken model per kind, each checked for its kind, its module and its numbers,
and healthy torchvision models that must give no error or warning."""

import dataclasses
import math
import re
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

import layerscope
from layerscope import Finding, capture
from layerscope.core.findings import find, group


def only(cap, kind: str) -> Finding:
    found = [f for f in cap.findings if f.kind == kind]
    assert len(found) == 1, [(f.kind, f.module) for f in cap.findings]
    return found[0]


def modules_of(cap, kind: str) -> list[str]:
    return [f.module for f in cap.findings if f.kind == kind]


class MissingFlatten(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.head = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        return self.head(self.features(x))


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)


class LogInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.log(self.fc1(x)))


class PerCount(nn.Module):
    """Divides each feature by how often it was seen; a feature never seen has a count of 0."""

    def __init__(self, counts):
        super().__init__()
        self.register_buffer("counts", counts)

    def forward(self, x):
        return x / self.counts


class Detached(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x).detach())


class WithUnused(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 2)
        self.extra = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))

    def forward(self, x):
        return self.fc(x)


class TimesZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(self.fc(x) * 0)


class SqrtAtZero(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.out = nn.Linear(4, 4), nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.sqrt(torch.relu(self.fc(x)) * 0))


def mlp(*sizes, act=nn.ReLU):
    layers = []
    for i, (a, b) in enumerate(zip(sizes, sizes[1:])):
        layers += [nn.Linear(a, b)] + ([act()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


# -- a failed forward: shape, dtype, device --------------------------------------------------------


def test_missing_flatten_is_a_shape_mismatch_at_the_linear():
    cap = capture(MissingFlatten(), torch.randn(2, 3, 8, 8))
    f = only(cap, "shape_mismatch")
    assert (f.severity, f.module) == ("error", "head")
    assert f.details["received"]["shape"] == [2, 8, 4, 4]
    assert "(2, 8, 4, 4)" in f.message and "128" in f.message
    assert cap.findings[0] is f


def test_wrong_in_features_deep_in_nested_sequentials():
    inner = nn.Sequential(nn.Linear(16, 12), nn.Linear(10, 4))
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(nn.ReLU(), inner))
    cap = capture(model, torch.randn(2, 8))
    f = only(cap, "shape_mismatch")
    assert f.module == "1.1.1"
    assert f.details["received"]["shape"] == [2, 12] and "10" in f.message
    assert modules_of(cap, "unused_module") == []  # the layers after the failure never got their turn


def test_float64_submodule_is_a_dtype_mismatch():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4).double(), nn.Linear(4, 2))
    cap = capture(model, torch.randn(2, 4))
    f = only(cap, "dtype_mismatch")
    assert f.module == "1"
    assert f.details["received"]["dtype"] == "float32" and f.details["module_has"] == "float64"
    assert "float64" in f.message and "float32" in f.message


def test_float64_batch_for_a_float32_model_names_the_whole_model():
    cap = capture(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2)), torch.randn(2, 4, dtype=torch.float64))
    f = only(cap, "dtype_mismatch")
    assert f.module == "" and f.details["failed_in"] == "0"
    assert f.message.startswith("The batch is float64, but the model's weights are float32")


def test_meta_submodule_is_a_device_mismatch_naming_that_submodule():
    model = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU()), nn.Linear(4, 2))
    model[1].to("meta")
    cap = capture(model, torch.randn(2, 4))
    assert cap.error.module == "1.0"  # torch stopped inside it...
    f = only(cap, "device_mismatch")
    assert f.module == "1"  # ...but the submodule left on the meta device is the one to fix
    assert f.details["received"]["device"] == "cpu" and f.details["module_has"] == "meta"
    assert "meta" in f.message and "cpu" in f.message


class Raises(nn.Module):
    def forward(self, x):
        raise RuntimeError("this block is not finished")


def test_other_failures_keep_the_engine_message():
    cap = capture(nn.Sequential(nn.Linear(4, 4), nn.Sequential(Raises())), torch.randn(2, 4))
    f = only(cap, "forward_error")
    assert (f.severity, f.module, f.message) == ("error", "1.0", cap.error.message)
    assert f.details["torch_message"] == "this block is not finished"
    cap = capture(mlp(4, 3), torch.randn(2, 4), target=torch.tensor([5, 0]))
    f = only(cap, "loss_error")
    assert (f.module, f.message) == ("", cap.error.message) and "5" in f.message


# -- NaN / Inf: the producer, once -----------------------------------------------------------------


def test_log_of_a_negative_in_a_module_names_that_module_once():
    model = nn.Sequential(nn.Linear(4, 8), Log(), nn.Linear(8, 2))
    x = torch.randn(6, 4)
    cap = capture(model, x)
    f = only(cap, "nan")
    assert (f.severity, f.module) == ("error", "1")
    with torch.no_grad():
        expected = int((model[0](x) < 0).sum())
    assert expected > 0 and f.details["nan_count"] == expected and f.details["numel"] == 48
    assert f"{expected} of 48 values" in f.message
    assert f.details["downstream"] == ["2", ""]
    assert [g.module for g in cap.findings if g.severity == "error"] == ["1"]  # no NaN loss, no NaN gradients


def test_log_in_forward_code_names_the_module_whose_code_ran_it():
    model = LogInForward()
    x = torch.randn(6, 4)
    cap = capture(model, x)
    f = only(cap, "nan")
    assert f.module == ""  # not fc2, which only received the NaN
    assert f.details["first_seen_in"] == "fc2"
    with torch.no_grad():
        expected = int(model(x).isnan().sum())
    assert f.details["nan_count"] == expected == 12
    assert [(g.kind, g.module) for g in capture(model, x, backward=False).findings] == [("nan", "")]


def test_nan_weight_names_the_layer_holding_it():
    model = mlp(4, 8, 2)
    with torch.no_grad():
        model[2].weight[1, 3] = float("nan")
    cap = capture(model, torch.randn(5, 4))
    f = only(cap, "nan")
    assert f.module == "2" and f.details["nan_count"] == 5
    assert "parameter weight already holds NaN" in f.message


def test_division_by_zero_gives_inf_at_the_dividing_module():
    counts = torch.tensor([3.0, 0.0, 5.0, 0.0])
    model = nn.Sequential(nn.Linear(4, 4), PerCount(counts), nn.Linear(4, 2))
    x = torch.randn(5, 4)
    cap = capture(model, x)
    f = only(cap, "inf")
    assert f.module == "1"
    with torch.no_grad():
        expected = int(torch.isinf(model[1](model[0](x))).sum())
    assert f.details["inf_count"] == expected == 10 and f.details["nan_count"] == 0
    assert "10 of 20 values (50.0%)" in f.message


def test_nan_in_the_batch_is_reported_once_as_input():
    x = torch.randn(3, 4)
    x[1, 2] = float("nan")
    cap = capture(mlp(4, 8, 2), x)
    f = only(cap, "input_nonfinite")
    assert (f.module, f.details["nan_count"], f.details["numel"]) == ("", 1, 12)
    assert [g.kind for g in cap.findings if g.severity == "error"] == ["input_nonfinite"]


def test_nan_loss_from_finite_outputs():
    cap = capture(mlp(4, 3), torch.randn(2, 4), loss_fn=lambda out, batch: torch.log(out.sum() * 0 - 1))
    f = only(cap, "nonfinite_loss")
    assert f.module == "" and math.isnan(f.details["loss"]) and f.details["loss_kind"] == "loss_fn"
    assert [g.kind for g in cap.findings if g.severity == "error"] == ["nonfinite_loss"]


def test_nan_gradient_from_sqrt_at_zero_names_the_layer_before_it():
    cap = capture(SqrtAtZero(), torch.randn(3, 4))
    f = only(cap, "nonfinite_grad")
    assert f.module == "fc" and f.details["layers"] == ["fc"]
    assert not math.isfinite(cap["fc"].param_grad_norms["weight"])
    assert math.isfinite(cap["out"].param_grad_norms["weight"])


# -- gradients ---------------------------------------------------------------------------------------


def test_detach_in_forward_leaves_the_block_before_it_without_gradient():
    cap = capture(Detached(), torch.randn(4, 4))
    f = only(cap, "no_grad")
    # reported where the gradient is cut (the model's own forward code), listing the starved block
    assert (f.severity, f.module, f.details["cut_at"]) == ("warning", "", "")
    assert f.details["modules"] == ["a"] and f.modules == ("", "a")
    assert f.details["parameters"] == 4 * 8 + 8
    assert cap["b"].param_grad_norms["weight"] > 0


def test_frozen_block_is_info_and_named_once():
    model = mlp(4, 8, 8, 2)
    model[2].requires_grad_(False)
    block = nn.Sequential(nn.Linear(4, 4), nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4)))
    block[1].requires_grad_(False)
    for m, name, count in ((model, "2", 72), (block, "1", 40)):
        cap = capture(m, torch.randn(4, 4))
        f = only(cap, "frozen")
        assert (f.severity, f.module, f.details["parameters"]) == ("info", name, count)
        assert modules_of(cap, "no_grad") == []


def test_output_times_zero_gives_exactly_zero_gradients():
    cap = capture(TimesZero(), torch.randn(3, 4))
    f = only(cap, "zero_grad")
    assert (f.severity, f.module) == ("warning", "fc")
    assert cap["fc"].param_grad_norms["weight"] == 0.0


def _ratio(model: nn.Sequential, layer: int, x: torch.Tensor) -> float:
    """||gradient|| / ||parameters|| of one layer under the mean of all outputs, by autograd."""
    params = list(model[layer].parameters())
    out = model(x)
    grads = torch.autograd.grad(out.sum() / out.numel(), params)
    norm = lambda ts: math.sqrt(sum(float(t.detach().double().pow(2).sum()) for t in ts))
    return norm(grads) / norm(params)


def _exploding_stack():
    """Twelve Linear(64, 64) with weights of std 1.5: gradients grow by orders of magnitude towards the input."""
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    for p in model.parameters():
        nn.init.normal_(p, std=1.5)
    x = torch.randn(8, 64)
    return model, x, capture(model, x)


def test_exploding_linear_stack():
    model, x, cap = _exploding_stack()
    assert cap.error is None and math.isfinite(cap.loss)
    exploding = {f.module: f for f in cap.findings if f.kind == "exploding_grad"}
    assert "0" in exploding and exploding["0"].severity == "warning"
    assert exploding["0"].details["ratio"] == pytest.approx(_ratio(model, 0, x), rel=1e-3)
    assert exploding["0"].details["ratio"] > 1e4


def test_gradients_overflowing_to_inf_are_exploding_not_a_bad_operation():
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(18)])
    for p in model.parameters():
        nn.init.normal_(p, std=1.5)
    cap = capture(model, torch.randn(8, 64))
    assert math.isfinite(cap.loss) and modules_of(cap, "nonfinite_grad") == []
    exploding = [f for f in cap.findings if f.kind == "exploding_grad"]
    assert any(f.module == "0" or "0" in f.details.get("layers", ()) for f in exploding)
    if exploding[0].severity == "error":  # some gradient norms overflowed to Inf
        assert exploding[0].details["largest_finite_grad"] > 1e12
        assert "overflows to Inf" in exploding[0].message


def test_vanishing_sigmoid_stack_at_its_first_layers_only():
    layers = []
    for _ in range(25):
        layers += [nn.Linear(32, 32), nn.Sigmoid()]
    model = nn.Sequential(*layers)
    x = torch.randn(8, 32)
    cap = capture(model, x)
    (vanishing,) = [f for f in cap.findings if f.kind == "vanishing_grad"]  # the repeats grouped into one
    names = vanishing.modules
    assert {"0", "2", "4"} <= set(names) and "48" not in names and "24" not in names
    assert vanishing.module == "0" and list(vanishing.details["each"]) == list(names)
    first = vanishing.details
    assert first["ratio"] == vanishing.details["each"]["0"]["ratio"]
    assert first["ratio"] == pytest.approx(_ratio(model, 0, x), rel=1e-3)
    assert first["ratio"] < first["median_ratio"] * 1e-3
    assert modules_of(cap, "exploding_grad") == []


def test_summed_softmax_is_a_flat_loss_not_vanishing_gradients():
    model = nn.Sequential(mlp(8, 16, 16, 4), nn.Softmax(dim=1))
    x = torch.randn(8, 8)
    cap = capture(model, x)
    assert cap.loss == pytest.approx(8.0)  # each row of a softmax adds up to 1
    assert [(f.kind, f.module) for f in cap.findings] == [("flat_loss", "1")]
    assert cap.findings[0].details["largest_inner_grad"] < 1e-4 * math.sqrt(8 * 4)
    with_target = capture(model, x, target=torch.arange(8) % 4)
    assert with_target.findings == ()


def test_thresholds_can_be_overridden():
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    for p in model.parameters():
        nn.init.normal_(p, std=1.5)
    cap = capture(model, torch.randn(8, 64))
    assert [f for f in find(cap, exploding_ratio=1e30) if f.kind == "exploding_grad"] == []


# -- activations -------------------------------------------------------------------------------------


def test_relu_after_a_bias_of_minus_100_is_dead():
    model = mlp(8, 16, 4)
    nn.init.constant_(model[0].bias, -100.0)
    cap = capture(model, torch.randn(4, 8))
    f = only(cap, "dead_activation")
    assert (f.severity, f.module) == ("warning", "1")
    assert (f.details["dead_units"], f.details["units"], f.details["fraction"]) == (16, 16, 1.0)
    assert only(cap, "zero_grad").module == "0"


@pytest.mark.parametrize("batch", [1, 2, 8])
def test_default_initialised_relus_are_not_called_dead(batch):
    for seed in range(5):
        torch.manual_seed(seed)
        cap = capture(mlp(16, 32, 32, 8), torch.randn(batch, 16))
        dead = [c.dead_units / c.units for n in ("1", "3") for c in cap[n].calls]
        assert modules_of(cap, "dead_activation") == [], dead


def test_saturated_sigmoid():
    model = nn.Sequential(nn.Linear(4, 16), nn.Sigmoid())
    nn.init.normal_(model[0].weight, std=20.0)
    x = torch.randn(64, 4)
    cap = capture(model, x)
    f = only(cap, "saturated_activation")
    assert f.module == "1"
    with torch.no_grad():
        y = model(x)
    share = lambda m: float(((y <= m) | (y >= 1 - m)).double().mean())
    edges = cap["1"].calls[0].histogram.edges
    width = edges[1] - edges[0]  # read off the histogram: exact up to one bin
    assert share(0.02 - width) <= f.details["fraction"] <= share(0.02 + width)
    assert f.details["fraction"] == pytest.approx(share(0.02), abs=0.03) and share(0.02) > 0.5


# -- the model's flags and the batch -----------------------------------------------------------------


def test_unused_submodule_is_info_and_named_once():
    cap = capture(WithUnused(), torch.randn(2, 4))
    f = only(cap, "unused_module")
    assert (f.severity, f.module, f.details["parameters"]) == ("info", "extra", 20 + 10)


def test_dropout_and_batchnorm_in_training_mode():
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(), nn.Linear(8, 2))
    cap = capture(model, torch.randn(6, 4))
    f = only(cap, "train_mode")
    assert (f.severity, f.module, f.details["layers"]) == ("info", "", 2)
    model.eval()
    model[2].train()
    assert only(capture(model, torch.randn(6, 4)), "train_mode").module == "2"


def test_unnormalised_pixels():
    x = torch.randint(0, 256, (2, 3, 8, 8)).float()
    cap = capture(nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU()), x)
    f = only(cap, "input_range")
    assert (f.severity, f.module) == ("warning", "")
    assert (f.details["min"], f.details["max"]) == (float(x.min()), float(x.max()))
    assert f.details["mean"] == pytest.approx(float(x.double().mean()))


# -- order, and the capture filling its findings ----------------------------------------------------


class Mixed(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem, self.drop, self.frozen, self.spare = mlp(4, 8, 8), nn.Dropout(), mlp(8, 8, 2), nn.Linear(3, 3)
        nn.init.constant_(self.stem[0].bias, -1000.0)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.frozen(self.drop(self.stem(x)))


def test_sorted_by_severity_then_execution_order():
    cap = capture(Mixed(), torch.randint(0, 256, (4, 4)).float())
    assert [(f.severity, f.kind, f.module) for f in cap.findings] == [
        ("warning", "zero_grad", "stem.0"),
        ("warning", "dead_activation", "stem.1"),
        ("warning", "input_range", ""),  # the whole model returns last
        ("info", "frozen", "frozen"),
        ("info", "train_mode", ""),
        ("info", "unused_module", "spare"),  # never called: after everything else
    ]
    assert [cap[f.module].calls[0].index for f in cap.findings[:3]] == [0, 1, 9]
    assert [(f.kind, f.module) for f in find(cap)] == [(f.kind, f.module) for f in cap.findings]


@pytest.mark.parametrize("factory", [torchvision.models.resnet18, torchvision.models.squeezenet1_1])
@pytest.mark.parametrize("target", [None, torch.tensor([3, 7])])
def test_healthy_torchvision_models_have_no_error_or_warning(factory, target):
    model = factory(weights=None).eval()
    cap = capture(model, torch.randn(2, 3, 64, 64), target=target)
    assert cap.error is None and cap.backward
    assert [(f.kind, f.module, f.message) for f in cap.findings if f.severity != "info"] == []
    assert cap.findings == ()  # eval mode, nothing frozen or unused either
    relus = [c for _, c in cap.calls if c.units]
    assert relus and max(c.dead_units / c.units for c in relus) < 0.9  # up to about half is usual at random init


def test_findings_leave_the_model_as_it_was():
    model = Detached()
    flags = [p.requires_grad for p in model.parameters()], [m.training for m in model.modules()]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    cap = capture(model, torch.randn(4, 4))
    find(cap)
    assert flags == ([p.requires_grad for p in model.parameters()], [m.training for m in model.modules()])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())
    assert all(p.grad is None for p in model.parameters())


def test_sum_loss_after_layernorm_behind_dropout_is_flat_not_exploding():
    torch.manual_seed(0)
    layers = []
    for _ in range(40):
        layers += [nn.Linear(16, 16), nn.ReLU(), nn.LayerNorm(16), nn.Dropout(0.1)]
    cap = capture(nn.Sequential(*layers).eval(), torch.randn(4, 16))
    kinds = {f.kind for f in cap.findings}
    assert "flat_loss" in kinds and not kinds & {"exploding_grad", "vanishing_grad"}
    flat = next(f for f in cap.findings if f.kind == "flat_loss")
    assert flat.module == "158"  # the last LayerNorm: the Dropout after it passes the same tensor on


# -- fix lines, grouped repeats, where a gradient is cut -----------------------------------------------------------

SRC = Path(__file__).resolve().parents[1] / "src" / "layerscope"


def kinds_in_source() -> set[str]:
    """Every finding kind the rules can make, read off the source: Finding("kind", ...), the mismatch kinds, the
    phases' "<phase>_error", "nan"/"inf", and kinds picked from tuples (("update_too_large", ...), ...)."""
    found = set()
    for path in (SRC / "core").rglob("*.py"):
        code = path.read_text()
        found |= set(re.findall(r'Finding\(\s*"([a-z_]+)"', code))
        found |= set(re.findall(r'_mismatch\(\s*"([a-z_]+)"', code))
        found |= set(re.findall(r'for kind, [^\n]*in \(\("([a-z_]+)"', code))
        found |= set(re.findall(r'\("([a-z_]+)", lambda', code))
        if 'Finding(f"{err.phase}_error"' in code:
            found |= {f"{phase}_error" for phase in ("loss", "backward")}  # "forward" goes to the kinds below
        if 'kind = "nan" if' in code:
            found |= {"nan", "inf"}
    return found


def test_every_finding_kind_has_a_fix_line():
    from layerscope.core.fixes import FIXES

    kinds = kinds_in_source()
    assert {"shape_mismatch", "device_mismatch", "nan", "inf", "no_grad", "loss_error", "rank_desync",
            "unsupported_ops", "activation_memory"} <= kinds, kinds
    watched = {"loss_diverged", "loss_flat", "grad_accumulating", "update_too_large", "update_too_small",
               "param_not_in_optimizer", "eval_mode_training", "dead_units_growing"}  # core/trends.py
    assert watched <= kinds, watched - kinds
    missing = sorted(k for k in kinds if not FIXES.get(k, "").startswith("Try: "))
    assert not missing, f"finding kinds without a 'Try: ...' line in core/fixes.py: {missing}"
    assert all(len(line) <= 220 for line in FIXES.values())  # one short line each
    # made findings carry it, also when built by hand; an explicit fix wins
    assert Finding("nan", "error", "0", "m").fix == FIXES["nan"]
    assert Finding("nan", "error", "0", "m", fix="Try: this.").fix == "Try: this."


def test_fix_lines_and_grouped_findings_survive_save_and_load(tmp_path):
    model = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
    for p in model.parameters():
        nn.init.normal_(p, std=1.5)
    cap = capture(model, torch.randn(8, 64))
    path = tmp_path / "c.lsc"
    cap.save(path)
    back = layerscope.load(path)
    assert [(f.kind, f.module, f.fix, f.modules, f.message) for f in back.findings] == \
        [(f.kind, f.module, f.fix, f.modules, f.message) for f in cap.findings]
    assert all(f.fix.startswith("Try: ") for f in back.findings)


def test_repeats_of_one_kind_are_one_finding_listing_the_modules():
    model, x, cap = _exploding_stack()
    (exploding,) = [f for f in cap.findings if f.kind == "exploding_grad"]
    names = exploding.modules
    assert len(names) >= 3 and names[0] == exploding.module == "0"  # the first to run leads
    assert list(names) == sorted(names, key=int)  # in execution order
    for name in names:  # each module's own numbers are kept, and they are right
        assert exploding.details["each"][name]["ratio"] == pytest.approx(_ratio(model, int(name), x), rel=1e-3)
        assert exploding.details["each"][name]["ratio"] > 1e4
    assert f"The same holds for {len(names) - 1} more modules: 1, 2" in exploding.message
    ungrouped = find(dataclasses.replace(cap, findings=()))
    assert [f.modules for f in ungrouped] == [f.modules for f in cap.findings]  # find() groups the same way
    # the tree badges every module listed, and counts the finding once on the model around them
    from layerscope.widget.rows import FIELDS, tree_rows

    rows = {r[0]: dict(zip(FIELDS, r)) for r in tree_rows(cap)}
    assert all(rows[n]["warnings"] >= 1 for n in names)
    assert rows[""]["warnings"] == sum(f.severity == "warning" for f in cap.findings)


def test_kinds_found_once_per_input_or_op_are_not_grouped():
    a = Finding("input_range", "warning", "", "a", {"input": "[0]"})
    b = Finding("input_range", "warning", "", "b", {"input": "[1]"})
    c, d = Finding("dead_activation", "warning", "1", "c"), Finding("dead_activation", "warning", "3", "d")
    got = group([a, b, c, d])
    assert got[:2] == [a, b] and len(got) == 3 and got[2].modules == ("1", "3")


class Detach(nn.Module):
    def forward(self, x):
        return x.detach()


def test_a_detach_module_is_where_the_gradient_is_cut():
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 8), Detach(), nn.Linear(8, 2))
    cap = capture(model, torch.randn(3, 4))
    f = only(cap, "no_grad")
    assert (f.module, f.details["cut_at"], f.details["modules"]) == ("3", "3", ["0", "2"])
    assert "cut at 3 (Detach)" in f.message and "its input carries gradient, its output none" in f.message
    assert f.details["parameters"] == 4 * 8 + 8 + 8 * 8 + 8
    calls = {n: r.calls[0] for n, r in cap.modules.items() if r.calls}
    assert (calls["3"].input_requires_grad, calls["3"].output_requires_grad) == (True, False)
    assert (calls["0"].input_requires_grad, calls["0"].output_requires_grad) == (False, True)  # the batch has none
    assert cap["4"].param_grad_norms["weight"] > 0


class NoGradBackbone(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone, self.head = nn.Sequential(nn.Linear(4, 8), nn.ReLU()), nn.Linear(8, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.backbone(x)
        return self.head(h)


def test_a_block_run_under_no_grad_is_where_the_gradient_is_cut():
    cap = capture(NoGradBackbone(), torch.randn(3, 4))
    f = only(cap, "no_grad")
    assert f.module == "backbone" and "ran under torch.no_grad()" in f.message


def test_an_all_nan_output_says_no_finite_values():
    from layerscope.widget import text

    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(float("nan"))
    cap = capture(model, torch.randn(2, 4))
    rows = dict(text.stats_rows(cap["0"].calls[0]))
    assert rows["NaN"] == "8" and {rows[k] for k in ("mean", "std", "min", "max")} == {"no finite values"}

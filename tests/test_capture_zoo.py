"""The capture engine on odd models with exactly known structure."""

import pytest
import torch
from torch import nn

import layerscope
from layerscope import capture
from models import (
    Containers,
    DictModel,
    NamedTupleOut,
    RaisesInBackward,
    RaisesInside,
    ReusedReLU,
    TiedLM,
    missing_flatten,
    no_hooks_left,
)


def test_every_named_module_is_reported_in_order():
    model = Containers()
    cap = capture(model, torch.randn(3, 4))
    assert list(cap.modules) == [name for name, _ in model.named_modules()]
    assert cap[""].children == ("blocks", "stack", "scales")
    assert cap["blocks"].children == ("blocks.a", "blocks.b")
    assert cap["stack.1"].depth == 2 and cap[""].depth == 0
    assert cap["scales"].num_own_params == 8 and cap["scales"].calls == ()  # indexed, never called
    assert cap["blocks.a"].num_params == 20 and cap[""].num_params == 3 * 20 + 8


def test_dict_inputs_and_dict_outputs():
    batch = {"image": torch.randn(2, 3, 8, 8), "scale": torch.tensor(2.0)}
    cap = capture(DictModel(), batch)
    assert cap.error is None
    root = cap[""].calls[0]
    assert root.input_shapes == {"image": (2, 3, 8, 8), "scale": ()}
    assert root.output_shapes == {"logits": (2, 2), "features": (2, 4)}
    assert set(cap.output) == {"logits", "features"}
    assert not cap.output["logits"].requires_grad
    assert cap["image"].param_grad_norms["weight"] > 0


def test_reused_module_gets_one_record_per_call():
    model = ReusedReLU()
    cap = capture(model, torch.randn(4, 6))
    assert len(cap["act"].calls) == 2
    assert [c.output_shapes for c in cap["act"].calls] == [(4, 6), (4, 6)]
    order = [name for name, _ in cap.calls]
    assert order == ["fc1", "act", "fc2", "act", "fc3", ""]


def test_tied_weights_are_counted_once_and_lstm_tuples_nest():
    model = TiedLM()
    cap = capture(model, torch.randint(0, 50, (2, 7)))
    expected = sum(p.numel() for p in model.parameters())
    assert cap.total_params == expected == cap[""].num_params
    assert cap["embed"].num_own_params == cap["out"].num_own_params == 50 * 8
    assert cap["lstm"].calls[0].output_shapes == ((2, 7, 8), ((1, 2, 8), (1, 2, 8)))
    assert cap["unused"].calls == () and cap["unused"].param_grad_norms == {"weight": None, "bias": None}
    # the tied weight's gradient is the sum of both uses: the same norm on both modules
    assert cap["embed"].param_grad_norms["weight"] == cap["out"].param_grad_norms["weight"]
    model.zero_grad()
    model(torch.randint(0, 50, (2, 7)))  # a plain run still works afterwards
    assert no_hooks_left(model)


def test_namedtuple_and_non_tensor_outputs():
    cap = capture(NamedTupleOut(), torch.randn(2, 5))
    assert cap[""].calls[0].output_shapes == ((2, 3), ((2, 2), None, None))
    assert cap.output.main.shape == (2, 3) and cap.output.aux[1] == "not a tensor"
    assert cap.loss_kind == "sum"


def test_frozen_parameters_get_no_gradient_and_count_as_untrainable():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    cap = capture(model, torch.randn(3, 4))
    assert cap.trainable_params == 10 and cap.total_params == 30
    assert cap["0"].num_trainable == 0
    assert cap["0"].param_grad_norms == {"weight": None, "bias": None}
    assert cap["2"].param_grad_norms["weight"] > 0
    assert model[0].weight.requires_grad is False


def test_forward_error_names_the_innermost_module_and_keeps_earlier_records():
    model = RaisesInside()
    cap = capture(model, torch.randn(2, 4))
    err = cap.error
    assert err.phase == "forward" and err.module == "block.1" and err.module_type == "Boom"
    assert isinstance(err.exception, RuntimeError) and "boom" in err.message
    assert len(cap["pre"].calls) == 1 and len(cap["block.0"].calls) == 1
    # the failed calls are recorded, innermost first, after the calls that returned: what they got, no output
    failed = [(name, c.index, c.input_shapes, c.output_shapes, c.stats) for name, c in cap.calls if c.failed]
    assert failed == [("block.1", 2, (2, 4), None, None), ("block", 3, (2, 4), None, None), ("", 4, (2, 4), None, None)]
    assert not any(c.failed for name, c in cap.calls if name in ("pre", "block.0"))
    assert no_hooks_left(model)


def test_shape_mismatch_message_puts_got_next_to_expected():
    cap = capture(missing_flatten(), torch.randn(2, 3, 28, 28))
    assert cap.error.module == "head.0"
    assert cap.error.message.startswith("head.0 (Linear, in_features=1568) got input of shape (2, 8, 14, 14)")
    assert "1568" in cap.error.message.split("got")[1]


def test_dtype_mismatch_message():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2).double())
    cap = capture(model, torch.randn(2, 4))
    assert cap.error.module == "1"
    assert "float32" in cap.error.message and "float64" in cap.error.message


def test_backward_error_is_reported_with_phase_and_module():
    model = RaisesInBackward()
    cap = capture(model, torch.randn(2, 4))
    assert cap.error.phase == "backward" and cap.error.module == "bad"
    assert "no backward here" in cap.error.message
    assert cap.loss is not None and cap.output is not None
    assert no_hooks_left(model)


def test_target_out_of_range_is_a_clear_loss_error():
    cap = capture(nn.Linear(4, 10), torch.randn(2, 4), target=torch.tensor([3, 12]))
    assert cap.error.phase == "loss"
    assert "class 12" in cap.error.message and "10 classes" in cap.error.message


def test_loss_choices():
    model = nn.Linear(4, 3)
    x, y = torch.randn(5, 4), torch.tensor([0, 1, 2, 1, 0])
    ce = capture(model, x, target=y)
    assert ce.loss_kind == "cross_entropy"
    assert ce.loss == pytest.approx(float(nn.functional.cross_entropy(model(x), y).detach()), rel=1e-6)
    custom = capture(model, x, loss_fn=lambda out, batch: (out**2).mean())
    assert custom.loss_kind == "loss_fn"
    assert custom.loss == pytest.approx(float((model(x) ** 2).mean().detach()), rel=1e-6)
    plain = capture(model, x)
    assert plain.loss_kind == "sum" and plain.loss == pytest.approx(float(model(x).sum().detach()), rel=1e-5)
    forward_only = capture(model, x, backward=False)
    assert forward_only.loss is None and not forward_only.backward
    assert forward_only[""].param_grad_norms == {"weight": None, "bias": None}


@pytest.mark.parametrize(
    ("model", "batch", "error"),
    [
        ("not a model", torch.randn(2), TypeError),
        (nn.Linear(2, 2), None, ValueError),
        (nn.Linear(2, 2), 3.0, TypeError),
        (nn.Linear(2, 2), "text", TypeError),
    ],
)
def test_wrong_arguments_raise_clear_errors(model, batch, error):
    with pytest.raises(error, match="capture"):
        capture(model, batch)


def test_capture_under_no_grad_still_computes_gradients():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        cap = capture(model, torch.randn(3, 4))
    assert cap.backward and cap["0"].param_grad_norms["weight"] > 0


def test_public_api_is_small_and_explicit():
    assert "capture" in layerscope.__all__
    for name in layerscope.__all__:
        assert hasattr(layerscope, name)


def test_train_mode_capture_leaves_batchnorm_running_stats_untouched():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for run in (lambda: capture(model, torch.randn(4, 3, 8, 8) * 5 + 3),
                lambda: capture(model, torch.randn(4, 3, 8, 8), target=torch.tensor([9, 9, 9, 9]))):  # loss error
        run()
        for key, value in model.state_dict().items():
            assert torch.equal(value, before[key]), key
    assert model.training and no_hooks_left(model)


def test_garbage_collector_state_is_put_back():
    import gc

    assert gc.isenabled()
    capture(RaisesInside(), torch.randn(2, 4))
    assert gc.isenabled()
    gc.disable()
    try:
        capture(nn.Linear(2, 2), torch.randn(1, 2))
        assert not gc.isenabled()
    finally:
        gc.enable()
    with pytest.raises(TypeError):
        capture("not a model", torch.randn(2))
    assert gc.isenabled()


def test_a_settled_pause_puts_what_it_built_in_the_oldest_generation_and_leaves_a_freeze_alone():
    import gc

    from layerscope.core.collector import paused

    with paused(settle=True):
        built = [[i] for i in range(1000)]  # (lists: tracked by the collector)
    assert gc.isenabled()
    oldest = {id(o) for o in gc.get_objects(generation=2)}
    assert all(id(b) in oldest for b in built)
    gc.freeze()  # the process's own: a settled pause must not let these go
    try:
        frozen = gc.get_freeze_count()
        with paused(settle=True):
            more = [[i] for i in range(1000)]
        assert gc.get_freeze_count() == frozen and gc.isenabled() and len(more) == len(built)
    finally:
        gc.unfreeze()

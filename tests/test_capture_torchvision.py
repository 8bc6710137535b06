"""The capture engine on real torchvision models: counts, names, state, outputs and gradients."""

import copy

import pytest
import torch
from torch import nn
from torchvision import models as tvm

from layerscope import capture
from models import no_hooks_left

MODELS = {
    "squeezenet1_1": (lambda: tvm.squeezenet1_1(weights=None), (2, 3, 96, 96)),
    "resnet18": (lambda: tvm.resnet18(weights=None), (2, 3, 64, 64)),
    "mobilenet_v3_small": (lambda: tvm.mobilenet_v3_small(weights=None), (2, 3, 64, 64)),
    "vit_b_16": (lambda: tvm.vit_b_16(weights=None), (1, 3, 224, 224)),
}


def _state(model: nn.Module):
    return (
        [m.training for m in model.modules()],
        [(p.requires_grad, p.grad) for p in model.parameters()],
    )


def _mixed_state(model: nn.Module) -> nn.Module:
    """Some submodules in train mode, a frozen parameter, and an existing .grad to keep."""
    model.eval()
    modules = list(model.modules())
    modules[len(modules) // 2].train()
    params = list(model.parameters())
    params[0].requires_grad_(False)
    params[-1].grad = torch.full_like(params[-1], 7.0)
    return model


@pytest.mark.parametrize("name", list(MODELS))
def test_real_models_counts_names_state_and_output(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build()
    batch = torch.randn(shape)
    model.eval()
    with torch.no_grad():
        expected = model(batch)
    cap = capture(model, batch)
    assert cap.error is None, cap.error
    assert cap.total_params == sum(p.numel() for p in model.parameters())
    assert list(cap.modules) == [n for n, _ in model.named_modules()]
    assert torch.equal(cap.output, expected)  # bit-identical in eval mode
    assert _state(model)[0] == [m.training for m in model.modules()]
    assert no_hooks_left(model)
    # state of a model in mixed train/eval mode, with an existing .grad, restored exactly
    model = _mixed_state(model)
    before = _state(model)
    grad_before = list(model.parameters())[-1].grad.clone()
    cap = capture(model, batch)
    after = _state(model)
    assert after[0] == before[0]
    assert [rg for rg, _ in after[1]] == [rg for rg, _ in before[1]]
    assert all(g_after is g_before for (_, g_after), (_, g_before) in zip(after[1], before[1]))
    assert torch.equal(list(model.parameters())[-1].grad, grad_before)
    assert no_hooks_left(model)


def test_googlenet_train_mode_namedtuple_outputs():
    torch.manual_seed(0)
    model = tvm.googlenet(weights=None, aux_logits=True, init_weights=True).train()
    batch = torch.randn(2, 3, 96, 96)
    torch.manual_seed(1)
    expected = model(batch)
    torch.manual_seed(1)
    cap = capture(model, batch)
    assert cap.error is None
    assert cap[""].calls[0].output_shapes == ((2, 1000), (2, 1000), (2, 1000))
    assert type(cap.output).__name__ == "GoogLeNetOutputs"
    assert torch.equal(cap.output.logits, expected.logits.detach())  # same dropout draws: capture uses no RNG
    assert all(m.training for m in model.modules())
    assert cap["aux1.fc2"].param_grad_norms["weight"] > 0


def _reference_gradients(model: nn.Module, batch: torch.Tensor, target: torch.Tensor):
    """Plain autograd on a copy with every ReLU out of place: parameter grads and output grads per module."""
    ref = copy.deepcopy(model)
    for m in ref.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    outputs = {}

    def keep(name):
        def hook(module, args, out):
            if isinstance(out, torch.Tensor) and out.requires_grad:
                out.retain_grad()
                outputs[name] = out

        return hook

    handles = [m.register_forward_hook(keep(n)) for n, m in ref.named_modules()]
    try:
        loss = nn.functional.cross_entropy(ref(batch), target)
        loss.backward()
    finally:
        for h in handles:
            h.remove()
    params = {n: p.grad.double().norm().item() for n, p in ref.named_parameters()}
    out_grads = {n: t.grad.double().norm().item() for n, t in outputs.items()}
    return float(loss.detach()), params, out_grads


@pytest.mark.parametrize("name", ["squeezenet1_1", "resnet18"])
def test_gradients_match_plain_autograd_despite_inplace_relu(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    batch, target = torch.randn(shape), torch.tensor([1, 2])
    loss, params, out_grads = _reference_gradients(model, batch, target)
    cap = capture(model, batch, target=target)
    assert cap.error is None and cap.loss == pytest.approx(loss, rel=1e-5)
    for full_name, norm in params.items():
        module, _, local = full_name.rpartition(".")
        assert cap[module].param_grad_norms[local] == pytest.approx(norm, rel=1e-4, abs=1e-9), full_name
    for full_name, p in model.named_parameters():  # taken as each module's forward ended
        module, _, local = full_name.rpartition(".")
        assert cap[module].param_norms[local] == pytest.approx(p.double().norm().item(), rel=1e-5), full_name
    checked = 0
    for module, norm in out_grads.items():
        calls = cap[module].calls
        if len(calls) == 1 and calls[0].grad_output_norm is not None:
            assert calls[0].grad_output_norm == pytest.approx(norm, rel=1e-4, abs=1e-9), module
            checked += 1
    assert checked > 20
    # an in-place ReLU does not change the conv's recorded statistics: they describe its own output
    conv = "features.0" if name == "squeezenet1_1" else "conv1"
    assert cap[conv].calls[0].stats.min < 0
    assert all(p.grad is None for p in model.parameters())

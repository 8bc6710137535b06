"""Grad-CAM and Grad-CAM++ against pytorch-grad-cam, autograd and hand computations, on real models."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn
from torchvision import models as tvm
from torchvision.ops.misc import Permute

from layerscope import CAMResult, grad_cam
from layerscope.core.cam import layout
from models import no_hooks_left


def _corr(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64).ravel(), np.asarray(b, dtype=np.float64).ravel())[0, 1])


def _peer_cam(cls, model, layer_name, x, targets, reshape=None):
    """pytorch-grad-cam's map, on a copy (it puts the model in eval mode and fills .grad)."""
    model = copy.deepcopy(model)
    with cls(model, [model.get_submodule(layer_name)], reshape_transform=reshape) as cam:
        return cam(x, targets=[ClassifierOutputTarget(int(t)) for t in targets])


def _autograd_cam(model, x, layer_name, targets):
    """Grad-CAM from first principles: a hook keeps the layer's output, autograd gives d score / d output."""
    kept = {}
    handle = model.get_submodule(layer_name).register_forward_hook(lambda m, a, out: kept.setdefault("a", out))
    try:
        logits = model(x)
    finally:
        handle.remove()
    a = kept["a"]
    (g,) = torch.autograd.grad(logits.gather(1, targets[:, None]).sum(), a)
    return F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).detach()


def test_resnet18_layer4_matches_pytorch_grad_cam():
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 112, 112)
    result = grad_cam(model, x, layer="layer4", target=[3, 7])
    assert isinstance(result, CAMResult)
    assert result.layer == "layer4" and result.method == "gradcam"
    assert result.raw.shape == (2, 4, 4) and result.heatmap.shape == (2, 112, 112)
    assert result.target.tolist() == [3, 7]
    with torch.no_grad():
        logits = model(x)
    torch.testing.assert_close(result.scores, logits[[0, 1], [3, 7]])
    for i in range(2):
        assert float(result.heatmap[i].min()) == 0.0 and float(result.heatmap[i].max()) == pytest.approx(1.0)
    peer = _peer_cam(GradCAM, model, "layer4", x, [3, 7])
    for i in range(2):
        assert _corr(result.heatmap[i], peer[i]) > 0.99


def test_gradcam_plus_plus_matches_pytorch_grad_cam():
    # pytorch-grad-cam adds 1e-6 to the Grad-CAM++ denominator, layerscope does not: close, not identical.
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 112, 112)
    result = grad_cam(model, x, layer="layer4", method="gradcam++")
    assert result.method == "gradcam++"
    peer = _peer_cam(GradCAMPlusPlus, model, "layer4", x, result.target)
    for i in range(2):
        assert _corr(result.heatmap[i], peer[i]) > 0.99


def test_squeezenet_matches_pytorch_grad_cam_and_picks_the_class_map():
    model = tvm.squeezenet1_1(weights=None).eval()
    x = torch.randn(2, 3, 112, 112)
    result = grad_cam(model, x, layer="features")
    peer = _peer_cam(GradCAM, model, "features", x, result.target)
    for i in range(2):
        assert _corr(result.heatmap[i], peer[i]) > 0.99
    # Automatic: the last spatial output before the pooling is the ReLU after the 1x1 class convolution,
    # where Grad-CAM reduces to that class's own (ReLU'd) map divided by the number of positions.
    auto = grad_cam(model, x)
    assert auto.layer == "classifier.2"
    with torch.no_grad():
        class_maps = model.classifier[:3](model.features(x))
    expected = class_maps[torch.arange(2), auto.target] / (class_maps.shape[-2] * class_maps.shape[-1])
    torch.testing.assert_close(auto.raw, expected)


def test_inplace_relu_after_the_layer_uses_the_values_it_returned():
    # squeezenet's classifier.1 (the class convolution) is followed by ReLU(inplace=True).
    model = tvm.squeezenet1_1(weights=None).eval()
    x = torch.randn(1, 3, 96, 96)
    result = grad_cam(model, x, layer="classifier.1", target=5)
    a = model.classifier[1](model.classifier[0](model.features(x)))
    score = torch.flatten(model.classifier[3](F.relu(a)), 1)[0, 5]
    (g,) = torch.autograd.grad(score, a)
    expected = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).detach()
    assert a.min() < 0  # the in-place ReLU would have changed these values
    torch.testing.assert_close(result.raw, expected)


def test_residual_add_in_place_after_the_layer():
    # resnet's BasicBlock does `out = bn2(...); out += identity; out = relu(out)` on bn2's output.
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    result = grad_cam(model, x, layer="layer4.1.bn2", target=11)
    h = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    h = model.layer4[0](model.layer3(model.layer2(model.layer1(h))))
    block = model.layer4[1]
    a = block.bn2(block.conv2(block.relu(block.bn1(block.conv1(h)))))
    score = model.fc(torch.flatten(model.avgpool(F.relu(a + h)), 1))[0, 11]
    (g,) = torch.autograd.grad(score, a)
    expected = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1)).detach()
    torch.testing.assert_close(result.raw, expected)


class _Tiny(nn.Module):
    """conv 1->2 (3x3, hand-set), ReLU, global average pool, linear 2->3 (hand-set)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1, bias=False)
        self.act = nn.ReLU()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(2, 3, bias=False)
        with torch.no_grad():
            self.conv.weight.zero_()
            self.conv.weight[0, 0, 1, 1] = 1.0  # channel 0: the pixel itself
            self.conv.weight[1, 0, 1, 2] = 2.0  # channel 1: twice the right neighbour
            self.fc.weight.copy_(torch.tensor([[1.0, 0.5], [-1.0, 2.0], [0.0, 0.0]]))

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.act(self.conv(x))), 1))


def test_tiny_model_equals_hand_computation():
    image = np.array([[1, -2, 3, 0], [0, 4, -1, 2], [5, 0, 1, -3], [2, 2, 0, 1]], dtype=np.float32)
    x = torch.from_numpy(image)[None, None]
    right = np.pad(image, ((0, 0), (0, 1)))[:, 1:]
    maps = np.stack([np.maximum(image, 0), np.maximum(2 * right, 0)])  # ReLU output [2, 4, 4]
    fc = np.array([[1.0, 0.5], [-1.0, 2.0], [0.0, 0.0]])
    logits = fc @ maps.mean(axis=(1, 2))
    target = int(np.argmax(logits))
    grads = np.broadcast_to(fc[target][:, None, None] / 16, maps.shape)  # d score / d map: fc weight / (4*4)

    cam = np.maximum((grads.mean(axis=(1, 2))[:, None, None] * maps).sum(axis=0), 0)
    result = grad_cam(_Tiny(), x, layer="act")
    assert result.target.tolist() == [target]
    np.testing.assert_allclose(result.scores.numpy(), [logits[target]], rtol=1e-6)
    np.testing.assert_allclose(result.raw[0].numpy(), cam, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(result.heatmap[0].numpy(), (cam - cam.min()) / (cam.max() - cam.min()), rtol=1e-6)

    g2, g3 = grads**2, grads**3
    alpha = g2 / (2 * g2 + maps.sum(axis=(1, 2))[:, None, None] * g3)
    weights = (alpha * np.maximum(grads, 0)).sum(axis=(1, 2))
    cam_pp = np.maximum((weights[:, None, None] * maps).sum(axis=0), 0)
    result_pp = grad_cam(_Tiny(), x, layer="act", method="gradcam++")
    np.testing.assert_allclose(result_pp.raw[0].numpy(), cam_pp, rtol=1e-6, atol=1e-7)

    auto = grad_cam(_Tiny(), x)  # the last spatial output before the pooling
    assert auto.layer == "act"
    torch.testing.assert_close(auto.raw, result.raw)


def test_automatic_layer_on_resnet18_equals_layer4_and_works_under_no_grad():
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(2, 3, 64, 64)
    explicit = grad_cam(model, x, layer="layer4")
    with torch.no_grad():
        auto = grad_cam(model, x)
    with torch.inference_mode():
        made_in_inference_mode = x.clone()
        inference = grad_cam(model, made_in_inference_mode)
    assert auto.layer == inference.layer == "layer4"
    torch.testing.assert_close(auto.raw, explicit.raw)
    torch.testing.assert_close(inference.raw, explicit.raw)
    torch.testing.assert_close(auto.raw, _autograd_cam(model, x, "layer4", auto.target))
    assert float(auto.raw.max()) > 0


def test_frozen_model_and_layer_given_as_module():
    model = tvm.resnet18(weights=None).eval().requires_grad_(False)
    x = torch.randn(1, 3, 64, 64)
    auto = grad_cam(model, x)  # nothing in the pass needs a gradient: the layer is run again with a leaf
    by_module = grad_cam(model, x, layer=model.layer4)
    assert auto.layer == by_module.layer == "layer4"
    torch.testing.assert_close(auto.raw, by_module.raw)
    model.requires_grad_(True)
    torch.testing.assert_close(auto.raw, _autograd_cam(model, x, "layer4", auto.target))
    assert all(p.grad is None for p in model.parameters())


def _mixed_state(model):
    model.train()
    model.layer1.eval()
    model.conv1.weight.requires_grad_(False)
    model.fc.weight.grad = torch.full_like(model.fc.weight, 7.0)
    return model


def _state(model):
    return (
        [m.training for m in model.modules()],
        [(p.requires_grad, p.grad) for p in model.parameters()],
        [b.clone() for b in model.buffers()],
    )


def _assert_same_state(model, before):
    flags, params, buffers = _state(model)
    assert flags == before[0]
    assert [r for r, _ in params] == [r for r, _ in before[1]]
    assert all(g is g0 for (_, g), (_, g0) in zip(params, before[1]))
    assert torch.equal(model.fc.weight.grad, torch.full_like(model.fc.weight, 7.0))
    assert all(torch.equal(b, b0) for b, b0 in zip(buffers, before[2]))
    assert no_hooks_left(model)


def test_training_mode_result_and_state_restored():
    model = _mixed_state(tvm.resnet18(weights=None))
    x = torch.randn(2, 3, 64, 64)
    before = _state(model)
    result = grad_cam(model, x)
    _assert_same_state(model, before)  # batch-norm running statistics included
    reference = copy.deepcopy(model)  # training-mode batch norm: same batch statistics, same forward
    expected = _autograd_cam(reference, x, "layer4", result.target)
    assert result.layer == "layer4"
    torch.testing.assert_close(result.raw, expected)


class _Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


def test_state_restored_after_exceptions():
    model = _mixed_state(tvm.resnet18(weights=None))
    x = torch.randn(2, 3, 64, 64)
    before = _state(model)
    with pytest.raises(ValueError, match="1000 classes"):
        grad_cam(model, x, layer="layer4", target=1000)
    _assert_same_state(model, before)
    original_fc = model.fc
    model.fc = nn.Sequential(original_fc, _Boom())
    try:
        for layer in (None, "layer3"):
            with pytest.raises(RuntimeError, match="boom"):
                grad_cam(model, x, layer=layer)
            assert no_hooks_left(model)
    finally:
        model.fc = original_fc
    _assert_same_state(model, before)


def test_clear_errors():
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    with pytest.raises(ValueError, match="no module named 'layer5'.*'layer4'"):
        grad_cam(model, x, layer="layer5")
    with pytest.raises(ValueError, match=r"'fc' \(Linear\) returns shape \(1, 1000\), which has no spatial layout"):
        grad_cam(model, x, layer="fc")
    with pytest.raises(ValueError, match=r"'avgpool' .* \(1, 512, 1, 1\)"):
        grad_cam(model, x, layer="avgpool")
    with pytest.raises(ValueError, match="method must be one of gradcam, gradcam\\+\\+"):
        grad_cam(model, x, method="scorecam")
    with pytest.raises(ValueError, match="one per item"):
        grad_cam(model, x, target=[1, 2])
    assert no_hooks_left(model)
    side_branch = _SideBranch()
    with pytest.raises(ValueError, match="scores do not depend on the output of layer 'unused'"):
        grad_cam(side_branch, torch.randn(2, 3, 8, 8), layer="unused")
    assert grad_cam(side_branch, torch.randn(2, 3, 8, 8)).layer == "used"


class _SideBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.unused, self.used, self.fc = nn.Conv2d(3, 4, 3), nn.Conv2d(3, 4, 3), nn.Linear(4, 3)

    def forward(self, x):
        self.unused(x)
        return self.fc(self.used(x).mean(dim=(2, 3)))


@pytest.mark.parametrize(
    ("shape", "size", "expected"),
    [
        ((2, 512, 7, 7), (224, 224), ("nchw",)),
        ((2, 512, 7, 10), (224, 320), ("nchw",)),
        ((2, 7, 7, 768), (224, 224), ("nhwc",)),
        ((2, 7, 10, 768), (224, 320), ("nhwc",)),
        ((2, 197, 768), (224, 224), ("tokens", False, 1, 14, 14)),  # class token + 14 x 14
        ((2, 201, 768), (224, 224), ("tokens", False, 5, 14, 14)),  # class + 4 register tokens
        ((2, 196, 768), (224, 224), ("tokens", False, 0, 14, 14)),  # patch tokens only
        ((2, 281, 768), (224, 320), ("tokens", False, 1, 14, 20)),  # non-square image
        ((197, 2, 768), (224, 224), ("tokens", True, 1, 14, 14)),  # sequence first
        ((2, 50, 64), None, ("tokens", False, 1, 7, 7)),  # no image input: square grids
        ((2, 1000), (224, 224), None),
        ((2, 512, 1, 1), (224, 224), None),
        ((2, 3, 768), (224, 224), None),  # 3 tokens hold no 2 x 2 grid
        ((2, 240, 768), (224, 224), None),  # 44 tokens besides the 14 x 14 grid: too many to be prefix tokens
    ],
)
def test_layouts(shape, size, expected):
    assert layout(shape, 2, size) == expected


def test_channels_last_output_equals_its_channels_first_permutation():
    # Swin-style: [N, H, W, C] between two permutes, on a non-square input.
    model = nn.Sequential()
    model.add_module("conv", nn.Conv2d(3, 6, 4, stride=4))
    model.add_module("to_nhwc", Permute([0, 2, 3, 1]))
    model.add_module("norm", nn.LayerNorm(6))
    model.add_module("to_nchw", Permute([0, 3, 1, 2]))
    model.add_module("pool", nn.AdaptiveAvgPool2d(1))
    model.add_module("flat", nn.Flatten())
    model.add_module("fc", nn.Linear(6, 4))
    x = torch.randn(2, 3, 12, 20)
    nhwc = grad_cam(model, x, layer="norm")
    nchw = grad_cam(model, x, layer="to_nchw")
    assert nhwc.raw.shape == (2, 3, 5) and nhwc.heatmap.shape == (2, 12, 20)
    torch.testing.assert_close(nhwc.raw, nchw.raw)
    torch.testing.assert_close(nhwc.raw, _autograd_cam(model, x, "to_nchw", nhwc.target))
    assert grad_cam(model, x).layer == "to_nchw"


@pytest.mark.slow
def test_vit_b_16_without_a_reshape_function():
    model = tvm.vit_b_16(weights=None).eval()
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision initialises the head to zero
    x = torch.randn(1, 3, 224, 224)
    result = grad_cam(model, x)
    assert result.layer == "encoder.layers.encoder_layer_11.ln_1"
    assert result.raw.shape == (1, 14, 14) and result.heatmap.shape == (1, 224, 224)
    # Reference: the same layer's tokens, class token dropped, as a 14 x 14 grid, by hand with autograd.
    kept = {}
    handle = model.get_submodule(result.layer).register_forward_hook(lambda m, a, out: kept.setdefault("a", out))
    try:
        score = model(x)[0, result.target[0]]
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(score, kept["a"])
    grid = lambda t: t[:, 1:].reshape(1, 14, 14, 768).permute(0, 3, 1, 2)
    a, g = grid(kept["a"].detach()), grid(g)
    expected = F.relu((g.mean(dim=(2, 3), keepdim=True) * a).sum(dim=1))
    assert float(expected.max()) > 0
    torch.testing.assert_close(result.raw, expected)
    assert no_hooks_left(model) and all(p.grad is None for p in model.parameters())

"""Attention maps from nn.MultiheadAttention and scaled_dot_product_attention, and attention rollout."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import VisionTransformer

from layerscope import attention_maps, attention_rollout
from layerscope.core.attention import sdpa_weights
from models import no_hooks_left


def _mha_by_hand(mha: nn.MultiheadAttention, x: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head from the packed input projection, x batch-first [N, L, E]."""
    q, k, _ = F.linear(x, mha.in_proj_weight, mha.in_proj_bias).chunk(3, dim=-1)
    n, length, e = x.shape
    heads = mha.num_heads
    split = lambda t: t.reshape(n, length, heads, e // heads).transpose(1, 2)
    q, k = split(q), split(k)
    return (q @ k.transpose(-2, -1) / math.sqrt(e // heads)).softmax(dim=-1)


def _output_during(model, run):
    """The model's output during ``run()`` (a hook on the root, removed afterwards)."""
    seen = {}
    handle = model.register_forward_hook(lambda m, a, out: seen.setdefault("out", out))
    try:
        result = run()
    finally:
        handle.remove()
    return result, seen["out"]


def test_transformer_encoder_fast_path_model_outputs_unchanged_and_weights_by_hand():
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 2).eval()  # eval + no_grad: PyTorch's fused fast path
    x = torch.randn(3, 5, 16)
    with torch.no_grad():
        before = encoder(x)
    maps, during = _output_during(encoder, lambda: attention_maps(encoder, x))
    assert list(maps) == ["layers.0.self_attn", "layers.1.self_attn"]
    for weights in maps.values():
        assert weights.shape == (3, 4, 5, 5)
        torch.testing.assert_close(weights.sum(dim=-1), torch.ones(3, 4, 5))
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(encoder(x), before, atol=0, rtol=0)
        expected = _mha_by_hand(encoder.layers[0].self_attn, x)  # post-norm: layer 0 attends over x itself
    torch.testing.assert_close(maps["layers.0.self_attn"], expected, atol=1e-6, rtol=1e-5)
    assert torch.backends.mha.get_fastpath_enabled()
    assert no_hooks_left(encoder)


@pytest.mark.filterwarnings("ignore:The PyTorch API of nested tensors")
def test_padding_mask_gives_zero_weight_to_padded_keys():
    layer = nn.TransformerEncoderLayer(8, 2, 16, batch_first=True)
    encoder = nn.TransformerEncoder(layer, 1).eval()
    x = torch.randn(2, 6, 8)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[0, 4:] = True
    with torch.no_grad():
        before = encoder(x, src_key_padding_mask=pad)  # the nested-tensor path: zeros at padded positions
    maps, during = _output_during(encoder, lambda: attention_maps(encoder, {"src": x, "src_key_padding_mask": pad}))
    weights = maps["layers.0.self_attn"]
    assert float(weights[0, :, :, 4:].abs().max()) == 0.0
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(2, 2, 6))
    torch.testing.assert_close(during[~pad], before[~pad], atol=1e-5, rtol=1e-5)


def test_torchvision_vit_outputs_unchanged_and_weights_by_hand():
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=5).eval()
    nn.init.normal_(vit.heads.head.weight)
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = vit(images)
    names = ["encoder.layers.encoder_layer_0.self_attention", "encoder.layers.encoder_layer_1.self_attention"]
    maps, during = _output_during(vit, lambda: attention_maps(vit, images))
    assert list(maps) == names
    assert all(w.shape == (2, 2, 17, 17) for w in maps.values())  # class token + 4 x 4 patches
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)
    block = vit.encoder.layers[1]
    kept = {}
    handle = block.ln_1.register_forward_hook(lambda m, a, out: kept.setdefault("x", out))
    with torch.no_grad():
        vit(images)
    handle.remove()
    torch.testing.assert_close(maps[names[1]], _mha_by_hand(block.self_attention, kept["x"]), atol=1e-6, rtol=1e-5)
    assert no_hooks_left(vit)


class _Caller(nn.Module):
    """Calls one nn.MultiheadAttention the ways user code does and keeps what each call returned."""

    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(8, 2)  # sequence first
        self.returned = []

    def forward(self, x):
        out1, w1 = self.mha(x, x, x)  # need_weights=True, averaged over heads by default
        out2, w2 = self.mha(x, x, x, None, False)  # need_weights=False, positionally
        out3, w3 = self.mha(x[:, 0], x[:, 0], x[:, 0], average_attn_weights=False)  # unbatched, per head
        self.returned = [w1, w2, w3]
        return out1 + out2 + out3[:, None]


def test_multihead_attention_returns_what_each_caller_asked_for():
    model = _Caller().eval()
    x = torch.randn(4, 3, 8)  # [L, N, E]
    with torch.no_grad():
        before = model(x)
        expected = list(model.returned)
    maps, during = _output_during(model, lambda: attention_maps(model, x))
    torch.testing.assert_close(during, before, atol=1e-5, rtol=1e-5)
    w1, w2, w3 = model.returned
    torch.testing.assert_close(w1, expected[0])
    assert w2 is None and expected[1] is None
    torch.testing.assert_close(w3, expected[2])
    assert list(maps) == ["mha", "mha (call 2)", "mha (call 3)"]
    torch.testing.assert_close(maps["mha"], maps["mha (call 2)"])
    torch.testing.assert_close(maps["mha"].mean(dim=1), expected[0])
    assert maps["mha (call 3)"].shape == (1, 2, 4, 4)
    torch.testing.assert_close(maps["mha (call 3)"][0], expected[2])


class _SdpaAttention(nn.Module):
    """A timm-style attention block: packed qkv projection, F.scaled_dot_product_attention, projection."""

    def __init__(self, dim, heads, causal=False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        n, length, dim = x.shape
        qkv = self.qkv(x).reshape(n, length, 3, self.heads, dim // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(out.transpose(1, 2).reshape(n, length, dim))


class _Block(nn.Module):
    def __init__(self, dim, heads, causal=False):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = _SdpaAttention(dim, heads, causal)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def test_sdpa_attention_blocks_weights_by_hand_and_outputs_unchanged():
    model = nn.Sequential(_Block(12, 3), _Block(12, 3, causal=True)).eval()
    x = torch.randn(2, 5, 12)
    with torch.no_grad():
        before = model(x)
    original = F.scaled_dot_product_attention
    maps, during = _output_during(model, lambda: attention_maps(model, x))
    assert F.scaled_dot_product_attention is original
    assert list(maps) == ["0.attn", "1.attn"]
    torch.testing.assert_close(during, before, atol=0, rtol=0)  # the original function still does the work

    attn = model[1].attn
    with torch.no_grad():
        h = model[1].norm(model[0](x))
        q, k, _ = attn.qkv(h).reshape(2, 5, 3, 3, 4).permute(2, 0, 3, 1, 4).numpy()
    logits = q @ k.transpose(0, 1, 3, 2) / 2.0  # sqrt(head dim 4)
    logits[..., np.triu_indices(5, 1)[0], np.triu_indices(5, 1)[1]] = -np.inf  # causal
    expected = np.exp(logits - logits.max(-1, keepdims=True))
    expected /= expected.sum(-1, keepdims=True)
    np.testing.assert_allclose(maps["1.attn"].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert float(maps["1.attn"][..., 0, 1:].abs().max()) == 0.0
    assert no_hooks_left(model)


def test_sdpa_wrapper_and_fast_path_flag_restored_after_an_exception():
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.block = _Block(8, 2)

        def forward(self, x):
            self.block(x)
            raise RuntimeError("after attention")

    model = Broken()
    original = F.scaled_dot_product_attention
    with pytest.raises(RuntimeError, match="after attention"):
        attention_maps(model, torch.randn(1, 3, 8))
    assert F.scaled_dot_product_attention is original
    assert torch.backends.mha.get_fastpath_enabled()
    assert no_hooks_left(model)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"is_causal": True},
        {"scale": 0.3},
        {"attn_mask": "bool"},
        {"attn_mask": "float"},
        {"enable_gqa": True},
    ],
)
def test_sdpa_weights_reproduce_torch_output(kwargs):
    q = torch.randn(2, 4, 5, 8)
    k = torch.randn(2, 2 if kwargs.get("enable_gqa") else 4, 7, 8)
    v = torch.randn(*k.shape[:-1], 6)
    if kwargs.get("attn_mask") == "bool":
        kwargs["attn_mask"] = torch.rand(5, 7) > 0.3
        kwargs["attn_mask"][:, 0] = True
    elif kwargs.get("attn_mask") == "float":
        kwargs["attn_mask"] = torch.randn(2, 1, 5, 7)
    if kwargs.get("is_causal"):
        k, v = k[:, :, :5], v[:, :, :5]
    weights = sdpa_weights(q, k, v, **kwargs)
    expected = F.scaled_dot_product_attention(q, k, v, **kwargs)
    values = v.repeat_interleave(2, dim=1) if kwargs.get("enable_gqa") else v
    torch.testing.assert_close(weights @ values, expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(weights.sum(dim=-1), torch.ones(weights.shape[:-1]))


def test_model_without_attention_gives_no_maps():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert attention_maps(model, torch.randn(2, 4)) == {}


def _rollout_numpy(maps):
    result = None
    for w in maps:
        a = w.mean(axis=1) + np.eye(w.shape[-1])
        a = a / a.sum(axis=-1, keepdims=True)
        result = a if result is None else np.einsum("nij,njk->nik", a, result)
    return result[:, 0]


def test_attention_rollout_equals_numpy():
    rng = np.random.default_rng(0)
    maps = []
    for _ in range(3):
        w = rng.random((2, 4, 6, 6))
        maps.append(w / w.sum(axis=-1, keepdims=True))
    got = attention_rollout({f"layer{i}": torch.from_numpy(w).float() for i, w in enumerate(maps)})
    assert got.shape == (2, 6)
    np.testing.assert_allclose(got.numpy(), _rollout_numpy(maps), rtol=1e-5)
    np.testing.assert_allclose(got.sum(dim=-1).numpy(), 1.0, rtol=1e-6)
    single = attention_rollout([torch.from_numpy(maps[0]).float()])
    np.testing.assert_allclose(single.numpy(), (maps[0].mean(axis=1)[:, 0] + np.eye(6)[0]) / 2, rtol=1e-5)


def test_attention_rollout_of_a_vit():
    vit = VisionTransformer(image_size=32, patch_size=8, num_layers=3, num_heads=2, hidden_dim=16, mlp_dim=32,
                            num_classes=5).eval()
    maps = attention_maps(vit, torch.randn(1, 3, 32, 32))
    got = attention_rollout(maps)
    np.testing.assert_allclose(got.numpy(), _rollout_numpy([w.double().numpy() for w in maps.values()]), rtol=1e-5)


def test_attention_rollout_rejects_mismatched_maps():
    with pytest.raises(ValueError, match="same tokens"):
        attention_rollout([torch.full((1, 2, 4, 4), 0.25), torch.full((1, 2, 5, 5), 0.2)])
    with pytest.raises(ValueError, match=r"\[N, heads, L, L\]"):
        attention_rollout([torch.full((1, 2, 4, 5), 0.2)])
    with pytest.raises(ValueError, match="at least one"):
        attention_rollout({})

"""A zoo of small odd models with exactly known structure, for the capture tests."""

from __future__ import annotations

from collections import OrderedDict, namedtuple

import torch
from torch import nn


class DictModel(nn.Module):
    """Takes keyword tensors and returns a dict."""

    def __init__(self):
        super().__init__()
        self.image = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4, 2)

    def forward(self, image, scale):
        feats = self.image(image).mean(dim=(2, 3)) * scale
        return {"logits": self.head(feats), "features": feats}


class ReusedReLU(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(6, 6), nn.Linear(6, 6), nn.Linear(6, 3)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc3(self.act(self.fc2(self.act(self.fc1(x)))))


class TiedLM(nn.Module):
    """Embedding and output projection share one weight; the LSTM returns a tuple."""

    def __init__(self, vocab=50, dim=8):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.lstm = nn.LSTM(dim, dim, batch_first=True)
        self.out = nn.Linear(dim, vocab, bias=False)
        self.out.weight = self.embed.weight
        self.unused = nn.Linear(3, 3)

    def forward(self, ids):
        seq, _ = self.lstm(self.embed(ids))
        return self.out(seq)


class Containers(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4)})
        self.stack = nn.ModuleList([nn.Linear(4, 4), nn.Tanh()])
        self.scales = nn.ParameterList([nn.Parameter(torch.ones(4)), nn.Parameter(torch.ones(4))])

    def forward(self, x):
        x = self.blocks["b"](self.blocks["a"](x)) * self.scales[0] + self.scales[1]
        for layer in self.stack:
            x = layer(x)
        return x


Pair = namedtuple("Pair", ["main", "aux"])


class NamedTupleOut(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 3), nn.Linear(5, 2)

    def forward(self, x):
        return Pair(self.a(x), [self.b(x), "not a tensor", 7])


class Boom(nn.Module):
    def forward(self, x):
        raise RuntimeError("boom")


class RaisesInside(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.block = nn.Sequential(nn.ReLU(), Boom())

    def forward(self, x):
        return self.block(self.pre(x))


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("no backward here")


class BadBackward(nn.Module):
    def forward(self, x):
        return _FailingBackward.apply(x)


class RaisesInBackward(nn.Module):
    def __init__(self):
        super().__init__()
        self.pre = nn.Linear(4, 4)
        self.bad = BadBackward()
        self.post = nn.Linear(4, 2)

    def forward(self, x):
        return self.post(self.bad(self.pre(x)))


def missing_flatten() -> nn.Module:
    """A CNN that forgot nn.Flatten before its Linear head."""
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        head=nn.Sequential(nn.Linear(1568, 10)),
    ))


def no_hooks_left(model: nn.Module) -> bool:
    return all(
        not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)
        for m in model.modules()
    )


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, theta: float = 10000.0):
        super().__init__()
        self.register_buffer("inv_freq", 1.0 / theta ** (torch.arange(0, head_dim, 2).float() / head_dim),
                             persistent=False)

    def forward(self, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        angles = torch.cat([positions[:, None].float() * self.inv_freq[None]] * 2, dim=-1)
        return angles.cos(), angles.sin()


class LlamaAttention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.q_proj = nn.Linear(dim, dim, bias=False)
        self.k_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        b, length, _ = x.shape
        q = self.q_proj(x).view(b, length, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, length, self.kv_heads, self.head_dim).transpose(1, 2)
        q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
        out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True,
                                                               enable_gqa=self.kv_heads != self.heads)
        return self.o_proj(out.transpose(1, 2).reshape(b, length, -1))


class LlamaMLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.gate_proj = nn.Linear(dim, hidden, bias=False)
        self.up_proj = nn.Linear(dim, hidden, bias=False)
        self.down_proj = nn.Linear(hidden, dim, bias=False)
        self.act_fn = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


class LlamaBlock(nn.Module):
    def __init__(self, dim: int, hidden: int, heads: int, kv_heads: int, eps: float):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(dim, eps=eps)
        self.self_attn = LlamaAttention(dim, heads, kv_heads)
        self.post_attention_layernorm = nn.RMSNorm(dim, eps=eps)
        self.mlp = LlamaMLP(dim, hidden)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaLike(nn.Module):
    """A Llama-style decoder (RMSNorm, rotary positions, causal SDPA with grouped KV heads, SwiGLU MLP) built
    from plain torch modules, with Hugging Face's module names. ``LlamaLike.seven_b()`` has Llama 2 7B's sizes."""

    def __init__(self, vocab: int = 256, dim: int = 64, hidden: int = 172, layers: int = 2, heads: int = 4,
                 kv_heads: int | None = None, eps: float = 1e-6):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.rotary_emb = RotaryEmbedding(dim // heads)
        self.layers = nn.ModuleList([LlamaBlock(dim, hidden, heads, kv_heads or heads, eps) for _ in range(layers)])
        self.norm = nn.RMSNorm(dim, eps=eps)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    @classmethod
    def seven_b(cls) -> LlamaLike:
        return cls(vocab=32000, dim=4096, hidden=11008, layers=32, heads=32)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_emb(torch.arange(ids.shape[1], device=ids.device))
        x = self.embed_tokens(ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.lm_head(self.norm(x))

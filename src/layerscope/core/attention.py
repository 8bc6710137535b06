"""``attention_maps(model, batch)``: the per-head attention weights of every attention layer, and their rollout."""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from .hooks import HookSession
from .kinds import unwrap
from .nested import call_model
from .records import call_key


def _per_head(weights: torch.Tensor) -> torch.Tensor:
    """Weights from ``F.scaled_dot_product_attention`` ([..., L_query, L_key]) as [N, heads, L_query, L_key]:
    a 2-D query has no batch and one head, a 3-D one a batch and one head, more dimensions fold into heads."""
    if weights.dim() == 2:
        return weights[None, None]
    if weights.dim() == 3:
        return weights[:, None]
    return weights.reshape(weights.shape[0], -1, *weights.shape[-2:])


def _takes_weight_flags(module: nn.Module) -> bool:
    if not isinstance(module, nn.MultiheadAttention):
        return False
    parameters = inspect.signature(module.forward).parameters
    return "need_weights" in parameters and "average_attn_weights" in parameters


def sdpa_weights(query, key, value=None, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False) -> torch.Tensor:
    """The softmax weights ``F.scaled_dot_product_attention`` applies to ``value`` (before any dropout),
    taking the same arguments."""
    q, k = query.float(), key.float()
    if enable_gqa and k.dim() >= 3 and k.shape[-3] != q.shape[-3]:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
    logits = q @ k.transpose(-2, -1) * (1 / math.sqrt(q.shape[-1]) if scale is None else scale)
    if is_causal:
        causal = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool, device=q.device).tril()
        logits = logits.masked_fill(~causal, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            logits = logits.masked_fill(~attn_mask, -math.inf)
        else:
            logits = logits + attn_mask.float()
    return logits.softmax(dim=-1)


_SOFTMAX = frozenset({F.softmax, torch.softmax, torch.Tensor.softmax, torch.special.softmax})
_MATMUL = frozenset({torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.__rmatmul__, torch.bmm,
                     torch.Tensor.bmm, torch.baddbmm, torch.einsum})


def _last_dim(args: tuple, kwargs: dict) -> bool:
    x = args[0] if args else kwargs.get("input")
    dim = kwargs.get("dim", args[1] if len(args) > 1 else None)
    return isinstance(x, torch.Tensor) and x.dim() >= 2 and isinstance(dim, int) and dim in (-1, x.dim() - 1)


def _operands(args: tuple) -> list[torch.Tensor]:
    found = []
    for a in args:
        found += [t for t in a if isinstance(t, torch.Tensor)] if isinstance(a, (tuple, list)) else [a]
    return [t for t in found if isinstance(t, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    """Collects attention weights during one forward pass, attributed to the innermost running module.

    ``nn.MultiheadAttention``: a forward pre-hook binds the call's arguments and asks for per-head
    weights (``need_weights=True, average_attn_weights=False``); the forward hook keeps them and hands
    the caller what it asked for (None, or the head average). Everything else is seen as torch functions
    are called (a torch function mode, whatever name the function is called by):
    ``F.scaled_dot_product_attention`` gets its weights recomputed from its query, key and mask, and a
    softmax over the last dimension whose result is then multiplied with values (a matmul, bmm or einsum,
    also after dropout, a dtype change or a mask: same-shape results of it count as it) is attention
    written by hand (Hugging Face's eager attention, timm's window attention, a user's own).
    """

    def __init__(self):
        super().__init__()
        self.maps: dict[str, torch.Tensor] = {}
        self.running: list[str] = []
        self.asked: dict[str, list[dict[str, Any]]] = {}  # per nn.MultiheadAttention: what each call asked
        self.softmaxes: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (tensor, the softmax output)

    def add(self, name: str, weights: torch.Tensor) -> None:
        call = 0
        while call_key(name, call) in self.maps:
            call += 1
        self.maps[call_key(name, call)] = weights.detach()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.running or self.running[-1] in self.asked:
            return out
        if func is F.scaled_dot_product_attention:
            with torch.no_grad():
                self.add(self.running[-1], _per_head(sdpa_weights(*args, **kwargs)))
        elif func in _SOFTMAX:
            if isinstance(out, torch.Tensor) and _last_dim(args, kwargs):
                self.softmaxes[id(out)] = (out, out)
        elif func in _MATMUL:
            for t in _operands(args):
                held = self.softmaxes.pop(id(t), None)
                if held is not None and held[0] is t:
                    self.add(self.running[-1], _per_head(held[1]))
                    break
        elif self.softmaxes and isinstance(out, torch.Tensor) and args and isinstance(args[0], torch.Tensor):
            held = self.softmaxes.get(id(args[0]))
            if held is not None and held[0] is args[0] and out.shape == args[0].shape:
                self.softmaxes[id(out)] = (out, held[1])
        return out

    def enter(self, name: str, module: nn.Module):
        flags = _takes_weight_flags(module)

        def pre_hook(module, args, kwargs):
            self.running.append(name)
            if not flags:
                return None
            bound = inspect.signature(module.forward).bind(*args, **kwargs)
            bound.apply_defaults()
            self.asked.setdefault(name, []).append(dict(bound.arguments))
            bound.arguments.update(need_weights=True, average_attn_weights=False)
            return bound.args, bound.kwargs

        return pre_hook

    def leave(self, name: str, module: nn.Module):
        flags = _takes_weight_flags(module)

        def hook(module, args, kwargs, output):
            self.running.pop()
            if not flags:
                return None
            asked = self.asked[name].pop()
            attn_output, weights = output
            self.add(name, weights if weights.dim() == 4 else weights[None])  # unbatched: [heads, L, S]
            if not asked["need_weights"]:
                return attn_output, None
            return attn_output, weights.mean(dim=-3) if asked["average_attn_weights"] else weights

        return hook


def _configs(model: nn.Module) -> list:
    """The distinct Hugging Face configs the model's modules read their attention implementation from."""
    found = {}
    for module in model.modules():
        config = getattr(module, "config", None)
        if config is not None and hasattr(config, "_attn_implementation_internal"):
            found[id(config)] = config
    return list(found.values())


@contextlib.contextmanager
def _readable_attention(model: nn.Module):
    """Hugging Face models whose attention runs in a kernel that keeps no weights (flash attention, flex
    attention, a kernel of one's own) run the eager implementation for the pass: their config's
    ``_attn_implementation`` is set to "eager" and put back exactly afterwards. sdpa and eager stay as they
    are (sdpa's weights are recomputed from its arguments)."""
    changed = []
    try:
        for config in _configs(model):
            kind = config._attn_implementation_internal
            if isinstance(kind, str) and kind not in _READABLE:
                changed.append((config, kind))
                config._attn_implementation_internal = "eager"
        yield
    finally:
        for config, kind in changed:
            config._attn_implementation_internal = kind


_READABLE = ("eager", "sdpa")


def attention_maps(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """Attention weights [N, heads, L_query, L_key] per attention layer, by module name, in call order.

    Covers every ``nn.MultiheadAttention`` (also when called with ``need_weights=False``, as in
    ``nn.TransformerEncoderLayer`` and torchvision's ViT), every call of
    ``torch.nn.functional.scaled_dot_product_attention`` under whatever name (the weights are recomputed
    from its query, key and mask: timm blocks, Hugging Face's default "sdpa"), and attention written by
    hand, a softmax over the last dimension multiplied with values (Hugging Face's "eager", timm's Swin
    window attention [windows x N, heads, L, L], a user's own). A Hugging Face model whose attention
    implementation keeps no weights (flash, flex, a registered kernel) runs "eager" for this pass, its
    config put back afterwards. A module called several times gets "name (call 2)" and so on. The model's
    outputs are those of its standard (non fast-path) attention: for this pass the PyTorch attention fast
    path is switched off; it is put back afterwards, and hooks, training flags and buffers as well. In
    training mode the ``nn.MultiheadAttention`` weights are those after dropout. ``batch`` is passed as in
    ``capture``; a ``torch.compile`` wrapper is run through its original module.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attention_maps() needs a torch.nn.Module as model, got {type(model).__name__}")
    model, _ = unwrap(model)
    recorder = _Recorder()
    fast_path = torch.backends.mha.get_fastpath_enabled()
    with HookSession(model) as session, torch.no_grad(), _readable_attention(model):
        try:
            for name, module in model.named_modules():
                session.add_forward_pre_hook(module, recorder.enter(name, module))
                session.add_forward_hook(module, recorder.leave(name, module))
            torch.backends.mha.set_fastpath_enabled(False)
            with recorder:
                call_model(model, batch)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast_path)
    return recorder.maps


def attention_rollout(maps: Mapping[str, torch.Tensor] | Sequence[torch.Tensor]) -> torch.Tensor:
    """Attention rollout (Abnar & Zuidema 2020): how much each token flows into the first (class) token
    through all layers, as [N, L] whose rows sum to 1.

    ``maps`` are self-attention weights [N, heads, L, L] in layer order (e.g. ``attention_maps``'s
    result). Per layer the heads are averaged, the identity is added for the residual path and the rows
    are renormalised; the layers' matrices are multiplied from the first to the last.
    """
    layers = list(maps.values()) if isinstance(maps, Mapping) else list(maps)
    if not layers:
        raise ValueError("attention_rollout needs at least one attention map")
    rollout = None
    for weights in layers:
        if weights.dim() != 4 or weights.shape[-1] != weights.shape[-2]:
            shape = tuple(weights.shape)
            raise ValueError(f"attention_rollout needs self-attention maps [N, heads, L, L], got {shape}")
        if rollout is not None and weights.shape[-1] != rollout.shape[-1]:
            raise ValueError("attention_rollout needs maps over the same tokens in every layer, got lengths "
                             f"{rollout.shape[-1]} and {weights.shape[-1]}")
        a = weights.detach().double().mean(dim=1) + torch.eye(weights.shape[-1], dtype=torch.float64,
                                                              device=weights.device)
        a = a / a.sum(dim=-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout[:, 0].float()

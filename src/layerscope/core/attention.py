"""``attention_maps(model, batch)``: the per-head attention weights of every attention layer, and their rollout."""

from __future__ import annotations

import inspect
import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .hooks import HookSession
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


class _Recorder:
    """Hooks that collect attention weights during one forward pass.

    ``nn.MultiheadAttention``: a forward pre-hook binds the call's arguments and asks for per-head
    weights (``need_weights=True, average_attn_weights=False``); the forward hook keeps them and hands
    the caller what it asked for (None, or the head average). Other modules: calls of
    ``F.scaled_dot_product_attention`` while a module runs are attributed to the innermost running one.
    """

    def __init__(self):
        self.maps: dict[str, torch.Tensor] = {}
        self.running: list[str] = []
        self.asked: dict[str, list[dict[str, Any]]] = {}  # per nn.MultiheadAttention: what each call asked

    def add(self, name: str, weights: torch.Tensor) -> None:
        call = 0
        while call_key(name, call) in self.maps:
            call += 1
        self.maps[call_key(name, call)] = weights.detach()

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

    def sdpa(self, original):
        def scaled_dot_product_attention(*args, **kwargs):
            if self.running and self.running[-1] not in self.asked:
                with torch.no_grad():
                    self.add(self.running[-1], _per_head(sdpa_weights(*args, **kwargs)))
            return original(*args, **kwargs)

        return scaled_dot_product_attention


def attention_maps(model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
    """Attention weights [N, heads, L_query, L_key] per attention layer, by module name, in call order.

    Covers every ``nn.MultiheadAttention`` (also when called with ``need_weights=False``, as in
    ``nn.TransformerEncoderLayer`` and torchvision's ViT) and every module that calls
    ``torch.nn.functional.scaled_dot_product_attention`` through the module attribute (timm-style blocks;
    the weights are recomputed from its query, key and mask). A module called several times gets
    "name (call 2)" and so on. The model's outputs are those of its standard (non fast-path) attention:
    for this pass the PyTorch attention fast path is switched off and the module attribute is wrapped;
    both are put back afterwards, and hooks, training flags and buffers as well. In training mode the
    ``nn.MultiheadAttention`` weights are those after dropout. ``batch`` is passed as in ``capture``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"attention_maps() needs a torch.nn.Module as model, got {type(model).__name__}")
    recorder = _Recorder()
    fast_path = torch.backends.mha.get_fastpath_enabled()
    original = F.scaled_dot_product_attention
    with HookSession(model) as session, torch.no_grad():
        try:
            for name, module in model.named_modules():
                session.add_forward_pre_hook(module, recorder.enter(name, module))
                session.add_forward_hook(module, recorder.leave(name, module))
            torch.backends.mha.set_fastpath_enabled(False)
            F.scaled_dot_product_attention = recorder.sdpa(original)
            call_model(model, batch)
        finally:
            F.scaled_dot_product_attention = original
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

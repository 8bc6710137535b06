"""What the findings need to know about a module's class, read once while the model is at hand and kept in
``ModuleReport.traits`` (see ``records.TRAITS``), so that the rules can run on records alone."""

from __future__ import annotations

import torch
from torch import nn

from .stats import local

# Built-in layers that cannot turn finite inputs into NaN/Inf: when they output NaN/Inf, it came in with their input.
_PASS_ON = (
    nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.PReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish, nn.Sigmoid,
    nn.Tanh, nn.Hardtanh, nn.Hardsigmoid, nn.Hardswish, nn.Softsign, nn.Softplus, nn.LogSigmoid, nn.Softmax,
    nn.LogSoftmax, nn.Identity, nn.Flatten, nn.Unflatten, nn.modules.dropout._DropoutNd, nn.modules.pooling._MaxPoolNd,
    nn.modules.pooling._AvgPoolNd, nn.modules.pooling._AdaptiveAvgPoolNd, nn.modules.pooling._AdaptiveMaxPoolNd,
    nn.Upsample, nn.modules.padding._ConstantPadNd, nn.modules.padding._ReflectionPadNd,
    nn.modules.padding._ReplicationPadNd, nn.PixelShuffle, nn.PixelUnshuffle,
)
# Built-in weighted layers: with finite weights they only make Inf/NaN by overflowing (values near 3e38).
_AFFINE = (
    nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd, nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
    nn.Embedding,
)
_BY_CLASS = (
    ("pass_on", _PASS_ON),
    ("affine", _AFFINE),
    ("relu", (nn.ReLU, nn.ReLU6)),
    ("sequential", (nn.Sequential,)),
    ("embedding", (nn.Embedding, nn.EmbeddingBag)),
    ("param_container", (nn.ParameterList, nn.ParameterDict)),
    ("train_dependent", (nn.modules.dropout._DropoutNd, nn.modules.batchnorm._BatchNorm)),
)
_SATURATING = {nn.Sigmoid: (0.0, 1.0), nn.Tanh: (-1.0, 1.0), nn.Hardsigmoid: (0.0, 1.0)}

_cache: dict[type, frozenset[str]] = {}


def class_traits(module: nn.Module) -> frozenset[str]:
    """The traits that follow from the module's class alone (looked up once per class)."""
    kind = type(module)
    traits = _cache.get(kind)
    if traits is None:
        traits = _cache[kind] = frozenset(t for t, classes in _BY_CLASS if issubclass(kind, classes))
    return traits


def bounds(module: nn.Module) -> tuple[float, float] | None:
    """The output range of a saturating activation, or None (ReLU6's 0 is its off state, not saturation)."""
    if isinstance(module, nn.ReLU6):
        return None
    if isinstance(module, nn.Hardtanh):
        return float(module.min_val), float(module.max_val)
    for kind, span in _SATURATING.items():
        if isinstance(module, kind):
            return span
    return None


def sums_to_constant(entries: list[tuple[str, nn.Module]]) -> set[str]:
    """The modules whose outputs always add up to the same total: softmaxes, and layer/group norms whose scale
    is one number for all channels (as at initialisation). One check of all same-size scales at once, and one
    copy to the CPU per device."""
    found, checks = set(), {}
    for name, module in entries:
        if isinstance(module, nn.Softmax):
            found.add(name)
        elif isinstance(module, (nn.LayerNorm, nn.GroupNorm)):
            weight = None if module.weight is None else local(module.weight)  # a DTensor: this rank's shard
            if weight is None or weight.is_meta or not weight.numel():
                found.add(name)
            else:
                checks.setdefault((weight.device, weight.dtype, weight.numel()), []).append((name, weight))
    flags: dict[torch.device, list] = {}
    for group in checks.values():
        rows = torch.stack([w.detach().reshape(-1) for _, w in group])
        flags.setdefault(rows.device, []).append(([name for name, _ in group], rows.amin(1) == rows.amax(1)))
    for parts in flags.values():
        same = torch.cat([f for _, f in parts]).tolist()
        names = [name for group, _ in parts for name in group]
        found |= {name for name, flag in zip(names, same) if flag}
    return found

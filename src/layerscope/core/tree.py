"""The static side of a model: names, types, nesting and parameter counts, with no forward pass."""

from __future__ import annotations

from torch import nn


def _devices_and_dtypes(module: nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    tensors = [*module.parameters(), *module.buffers()]
    devices = sorted({str(t.device) for t in tensors})
    dtypes = sorted({str(t.dtype).removeprefix("torch.") for t in tensors})
    return tuple(devices), tuple(dtypes)


def module_tree(model: nn.Module) -> dict[str, dict]:
    """For every ``named_modules()`` entry, in that order: the static fields of its ModuleReport.

    Parameter counts count each tensor once, however often it is shared or tied.
    """
    entries = list(model.named_modules())
    children: dict[str, list[str]] = {name: [] for name, _ in entries}
    for name, _ in entries:
        if name:
            children[name.rpartition(".")[0]].append(name)
    tree = {}
    for name, module in entries:
        params = list(module.parameters())
        devices, dtypes = _devices_and_dtypes(module)
        tree[name] = dict(
            name=name,
            type_name=type(module).__name__,
            depth=0 if not name else name.count(".") + 1,
            children=tuple(children[name]),
            num_params=sum(p.numel() for p in params),
            num_own_params=sum(p.numel() for p in module.parameters(recurse=False)),
            num_trainable=sum(p.numel() for p in params if p.requires_grad),
            devices=devices,
            dtypes=dtypes,
        )
    return tree

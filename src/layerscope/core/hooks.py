"""One object owns every hook put on a model (during a pass, or over training steps) and, for a pass, puts
the model back as it was."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from torch.nn.parameter import is_lazy


class HookSession:
    """Context manager: hooks added through it are removed on exit (also on error), and each module's
    ``training`` flag, each parameter's ``requires_grad`` and each existing ``.grad`` are restored, and
    so are the buffers: each module attribute gets back the very tensor it held (a forward may assign a
    new one, ``self.running = self.running * 0.9 + ...``), and, when any module is in training mode (a
    training-mode pass updates batch-norm running statistics), that tensor gets back its values (not a
    lazy module's buffer, which has none before its first call).

    Removing twice is harmless. Exceptions are never swallowed.

    With ``restore=False`` (watching training, where the model must go on changing) it only owns the hooks:
    nothing is saved on entry and nothing is put back on exit.
    """

    def __init__(self, model: nn.Module, *, restore: bool = True, modules: list[nn.Module] | None = None):
        self.model = model
        self.modules = modules  # the model's modules, if already walked (a 2,000-module model makes walks count)
        self.restores = restore
        self._forward: list = []
        self._tensor: list = []
        self._training: list[tuple[nn.Module, bool]] = []
        self._params: list[tuple[nn.Parameter, bool, torch.Tensor | None]] = []
        self._buffers: list[tuple[nn.Module, str, torch.Tensor | None]] = []
        self._values: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __enter__(self) -> HookSession:
        if not self.restores:
            return self
        modules = list(self.model.modules()) if self.modules is None else self.modules
        self._training = [(m, m.training) for m in modules]
        params = {id(p): p for m in modules for p in m._parameters.values() if p is not None}
        self._params = [(p, p.requires_grad, p.grad) for p in params.values()]
        self._buffers = [(m, name, b) for m in modules for name, b in m._buffers.items()]
        training = any(flag for _, flag in self._training)
        buffers = {id(b): b for _, _, b in self._buffers if b is not None and not is_lazy(b)}
        self._values = [(b, b.clone()) for b in buffers.values()] if training else []
        return self

    def __exit__(self, *exc_info) -> None:
        self.remove()
        self.restore()

    def add_forward_pre_hook(self, module: nn.Module, hook: Callable) -> None:
        self._forward.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def add_forward_hook(self, module: nn.Module, hook: Callable, always_call: bool = False) -> None:
        """``hook(module, args, kwargs, output)`` after each forward; with ``always_call``, also on the way out of
        a forward that raised (output None), so that a failed call can be recorded."""
        self._forward.append(module.register_forward_hook(hook, with_kwargs=True, always_call=always_call))

    def add_tensor_hook(self, tensor: torch.Tensor, hook: Callable) -> None:
        self._tensor.append(tensor.register_hook(hook))

    def add_grad_hook(self, param: torch.Tensor, hook: Callable) -> None:
        """``hook(param)`` after each backward has added its gradient into ``param.grad``."""
        self._tensor.append(param.register_post_accumulate_grad_hook(hook))

    def add_global_forward_hook(self, hook: Callable) -> None:
        """``hook(module, args, kwargs, output)`` after the forward of every module of the process (filter by
        module), removed with the forward hooks. Raises TypeError on a torch whose global hooks take no kwargs."""
        self._forward.append(nn.modules.module.register_module_forward_hook(hook, with_kwargs=True))

    def add_step_hooks(self, optimizer: torch.optim.Optimizer, pre: Callable, post: Callable) -> None:
        """``pre(optimizer, args, kwargs)`` and ``post(...)`` around each ``optimizer.step()``."""
        self._tensor += [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def remove_forward_hooks(self) -> None:
        handles, self._forward = self._forward, []
        for handle in handles:
            handle.remove()

    def remove(self) -> None:
        self.remove_forward_hooks()
        handles, self._tensor = self._tensor, []
        for handle in handles:
            handle.remove()

    def restore(self) -> None:
        for module, training in self._training:
            module.training = training
        for param, requires_grad, grad in self._params:
            if param.requires_grad != requires_grad:
                param.requires_grad_(requires_grad)
            if param.grad is not grad:
                param.grad = grad
        for module, name, buffer in self._buffers:
            if module._buffers.get(name) is not buffer:
                module._buffers[name] = buffer
        with torch.no_grad():
            for buffer, saved in self._values:
                buffer.copy_(saved)

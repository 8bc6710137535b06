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

"""Cost of layerscope.watch against the same training loop unwatched, and against naive hooks, side by side.

    python benchmarks/bench_watch.py              # digits CNN, ResNet-18 (batch 16, 224 x 224), the 2,001-module
                                                  # stack; then the memory a long run keeps
    python benchmarks/bench_watch.py --quick      # fewer rounds, no memory run
    python benchmarks/bench_watch.py --quick --cpu --models stack2001 digits   # some models, by CPU time
    python benchmarks/bench_watch.py --memory-only --memory-steps 100000   # the memory figure alone, measured

Each method trains the same model in blocks of steps, each block from the same weights and optimizer state; blocks
of the methods take turns (round robin, each round starting one method later), so drifts of a busy machine hit
them alike; the figure per method is the median time per step over its blocks, and its ratio to the unwatched
loop's. Methods: the loop unwatched; watch every=10 and every=1 (each block also pays for the one-pass findings of
its sampled steps, which a run takes later, at the latest before thinning a step out); a naive-hooks baseline
(fastai's ActivationStats style: forward hooks on every module taking mean, std and the share of near-zero values
with one .item() each, and each parameter's gradient norm with .item()) at every=10 and every=1. Targets:
every=10 <= 1.05x, every=1 <= 1.5x. 2 threads.

Memory: the 2,001-module stack (1 + 4 x 500 modules; its records do not depend on the layer width, so the memory
run uses width 16 to get through many steps) trained with every=10 for --memory-steps steps, logging the loss: the
bytes the run keeps (its arrays and Python objects, counted by walking them), measured along the way.
"""

from __future__ import annotations

import argparse
import copy
import gc
import statistics
import sys
import time
from collections import OrderedDict
from types import MappingProxyType

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torchvision import models as tvm

import layerscope
from bench_capture import stack  # the same 2,001-module stack

TARGETS = {"watch every=10": 1.05, "watch every=1": 1.5}


def digits_cnn():
    torch.manual_seed(0)
    d = load_digits()
    x = (torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0 - 0.3) / 0.4
    y = torch.tensor(d.target)
    model = nn.Sequential(OrderedDict([
        ("conv1", nn.Conv2d(1, 16, 3, padding=1)), ("relu1", nn.ReLU()),
        ("conv2", nn.Conv2d(16, 32, 3, padding=1)), ("relu2", nn.ReLU()),
        ("pool", nn.AdaptiveAvgPool2d(2)), ("flatten", nn.Flatten()),
        ("fc", nn.Linear(128, 64)), ("relu3", nn.ReLU()), ("head", nn.Linear(64, 10))]))
    return model, (x[:64], y[:64]), lambda out, y: F.cross_entropy(out, y), torch.optim.Adam(model.parameters(), 1e-3)


def resnet18():
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None)
    batch = torch.randn(16, 3, 224, 224), torch.randint(0, 1000, (16,))
    return model, batch, lambda out, y: F.cross_entropy(out, y), torch.optim.SGD(model.parameters(), 1e-3, momentum=0.9)


def stack2001(width: int = 512):
    torch.manual_seed(0)
    model = stack(width=width)
    with torch.no_grad():  # with the default init, the 500 blocks' gradients overflow in the first backward (each
        for m in model.modules():  # block's gain is a little over 1, whatever the weights' scale, through its
            if isinstance(m, nn.Linear):  # LayerNorm) and every later step is NaN; small weights meet the
                m.weight.mul_(0.05)  # LayerNorm's eps, and the gradients fade toward the input instead
    batch = torch.randn(8, width), torch.randn(8, width)
    # Adam at a small learning rate: SGD sends a 2,000-layer stack to NaN within a few steps
    return model, batch, lambda out, y: F.mse_loss(out, y), torch.optim.Adam(model.parameters(), 1e-5)


# name: (factory, steps per block); a block holds one sampled step of every=10
MODELS = {"digits CNN (batch 64)": (digits_cnn, 50), "ResNet-18 (batch 16)": (resnet18, 10),
          "stack2001 (batch 8)": (stack2001, 10)}


class NaiveStats:
    """fastai ActivationStats style: per module output mean, std and share near zero, and per parameter the
    gradient norm, each read with .item() on sampled steps."""

    def __init__(self, model: nn.Module, every: int):
        self.model, self.every, self.step, self.stats = model, every, 0, []
        self.handles = []

    def __enter__(self):
        self.handles = [m.register_forward_hook(self.hook) for m in self.model.modules()]
        return self

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()

    def hook(self, module, args, out):
        if self.step % self.every == 0 and isinstance(out, torch.Tensor) and out.is_floating_point():
            o = out.detach()
            self.stats.append((o.mean().item(), o.std().item(), (o.abs() <= 0.05).float().mean().item()))

    def end_step(self):
        if self.step % self.every == 0:
            self.stats.append([p.grad.norm().item() for p in self.model.parameters() if p.grad is not None])
        self.step += 1
        if len(self.stats) > 100_000:
            self.stats.clear()


def block(model, batch, loss_fn, opt, steps: int, log=None, end=None, clock=time.perf_counter) -> float:
    x, y = batch
    start = clock()
    for _ in range(steps):
        loss = loss_fn(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if log is not None:
            log(loss=loss)
        if end is not None:
            end()
    return (clock() - start) / steps


def compare(factory, steps: int, rounds: int, clock=time.perf_counter) -> dict[str, float]:
    model, batch, loss_fn, opt = factory()
    model.train()
    runs = {"watch every=10": layerscope.watch(model, opt, every=10),
            "watch every=1": layerscope.watch(model, opt, every=1)}
    naive = {"naive hooks every=10": NaiveStats(model, 10), "naive hooks every=1": NaiveStats(model, 1)}

    def method(name):
        if name == "unwatched":
            return block(model, batch, loss_fn, opt, steps, clock=clock)
        if name in runs:
            with runs[name] as run:
                start = clock()
                block(model, batch, loss_fn, opt, steps, log=run.log)
                run._judge()  # the one-pass findings of the block's sampled steps: deferred work, paid here
                return (clock() - start) / steps
        with naive[name] as hooks:
            return block(model, batch, loss_fn, opt, steps, end=hooks.end_step, clock=clock)

    names = ["unwatched", *runs, *naive]
    for name in names:  # warm-up: one block each (the first sampled steps also pick the histogram edges)
        method(name)
    # every timed block trains from the same weights and optimizer state: the same steps for each method, and no
    # drift of a long benchmark into NaN (a fixed batch, trained on for hundreds of steps, can get there)
    weights, state = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:  # each round starts with the next method
            model.load_state_dict(weights)
            opt.load_state_dict(state)
            gc.collect()
            times[name].append(method(name))
    x, y = batch
    with torch.no_grad():
        final = float(loss_fn(model(x), y))
    if not np.isfinite(final):
        print(f"  (the model's loss went to {final}: these timings include the slow NaN paths)")
    plain = statistics.median(times["unwatched"])
    out = {"unwatched ms/step": plain * 1e3}
    out.update({f"{name} / unwatched": statistics.median(ts) / plain for name, ts in times.items()
                if name != "unwatched"})
    return out


def deep_size(obj, seen=None) -> int:
    """Bytes of ``obj`` and everything it holds (numpy arrays by their buffers), each object once; the watcher
    (which holds the live model) is left out."""
    seen = set() if seen is None else seen
    if id(obj) in seen or isinstance(obj, (nn.Module, torch.Tensor, type)):
        return 0
    seen.add(id(obj))
    size = sys.getsizeof(obj)
    if isinstance(obj, np.ndarray):
        return size if obj.base is None else size + deep_size(obj.base, seen)
    if isinstance(obj, (dict, MappingProxyType)):
        return size + sum(deep_size(k, seen) + deep_size(v, seen) for k, v in obj.items())
    if isinstance(obj, (list, tuple, set, frozenset)):
        return size + sum(deep_size(v, seen) for v in obj)
    if hasattr(obj, "__dict__"):  # the object's own dict (a temporary copy's id would be reused: counted once)
        held = vars(obj)
        return size + sys.getsizeof(held) + sum(deep_size(k, seen) + deep_size(v, seen) for k, v in held.items()
                                                if k != "_watcher")
    if hasattr(obj, "__slots__"):
        return size + sum(deep_size(getattr(obj, s), seen) for s in obj.__slots__ if hasattr(obj, s))
    if isinstance(obj, type({}.items())):
        return size
    return size


def memory(steps: int, width: int) -> None:
    model, batch, loss_fn, opt = stack2001(width)
    x, y = batch
    run = layerscope.watch(model, opt, every=10)
    checkpoints = sorted({min(steps, s) for s in (1_000, 5_000, 20_000, 50_000, steps)})
    print(f"\n== memory: the 2,001-module stack (width {width}), every=10, keep={run.keep}, loss logged ==")
    print(f"{'steps':>8}{'sampled kept':>14}{'run MB':>9}{'records MB':>12}{'scalars MB':>12}{'s/1k steps':>12}")
    start, done = time.perf_counter(), 0
    with run:
        for target in checkpoints:
            for _ in range(target - done):
                loss = loss_fn(model(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
                run.log(loss=loss)
            done = target
            run._flush()
            total = deep_size(run) / 2**20
            records = sum(r.calls.nbytes + r.counts.nbytes + r.params.nbytes + r.training.nbytes
                          for r in run.records) / 2**20
            scalars = sum(len(a) * a.itemsize + len(b) * b.itemsize for a, b in run._scalars.values()) / 2**20
            pace = (time.perf_counter() - start) / done * 1e3
            print(f"{done:>8}{len(run.records):>14}{total:>9.1f}{records:>12.1f}{scalars:>12.2f}{pace:>12.1f}",
                  flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 rounds, no memory run")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--models", nargs="*", default=list(MODELS),
                        help="models by the first word of their name (digits, resnet-18, stack2001)")
    parser.add_argument("--cpu", action="store_true",
                        help="time by this process's CPU time (less swayed by other work on a shared machine)")
    parser.add_argument("--memory-steps", type=int, default=20_000)
    parser.add_argument("--memory-width", type=int, default=16)
    parser.add_argument("--memory-only", action="store_true")
    args = parser.parse_args()
    clock, clock_name = (time.process_time, "CPU time") if args.cpu else (time.perf_counter, "wall time")
    torch.set_num_threads(2)
    rounds = 3 if args.quick else args.rounds
    chosen = [name for name in MODELS if any(name.lower().split()[0] == m.lower().split()[0] for m in args.models)]
    if not chosen and not args.memory_only:
        parser.error(f"no model called {args.models}: choose from {[name.split()[0] for name in MODELS]}")
    if not args.memory_only:
        for name in chosen:
            factory, steps = MODELS[name]
            row = compare(factory, steps, rounds, clock)
            print(f"\n== {name}: blocks of {steps} steps, median of {rounds} rounds, {clock_name}; unwatched "
                  f"{row['unwatched ms/step']:.1f} ms/step ==", flush=True)
            for key, value in row.items():
                if key == "unwatched ms/step":
                    continue
                target = TARGETS.get(key.removesuffix(" / unwatched"))
                met = "met" if target is not None and value <= target else "NOT met"
                verdict = "" if target is None else f"   target <= {target:.2f}x: {met}"
                print(f"  {key:<34} {value:6.3f}x{verdict}", flush=True)
    if not args.quick:
        memory(args.memory_steps, args.memory_width)


if __name__ == "__main__":
    main()

"""Cost of layerscope.capture against plain passes and peer tools, measured side by side in one run.

    python benchmarks/bench_capture.py            # all models, timings, memory kept, peak RSS, TorchLens
    python benchmarks/bench_capture.py --quick    # fewer repeats, no peak-RSS subprocesses

Prints ratios (the machine is noisy: compare, don't quote absolute times). Batch 8, 2 threads.
"""

from __future__ import annotations

import argparse
import inspect
import json
import statistics
import subprocess
import sys
import time
import tracemalloc

import torch
import torchinfo
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from torchvision import models as tvm

import layerscope

BATCH = 8
COSTS = "costs" in inspect.signature(layerscope.capture).parameters  # False for revisions before costs existed


def stack(blocks: int = 500, width: int = 512) -> nn.Module:
    layers = []
    for _ in range(blocks):
        layers += [nn.Linear(width, width), nn.ReLU(), nn.LayerNorm(width), nn.Dropout(0.1)]
    return nn.Sequential(*layers)  # 1 + 4 * blocks modules


MODELS = {
    "squeezenet1_1": lambda: (tvm.squeezenet1_1(weights=None), torch.randn(BATCH, 3, 224, 224)),
    "resnet50": lambda: (tvm.resnet50(weights=None), torch.randn(BATCH, 3, 224, 224)),
    "stack2001": lambda: (stack(), torch.randn(BATCH, 512)),
}


def _hooked(model: nn.Module, fn):
    """Run a forward with `fn(output)` hooked on every module; hooks removed afterwards."""
    def run(x):
        handles = [m.register_forward_hook(lambda mod, args, out: fn(out)) for m in model.modules()]
        try:
            with torch.no_grad():
                model(x)
        finally:
            for h in handles:
                h.remove()
    return run


def naive_stats(t):
    if isinstance(t, torch.Tensor) and t.is_floating_point():
        torch.std_mean(t), (t == 0).sum(), torch.isnan(t).sum(), torch.histc(t, 64)


def methods(model: nn.Module):
    clones: list[torch.Tensor] = []

    def forward(x):
        with torch.no_grad():
            model(x)

    def forward_backward(x):
        model.zero_grad(set_to_none=True)
        model(x).sum().backward()

    def clone_all(x):
        clones.clear()
        _hooked(model, lambda out: clones.append(out.detach().clone()) if isinstance(out, torch.Tensor) else None)(x)

    def flop_counter(x):
        with FlopCounterMode(display=False):
            forward_backward(x)

    costs = {
        "capture, forward only, costs": lambda x: layerscope.capture(model, x, backward=False, costs=True),
        "capture, forward+backward, costs": lambda x: layerscope.capture(model, x, costs=True),
    } if COSTS else {}
    return {
        "plain forward (no_grad)": forward,
        "capture, forward only": lambda x: layerscope.capture(model, x, backward=False),
        "plain forward+backward": forward_backward,
        "capture, forward+backward": lambda x: layerscope.capture(model, x),
        **costs,
        "FlopCounterMode forward+backward": flop_counter,
        "torchinfo.summary": lambda x: torchinfo.summary(model, input_data=x, verbose=0, mode="eval"),
        "naive stats hooks": _hooked(model, naive_stats),
        "clone every output": clone_all,
    }, clones


def time_side_by_side(fns: dict, x, repeats: int, clock=time.perf_counter) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        fn(x)
    for _ in range(repeats):  # interleaved, so drifts of the machine hit every method alike
        for name, fn in fns.items():
            start = clock()
            fn(x)
            times[name].append(clock() - start)
    return {name: statistics.median(ts) for name, ts in times.items()}


def memory_kept(model: nn.Module, x, clones: list[torch.Tensor]) -> tuple[int, int]:
    """Bytes a Capture keeps (Python objects and numpy arrays traced, plus its tensors) vs cloning all outputs."""
    tracemalloc.start()
    cap = layerscope.capture(model, x)
    python_bytes, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    tensors = [c.feature_maps for _, c in cap.calls if c.feature_maps is not None]
    tensors += [t for t in [cap.output] if isinstance(t, torch.Tensor)]
    kept = python_bytes + sum(t.numel() * t.element_size() for t in tensors)
    cloned = sum(t.numel() * t.element_size() for t in clones)
    return kept, cloned


def torchlens_ratio(model_name: str, repeats: int) -> float | None:
    """TorchLens in its own process (it wraps torch functions globally): its time over a plain forward."""
    code = f"""
import sys, time, statistics, torch, torchlens
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from bench_capture import MODELS
torch.set_num_threads(2)
torch.manual_seed(0)
model, x = MODELS[{model_name!r}]()
model.eval()
def plain():
    with torch.no_grad():
        model(x)
def lens():
    torchlens.trace(model, x, capture=torchlens.options.CaptureOptions(unwrap_when_done=True))
plain(); lens()
a, b = [], []
for _ in range({repeats}):
    t = time.perf_counter(); plain(); a.append(time.perf_counter() - t)
    t = time.perf_counter(); lens(); b.append(time.perf_counter() - t)
print(statistics.median(b) / statistics.median(a))
"""
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=900)
        return float(out.stdout.strip().splitlines()[-1])
    except (subprocess.SubprocessError, ValueError, IndexError):
        return None


def peak_rss(model_name: str, method: str) -> float:
    """MB by which one run of a method raises the peak RSS of a fresh process that holds model and batch.

    The peak is reset (/proc/self/clear_refs) after the model is built: a forked child otherwise starts
    with its parent's peak."""
    code = f"""
import sys, torch
sys.path.insert(0, {str(__file__.rsplit('/', 1)[0])!r})
from bench_capture import MODELS, methods
torch.set_num_threads(2)
model, x = MODELS[{model_name!r}]()
model.eval()
fn = methods(model)[0][{method!r}]
def status(key):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":"))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
before = status("VmRSS")
fn(x)
print((status("VmHWM") - before) / 1024)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats, no peak RSS, no TorchLens")
    parser.add_argument("--models", nargs="*", default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--cpu", action="store_true",
                        help="time by this process's CPU time (less swayed by other work on a shared machine)")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    torch.set_num_threads(2)
    results = {}
    for name in args.models:
        torch.manual_seed(0)
        model, x = MODELS[name]()
        model.eval()
        fns, clones = methods(model)
        times = time_side_by_side(fns, x, repeats, time.process_time if args.cpu else time.perf_counter)
        fns["clone every output"](x)
        kept, cloned = memory_kept(model, x, clones)
        fwd, fwdbwd = times["plain forward (no_grad)"], times["plain forward+backward"]
        row = {
            "capture fwd / plain fwd": times["capture, forward only"] / fwd,
            "capture fwd+bwd / plain fwd+bwd": times["capture, forward+backward"] / fwdbwd,
            **({
                "capture+costs fwd / plain fwd": times["capture, forward only, costs"] / fwd,
                "capture+costs fwd+bwd / plain fwd+bwd": times["capture, forward+backward, costs"] / fwdbwd,
                "costs on / off, capture fwd": times["capture, forward only, costs"] / times["capture, forward only"],
                "costs on / off, capture fwd+bwd":
                    times["capture, forward+backward, costs"] / times["capture, forward+backward"],
            } if COSTS else {}),
            "FlopCounterMode fwd+bwd / plain fwd+bwd": times["FlopCounterMode forward+backward"] / fwdbwd,
            "torchinfo / plain fwd": times["torchinfo.summary"] / fwd,
            "naive stats hooks / plain fwd": times["naive stats hooks"] / fwd,
            "clone all outputs / plain fwd": times["clone every output"] / fwd,
            "capture memory kept / clone-all memory": kept / cloned,
        }
        if not args.quick:
            row["torchlens / plain fwd"] = torchlens_ratio(name, max(3, repeats // 2))
            for method in ("plain forward (no_grad)", "capture, forward only", "plain forward+backward",
                           "capture, forward+backward", "clone every output"):
                row[f"peak RSS rise, MB: {method}"] = peak_rss(name, method)
        results[name] = row
        clock = "CPU time" if args.cpu else "wall time"
        print(f"\n== {name} (batch {BATCH}, 2 threads, median of {repeats}, {clock}; plain fwd {fwd * 1e3:.0f} ms) ==")
        for key, value in row.items():
            shown = "n/a" if value is None else f"{value:.3f}" if "memory kept" in key else f"{value:.2f}"
            print(f"  {key:<58} {shown}")
        print(f"  capture keeps {kept / 2**20:.1f} MB; cloning every output takes {cloned / 2**20:.1f} MB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()

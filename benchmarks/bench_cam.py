"""Cost of layerscope.grad_cam next to a plain forward + backward and pytorch-grad-cam, in one run.

    python benchmarks/bench_cam.py            # resnet18, 224 x 224, batch 1 and 8, 2 threads
    python benchmarks/bench_cam.py --repeats 5

The contenders run interleaved (one of each per round), so a noisy machine slows them alike; the median
and the fastest round of each are reported next to their ratio to the plain forward + backward. Compare
the ratios, not the absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from pytorch_grad_cam import GradCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torchvision import models as tvm

import layerscope


def contenders(model, x, cam):
    target = 1

    def plain_forward():
        with torch.no_grad():
            model(x)

    def plain_forward_backward():
        model(x)[:, target].sum().backward()
        model.zero_grad(set_to_none=True)

    return {
        "forward (no_grad)": plain_forward,
        "forward + backward": plain_forward_backward,
        "layerscope grad_cam layer4": lambda: layerscope.grad_cam(model, x, layer="layer4", target=target),
        "layerscope grad_cam auto": lambda: layerscope.grad_cam(model, x, target=target),
        "layerscope gradcam++ layer4": lambda: layerscope.grad_cam(model, x, layer="layer4", target=target,
                                                                   method="gradcam++"),
        "pytorch-grad-cam GradCAM": lambda: cam(x, targets=[ClassifierOutputTarget(target)] * len(x)),
    }


def measure(batch: int, repeats: int) -> dict[str, list[float]]:
    torch.manual_seed(0)
    model = tvm.resnet18(weights=None).eval()
    x = torch.randn(batch, 3, 224, 224)
    with GradCAM(model, [model.layer4]) as cam:
        runs = contenders(model, x, cam)
        for fn in runs.values():  # warm-up
            fn()
        times: dict[str, list[float]] = {name: [] for name in runs}
        for _ in range(repeats):
            for name, fn in runs.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"resnet18, 224 x 224, {args.threads} threads, {args.repeats} interleaved rounds")
    for batch in (1, 8):
        times = measure(batch, args.repeats)
        median = {name: statistics.median(t) for name, t in times.items()}
        fastest = {name: min(t) for name, t in times.items()}
        print(f"\nbatch {batch}")
        print(f"  {'':30} {'median ms':>10} {'ratio':>6} {'fastest ms':>11} {'ratio':>6}")
        for name in times:
            print(f"  {name:30} {median[name] * 1e3:10.1f} {median[name] / median['forward + backward']:6.2f} "
                  f"{fastest[name] * 1e3:11.1f} {fastest[name] / fastest['forward + backward']:6.2f}")


if __name__ == "__main__":
    main()

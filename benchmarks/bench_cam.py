"""Cost of layerscope.grad_cam next to a plain forward + backward and pytorch-grad-cam, in one run.

    python benchmarks/bench_cam.py            # resnet18, 224 x 224, batch 1 and 8, 2 threads
    python benchmarks/bench_cam.py --repeats 5

The contenders run interleaved (one of each per round) and the median per contender is reported, so a
noisy machine slows them alike; compare the ratios to the plain pass, not the absolute times.
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


def measure(batch: int, repeats: int) -> dict[str, float]:
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
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"resnet18, 224 x 224, {args.threads} threads, median of {args.repeats} interleaved rounds")
    for batch in (1, 8):
        medians = measure(batch, args.repeats)
        base = medians["forward + backward"]
        print(f"\nbatch {batch}")
        print(f"  {'':30} {'ms':>8} {'/ fwd+bwd':>10}")
        for name, seconds in medians.items():
            print(f"  {name:30} {seconds * 1e3:8.1f} {seconds / base:10.2f}")


if __name__ == "__main__":
    main()

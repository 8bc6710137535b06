"""What the findings add to a capture: time of ``find(cap)`` over the time of ``capture()``.

    python benchmarks/bench_findings.py            # squeezenet1_1, resnet18 and a 2001-module stack
    python benchmarks/bench_findings.py --quick    # fewer repeats

Batch 8, 224x224 images, 2 threads. Prints medians and the ratio (the machine is noisy: compare, don't
quote absolute times). ``capture()`` already runs ``find()`` once; the ratio is find's share of that.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torchvision import models as tvm

import layerscope
from bench_capture import stack  # the same 2,001-module stack
from layerscope.core.findings import find

BATCH = 8


MODELS = {
    "squeezenet1_1": lambda: (tvm.squeezenet1_1(weights=None).eval(), torch.randn(BATCH, 3, 224, 224)),
    "resnet18": lambda: (tvm.resnet18(weights=None).eval(), torch.randn(BATCH, 3, 224, 224)),
    "stack2001": lambda: (stack().eval(), torch.randn(BATCH, 512)),
}


def median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 3 if args.quick else 7
    print(f"{'model':<15}{'capture s':>11}{'find ms':>10}{'find/capture':>14}{'findings':>10}")
    for name, make in MODELS.items():
        torch.manual_seed(0)
        model, batch = make()
        cap = layerscope.capture(model, batch)  # warm-up
        capture_s = median_time(lambda m=model, b=batch: layerscope.capture(m, b), repeats)
        find_s = median_time(lambda c=cap: find(c), repeats * 10)
        print(f"{name:<15}{capture_s:>11.2f}{find_s * 1e3:>10.1f}{find_s / capture_s:>14.2%}{len(cap.findings):>10}")


if __name__ == "__main__":
    main()

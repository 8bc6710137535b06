"""Saving and loading captures: time to save and load, file size, and findings on a loaded capture.

    python benchmarks/bench_records.py            # squeezenet1_1 and resnet50 at 224x224, the 2,001-module stack
    python benchmarks/bench_records.py --quick    # fewer repeats

Batch 8, 2 threads. Prints medians, the file size against the capture's own numbers, and find() on a loaded
capture against find() on the fresh one (the machine is noisy: compare, don't quote absolute times).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from torchvision import models as tvm

import layerscope
from bench_capture import stack  # the same 2,001-module stack
from bench_findings import median_time

BATCH = 8

MODELS = {
    "squeezenet1_1": lambda: (tvm.squeezenet1_1(weights=None).eval(), torch.randn(BATCH, 3, 224, 224)),
    "resnet50": lambda: (tvm.resnet50(weights=None).eval(), torch.randn(BATCH, 3, 224, 224)),
    "stack2001": lambda: (stack().eval(), torch.randn(BATCH, 512)),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(2)
    repeats = 3 if args.quick else 7
    print(f"{'model':<15}{'calls':>7}{'save ms':>9}{'load ms':>9}{'file MB':>9}{'maps MB':>9}"
          f"{'find fresh ms':>15}{'find loaded ms':>16}{'loaded/fresh':>14}")
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in MODELS.items():
            torch.manual_seed(0)
            model, batch = make()
            cap = layerscope.capture(model, batch)
            path = Path(tmp) / f"{name}.lsc"
            save_s = median_time(lambda c=cap, p=path: c.save(p), repeats)
            load_s = median_time(lambda p=path: layerscope.load(p), repeats)
            loaded = layerscope.load(path)
            fresh_s = median_time(lambda c=cap: layerscope.findings(c), repeats * 5)
            loaded_s = median_time(lambda c=loaded: layerscope.findings(c), repeats * 5)
            maps = sum(c.feature_maps.numel() * 4 for _, c in cap.calls if c.feature_maps is not None)
            print(f"{name:<15}{len(cap.calls):>7}{save_s * 1e3:>9.0f}{load_s * 1e3:>9.0f}"
                  f"{path.stat().st_size / 1e6:>9.2f}{maps / 1e6:>9.2f}{fresh_s * 1e3:>15.1f}{loaded_s * 1e3:>16.1f}"
                  f"{loaded_s / fresh_s:>14.2f}")


if __name__ == "__main__":
    main()

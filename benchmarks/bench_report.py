"""The HTML report: file size, time to write it against the capture itself, and time to interactive in Chromium.

    python benchmarks/bench_report.py            # SqueezeNet 1.1 at 224x224 (batch 1 and 8), the 2,001-module stack
    python benchmarks/bench_report.py --quick    # fewer repeats

Capture and report are timed side by side, interleaved (medians). "write" is ``Capture.save_html`` on a fresh
capture, so it includes the torchinfo summary it computes; "write, summary cached" is the same once
``cap.summary()`` has run. "cold" is the first capture and the first report of a new process (imports
included). Time to interactive is from navigation start (file://) to the tree and the first panel drawn,
in headless Chromium. The machine is noisy: compare, don't quote absolute times.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision import models as tvm

import layerscope
from bench_capture import stack  # the same 2,001-module stack

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
MODELS = {
    "squeezenet1_1 b1": lambda: (tvm.squeezenet1_1(weights=None).eval(), torch.randn(1, 3, 224, 224)),
    "squeezenet1_1 b8": lambda: (tvm.squeezenet1_1(weights=None).eval(), torch.randn(8, 3, 224, 224)),
    "stack2001 b8": lambda: (stack().eval(), torch.randn(8, 512)),
}
TARGET_MB = {"squeezenet1_1 b1": 3, "squeezenet1_1 b8": 3, "stack2001 b8": 15}


def side_by_side(model, batch, path: Path, repeats: int) -> dict[str, float]:
    times: dict[str, list[float]] = {"capture": [], "write": [], "write, summary cached": []}
    layerscope.capture(model, batch).save_html(path)  # warm-up: imports, first figure
    for _ in range(repeats):
        start = time.perf_counter()
        cap = layerscope.capture(model, batch)
        times["capture"].append(time.perf_counter() - start)
        start = time.perf_counter()
        cap.save_html(path)
        times["write"].append(time.perf_counter() - start)
        start = time.perf_counter()
        cap.save_html(path)
        times["write, summary cached"].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


def cold(name: str) -> tuple[float, float]:
    """Seconds of the first capture and the first report in a fresh process."""
    code = f"""
import sys, tempfile, time, torch
sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(2)
from bench_report import MODELS
torch.manual_seed(0)
model, batch = MODELS[{name!r}]()
import layerscope
t = time.perf_counter(); cap = layerscope.capture(model, batch); a = time.perf_counter() - t
with tempfile.TemporaryDirectory() as tmp:
    t = time.perf_counter(); cap.save_html(tmp + "/r.html"); b = time.perf_counter() - t
print(a, b)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    a, b = out.stdout.split()
    return float(a), float(b)


def interactive(paths: dict[str, Path], repeats: int) -> dict[str, tuple[float, float]]:
    """Milliseconds from navigation start to the report drawn, and from typing a search to its rows, per report."""
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        for name, path in paths.items():
            ready, search = [], []
            for _ in range(repeats):
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
                page = context.new_page()
                page.goto(path.resolve().as_uri())
                page.wait_for_function("() => document.documentElement.dataset.lsReady", timeout=60_000)
                ready.append(float(page.evaluate("document.documentElement.dataset.lsReady")))
                search.append(page.evaluate("""() => new Promise((resolve) => {
                    const box = document.querySelector(".ls-search"), t0 = performance.now();
                    box.value = "1"; box.dispatchEvent(new Event("input"));
                    requestAnimationFrame(() => resolve(performance.now() - t0));
                })"""))
                context.close()
            out[name] = (statistics.median(ready), statistics.median(search))
        browser.close()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    args = parser.parse_args()
    repeats = 3 if args.quick else 7
    torch.set_num_threads(2)
    rows, paths = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, make in MODELS.items():
            torch.manual_seed(0)
            model, batch = make()
            path = paths[name] = Path(tmp) / f"{name.replace(' ', '_')}.html"
            rows[name] = side_by_side(model, batch, path, repeats)
            rows[name]["size"] = path.stat().st_size / 1e6
            rows[name]["cold"] = cold(name)
        shown = interactive(paths, repeats)
        print(f"\n{'report':<18}{'MB':>6}{'target':>8}{'capture s':>11}{'write s':>9}{'write/cap':>11}"
              f"{'cached/cap':>11}{'cold cap s':>12}{'cold write s':>14}{'ready ms':>10}{'search ms':>11}")
        for name, r in rows.items():
            ready, search = shown[name]
            print(f"{name:<18}{r['size']:>6.2f}{'<' + str(TARGET_MB[name]):>8}{r['capture']:>11.2f}{r['write']:>9.2f}"
                  f"{r['write'] / r['capture']:>11.2f}{r['write, summary cached'] / r['capture']:>11.2f}"
                  f"{r['cold'][0]:>12.2f}{r['cold'][1]:>14.2f}{ready:>10.0f}{search:>11.0f}")


if __name__ == "__main__":
    main()

"""Capture cost of this working tree against an earlier revision, measured side by side in one run.

    python benchmarks/bench_versus.py 7bccf63            # 3 rounds of bench_capture --quick, each revision in turn
    python benchmarks/bench_versus.py HEAD~3 --rounds 5 --models stack2001

Each round runs this tree's bench_capture.py twice, once importing layerscope from a temporary worktree of
REV and once from this tree, in alternating order, and the medians over rounds are printed side by side.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KEYS = ("capture fwd / plain fwd", "capture fwd+bwd / plain fwd+bwd", "capture memory kept / clone-all memory",
        "capture+costs fwd / plain fwd", "capture+costs fwd+bwd / plain fwd+bwd")


def run(src: Path, models: list[str], out: Path, cpu: bool = False) -> dict:
    cmd = [sys.executable, str(HERE / "bench_capture.py"), "--quick", "--json", str(out), "--models", *models]
    cmd += ["--cpu"] if cpu else []
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONPATH": str(src)}, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rev")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--models", nargs="*", default=["squeezenet1_1", "resnet50", "stack2001"])
    parser.add_argument("--cpu", action="store_true", help="time by CPU time (bench_capture.py --cpu)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(tmp) / "base"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(base), args.rev], check=True)
        try:
            results: dict[str, list[dict]] = {"before": [], "after": []}
            for i in range(args.rounds):
                order = [("before", base / "src"), ("after", ROOT / "src")]
                for label, src in order if i % 2 == 0 else order[::-1]:
                    results[label].append(run(src, args.models, Path(tmp) / f"{label}{i}.json", args.cpu))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(base)], check=True)
    print(f"median of {args.rounds} rounds (each a median of 3 runs); before = {args.rev}, after = this tree")
    print(f"{'model':<15}{'ratio':<42}{'before':>9}{'after':>9}")
    for model in args.models:
        for key in KEYS:
            before = [r[model][key] for r in results["before"] if key in r[model]]
            after = statistics.median(r[model][key] for r in results["after"])
            shown = f"{statistics.median(before):>9.3f}" if before else f"{'-':>9}"  # a ratio REV cannot measure
            print(f"{model:<15}{key:<42}{shown}{after:>9.3f}")


if __name__ == "__main__":
    main()

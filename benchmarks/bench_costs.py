"""Costs of a model that does not fit: a Llama-2-7B-sized decoder on the meta device, batch 1 x 512 tokens.

    python benchmarks/bench_costs.py              # in a fresh process: times, RSS, FLOPs and activation bytes
    python benchmarks/bench_costs.py --tokens 2048

The model is tests/models.py's LlamaLike.seven_b() (plain torch modules, Hugging Face's module names). RSS is
read from /proc: after importing layerscope (torch's own share is most of it), after building the model on
meta, after the capture, and the peak rise over the post-import level; a small model built and captured on meta
first shows what is torch's one-off warm-up (kernels and modules loaded on first use).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent / "tests"

CODE = """
import sys, time
sys.path.insert(0, {tests!r})

def status(key):
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith(key + ":")) / 1024

import torch
import layerscope
from models import LlamaLike
torch.set_num_threads(2)
imported = status("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset the peak to the current RSS
with torch.device("meta"):
    layerscope.capture(LlamaLike(), torch.randint(0, 256, (1, 8)))
warm = status("VmRSS")
t0 = time.perf_counter()
with torch.device("meta"):
    model = LlamaLike.seven_b()
t1 = time.perf_counter()
built = status("VmRSS")
cap = layerscope.capture(model, torch.randint(0, 32000, (1, {tokens})))
t2 = time.perf_counter()
assert cap.error is None, cap.error
params = cap.total_params
layer = cap["layers.0"]
print(f"parameters {{params / 1e9:.2f}} B, {{len(cap.modules)}} modules, meta={{cap.meta}}")
print(f"build on meta {{t1 - t0:.2f}} s, capture with costs {{t2 - t1:.2f}} s")
print(f"RSS: after import {{imported:.0f}} MB, after a warm-up on a small meta model {{warm:.0f}} MB "
      f"(+{{warm - imported:.0f}}), after building the 7B model {{built:.0f}} MB (+{{built - warm:.0f}}), after its "
      f"capture {{status('VmRSS'):.0f}} MB (+{{status('VmRSS') - built:.0f}}); peak rise over import "
      f"{{status('VmHWM') - imported:.0f}} MB")
print(f"forward FLOPs {{cap.flops / 1e12:.2f}} T (2 x parameters x tokens = {{2 * params * {tokens} / 1e12:.2f}} T), "
      f"unsupported ops: {{cap[''].unsupported_ops or 'none'}}")
print(f"saved for backward {{cap.activation_bytes / 2**30:.2f}} GiB (fp32, attention on meta's math path)")
print(f"layers.0: {{layer.flops / 1e9:.1f}} GFLOPs (attention {{cap['layers.0.self_attn'].flops / 1e9:.1f}}, "
      f"MLP {{cap['layers.0.mlp'].flops / 1e9:.1f}}), saved {{layer.activation_bytes / 2**20:.0f}} MiB; "
      f"lm_head {{cap['lm_head'].flops / 1e9:.1f}} GFLOPs")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    args = parser.parse_args()
    code = CODE.format(tests=str(TESTS), tokens=args.tokens)
    subprocess.run([sys.executable, "-c", code], check=True)


if __name__ == "__main__":
    main()

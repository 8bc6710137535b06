"""``layerscope.gather`` of the 2,001-module stack's capture on 2 ranks, against one training step of the same job.

    python benchmarks/bench_gather.py            # 5 repeats of each, interleaved
    python benchmarks/bench_gather.py --quick    # 3 repeats
    python benchmarks/bench_gather.py --run      # gather(run) of a watched loop (4 sampled steps) instead
    python benchmarks/bench_gather.py --own-batch  # each rank on its own batch (default: the same on both)

Two CPU processes on gloo, one thread each, DDP on bench_capture's stack (500 x Linear(512)/ReLU/LayerNorm/Dropout,
131M parameters), batch 8 per rank. Times, on rank 0 (dst) from a barrier: one DDP training step (forward,
backward with DDP's all-reduce, SGD step), the same step without DDP (one rank's compute), and ``gather(cap)``;
also its parts: encoding a capture (what every other rank does) and merging two captures (what dst does, after
decoding). Prints medians of wall and CPU time and the ratios (the machine is noisy: compare, don't quote absolute
times; gather's CPU time on rank 0 leaves out the other rank's encoding, which its wall time waits for).

By default both ranks train on the same batch, which makes the merge run DDP's check that replicas given the same
batch compute the same outputs (``rank_desync``), and lets rank 1's statistics share rank 0's records; with
``--own-batch`` each rank draws its own (seeded by its rank), as under a DistributedSampler.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))

BATCH = 8
WORLD = 2


def _paused(fn, *args):
    """As gather runs it: with the cyclic garbage collector paused."""
    try:
        from layerscope.core.collector import paused
    except ImportError:  # a revision from before the collector module
        from layerscope.core.capture import _gc_paused as paused

    with paused():
        return fn(*args)


def _timed(fn) -> tuple[float, float]:
    """Wall time and this process's CPU time (all its threads) of one run, from a barrier. What the run returns (a
    merged capture: tens of thousands of records) is freed after the clocks are read: it is the caller's to keep."""
    dist.barrier()
    start, cpu = time.perf_counter(), time.process_time()
    kept = fn()  # noqa: F841
    return time.perf_counter() - start, time.process_time() - cpu


def _run_rank(rank: int, init: str, repeats: int) -> None:
    """gather(run) of a DDP loop over the stack watched for 4 sampled steps (every=1), against one training step."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    import layerscope
    from bench_capture import stack

    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(stack())
    x, y = torch.randn(BATCH, 512), torch.randn(BATCH, 512)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        opt.zero_grad(set_to_none=True)
        F.mse_loss(model(x), y).backward()
        opt.step()

    steps = [_timed(step) for _ in range(repeats + 1)][1:]
    with layerscope.watch(model, opt, every=1) as run:
        for _ in range(4):
            step()
    gathers = [_timed(lambda: layerscope.gather(run)) for _ in range(repeats)]
    if rank == 0:
        train, gather = statistics.median(t for t, _ in steps), statistics.median(t for t, _ in gathers)
        print(f"gather(run) of {len(run.steps)} sampled steps, {len(run.structure.modules)} modules: "
              f"{gather * 1e3:.0f} ms wall, {gather / len(run.steps) * 1e3:.0f} ms per step; one DDP training step "
              f"{train * 1e3:.0f} ms; per sampled step {gather / len(run.steps) / train:.1%} of a training step "
              f"(median of {repeats}, rank 0)")
    dist.destroy_process_group()


def _rank(rank: int, init: str, repeats: int, own_batch: bool = False) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=WORLD)
    import layerscope
    from bench_capture import stack
    from layerscope.core import distributed, wire

    torch.manual_seed(0)
    plain = stack()
    model = nn.parallel.DistributedDataParallel(plain)
    if own_batch:
        torch.manual_seed(1 + rank)
    x, y = torch.randn(BATCH, 512), torch.randn(BATCH, 512)
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step(net):
        opt.zero_grad(set_to_none=True)
        F.mse_loss(net(x), y).backward()
        opt.step()

    cap = layerscope.capture(model, x, loss_fn=lambda out, _: F.mse_loss(out, y))
    fns = {"DDP training step": lambda: step(model), "local training step": lambda: step(plain),
           "gather": lambda: layerscope.gather(cap), "encode one capture": lambda: _paused(wire.encode, cap),
           "merge two captures": lambda: distributed.merge([dataclasses.replace(cap, rank=r) for r in range(WORLD)])}
    times: dict[str, list[tuple[float, float]]] = {name: [] for name in fns}
    for fn in fns.values():  # warm-up
        _timed(fn)
    for _ in range(repeats):  # interleaved, so drifts of the machine hit every method alike
        for name, fn in fns.items():
            times[name].append(_timed(fn))
    if rank == 0:
        wall = {name: statistics.median(t for t, _ in ts) for name, ts in times.items()}
        cpu = {name: statistics.median(c for _, c in ts) for name, ts in times.items()}
        print(f"stack2001: {len(cap.modules)} modules, {len(cap.calls)} calls, {cap.total_params / 1e6:.0f}M "
              f"parameters, {len(wire.encode(cap)) / 1e6:.1f} MB sent per rank, "
              f"{'each rank on its own batch' if own_batch else 'the same batch on both ranks'} "
              f"(median of {repeats}, rank 0)")
        print(f"  {'':<30} {'wall ms':>9} {'CPU ms':>9}")
        for name in fns:
            print(f"  {name:<30} {wall[name] * 1e3:9.0f} {cpu[name] * 1e3:9.0f}")
        for step in ("DDP training step", "local training step"):
            print(f"  {'gather / ' + step:<30} {wall['gather'] / wall[step]:9.1%} {cpu['gather'] / cpu[step]:9.1%}")
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="3 repeats")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", action="store_true", help="gather(run) of a watched loop")
    parser.add_argument("--own-batch", action="store_true", help="each rank on its own batch")
    args = parser.parse_args()
    repeats = 3 if args.quick else args.repeats
    with tempfile.TemporaryDirectory() as tmp:
        init = f"file://{tmp}/rendezvous"
        if args.run:
            mp.spawn(_run_rank, args=(init, repeats), nprocs=WORLD)
        else:
            mp.spawn(_rank, args=(init, repeats, args.own_batch), nprocs=WORLD)


if __name__ == "__main__":
    main()

"""The jobs of tests/test_distributed.py: what every rank runs (spawned processes import only this module).

Each scenario captures on every rank, gathers on rank 0 and saves the ranks' captures and the merged one."""

from __future__ import annotations

import dataclasses
import os
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import layerscope

WORLD = 2


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))  # 8*16 + 16 + 16*4 + 4 = 212 parameters


def make_batch(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    return torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)


class Normalize(nn.Module):
    """Rows scaled to unit length: an all-zero row gives 0/0 = NaN."""

    def forward(self, x):
        return x / x.norm(dim=1, keepdim=True)


class RankShift(nn.Module):
    """Code that depends on the rank: replicas that compute differently."""

    def forward(self, x):
        return x + 1e-3 * dist.get_rank()


# -- running a job -------------------------------------------------------------------------------------------------


def entry(rank, world, init, out, scenarios):
    """One rank of the job: every scenario in turn, each writing into its own folder under ``out``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        for scenario in scenarios:
            folder = os.path.join(out, scenario)
            os.makedirs(folder, exist_ok=True)
            SCENARIOS[scenario](rank, folder)
        dist.barrier()  # no rank tears the group down while another still talks to it
    finally:
        dist.destroy_process_group()


def run_job(out, scenarios: list[str], timeout: float = 300):
    """Run ``scenarios`` in one two-rank gloo job writing to ``out``; a failure on any rank raises with its
    traceback, and a job still running after ``timeout`` seconds (a rank waiting in a collective) fails the test."""
    import pytest
    import torch.multiprocessing as mp

    context = mp.start_processes(entry, args=(WORLD, f"file://{out / 'rendezvous'}", str(out), scenarios),
                                 nprocs=WORLD, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for p in context.processes:
                p.kill()
            pytest.fail(f"the job did not finish in {timeout:.0f} s (a rank waits in a collective)")
    return out


def hooks(model: nn.Module) -> list[int]:
    return [len(d) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks, m._backward_hooks)]


def _capture_and_gather(rank, out, model, batch, target, **kwargs):
    """Capture on this rank and gather on rank 0; checks that no hook and no .grad is left behind."""
    before = hooks(model)
    cap = layerscope.capture(model, batch, target=target, **kwargs)
    assert hooks(model) == before, "capture left hooks on the model"
    assert all(p.grad is None for p in model.parameters()), "capture left a .grad"
    assert cap.rank == rank and cap.world_size == WORLD
    cap.save(os.path.join(out, f"rank{rank}.lsc"))
    merged = layerscope.gather(cap, dst=0)
    assert (merged is None) == (rank != 0)
    if merged is not None:
        merged.save(os.path.join(out, "merged.lsc"))
    return cap


def _train_step(model, x, y):
    """One SGD step after the capture: the model, its gradient hooks and its sharding work as before."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(x), y).backward()
    opt.step()


def _ddp(rank, out):
    model = nn.parallel.DistributedDataParallel(make_model())
    x, y = make_batch(rank)
    cap = _capture_and_gather(rank, out, model, x, y)
    on_1 = layerscope.gather(cap, dst=1)  # the other ranks' captures decoded whole: the same job
    assert (on_1 is None) == (rank != 1)
    if on_1 is not None:
        on_1.save(os.path.join(out, "merged_on_1.lsc"))
    _train_step(model, x, y)
    if rank == 0:
        for name, p in model.module.named_parameters():
            np.save(os.path.join(out, f"stepped.{name}.npy"), p.detach().numpy())


def _fsdp(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    x, y = make_batch(rank)
    with torch.no_grad():
        model(x)  # FSDP2 now keeps the root's parameters gathered: capture must still see the sharded ones
    _capture_and_gather(rank, out, model, x, y)
    assert all(type(p).__name__ == "DTensor" for p in model.parameters()), "capture left gathered parameters"
    _train_step(model, x, y)
    for name, p in model.named_parameters():
        full = p.full_tensor()  # a collective: every rank takes part
        if rank == 0:
            np.save(os.path.join(out, f"stepped.{name}.npy"), full.detach().numpy())


def _tensor_parallel(rank, out):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    model = parallelize_module(make_model(), mesh, {"0": ColwiseParallel(), "2": RowwiseParallel()})
    x, y = make_batch(0)  # tensor parallel: every rank gets the same batch
    _capture_and_gather(rank, out, model, x, y)


def _dtensor_activations(rank, out):
    """Tensor parallel that keeps the activations as DTensors between the layers: statistics of the local shards."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    mesh = init_device_mesh("cpu", (WORLD,))
    plan = {"0": ColwiseParallel(use_local_output=False), "2": RowwiseParallel(input_layouts=Shard(-1))}
    model = parallelize_module(make_model(), mesh, plan)
    x, y = make_batch(0)
    seen = {}
    handle = model[1].register_forward_hook(lambda m, a, o: seen.setdefault("relu", o.to_local().detach().clone()))
    with torch.no_grad():
        model(x)
    handle.remove()
    cap = _capture_and_gather(rank, out, model, x, y)
    assert cap.error is None, cap.error
    got, want = cap["1"].calls[0].stats, layerscope.TensorStats.of(seen["relu"])
    assert got.numel == want.numel == 48 and abs(got.mean - want.mean) < 1e-6 and got.max == want.max
    assert cap["1"].calls[0].output_shapes == (6, 16)  # a DTensor's global shape; its statistics are the shard's


def _nan_on_rank_1(rank, out):
    model = nn.parallel.DistributedDataParallel(nn.Sequential(Normalize(), make_model()))
    x, y = make_batch(rank)
    if rank == 1:
        x[2] = 0.0  # finite input; Normalize makes 0/0
    _capture_and_gather(rank, out, model, x, y)


def _desync(rank, out):
    model = nn.parallel.DistributedDataParallel(make_model())
    if rank == 1:
        with torch.no_grad():
            model.module[2].weight[0, 0] += 1e-3  # changed on one replica after DDP broadcast the weights
    _capture_and_gather(rank, out, model, *make_batch(rank))


def _rank_dependent(rank, out):
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(make_model(), RankShift(), nn.Linear(4, 3)))
    _capture_and_gather(rank, out, model, *make_batch(0))  # the very same batch on both ranks


def _device_mismatch_on_rank_1(rank, out):
    model = make_model()  # replicas without DDP: the failed forward leaves no rank waiting in a collective
    if rank == 1:
        model[2].to("meta")
    _capture_and_gather(rank, out, model, *make_batch(rank))


def _unsendable_on_rank_1(rank, out):
    """Rank 1's capture cannot be encoded: both ranks raise, no rank is left waiting, and the next gather works."""
    model = nn.parallel.DistributedDataParallel(make_model())
    x, y = make_batch(rank)
    cap = layerscope.capture(model, x, target=y)
    broken = cap
    if rank == 1:
        finding = layerscope.Finding(kind="custom", severity="info", module="", message="m", details={"x": object()})
        broken = dataclasses.replace(cap, findings=(finding,))
    try:
        layerscope.gather(broken, dst=0)
        outcome = "returned"
    except Exception as exc:  # noqa: BLE001 - what each rank raised is the test's to check
        outcome = f"{type(exc).__name__}: {exc}"
    merged = layerscope.gather(cap, dst=0)
    with open(os.path.join(out, f"rank{rank}.txt"), "w") as f:
        f.write(f"{outcome}\n{merged is not None and merged.world_size}")


WATCH_STEPS, WATCH_EVERY, NAN_STEP = 5, 2, 4  # sampled: 0, 2, 4; rank 1's batch makes a NaN at step 4


def _watch_ddp(rank, out):
    """A DDP loop watched on both ranks and gathered on rank 0, with the references recorded by plain means: the
    first Linear's output of each step (a forward hook), the all-reduced gradient norms, each rank's loss."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(nn.Sequential(Normalize(), make_model()))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    outputs, step, base = {}, [0], hooks(model)

    def record(module, args, output):
        outputs.setdefault(step[0], output.detach().double().numpy())

    handle = model.module[1][0].register_forward_hook(record)
    before = hooks(model)
    losses, grads = [], {}
    g = torch.Generator().manual_seed(100 + rank)
    with layerscope.watch(model, opt, every=WATCH_EVERY) as run:
        for step[0] in range(WATCH_STEPS):
            x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
            if rank == 1 and step[0] == NAN_STEP:
                x[2] = 0.0  # finite input; Normalize makes 0/0
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            grads[step[0]] = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
            opt.step()
            run.log(loss=loss)
            losses.append(loss.item())
    assert hooks(model) == before, "watch left hooks on the model"
    handle.remove()
    np.save(os.path.join(out, f"losses.rank{rank}.npy"), np.array(losses))
    for s, o in outputs.items():
        np.save(os.path.join(out, f"out.{s}.rank{rank}.npy"), o)
    if rank == 0:
        np.savez(os.path.join(out, "grads.npz"), **{f"{s}:{n}": v for s, d in grads.items() for n, v in d.items()})
    run.save(os.path.join(out, f"rank{rank}.lsr"))
    dist.barrier()
    start = time.perf_counter()
    merged = layerscope.gather(run, dst=0)
    seconds = time.perf_counter() - start
    assert hooks(model) == base, "gather left hooks on the model"
    assert (merged is None) == (rank != 0)
    if merged is not None:
        merged.save(os.path.join(out, "merged.lsr"))
        with open(os.path.join(out, "gather_seconds.txt"), "w") as f:
            f.write(str(seconds))


def _watch_ddp_amp(rank, out):
    """A DDP loop with a GradScaler watched on both ranks: step 0 lets ``scaler.step`` unscale the gradients, step 1
    unscales them first to clip them (the usual recipe); the unscaled all-reduced gradient norms, for reference."""
    torch.manual_seed(0)
    model = nn.parallel.DistributedDataParallel(make_model())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    norms = {}
    g = torch.Generator().manual_seed(100 + rank)
    with layerscope.watch(model, opt, every=1, scaler=scaler) as run:
        for step in range(2):
            x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
            opt.zero_grad()
            scale = scaler.get_scale()
            scaler.scale(F.cross_entropy(model(x), y)).backward()
            if step == 1:
                scaler.unscale_(opt)
                scale = 1.0
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1e6)  # far above the norms: changes nothing
            norms.update({f"{step}:{n}": p.grad.double().norm().item() / scale for n, p in model.named_parameters()})
            scaler.step(opt)
            scaler.update()
    run.save(os.path.join(out, f"rank{rank}.lsr"))
    np.savez(os.path.join(out, f"norms.rank{rank}.npz"), **norms)


def _watch_fsdp(rank, out):
    """An FSDP2 loop watched on both ranks: the global norms of the full gradients and parameters, for reference."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    mesh = init_device_mesh("cpu", (WORLD,))
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    base, norms = hooks(model), {}
    g = torch.Generator().manual_seed(100 + rank)
    with layerscope.watch(model, opt, every=1) as run:
        for step in range(2):
            x, y = torch.randn(6, 8, generator=g), torch.randint(0, 4, (6,), generator=g)
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            for n, p in model.named_parameters():  # collectives, outside watch: every rank takes part
                norms[f"{step}:{n}:grad"] = p.grad.full_tensor().double().norm().item()
                norms[f"{step}:{n}:param"] = p.full_tensor().double().norm().item()
            opt.step()
            run.log(loss=1.0 + rank)
    assert hooks(model) == base, "watch left hooks on the model"
    assert all(type(p).__name__ == "DTensor" for p in model.parameters())
    merged = layerscope.gather(run, dst=0)
    if merged is not None:
        merged.save(os.path.join(out, "merged.lsr"))
        np.savez(os.path.join(out, "norms.npz"), **norms)


def _watch_alone(rank, out):
    """watch runs no collective: only rank 1 watches (rank 0 does not take part), under the profiler."""
    if rank == 1:
        with torch.profiler.profile() as prof:
            model = make_model()
            opt = torch.optim.SGD(model.parameters(), lr=0.1)
            x, y = make_batch(rank)
            with layerscope.watch(model, opt, every=1) as run:
                for _ in range(3):
                    opt.zero_grad()
                    F.cross_entropy(model(x), y).backward()
                    opt.step()
                    run.log(loss=1.0)
        assert len(run.steps) == 3 and not any(hooks(model))
        names = sorted({e.name for e in prof.events() if e.name.startswith(("c10d", "gloo"))})
        with open(os.path.join(out, "collectives.txt"), "w") as f:
            f.write("\n".join(names))
    dist.barrier()
    with torch.profiler.profile() as prof:  # the check can fail: a collective is seen by the profiler
        dist.barrier()
    if rank == 1:
        with open(os.path.join(out, "control.txt"), "w") as f:
            f.write("\n".join(sorted({e.name for e in prof.events() if e.name.startswith(("c10d", "gloo"))})))


SCENARIOS = {"ddp": _ddp, "fsdp": _fsdp, "tensor_parallel": _tensor_parallel, "dtensor": _dtensor_activations,
             "nan": _nan_on_rank_1,
             "desync": _desync, "rank_dependent": _rank_dependent, "device": _device_mismatch_on_rank_1,
             "unsendable": _unsendable_on_rank_1,
             "watch_ddp": _watch_ddp, "watch_ddp_amp": _watch_ddp_amp, "watch_fsdp": _watch_fsdp,
             "watch_alone": _watch_alone}

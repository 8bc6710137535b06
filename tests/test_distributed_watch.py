"""watch in every rank of a DDP job and gather(run): two CPU processes on gloo (tests/distributed_jobs.py).

The job records its references by plain means: a forward hook's output of each step on each rank, the gradient
norms DDP left in .grad (all-reduced), each rank's loss. The merged run is checked against them with float64
numpy, and against the merge of the ranks' saved runs and its own save/load."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import layerscope
from distributed_jobs import NAN_STEP, WATCH_EVERY, WATCH_STEPS, WORLD, make_batch, make_model, run_job
from layerscope import Run, TensorStats, load
from layerscope.core.run_ranks import merge_runs
from test_distributed import FSDP2_ON_CPU, assert_stats, needs_fsdp2_on_cpu
from test_records import same

SCENARIOS = ["watch_ddp", "watch_ddp_amp", "watch_alone", *(["watch_fsdp"] if FSDP2_ON_CPU else [])]


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    out = tmp_path_factory.mktemp("watch_jobs")
    return run_job(out, SCENARIOS)


@pytest.fixture(scope="module")
def merged(job) -> Run:
    return load(job / "watch_ddp" / "merged.lsr")


def test_the_gathered_run_has_the_ranks_steps_and_exact_activation_stats(job, merged):
    folder = job / "watch_ddp"
    ranks = [load(folder / f"rank{r}.lsr") for r in range(WORLD)]
    assert isinstance(merged, Run) and merged.merged and merged.world_size == WORLD
    sampled = list(range(0, WATCH_STEPS, WATCH_EVERY))
    assert merged.steps.tolist() == ranks[0].steps.tolist() == ranks[1].steps.tolist() == sampled
    assert merged.step_count == WATCH_STEPS and merged.structure.total_params == 212
    means = merged.series("module.1.0", "mean")[1]
    for i, step in enumerate(sampled):
        call = merged.at(step)["module.1.0"].calls[0]
        outputs = [np.load(folder / f"out.{step}.rank{r}.npy") for r in range(WORLD)]
        reference = TensorStats.of(np.concatenate([o.ravel() for o in outputs]))
        assert_stats(call.stats, reference)
        assert means[i] == call.stats.mean
        assert len(call.per_rank) == WORLD
        for r in range(WORLD):
            assert_stats(call.per_rank[r], TensorStats.of(outputs[r]))
        assert call.histogram.counts.sum() + call.histogram.under + call.histogram.over == call.stats.count


def test_gradient_norms_are_the_all_reduced_ones_and_the_loss_is_the_ranks_mean(job, merged):
    folder = job / "watch_ddp"
    grads = np.load(folder / "grads.npz")
    for step in merged.steps.tolist():
        if step == NAN_STEP:
            continue  # DDP spread rank 1's NaN into every gradient
        cap = merged.at(step)
        for key in [k for k in grads.files if k.startswith(f"{step}:")]:
            module, local = key.split(":", 1)[1].rsplit(".", 1)
            p = cap[module].params[local]
            assert p.grad_norm == pytest.approx(float(grads[key]), rel=1e-6)
            assert [q.grad_norm for q in p.per_rank] == pytest.approx([float(grads[key])] * WORLD, rel=1e-6)
        weight, bias = (float(grads[f"{step}:module.1.2.{n}"]) for n in ("weight", "bias"))
        got = merged.series("module.1.2", "grad_norm")[1][merged.steps.tolist().index(step)]
        assert got == pytest.approx(np.hypot(weight, bias), rel=1e-6)
    losses = np.mean([np.load(folder / f"losses.rank{r}.npy") for r in range(WORLD)], axis=0)
    steps, values = merged.scalars("loss")
    assert steps.tolist() == list(range(WATCH_STEPS))
    np.testing.assert_allclose(values, losses, rtol=1e-6)
    assert np.isnan(values[NAN_STEP])


def test_a_nan_on_rank_1_at_one_step_is_found_with_its_rank_and_step(merged):
    nan = [f for f in merged.findings if f.kind == "nan"]
    assert len(nan) == 1, merged.findings
    assert (nan[0].module, nan[0].rank, nan[0].step) == ("module.0", 1, NAN_STEP)
    assert [f for f in merged.at(NAN_STEP).findings if f.kind == "nan" and f.rank == 1]
    per_rank = merged.at(NAN_STEP)["module.0"].calls[0].per_rank
    assert per_rank[0].nan_count == 0 and per_rank[1].nan_count == 8
    diverged = [f for f in merged.findings if f.kind == "loss_diverged"]
    assert len(diverged) == 1 and diverged[0].rank == 1 and diverged[0].details["ranks"] == [1]
    assert not [f for f in merged.findings if f.kind == "rank_desync"]  # DDP keeps the replicas in step


def test_the_merged_run_saves_loads_merges_again_and_opens_in_the_inspector(job, merged, tmp_path):
    from layerscope.widget import ModelInspector

    folder = job / "watch_ddp"
    again = merge_runs([load(folder / f"rank{r}.lsr") for r in range(WORLD)])  # from the ranks' files, no job
    path = tmp_path / "again.lsr"
    again.save(path)
    loaded = load(path)
    for run in (again, loaded):
        assert run.steps.tolist() == merged.steps.tolist() and run.world_size == WORLD
        for step in merged.steps.tolist():
            same(run.at(step), merged.at(step))
        same(list(run.findings), list(merged.findings))
        same(run.scalars("loss"), merged.scalars("loss"))
    inspector = ModelInspector(loaded)
    inspector.tree._handle_custom_msg({"event": "shown"}, [])
    inspector.select("module.1.0")
    inspector._tabs.selected_index = inspector.tab_index("Activations")
    inspector.show_step(0)
    shown = inspector._stats.value
    assert "all ranks" in shown and "rank 0" in shown and "rank 1" in shown
    with pytest.raises(ValueError, match="already merged"):
        layerscope.gather(loaded)
    with pytest.raises(ValueError, match="already merged"):
        merge_runs([loaded])


@needs_fsdp2_on_cpu
def test_fsdp2_watched_steps_give_global_gradient_and_parameter_norms(job):
    folder = job / "watch_fsdp"
    merged = load(folder / "merged.lsr")
    norms = np.load(folder / "norms.npz")
    assert merged.steps.tolist() == [0, 1] and merged.structure.total_params == 212
    for step in (0, 1):
        cap = merged.at(step)
        for name in ("0.weight", "0.bias", "2.weight", "2.bias"):
            module, local = name.split(".")
            p = cap[module].params[local]
            assert p.grad_norm == pytest.approx(float(norms[f"{step}:{name}:grad"]), rel=1e-5)
            assert p.norm == pytest.approx(float(norms[f"{step}:{name}:param"]), rel=1e-5)
            shards = [q.norm for q in p.per_rank]
            assert [q.shard for q in p.per_rank] == [(0, 2), (1, 2)] and p.norm == pytest.approx(np.hypot(*shards))
        assert not [f for f in cap.findings if f.kind == "rank_desync"], cap.findings
    assert merged.scalars("loss")[1].tolist() == [1.5, 1.5]  # the mean of the ranks' 1.0 and 2.0


def test_ddp_with_a_grad_scaler_reports_unscaled_gradient_norms(job):
    """Under DDP watch reads .grad at the optimizer step (after the all-reduce), when ``scaler.step`` or the user's
    ``unscale_`` has already divided it by the scale: it must not be divided again."""
    folder = job / "watch_ddp_amp"
    for r in range(WORLD):
        run, norms = load(folder / f"rank{r}.lsr"), np.load(folder / f"norms.rank{r}.npz")
        assert run.steps.tolist() == [0, 1] and run.record(0).grad_scale == 2.0**10
        for step in (0, 1):
            cap = run.at(step)
            for name in ("0", "2"):
                for local, p in cap[f"module.{name}"].params.items():
                    assert p.grad_norm == pytest.approx(norms[f"{step}:module.{name}.{local}"], rel=1e-5)


def test_watch_alone_runs_no_collective_and_leaves_no_hooks(job):
    folder = job / "watch_alone"
    assert (folder / "collectives.txt").read_text() == ""  # rank 1 watched while rank 0 took part in nothing
    assert "gloo:barrier" in (folder / "control.txt").read_text().split("\n")  # the profiler does see collectives


def test_gather_of_a_run_outside_a_job_returns_it():
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = make_batch(0)
    with layerscope.watch(model, opt, every=1) as run:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        with pytest.raises(ValueError, match="ended"):
            layerscope.gather(run)
        opt.step()
    assert layerscope.gather(run) is run

"""Capture in every rank of a torch.distributed job and gather: two CPU processes on gloo.

One job (tests/distributed_jobs.py) runs every scenario: DDP, FSDP2 and a tensor-parallel (DTensor) copy of the
same 212-parameter model, a NaN on one rank, a desynchronised replica, a device mismatch on one rank. The
references are computed here, in one process, on the same model unsharded: counts, global norms (the gradient
of the concatenated batch), float64 numpy statistics over every rank's outputs."""

from __future__ import annotations

import dataclasses
import math
from types import MappingProxyType

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import layerscope
from distributed_jobs import SCENARIOS, WORLD, make_batch, make_model, run_job
from layerscope import TensorStats, load
from layerscope.core import aligned, distributed, findings, versions, wire
from layerscope.core.records import copy_with
from test_records import same, zoo

FSDP2_ON_CPU = versions.torch_version() >= (2, 7)  # CPU streams lack record_event before torch 2.7
needs_fsdp2_on_cpu = pytest.mark.skipif(not FSDP2_ON_CPU, reason="FSDP2 runs on CPU from torch 2.7")


@pytest.fixture(scope="module")
def jobs(tmp_path_factory):
    """Run every capture scenario in one two-rank job; a failure on any rank fails with its traceback."""
    out = tmp_path_factory.mktemp("jobs")
    # the capture scenarios (test_distributed_watch.py runs the watch ones)
    scenarios = [s for s in SCENARIOS if not s.startswith("watch_") and (s != "fsdp" or FSDP2_ON_CPU)]
    return run_job(out, scenarios)


# -- references on the unsharded model -----------------------------------------------------------------------------


def reference_grads(batches) -> tuple[nn.Module, dict[str, float], dict[str, float]]:
    """Parameter norms and gradient norms of the unsharded model on the concatenated batch (mean cross-entropy)."""
    model = make_model()
    x = torch.cat([b[0] for b in batches])
    y = torch.cat([b[1] for b in batches])
    F.cross_entropy(model(x), y).backward()
    norms = {n: p.detach().double().norm().item() for n, p in model.named_parameters()}
    grads = {n: p.grad.double().norm().item() for n, p in model.named_parameters()}
    return model, norms, grads


def outputs(model: nn.Module, x: torch.Tensor) -> dict[str, np.ndarray]:
    """Every module's output on ``x``, as float64 numpy arrays (plain forward hooks, no layerscope)."""
    seen = {}
    handles = [m.register_forward_hook(lambda m, a, o, n=n: seen.__setitem__(n, o.detach().double().numpy()))
               for n, m in model.named_modules()]
    with torch.no_grad():
        model(x)
    for h in handles:
        h.remove()
    return seen


def assert_stats(merged: TensorStats, reference: TensorStats):
    """Counts exact; moments and range to float32 rounding (a tensor-parallel shard's matmul rounds its own way)."""
    assert (merged.numel, merged.count, merged.zeros, merged.nan_count) == (
        reference.numel, reference.count, reference.zeros, reference.nan_count)
    assert merged.mean == pytest.approx(reference.mean, rel=1e-6, abs=1e-7)
    assert merged.std == pytest.approx(reference.std, rel=1e-6)
    assert (merged.min, merged.max) == pytest.approx((reference.min, reference.max), rel=1e-6)


def check_job(folder, prefix: str, batches, local_outputs, tmp_path) -> layerscope.Capture:
    """What every job must give: global counts and norms, exact merged statistics with per-rank ones, a round trip."""
    merged = load(folder / "merged.lsc")
    ranks = [load(folder / f"rank{r}.lsc") for r in range(WORLD)]
    assert merged.merged and merged.world_size == WORLD and merged.rank is None
    plain = layerscope.capture(make_model(), batches[0][0])
    _, norms, grads = reference_grads(batches)
    assert merged.total_params == plain.total_params == 212
    for name in ("0", "1", "2"):
        m = merged[prefix + name]
        assert (m.num_params, m.num_own_params) == (plain[name].num_params, plain[name].num_own_params)
        for local_name, p in m.params.items():
            assert p.norm == pytest.approx(norms[f"{name}.{local_name}"], rel=1e-6)
            assert p.grad_norm == pytest.approx(grads[f"{name}.{local_name}"], rel=1e-5)
            assert len(p.per_rank) == WORLD
        call = m.calls[0]
        per_rank = [local_outputs(r)[name] for r in range(WORLD)]
        assert_stats(call.stats, TensorStats.of(np.concatenate([o.ravel() for o in per_rank])))
        assert len(call.per_rank) == WORLD
        for r in range(WORLD):
            assert_stats(call.per_rank[r], TensorStats.of(per_rank[r]))
            assert call.per_rank[r] == ranks[r][prefix + name].calls[0].stats
        assert call.histogram.counts.sum() + call.histogram.under + call.histogram.over == call.stats.count
    again = layerscope.core.distributed.merge(ranks)  # the same merge from the ranks' saved files, no job
    same(merged, again)
    path = tmp_path / "again.lsc"
    merged.save(path)
    loaded = load(path)
    same(merged, loaded)
    same(layerscope.findings(loaded), list(merged.findings))
    return merged


def data_parallel_outputs(batches):
    model = make_model()
    return lambda r: outputs(model, batches[r][0])


def check_stepped(folder, batches):
    """The job's SGD step after the capture equals the same step of the unsharded model on the concatenated batch."""
    model, _, _ = reference_grads(batches)
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.1 * p.grad
    for name, p in model.named_parameters():
        np.testing.assert_allclose(np.load(folder / f"stepped.{name}.npy"), p.detach().numpy(), rtol=1e-5, atol=1e-6)


# -- tests -----------------------------------------------------------------------------------------------------------


def test_ddp_global_norms_exact_stats_and_the_model_trains_on(jobs, tmp_path):
    folder = jobs / "ddp"
    batches = [make_batch(r) for r in range(WORLD)]
    merged = check_job(folder, "module.", batches, data_parallel_outputs(batches), tmp_path)
    assert merged[""].type_name == "DistributedDataParallel"
    assert not [f for f in merged.findings if f.kind == "rank_desync"]
    same(load(folder / "merged_on_1.lsc"), load(folder / "merged.lsc"))  # gather(cap, dst=1): the same records
    check_stepped(folder, batches)


@needs_fsdp2_on_cpu
def test_fsdp2_sharded_parameters_give_global_counts_and_norms(jobs, tmp_path):
    folder = jobs / "fsdp"
    batches = [make_batch(r) for r in range(WORLD)]
    merged = check_job(folder, "", batches, data_parallel_outputs(batches), tmp_path)
    weight = merged["0"].params["weight"]
    assert weight.shape == (16, 8) and weight.placements == ("Shard(0)",)
    assert [q.shard for q in weight.per_rank] == [(0, 2), (1, 2)]
    shards = [q.norm for q in weight.per_rank]
    assert shards[0] != shards[1] and weight.norm == pytest.approx(math.hypot(*shards))
    check_stepped(folder, batches)


def test_tensor_parallel_dtensor_linear(jobs, tmp_path):
    folder = jobs / "tensor_parallel"
    batches = [make_batch(0)]  # one batch, on both ranks
    full = outputs(make_model(), batches[0][0])

    def local_outputs(r):  # ColwiseParallel splits the first layer's outputs by column; RowwiseParallel replicates
        cols = slice(8 * r, 8 * (r + 1))
        return {"0": full["0"][:, cols], "1": full["1"][:, cols], "2": full["2"]}

    merged = check_job(folder, "", batches, local_outputs, tmp_path)
    assert merged["0"].params["weight"].placements == ("Shard(0)",)
    assert merged["2"].params["weight"].placements == ("Shard(1)",)
    bias = merged["2"].params["bias"]
    assert bias.placements == ("Replicate()",) and [q.shard for q in bias.per_rank] == [(0, 1), (0, 1)]
    assert merged["0"].calls[0].output_shapes == (6, 8)  # each rank's own share of the columns
    assert not [f for f in merged.findings if f.kind == "rank_desync"]  # the replicated bias agrees


def test_dtensor_activations_are_summarised_on_their_local_shards(jobs):
    merged = load(jobs / "dtensor" / "merged.lsc")
    assert merged.error is None and merged.total_params == 212
    relu = merged["1"].calls[0]
    assert relu.stats.numel == 6 * 16 and [s.numel for s in relu.per_rank] == [48, 48]  # two shards of (6, 16)
    full = outputs(make_model(), make_batch(0)[0])
    assert_stats(relu.stats, TensorStats.of(full["1"]))
    assert merged["2"].params["weight"].grad_norm == pytest.approx(reference_grads([make_batch(0)])[2]["2.weight"],
                                                                   rel=1e-5)


def test_a_nan_on_rank_1_only_is_found_at_its_module_and_rank(jobs):
    folder = jobs / "nan"
    merged = load(folder / "merged.lsc")
    nan = [f for f in merged.findings if f.kind == "nan"]
    assert len(nan) == 1 and nan[0].module == "module.0" and nan[0].rank == 1, merged.findings
    assert nan[0].details["ranks"] == [1]
    per_rank = merged["module.0"].calls[0].per_rank
    assert per_rank[0].nan_count == 0 and per_rank[1].nan_count == 8  # the zero row's 8 values
    assert merged["module.0"].calls[0].stats.nan_count == 8
    assert not [f for f in merged.findings if f.kind == "nonfinite_grad"]  # DDP spread the NaN: an echo, not a cause


def test_a_desync_injected_into_one_ddp_replica_is_reported(jobs):
    folder = jobs / "desync"
    merged = load(folder / "merged.lsc")
    found = [f for f in merged.findings if f.kind == "rank_desync"]
    assert len(found) == 1, merged.findings
    f = found[0]
    assert f.module == "module.2" and f.rank == 1 and f.severity == "error"
    assert f.details["parameters"] == ["module.2.weight"] and f.details["reference_rank"] == 0
    assert "rank 1" in f.message and "rank 0" in f.message


def test_replicas_that_compute_differently_on_the_same_batch_are_reported(jobs):
    folder = jobs / "rank_dependent"
    merged = load(folder / "merged.lsc")
    found = [f for f in merged.findings if f.kind == "rank_desync"]
    assert len(found) == 1 and found[0].module == "module.1" and found[0].rank == 1, merged.findings
    assert found[0].severity == "warning" and "same batch" in found[0].message


def test_a_device_mismatch_on_one_rank_names_the_rank(jobs):
    folder = jobs / "device"
    merged = load(folder / "merged.lsc")
    f = next(f for f in merged.findings if f.kind == "device_mismatch")
    assert f.module == "2" and f.rank == 1
    assert merged.error.message.startswith("Rank 1: ")
    assert merged["2"].calls[0].per_rank[1] is None  # rank 1 never got through it


def test_a_rank_whose_capture_cannot_be_sent_makes_every_rank_raise_and_leaves_the_group_usable(jobs):
    folder = jobs / "unsendable"
    rank0, rank1 = [(folder / f"rank{r}.txt").read_text().splitlines() for r in range(2)]
    assert rank1[0] == "TypeError: cannot save a object in a layerscope file", rank1
    assert rank0[0] == ("RuntimeError: gather(): rank 1 could not send its capture (TypeError: cannot save a "
                        "object in a layerscope file)"), rank0
    assert rank0[1] == "2" and rank1[1] == "False"  # the next gather: the merged capture on rank 0 only


def test_gather_outside_a_job_and_bad_arguments():
    cap = layerscope.capture(make_model(), make_batch(0)[0])
    assert cap.rank is None and cap.world_size == 1 and not cap.merged
    assert layerscope.gather(cap) is cap  # one process is the whole job
    with pytest.raises(TypeError, match="Capture"):
        layerscope.gather("capture.lsc")
    with pytest.raises(ValueError, match="rank order"):
        distributed.merge([cap, dataclasses.replace(cap, rank=0)])
    merged = distributed.merge([cap, cap])
    with pytest.raises(ValueError, match="already merged"):
        distributed.merge([merged])


def test_the_inspector_and_the_report_show_per_rank_values_and_ranks_of_findings(jobs, tmp_path):
    from layerscope import plots
    from layerscope.widget import ModelInspector, text

    merged = load(jobs / "tensor_parallel" / "merged.lsc")
    inspector = ModelInspector(merged)
    inspector.tree._handle_custom_msg({"event": "shown"}, [])
    inspector.select("0")  # ColwiseParallel: each rank holds other columns
    call = merged["0"].calls[0]
    shown = inspector._stats.value
    assert "all ranks" in shown and "rank 0" in shown and "rank 1" in shown
    assert all(f"{s.mean:.6g}" in shown for s in (call.stats, *call.per_rank))
    assert inspector._hist.value[:4] == b"\x89PNG"
    assert call.histogram.rebinned  # the ranks binned over their own ranges: spread onto shared bins
    figure = plots.activation_histogram(call)
    assert any("merged across ranks" in t.get_text() for t in figure.axes[0].texts)
    same_on_both = merged["2"].calls[0]  # RowwiseParallel's output is replicated: one column is enough
    assert len(set(same_on_both.per_rank)) == 1 and "rank 0" not in text.stats(same_on_both)
    nan = next(f for f in load(jobs / "nan" / "merged.lsc").findings if f.kind == "nan")
    assert " · rank 1 · " in text.finding_label(nan) and "(rank 1)" in text.finding(nan)
    rows = dict(text.stats_rows(call))  # what the HTML report shows
    assert rows["mean by rank"] == " · ".join(f"{s.mean:.6g}" for s in call.per_rank)
    from layerscope.report.data import document

    doc, _ = document(load(jobs / "nan" / "merged.lsc"))
    assert any(" · rank 1 · " in f["label"] for f in doc["findings"])
    merged.save_html(tmp_path / "job.html")
    assert (tmp_path / "job.html").stat().st_size > 0


def test_statistics_of_all_calls_at_once_equal_merging_them_one_by_one():
    rng = np.random.default_rng(1)
    ranks = []
    for r in range(3):
        stats = []
        for i in range(60):
            values = rng.normal(1e3 * (i % 3), 1 + r, size=int(rng.integers(1, 50)))
            values[: i % 4] = np.nan if r == 1 else np.inf  # a few non-finite values
            if i % 7 == r:
                values[:] = np.nan  # no finite value on this rank
            stats.append(None if i % 11 == r else TensorStats.of(values))  # a rank that did not make the call
        ranks.append(stats)
    got = distributed.merge_tables([distributed.stats_table(stats) for stats in ranks])
    for i, row in enumerate(zip(*ranks)):
        present = [s for s in row if s is not None]
        want = present[0] if present else None
        for s in present[1:]:
            want = want.merge(s)
        assert (got[i] is None) == (want is None), i
        if want is not None:
            same(got[i], want, f"call {i}")


def test_histograms_of_all_calls_at_once_equal_merging_them_one_by_one():
    rng = np.random.default_rng(0)
    calls, expected = [], []
    for i in range(40):
        hists = []
        for r in range(3):
            values = rng.normal(r * 0.3 * (i % 4), 1 + r, size=500)
            edges = np.linspace(values.min(), values.max(), 17) if i % 5 else np.linspace(-4, 4, 17)  # some shared
            hists.append(layerscope.Histogram(counts=np.histogram(values, edges)[0], edges=edges, sampled=500,
                                              numel=500, under=int((values < edges[0]).sum()),
                                              over=int((values > edges[-1]).sum())))
        if i == 7:  # a rank without this histogram: the calls are not all alike
            hists[2] = None
        calls.append(hists)
        expected.append(distributed._histogram([h for h in hists if h is not None]))
    for got, want in zip(distributed._histograms(calls), expected):
        assert np.array_equal(got.edges, want.edges) and got.rebinned == want.rebinned
        assert np.array_equal(got.counts, want.counts) and (got.under, got.over) == (want.under, want.over)
        assert got.counts.sum() + got.under + got.over == got.sampled


def _doubled(batch):
    return torch.utils._pytree.tree_map(lambda t: t * 2 if isinstance(t, torch.Tensor) and t.is_floating_point()
                                        else t, batch)


def _moved(cap):
    """The capture as if its first call's output had been made on another device, in another dtype, from inputs
    that were not all finite."""
    name, call = cap.calls[0]
    report = cap[name]
    calls = (copy_with(call, output_devices=("meta",), output_dtypes=("torch.float16",), input_finite=False),
             *report.calls[1:])
    modules = {**cap.modules, name: copy_with(report, calls=calls, devices=("meta",), traits=frozenset())}
    return dataclasses.replace(cap, modules=MappingProxyType(modules))


@pytest.mark.parametrize("index", range(len(zoo())))
def test_lined_up_captures_merged_a_field_at_a_time_give_the_records_of_the_general_merge(index):
    model, batch = zoo()[index]
    ranks = [layerscope.capture(model, batch), layerscope.capture(model, _doubled(batch)),
             _moved(layerscope.capture(model, batch, bins=np.linspace(-3, 3, 33)))]
    ranks = [dataclasses.replace(c, rank=r) for r, c in enumerate(ranks)]
    columns = [aligned.Columns.of(c) for c in ranks]
    assert aligned.lined_up(columns)
    same(aligned.modules(columns), distributed._modules(ranks))
    same(aligned.modules(columns[:2]), distributed._modules(ranks[:2]))
    # the other ranks read from the bytes they send, without their records, as gather does
    sent = [wire.encode(c) for c in ranks[1:]]
    heads, read = zip(*[wire.columns(data) for data in sent])
    got = distributed._merge([ranks[0], *heads], dict(enumerate([columns[0], *read])))
    want = distributed.merge([ranks[0], *map(wire.decode, sent)])
    same(got, want)
    # and from the lean bytes a rank sends once the digests say the ranks line up
    assert len({wire.digest(c) for c in ranks}) == 1
    lean = [wire.encode(c, lean=True) for c in ranks[1:]]
    assert all(len(a) < len(b) for a, b in zip(lean, sent))
    heads, read = zip(*[wire.columns(data, columns[0]) for data in lean])
    merged = distributed._merge([ranks[0], *heads], dict(enumerate([columns[0], *read])))
    same(merged, want)
    # a parameter record (or a call's statistics) read from lean bytes is rank 0's own when it holds the very same
    # values
    params = [p.per_rank for m in merged.modules.values() for p in m.params.values()]
    assert all((p[r] is p[0]) == (vars(p[r]) == vars(p[0])) for p in params for r in (1, 2))
    stats = [c.per_rank for m in merged.modules.values() for c in m.calls if c.per_rank[0] is not None]
    assert all((s[r] is s[0]) == (vars(s[r]) == vars(s[0])) for s in stats for r in (1, 2))
    # with the findings looking up the modules' structure as gather does, from the first rank's capture
    like = findings._Look(ranks[0]).structure()
    same(distributed._merge([ranks[0], *heads], dict(enumerate([columns[0], *read])), like), want)


@pytest.mark.parametrize("index", range(len(zoo())))
def test_what_a_rank_sends_keeps_every_record_of_the_zoo(index):
    model, batch = zoo()[index]
    cap = layerscope.capture(model, batch)
    same(cap, wire.decode(wire.encode(cap)))


def test_a_replicas_parameter_records_read_from_lean_bytes_are_those_of_rank_0():
    model, batch = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(3, 4)
    ranks = [dataclasses.replace(layerscope.capture(model, b, target=torch.tensor([0, 1, 1])), rank=r)
             for r, b in enumerate([batch, batch, batch * 2])]
    own = aligned.Columns.of(ranks[0])
    read = [wire.columns(wire.encode(c, lean=True), own) for c in ranks[1:]]
    merged = distributed._merge([ranks[0], *[head for head, _ in read]], {0: own, 1: read[0][1], 2: read[1][1]})
    params = [p.per_rank for m in merged.modules.values() for p in m.params.values()]
    assert len(params) == 4 and all(p[1] is p[0] and p[2] is not p[0] for p in params)  # rank 2: other gradients
    assert all(p[2].grad_norm != p[0].grad_norm and p[2].norm == p[0].norm for p in params)
    stats = [c.per_rank for m in merged.modules.values() for c in m.calls]  # and so are the calls' statistics
    assert len(stats) == 4 and all(s[1] is s[0] and s[2] is not s[0] and s[2].mean != s[0].mean for s in stats)


def test_lean_bytes_are_read_only_against_a_capture_that_lines_up():
    model, batch = zoo()[0]
    cap = layerscope.capture(model, batch)
    data = wire.encode(cap, lean=True)
    with pytest.raises(ValueError, match="columns"):
        wire.decode(data)
    with pytest.raises(ValueError, match="lines up"):
        wire.columns(data)
    renamed = {f"{name}_": report for name, report in cap.modules.items()}
    assert wire.digest(cap) != wire.digest(dataclasses.replace(cap, modules=MappingProxyType(renamed)))
    fewer = dict(list(cap.modules.items())[:-1])
    assert wire.digest(cap) != wire.digest(dataclasses.replace(cap, modules=MappingProxyType(fewer)))


def test_a_merge_of_one_capture_keeps_its_dead_units_and_findings():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    with torch.no_grad():
        model[0].weight.zero_()
        model[0].bias.copy_(torch.tensor([-1.0, 1.0, 1.0, 1.0]))  # channel 0 dead on every item, the others alive
    cap = layerscope.capture(model, torch.randn(3, 4))
    assert cap["1"].calls[0].dead_units == 1
    merged = distributed.merge([cap])
    assert not merged.merged and merged["1"].calls[0].dead_units == 1
    assert [(f.kind, f.module) for f in merged.findings] == [(f.kind, f.module) for f in cap.findings]

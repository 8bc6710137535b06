"""Records that outlive the pass: save and load keep every record, loading runs no code, findings come from
records alone (also in a fresh process that cannot import the model's class), fixed histogram edges make
captures mergeable, and the calls make a table."""

from __future__ import annotations

import dataclasses
import io
import json
import math
import pickle
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Mapping

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

import layerscope
from layerscope import FormatError, capture, load
from layerscope.core.table import COLUMNS
from models import Containers, DictModel, NamedTupleOut, RaisesInBackward, RaisesInside, ReusedReLU, TiedLM


def same(a, b, where="capture"):
    """Deep equality of records: dataclass fields, mappings, sequences, arrays, tensors; NaN equals NaN."""
    if dataclasses.is_dataclass(a) and not isinstance(a, type):
        assert type(a) is type(b), where
        for f in dataclasses.fields(a):
            if f.name in ("output", "model", "batch", "exception", "summary_text"):
                continue  # live objects, None after loading; the summary is compared through summary()
            same(getattr(a, f.name), getattr(b, f.name), f"{where}.{f.name}")
    elif isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, np.ndarray):
        nan = a.dtype.kind == "f"
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b, equal_nan=nan), where
    elif isinstance(a, Mapping):
        assert isinstance(b, Mapping) and list(a) == list(b), where
        for k in a:
            same(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, (tuple, list)):
        assert isinstance(b, (tuple, list)) and len(a) == len(b), where
        assert type(a) is type(b) or where.endswith("details") or "details[" in where, where
        for i, (x, y) in enumerate(zip(a, b)):
            same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b and type(a) is type(b), f"{where}: {a!r} != {b!r}"


def round_trip(cap, tmp_path):
    path = tmp_path / "capture.lsc"
    cap.save(path)
    return load(path)


class NanLog(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(4, 8), nn.Linear(8, 2)

    def forward(self, x):
        return self.fc2(torch.log(self.fc1(x)))


def zoo():
    torch.manual_seed(0)
    return [
        (Containers(), torch.randn(3, 4)),
        (DictModel(), {"image": torch.randn(2, 3, 8, 8), "scale": torch.tensor(2.0)}),
        (ReusedReLU(), torch.randn(4, 6)),
        (TiedLM(), torch.randint(0, 50, (2, 7))),
        (NamedTupleOut(), torch.randn(2, 5)),
        (RaisesInside(), torch.randn(2, 4)),
        (RaisesInBackward(), torch.randn(2, 4)),
        (NanLog(), torch.randn(3, 4)),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.BatchNorm1d(4)).train(), torch.randn(5, 4)),
    ]


@pytest.mark.parametrize("costs", [False, True])
@pytest.mark.parametrize("index", range(len(zoo())))
def test_round_trip_keeps_every_record_of_the_zoo(index, costs, tmp_path):
    model, batch = zoo()[index]
    cap = capture(model, batch, costs=costs)
    assert (cap.flops is None) is (not costs) and (cap[""].activation_bytes is None) is (not costs)
    loaded = round_trip(cap, tmp_path)
    same(cap, loaded)
    assert loaded.output is None and loaded.model is None and loaded.batch is None
    if cap.error is not None:
        assert loaded.error.exception is None and loaded.error.exception_type == type(cap.error.exception).__name__
        assert loaded.error.traceback and loaded.error.traceback == cap.error.traceback
        assert str(loaded.error) == cap.error.message
    assert _json(layerscope.findings(loaded)) == _json(loaded.findings) == _json(cap.findings)


@pytest.mark.parametrize("factory", [torchvision.models.squeezenet1_1, torchvision.models.resnet18])
def test_round_trip_on_torchvision_models_keeps_stats_histograms_and_feature_maps(factory, tmp_path):
    model = factory(weights=None).eval()
    cap = capture(model, torch.randn(2, 3, 64, 64), target=[1, 2])
    cap.summary()  # computed before saving: the table travels with the file
    loaded = round_trip(cap, tmp_path)
    same(cap, loaded)
    assert loaded.summary() == cap.summary() and "Total params" in loaded.summary()
    conv = next(c for _, c in loaded.calls if c.feature_maps is not None)
    assert conv.feature_maps.dtype == torch.bfloat16 and conv.histogram.counts.dtype == np.int64
    assert loaded["layer1.0.conv1" if factory is torchvision.models.resnet18 else "features.0"].param_grad_norms[
        "weight"] > 0


def _json(findings) -> str:
    return json.dumps([dataclasses.asdict(f) for f in findings], sort_keys=True)


def test_findings_of_a_loaded_capture_in_a_fresh_process_that_cannot_import_the_model(tmp_path):
    # the model's class lives in this test module only: the fresh process never imports it
    class Broken(nn.Module):
        def __init__(self):
            super().__init__()
            self.pre = nn.Sequential(nn.Linear(4, 8), nn.ReLU())
            self.dead = nn.Sequential(nn.Linear(8, 8), nn.ReLU())
            self.frozen = nn.Linear(8, 8).requires_grad_(False)
            self.unused = nn.Linear(3, 3)
            self.drop = nn.Dropout(0.1)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.drop(self.frozen(self.dead(self.pre(x).detach()))))

    model = Broken().train()
    with torch.no_grad():
        model.dead[0].bias.fill_(-100.0)
    cap = capture(model, torch.randn(16, 4) * 50, target=[0, 1] * 8)
    kinds = {f.kind for f in cap.findings}
    assert {"dead_activation", "frozen", "unused_module", "train_mode", "input_range", "no_grad"} <= kinds, kinds
    path = tmp_path / "broken.lsc"
    cap.save(path)
    script = textwrap.dedent(f"""
        import dataclasses, json, sys
        import layerscope
        cap = layerscope.load({str(path)!r})
        assert cap.model is None and "test_records" not in sys.modules
        again = layerscope.findings(cap)
        print(json.dumps([[dataclasses.asdict(f) for f in again], [dataclasses.asdict(f) for f in cap.findings]],
                         sort_keys=True))
    """)
    run = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert run.returncode == 0, run.stderr
    recomputed, stored = json.loads(run.stdout)
    expected = json.loads(_json(cap.findings))
    assert recomputed == expected and stored == expected


def test_nan_rule_reads_input_finiteness_per_call():
    cap = capture(NanLog(), torch.randn(3, 4))
    assert cap["fc1"].calls[0].input_finite is True
    assert cap["fc2"].calls[0].input_finite is False  # torch.log ran between the two layers
    nan = next(f for f in cap.findings if f.kind == "nan")
    assert nan.module == ""  # the root's own forward code made the NaN


def _evil_zip(path, members: dict[str, bytes]) -> None:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(name, data)


class _Payload:
    """Unpickling this writes a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_file_with_a_pickle_inside_is_refused_and_runs_nothing(tmp_path):
    good = tmp_path / "good.lsc"
    capture(ReusedReLU(), torch.randn(2, 6)).save(good)
    with zipfile.ZipFile(good) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    marker = tmp_path / "code-ran"
    payload = pickle.dumps(_Payload(marker))
    cases = {
        "extra.pkl": {**members, "extra.pkl": payload},
        "json-is-a-pickle": {**members, "layerscope.json": payload},
        "npy-is-a-pickle": {**members, "counts.npy": payload},
        "unknown-member": {**members, "notes.txt": b"hello"},
    }
    buffer = io.BytesIO()
    np.save(buffer, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    cases["object-array"] = {**members, "counts.npy": buffer.getvalue()}
    for label, content in cases.items():
        path = tmp_path / f"{label}.lsc"
        _evil_zip(path, content)
        with pytest.raises(FormatError) as caught:
            load(path)
        message = str(caught.value)
        expected = "pickle" if label != "unknown-member" and label != "object-array" else \
            "notes.txt" if label == "unknown-member" else "plain numeric array"
        assert expected in message, (label, message)
    assert not marker.exists()
    (tmp_path / "not-a-zip.lsc").write_bytes(payload)
    with pytest.raises(FormatError, match="not a zip"):
        load(tmp_path / "not-a-zip.lsc")


def test_a_newer_format_version_says_to_upgrade(tmp_path):
    path = tmp_path / "capture.lsc"
    capture(ReusedReLU(), torch.randn(2, 6)).save(path)
    with zipfile.ZipFile(path) as zf:
        members = {name: zf.read(name) for name in zf.namelist()}
    doc = json.loads(members["layerscope.json"])
    doc["version"] = 99
    _evil_zip(path, {**members, "layerscope.json": json.dumps(doc).encode()})
    with pytest.raises(FormatError, match="upgrade layerscope"):
        load(path)


def test_fixed_edges_make_the_halves_of_a_batch_merge_into_the_whole():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Linear(32, 32), nn.Tanh()).eval()
    batch = torch.randn(40, 6)
    edges = np.linspace(-3, 3, 25)
    whole = capture(model, batch, bins=edges, backward=False)
    first = capture(model, batch[:13], bins=edges, backward=False)
    second = capture(model, batch[13:], bins=edges, backward=False)
    for name in ("0", "1", "2", "3"):
        a, b, w = first[name].calls[0], second[name].calls[0], whole[name].calls[0]
        merged = a.stats.merge(b.stats)
        reference = w.stats
        assert merged.count == reference.count and merged.nan_count == 0
        assert merged.mean == pytest.approx(reference.mean, rel=1e-5, abs=1e-6)
        assert merged.std == pytest.approx(reference.std, rel=1e-5, abs=1e-6)
        assert (merged.min, merged.max) == (reference.min, reference.max)
        h = a.histogram.merge(b.histogram)
        assert np.array_equal(h.edges, edges) and np.array_equal(h.counts, w.histogram.counts)
        assert (h.under, h.over) == (w.histogram.under, w.histogram.over)
        out = model[: int(name) + 1](batch).detach().double().numpy().ravel()
        assert np.array_equal(h.counts, np.histogram(out[(out >= -3) & (out <= 3)], bins=edges)[0])
        assert h.under == (out < -3).sum() and h.over == (out > 3).sum()


def test_edges_per_module_and_bad_edges():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    cap = capture(model, torch.randn(3, 4), bins={"1": [0.0, 0.5, 1.0, 4.0]})
    assert np.array_equal(cap["1"].calls[0].histogram.edges, [0.0, 0.5, 1.0, 4.0])
    assert len(cap["0"].calls[0].histogram.counts) == 64  # not named: 64 equal bins over its own range
    for bad in ([1.0], [0.0, 0.0, 1.0], [[0.0, 1.0]], [0.0, float("nan")]):
        with pytest.raises(ValueError, match="edges"):
            capture(model, torch.randn(3, 4), bins=bad)
    with pytest.raises(ValueError, match="positive"):
        capture(model, torch.randn(3, 4), bins=0)


def test_to_pandas_has_one_row_per_call():
    pd = pytest.importorskip("pandas")
    cap = capture(ReusedReLU(), torch.randn(4, 6))
    table = cap.to_pandas()
    assert isinstance(table, pd.DataFrame) and list(table.columns) == list(COLUMNS)
    assert len(table) == len(cap.calls) == 6
    assert list(table["module"]) == [name for name, _ in cap.calls]
    act = table[table["module"] == "act"]
    assert list(act["call"]) == [0, 1]
    second = cap["act"].calls[1]
    assert act.iloc[1]["mean"] == second.stats.mean and act.iloc[1]["grad_output_norm"] == second.grad_output_norm
    assert table.iloc[0]["own_params"] == 42 and table.iloc[-1]["params"] == cap.total_params


def test_to_pandas_without_pandas_says_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)
    with pytest.raises(ImportError, match="pip install pandas"):
        capture(ReusedReLU(), torch.randn(4, 6)).to_pandas()


def test_a_capture_is_never_changed_after_it_is_built():
    cap = capture(NanLog(), torch.randn(3, 4))
    assert isinstance(cap.findings, tuple) and cap.findings
    with pytest.raises(dataclasses.FrozenInstanceError):
        cap.findings = ()
    assert cap["fc2"].parent == "" and cap[""].parent is None


def test_a_tensor_passed_on_to_a_module_with_other_edges_is_binned_on_those_edges():
    model = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5)).eval()  # eval Dropout returns the very same tensor
    cap = capture(model, torch.randn(8, 4), bins={"0": [-5.0, 0.0, 5.0], "1": [-5.0, -1.0, 1.0, 5.0]})
    assert np.array_equal(cap["0"].calls[0].histogram.edges, [-5.0, 0.0, 5.0])
    assert np.array_equal(cap["1"].calls[0].histogram.edges, [-5.0, -1.0, 1.0, 5.0])
    assert cap["0"].calls[0].stats == cap["1"].calls[0].stats

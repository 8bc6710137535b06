"""ModelInspector(run) without a browser: it follows a run as it trains (throttled), the step cursor shows that
step's panels, findings over time reach the tree and select their step, and the pictures hold the run's numbers.
(The page itself is tested in test_widget_browser.py.)"""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from matplotlib.image import imread
from sklearn.datasets import load_digits

from layerscope import load, plots, watch
from layerscope.widget import ModelInspector, steps
from layerscope.widget.tree import FIELDS
from test_watch import batches, cnn


@pytest.fixture(scope="module")
def digits():
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32)[:, None] / 16.0
    return (x - x.mean()) / x.std(), torch.tensor(d.target)


def on_page(inspector: ModelInspector) -> ModelInspector:
    inspector.tree._handle_custom_msg({"event": "shown"}, [])
    return inspector


def is_png(data: bytes) -> bool:
    return imread(io.BytesIO(data), format="png").shape[0] > 10


def train(model, opt, run, data):
    for x, y in data:
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log(loss=loss)


@pytest.fixture(scope="module")
def broken_run(digits):
    x, y = digits
    model = cnn().train()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)  # 100 times too high: the ReLUs die
    with watch(model, opt, every=2) as run:
        train(model, opt, run, batches(x, y, 30))
    return run


def test_an_inspector_shown_before_the_loop_follows_the_run(digits, monkeypatch):
    x, y = digits
    model = cnn().train()
    opt = torch.optim.Adam(model.parameters(), lr=1.0)
    run = watch(model, opt, every=2)
    inspector = on_page(ModelInspector(run))
    assert inspector.step is None and inspector._titles[0] == "Over time"
    assert [r[0] for r in inspector.tree.rows] == [n for n, _ in model.named_modules()]
    assert "No sampled step yet" in inspector._over_note.value and inspector._steps.slider.disabled
    refreshed = []
    original = inspector._refresh_run
    monkeypatch.setattr(inspector, "_refresh_run", lambda done: (refreshed.append(done), original(done)))
    monkeypatch.setattr(steps, "LIVE_INTERVAL", 0.0)
    monkeypatch.setattr(steps, "LIVE_SHARE", 1e12)
    inspector._throttle = steps.Throttle()
    with run:
        train(model, opt, run, batches(x, y, 6))
        assert refreshed == [False] * 6  # one update per step when updates are due at once
        assert inspector.step == 4 and [v for _, v in inspector._steps.slider.options] == [0, 2, 4]
    assert refreshed[-1] is True and inspector.step == 4
    assert is_png(inspector._over_image.value) and is_png(inspector._steps.image.value)
    assert "6 steps (done)" in inspector._steps.note.value


def test_live_updates_wait_for_the_interval(digits, monkeypatch):
    x, y = digits
    model = cnn()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    run = watch(model, opt, every=1)
    inspector = on_page(ModelInspector(run))
    refreshed = []
    original = inspector._refresh_run
    monkeypatch.setattr(inspector, "_refresh_run", lambda done: (refreshed.append(done), original(done)))
    monkeypatch.setattr(steps, "LIVE_INTERVAL", 3600.0)
    inspector._throttle = steps.Throttle()
    with run:
        train(model, opt, run, batches(x, y, 5))
    assert refreshed == [False, True]  # the first step, then only the end of the block
    assert inspector.step == 4


def test_findings_over_time_reach_the_tree_and_select_their_step(broken_run):
    run = broken_run
    inspector = on_page(ModelInspector(run))
    rows = {r[0]: dict(zip(FIELDS, r)) for r in inspector.tree.rows}
    findings = run.findings
    assert any(f.kind == "dead_units_growing" for f in findings)
    assert rows[""]["warnings"] == sum(f.severity == "warning" for f in findings)
    assert rows[""]["errors"] == sum(f.severity == "error" for f in findings)
    grown = next(i for i, f in enumerate(findings) if f.kind == "dead_units_growing")
    inspector._tabs.selected_index = inspector.tab_index("Findings")
    inspector._findings.value = grown
    finding = findings[grown]
    assert inspector.selected == finding.module
    assert inspector.step == min(run.steps, key=lambda s: abs(s - finding.step))
    assert f"step {finding.step}" in inspector._findings.options[grown][0]
    assert "at step" in inspector._finding_detail.value


def test_the_step_cursor_shows_that_steps_one_pass_panels(broken_run):
    run = broken_run
    inspector = on_page(ModelInspector(run))
    inspector.select("conv2")
    inspector._tabs.selected_index = inspector.tab_index("Activations")
    pictures = {}
    for step in (0, 10):
        inspector.show_step(step)
        assert inspector.step == step and inspector.capture is run.at(step)
        mean = run.series("conv2", "mean")[1][list(run.steps).index(step)]
        assert f"{mean:.6g}" in inspector._stats.value
        pictures[step] = inspector._hist.value
    assert pictures[0] != pictures[10] and not inspector._steps.follow
    inspector.show_step(int(run.steps[-1]))
    assert inspector._steps.follow
    inspector._tabs.selected_index = inspector.tab_index("Feature maps")
    assert "keeps no feature maps" in inspector._fm_note.value
    inspector._tabs.selected_index = inspector.tab_index("Explain")
    assert "watched run" in inspector._ex_note.value
    inspector._tabs.selected_index = inspector.tab_index("Over time")
    assert is_png(inspector._over_image.value) and "red line is step" in inspector._over_note.value


def test_a_loaded_run_opens_in_the_inspector(broken_run, tmp_path):
    broken_run.save(tmp_path / "run.lsr")
    loaded = load(tmp_path / "run.lsr")
    inspector = on_page(ModelInspector(loaded))
    assert inspector.step == int(broken_run.steps[-1])
    assert [r for r in inspector.tree.rows] == [r for r in on_page(ModelInspector(broken_run)).tree.rows]
    assert "(done)" in inspector._steps.note.value and is_png(inspector._over_image.value)
    with pytest.raises(ValueError, match="watched run"):
        on_page(ModelInspector(cnn(), torch.randn(2, 1, 8, 8))).show_step(0)


def test_the_heatmap_holds_the_share_of_values_in_each_bin_per_step(broken_run):
    run = broken_run
    fig = plots.activation_heatmap(run, "conv2", step=10)
    mesh = fig.axes[0].collections[0]
    steps_, edges, counts, under, over = run.histograms("conv2")
    table = np.column_stack([under, counts, over]).astype(float)
    expected = (table / table.sum(axis=1, keepdims=True)).T[::-1]  # over on top, under at the bottom
    shown = np.ma.filled(mesh.get_array(), 0.0).reshape(expected.shape)
    assert np.allclose(shown, expected)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()][0].startswith(">")
    cursor = [line for line in fig.axes[0].get_lines() if line.get_xdata()[0] == list(steps_).index(10) + 0.5]
    assert cursor
    figure = plots.module_over_time(run, "fc", step=10)
    updates = next(ax for ax in figure.axes if ax.get_title(loc="left").startswith("Update ratio"))
    x, y = updates.get_lines()[0].get_data()
    ratios = run.series("fc", "update_ratio")[1]
    assert np.allclose(y, ratios[np.isfinite(ratios) & (ratios > 0)])
    scalars = plots.scalars_over_time(run, step=10)
    loss = run.scalars("loss")
    drawn = scalars.axes[0].get_lines()[0].get_data()
    assert np.array_equal(drawn[0], loss[0][np.isfinite(loss[1])])

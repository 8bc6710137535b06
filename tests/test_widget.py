"""The ModelInspector controller without a browser: the data the tree gets, selection, panels, caching,
escaping, refresh and the model left as it was. (The page itself is tested in test_widget_browser.py.)"""

from __future__ import annotations

import html
import io
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
import torchvision
import traitlets
from matplotlib.image import imread
from torch import nn
from torchvision.models import squeezenet1_1

import layerscope
from layerscope import plots
from layerscope.core import cam as core_cam
from layerscope.core.records import human, human_bytes
from layerscope.widget import ModelInspector, text
from layerscope.widget.inspector import (
    ACTIVATIONS,
    ALL_HEADS,
    COST,
    EXPLAIN,
    FEATURE_MAPS,
    FINDINGS,
    GRADIENTS,
    SUMMARY,
)
from layerscope.widget.progress import Progress
from layerscope.widget.tree import COLUMNS, FIELDS, TreeWidget

EVIL = "<img src=x onerror=alert(1)>"
WIDGET_DIR = Path(layerscope.__file__).parent / "widget"


@pytest.fixture(scope="module")
def squeezenet():
    torch.manual_seed(0)
    return squeezenet1_1(weights=None).eval(), torch.randn(2, 3, 64, 64)


def on_page(inspector: ModelInspector) -> ModelInspector:
    """What the tree's view sends once it is drawn in a page: from then on the panels are drawn."""
    inspector.tree._handle_custom_msg({"event": "shown"}, [])
    return inspector


def png_size(data: bytes) -> tuple[int, int]:
    image = imread(io.BytesIO(data), format="png")
    return image.shape[1], image.shape[0]


def broken_model() -> nn.Module:
    return nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        head=nn.Sequential(nn.Flatten(), nn.Linear(100, 10)),
    ))


class Evil(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.blocks = nn.ModuleDict({EVIL: nn.Linear(4, 3 if fail else 4), "next": nn.Linear(4, 2)})

    def forward(self, x):
        return self.blocks["next"](self.blocks[EVIL](x))


def test_counts_in_the_header_and_the_tree():
    assert [text.count(n) for n in (0, 9280, 1235496)] == ["0", "9,280", "1,235,496"]
    assert [human(n) for n in (0, 950, 999, 9280, 11_400, 999_499, 999_500, 1_235_496, 3 * 10**9, 2e5, 12.5)] == \
        ["0", "950", "999", "9.28K", "11.4K", "999K", "1.00M", "1.24M", "3.00B", "200K", "12.5"]


def test_tree_rows_hold_every_module_in_order(squeezenet):
    model, batch = squeezenet
    inspector = ModelInspector(model, batch)
    rows = [dict(zip(FIELDS, r)) for r in inspector.tree.rows]
    names = [n for n, _ in model.named_modules()]
    assert [r["name"] for r in rows] == names
    for r in rows:
        module = model.get_submodule(r["name"])
        assert r["type"] == type(module).__name__
        assert r["params"] == human(sum(p.numel() for p in module.parameters()))
        assert r["label"] == (r["name"].rpartition(".")[2] if r["name"] else text.ROOT_LABEL)
        parent = r["name"].rpartition(".")[0] if r["name"] else None
        assert r["parent"] == (-1 if parent is None else names.index(parent))
        assert r["called"] is True  # SqueezeNet calls every module
    assert inspector.tree.rows[names.index("features.3.expand3x3")][3] == "9.28K"  # 16*64*9 + 64 = 9280
    assert inspector.tree.expanded == [""]  # the model is open: its top-level blocks show at once
    assert inspector.tree.selected == inspector.selected == ""


def test_tree_column_switch_and_sort_with_the_costs_in_every_row(squeezenet):
    model, batch = squeezenet
    inspector = ModelInspector(model, batch)
    cap = inspector.capture
    assert inspector.tree.column == "params" and inspector.tree.sorted is False and COLUMNS == (
        "params", "flops", "memory")
    for r in (dict(zip(FIELDS, row)) for row in inspector.tree.rows):
        report = cap[r["name"]]
        assert (r["params_value"], r["flops_value"], r["memory_value"]) == (
            report.num_params, report.flops, report.activation_bytes)
        assert (r["flops"], r["memory"]) == (human(report.flops), human_bytes(report.activation_bytes))
    root = dict(zip(FIELDS, inspector.tree.rows[0]))
    assert root["flops_value"] == cap.flops > 0 and root["memory_value"] == cap.activation_bytes > 0
    inspector.tree.column = "flops"  # what the toolbar's menu sets
    inspector.tree.sorted = True
    assert (inspector.tree.column, inspector.tree.sorted) == ("flops", True)
    assert "column='flops'" in repr(inspector.tree)
    with pytest.raises(traitlets.TraitError):
        inspector.tree.column = "<script>"
    inspector.select("features.3.expand3x3")  # the selection and the rows stay as they were
    assert inspector.selected == "features.3.expand3x3" and inspector.tree.rows == ModelInspector(
        cap).tree.rows
    plain = ModelInspector(model, batch, costs=False)  # nothing to show: the front end disables the choice
    assert all(r[FIELDS.index("flops_value")] is None and r[FIELDS.index("memory")] is None
               for r in plain.tree.rows)


def test_header_shows_own_and_total_flops_bytes_and_share(squeezenet):
    model, batch = squeezenet
    inspector = ModelInspector(model, batch)
    cap = inspector.capture
    inspector.select("features.3")
    r = cap["features.3"]
    header = inspector._header.value
    assert f"own {human(r.own_flops)} · total {human(r.flops)} ({r.flops / cap.flops:.0%} of the model)" in header
    assert f"backward {human(r.backward_flops)}" in header
    assert f"activations {human_bytes(r.activation_bytes)} ({r.activation_bytes / cap.activation_bytes:.0%} of " \
           f"the model)" in header
    assert f"parameters {human_bytes(r.param_bytes)}" in header and f"gradients {human_bytes(r.grad_bytes)}" in header
    assert r.param_bytes == 4 * r.num_params
    plain = ModelInspector(model, batch, costs=False)
    plain.select("features.3")
    assert "FLOPs" not in plain._header.value and f"parameters {human_bytes(r.param_bytes)}" in plain._header.value


def test_cost_tab_draws_where_the_cost_goes_and_lists_the_largest_modules(squeezenet, tmp_path):
    model, batch = squeezenet
    inspector = on_page(ModelInspector(model, batch))
    inspector._tabs.selected_index = COST
    assert inspector._cost_image.value[:4] == b"\x89PNG" and "of (model) go" in inspector._cost_note.value
    largest = inspector._cost_table.value
    cap = inspector.capture
    leaves = sorted((r for r in cap.modules.values() if not r.children), key=lambda r: -r.flops)
    assert "Most FLOPs" in largest and "Most activation memory" in largest
    assert largest.index(f"<td>{leaves[0].name}</td>") < largest.index(f"<td>{leaves[1].name}</td>")
    first = inspector._cost_image.value
    inspector.select("features.3")
    assert inspector._cost_image.value != first and "features.3" in inspector._cost_note.value
    path = tmp_path / "plain.lsc"
    layerscope.capture(model, batch).save(path)  # no costs counted: the tab says how to get them
    plain = on_page(ModelInspector(layerscope.load(path)))
    plain._tabs.selected_index = COST
    assert "costs=True" in plain._cost_note.value and plain._cost_image.layout.display == "none"


def test_a_click_handled_on_another_thread_is_not_taken_for_the_inspectors_own_change():
    # ipykernel 7 can run one widget's message while another's handler is drawing: a tab click must still draw
    inspector = on_page(ModelInspector(nn.Sequential(nn.Linear(4, 4), nn.ReLU()), torch.randn(2, 4)))
    with inspector._quietly():  # this thread sets the inspector's own controls
        click = threading.Thread(target=setattr, args=(inspector._tabs, "selected_index", COST))
        click.start()
        click.join()
    assert inspector._drawn.get(COST) and inspector._cost_image.value[:4] == b"\x89PNG"


def test_badges_count_the_findings_on_a_module_and_below():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 2))
    with torch.no_grad():
        model[0].bias.fill_(-10.0)  # the ReLU after it is dead: findings warn about both
    inspector = ModelInspector(nn.Sequential(OrderedDict(block=model)), torch.randn(4, 8))
    findings = inspector.capture.findings
    assert {f.severity for f in findings} >= {"warning"}
    for row in inspector.tree.rows:
        r = dict(zip(FIELDS, row))
        below = [f for f in findings if not r["name"] or f.module == r["name"] or f.module.startswith(r["name"] + ".")]
        assert r["errors"] == sum(f.severity == "error" for f in below)
        assert r["warnings"] == sum(f.severity == "warning" for f in below)
    assert dict(zip(FIELDS, inspector.tree.rows[0]))["warnings"] == sum(f.severity == "warning" for f in findings)


def test_select_updates_the_header_and_the_tree(squeezenet):
    model, batch = squeezenet
    inspector = ModelInspector(model, batch)
    inspector.select("features.3.expand3x3")
    assert inspector.tree.selected == "features.3.expand3x3"
    call = inspector.capture["features.3.expand3x3"].calls[0]
    header = inspector._header.value
    assert "total 9,280" in header and "own 9,280" in header and "trainable 9,280" in header
    assert f"{call.input_shapes} → {call.output_shapes}" in header
    assert call.output_shapes == (2, 64, 15, 15)
    assert "cpu" in header and "float32" in header
    inspector.tree.selected = "classifier.2"  # a click in the page
    assert inspector.selected == "classifier.2"
    assert "classifier.2" in inspector._header.value and "ReLU" in inspector._header.value
    with pytest.raises(KeyError, match="no module named 'nope'"):
        inspector.select("nope")
    assert inspector.selected == "classifier.2"


def test_panels_are_drawn_on_demand_and_cached(squeezenet, monkeypatch):
    model, batch = squeezenet
    drawn = []
    for name in ("activation_histogram", "feature_maps", "gradient_flow"):
        original = getattr(plots, name)
        monkeypatch.setattr(plots, name, lambda *a, _f=original, _n=name, **k: (drawn.append(_n), _f(*a, **k))[1])
    inspector = ModelInspector(model, batch)
    assert drawn == []  # nothing is drawn before the inspector is on a page
    on_page(inspector)
    assert drawn == ["activation_histogram"]  # only the visible tab
    inspector.select("features.3.expand3x3")
    first = inspector._hist.value
    assert first[:8] == b"\x89PNG\r\n\x1a\n" and png_size(first) == (640, 256)  # 8 x 3.2 inches at 80 dpi
    inspector.select("features.4")
    inspector.select("features.3.expand3x3")
    assert drawn == ["activation_histogram"] * 3 and inspector._hist.value == first
    stats = inspector._stats.value
    s = inspector.capture["features.3.expand3x3"].calls[0].stats
    assert f"{s.mean:.6g}" in stats and f"{s.std:.6g}" in stats and f"{s.numel:,}" in stats
    inspector._tabs.selected_index = GRADIENTS
    inspector._tabs.selected_index = ACTIVATIONS
    inspector._tabs.selected_index = GRADIENTS
    assert drawn.count("gradient_flow") == 1
    grads = inspector.capture["features.3.expand3x3"].param_grad_norms
    assert f"{grads['weight']:.4g}" in inspector._grad_text.value
    assert f"{grads['bias']:.4g}" in inspector._grad_text.value
    inspector._tabs.selected_index = FEATURE_MAPS
    assert drawn.count("feature_maps") == 1 and inspector._fm_image.value[:4] == b"\x89PNG"
    assert "channels 0–15 of 64" in inspector._fm_note.value


def test_feature_map_pages_are_the_module_output(squeezenet):
    model, batch = squeezenet
    inspector = on_page(ModelInspector(model, batch))
    inspector.select("features.3.expand3x3")
    inspector._tabs.selected_index = FEATURE_MAPS
    page0 = inspector._fm_image.value
    inspector._page(1)
    inspector._fm_item.value = 1
    assert "channels 16–31 of 64" in inspector._fm_note.value and inspector._fm_image.value != page0
    seen = []
    module = model.features[3].expand3x3
    handle = module.register_forward_hook(lambda m, i, o: seen.append(o.clone()))  # before the in-place ReLU
    with torch.no_grad():
        model(batch)
    handle.remove()
    torch.testing.assert_close(inspector._rerun.feature_maps("features.3.expand3x3", 0, 1, 1), seen[0][1, 16:32])
    torch.testing.assert_close(inspector._rerun.feature_maps("features.3.expand3x3", 0, 0, 0).bfloat16(),
                               inspector.capture["features.3.expand3x3"].calls[0].feature_maps, rtol=0, atol=0)
    inspector._page(5)  # clamped to the last page
    assert "channels 48–63 of 64" in inspector._fm_note.value and inspector._fm_next.disabled
    inspector.select("classifier.3")  # AdaptiveAvgPool2d: (2, 1000, 1, 1), a single position
    assert "no spatial" in inspector._fm_note.value and inspector._fm_image.layout.display == "none"


def test_grad_cam_once_per_layer_and_class(squeezenet, monkeypatch):
    model, batch = squeezenet
    calls = []
    original = core_cam.grad_cam
    monkeypatch.setattr(core_cam, "grad_cam", lambda *a, **k: (calls.append(k), original(*a, **k))[1])
    names = [f"class {i}" for i in range(1000)]
    inspector = on_page(ModelInspector(model, batch, class_names=names))
    inspector.select("features.12")
    inspector._tabs.selected_index = EXPLAIN
    with torch.no_grad():
        top = model(batch)[0].softmax(0).topk(5)
    assert inspector._ex_class.value == int(top.indices[0])  # the top prediction of item 0
    assert calls == [{"layer": "features.12", "target": int(top.indices[0])}]
    assert inspector._ex_image.value[:4] == b"\x89PNG"
    assert [f"{i}: class {i}" for i in top.indices.tolist()] == re.findall(r"<th>([^<]*)</th>", inspector._ex_top.value)
    assert [f"{p:.2%}" for p in top.values.tolist()] == re.findall(r"<td>([^<]*)</td>", inspector._ex_top.value)
    inspector._ex_class.value = 7
    inspector._ex_class.value = int(top.indices[0])
    inspector.select("features.4")
    inspector.select("features.12")
    top1 = int(top.indices[0])
    assert [(c["layer"], c["target"]) for c in calls] == [("features.12", top1), ("features.12", 7),
                                                          ("features.4", top1)]
    inspector.select("classifier.3")  # a 1 x 1 output: the automatic layer, named in the note
    assert calls[-1]["layer"] is None
    assert "chosen automatically" in inspector._ex_note.value
    assert original(model, batch).layer in inspector._ex_note.value


def test_explain_controls_start_with_a_value_and_follow_the_item():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))
    batch = torch.randn(2, 3, 16, 16)
    batch[1] *= -3
    target = torch.tensor([3, 7])
    inspector = on_page(ModelInspector(model.eval(), batch, target=target))
    inspector.select("0")
    inspector._tabs.selected_index = EXPLAIN
    with torch.no_grad():
        probs = model(batch).double().softmax(1)
    spread = (-(probs * probs.log()).sum(1) / math.log(1000)).tolist()
    assert spread[0] > 0.99 > spread[1]  # item 0 near uniform (untrained), item 1 less so
    assert inspector._ex_item.value == 0 and inspector._ex_class.value == int(probs[0].argmax())
    assert "True label (target): <b>3</b>" in inspector._ex_top.value
    assert "close to uniform" in inspector._ex_top.value
    assert inspector._ex_find.layout.display is None and len(inspector._ex_find.options) == 1000
    inspector._ex_item.value = 1  # the other item: its own top prediction, its own label
    assert inspector._ex_class.value == int(probs[1].argmax()) != int(probs[0].argmax())
    assert "True label (target): <b>7</b>" in inspector._ex_top.value
    assert "close to uniform" not in inspector._ex_top.value
    inspector._ex_class.value = 5  # a class picked by hand stays while the item does
    inspector.select("1")
    assert inspector._ex_class.value == 5
    inspector._ex_find.value = "42"  # the search box picks a class
    assert inspector._ex_class.value == 42 and inspector._drawn[EXPLAIN][-2] == 42


def test_a_block_with_attention_layers_points_to_them():
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True).eval()
    model = nn.Sequential(OrderedDict(enc=nn.TransformerEncoder(layer, 2, enable_nested_tensor=False))).eval()
    inspector = on_page(ModelInspector(model, torch.randn(1, 4, 8)))
    inspector.select("enc")
    inspector._tabs.selected_index = EXPLAIN
    note = inspector._ex_note.value
    assert "holds attention layers" in note and "enc.layers.0.self_attn, enc.layers.1.self_attn" in note
    assert "image batch" not in note


def test_a_click_arriving_while_a_panel_draws_is_drawn_not_swallowed():
    # the user's change lands (on another thread) while the panel is drawing: the draw in progress must not
    # record the new value as drawn, so the user's event draws it once it has the lock
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 1000))
    batch = torch.randn(2, 3, 16, 16)
    batch[1] *= -3  # the two items have different top classes
    inspector = on_page(ModelInspector(model.eval(), batch))
    inspector.select("0")
    original = inspector._explain_cam
    clicked = []

    def slow(name):
        original(name)
        if not clicked:
            clicked.append(1)
            user = threading.Thread(target=setattr, args=(inspector._ex_item, "value", 1))
            user.start()
            user.join(timeout=0.5)  # it waits for the lock the draw holds
            clicked.append(user)

    inspector._explain_cam = slow
    inspector._tabs.selected_index = EXPLAIN
    clicked[1].join()
    with torch.no_grad():
        second = int(model(batch)[1].argmax())
    assert inspector._drawn[EXPLAIN][3:5] == (1, second)  # item 1 drawn, with its own class
    assert inspector._ex_class.value == second


def test_attention_heads_and_tokens():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=8, nhead=2, dim_feedforward=16, batch_first=True).eval()
    model = nn.Sequential(OrderedDict(block=layer, head=nn.Linear(8, 3))).eval()
    tokens = ["the", "<b>cat</b>", "sat", "down"]
    inspector = on_page(ModelInspector(model, torch.randn(1, 4, 8), tokens=tokens))
    inspector.select("block.self_attn")
    inspector._tabs.selected_index = EXPLAIN
    assert [v for _, v in inspector._ex_head.options] == [ALL_HEADS, 0, 1]
    assert inspector._ex_head.value == ALL_HEADS  # the picker starts on "all", not blank
    assert inspector._ex_class.layout.display == "none" and inspector._ex_head.layout.display is None
    all_heads = inspector._ex_image.value
    inspector._ex_head.value = 1
    assert inspector._ex_image.value[:4] == b"\x89PNG" and inspector._ex_image.value != all_heads
    assert "block.self_attn" in inspector._ex_note.value


def test_strings_from_the_model_reach_the_page_as_text():
    inspector = on_page(ModelInspector(Evil(), torch.randn(2, 4), class_names=[EVIL, "b"]))
    name = f"blocks.{EVIL}"
    assert inspector.tree.rows[2][:2] == [name, EVIL]  # raw data: tree.js sets it with textContent
    inspector.select(name)
    assert "<img" not in inspector._header.value
    assert html.escape(name) in inspector._header.value
    inspector._tabs.selected_index = SUMMARY
    assert "<img" not in inspector._summary.value and "&lt;img" in inspector._summary.value
    top = text.predictions([(0, 0.5)], [EVIL])
    assert "<img" not in top and html.escape(f"0: {EVIL}") in top
    failed = ModelInspector(Evil(fail=True), torch.randn(2, 4))
    assert failed.selected == "blocks.next" and "<img" not in failed._banner.value
    assert html.escape("blocks.next") in failed._banner.value


def test_tree_front_end_ships_in_the_package_and_sets_text_only():
    js, css = (WIDGET_DIR / "tree.js").read_text(), (WIDGET_DIR / "tree.css").read_text()
    tree = TreeWidget()
    assert (tree._esm, tree._css) == (js, css)
    for source in (js, css):
        assert not re.search(r"https?://|@import|import\s*\(", source)  # nothing fetched at run time
    assert "innerHTML" not in js and "insertAdjacentHTML" not in js and "outerHTML" not in js


def test_broken_model_selects_and_marks_the_failing_module():
    inspector = on_page(ModelInspector(broken_model(), torch.randn(2, 3, 28, 28)))
    err = inspector.capture.error
    assert err.module == "head.1"
    assert inspector.selected == "head.1" and inspector.tree.marked == "head.1"
    assert inspector.tree.expanded == ["", "head"]
    assert html.escape(err.message) in inspector._banner.value and inspector._banner.layout.display is None
    row = dict(zip(FIELDS, inspector.tree.rows[list(inspector.capture.modules).index("head.1")]))
    assert row["errors"] == 1 and row["called"] is True  # its failed call is recorded, not greyed out
    (call,) = inspector.capture["head.1"].calls
    assert call.failed and call.input_shapes == (2, 8 * 14 * 14) and call.output_shapes is None
    assert call.stats is None and call.input_requires_grad is True
    header = dict(text.header_rows(inspector.capture["head.1"], call))
    assert header["Calls"] == "1 (failed)" and header["Shapes"].startswith("(2, 1568) → failed")
    assert "Calls</th><td>1 (failed)" in inspector._header.value
    assert "This call failed: it received (2, 1568) (float32 on cpu)" in inspector._stats.value
    assert "never called" not in inspector._stats.value
    # the modules around it raised too: their calls are failed, after the ones that returned
    outer = inspector.capture
    assert [c.failed for c in outer["head"].calls] == [True] == [c.failed for c in outer[""].calls]
    assert inspector.capture["head"].calls[0].index > call.index > inspector.capture["features.2"].calls[0].index
    inspector._tabs.selected_index = EXPLAIN
    assert "the model failed" in inspector._ex_note.value


def test_findings_tab_lists_findings_and_selects_their_module():
    inspector = on_page(ModelInspector(broken_model(), torch.randn(2, 3, 28, 28)))
    inspector._tabs.selected_index = FINDINGS
    findings = inspector.capture.findings
    assert [label for label, _ in inspector._findings.options] == \
        [f"{f.severity} · {f.module or text.ROOT_LABEL} · {f.kind.replace('_', ' ')}" for f in findings]
    assert f"{len(findings)} finding" in inspector._findings_note.value and "1 error" in inspector._findings_note.value
    assert inspector._tabs.titles[FINDINGS] == f"Findings ({len(findings)})"
    assert html.escape(findings[0].message) in inspector._finding_detail.value  # the first, in full, until a pick
    inspector.select("")
    inspector._findings.value = 0  # a click on the first finding
    assert inspector.selected == findings[0].module == "head.1"
    assert html.escape(findings[0].message) in inspector._finding_detail.value
    assert findings[0].fix.startswith("Try: ") and html.escape(findings[0].fix) in inspector._finding_detail.value


def test_a_thousand_findings_stay_one_widget():
    blocks = [(nn.Linear(32, 32), nn.ReLU()) for _ in range(250)]
    for linear, _ in blocks:
        nn.init.constant_(linear.bias, -100.0)  # every ReLU dead: one dead_activation finding each
    model = nn.Sequential(*[m for b in blocks for m in b]).eval()
    inspector = ModelInspector(model, torch.randn(4, 32), backward=False)
    (dead,) = [f for f in inspector.capture.findings if f.kind == "dead_activation"]  # grouped into one
    assert len(dead.modules) == 250
    assert len(inspector._findings.options) == len(inspector.capture.findings)
    assert sum(1 for _ in inspector._descendants()) < 40  # the inspector's size does not grow with the model


def test_refresh_keeps_the_selection_and_reads_the_new_batch():
    torch.manual_seed(0)
    model = broken_model()
    inspector = on_page(ModelInspector(model, torch.randn(2, 3, 28, 28)))
    inspector.select("features.1")
    model.head[1] = nn.Linear(8 * 14 * 14, 10)  # the fix
    new_batch = torch.randn(3, 3, 28, 28)
    before = inspector.capture
    inspector.refresh(new_batch)
    assert inspector.capture is not before and inspector.capture.error is None
    assert inspector.selected == "features.1" and inspector.tree.marked is None
    assert inspector._banner.layout.display == "none"
    expected = layerscope.capture(model, new_batch)["features.1"].calls[0].stats
    assert f"{expected.mean:.6g}" in inspector._stats.value
    assert "(3, 8, 28, 28)" in inspector._header.value
    inspector.select("head.1")
    assert inspector.capture["head.1"].called


def test_the_model_is_left_as_it_was():
    torch.manual_seed(0)
    model = squeezenet1_1(weights=None, num_classes=10)
    model.features.insert(1, nn.BatchNorm2d(64))  # training mode: running statistics would move
    model.train()
    model.features[0].weight.requires_grad_(False)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    inspector = on_page(ModelInspector(model, torch.randn(2, 3, 64, 64)))
    inspector.select("features.4.expand3x3")
    for tab in (FEATURE_MAPS, EXPLAIN, GRADIENTS, SUMMARY):
        inspector._tabs.selected_index = tab
    inspector._tabs.selected_index = FEATURE_MAPS
    inspector._page(1)
    assert inspector._fm_image.value[:4] == b"\x89PNG"
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(m.training for m in model.modules())
    assert not model.features[0].weight.requires_grad and model.features[1].weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert not nn.modules.module._global_forward_hooks  # the progress bar's hook is gone too


def test_progress_bar_only_for_a_slow_capture(capsys, monkeypatch):
    import layerscope.widget.inspector as inspector_module

    ModelInspector(nn.Linear(4, 2), torch.randn(2, 4))
    assert capsys.readouterr().err == ""
    monkeypatch.setattr(inspector_module, "PROGRESS_DELAY", 0.0)
    ModelInspector(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), torch.randn(2, 4))
    err = capsys.readouterr().err
    # 4 modules: their forwards, their output gradients, then the findings: 9 steps, never past them
    steps = [(int(n), int(total)) for n, total in re.findall(r"layerscope: [a-z ]+: .*?\| *(\d+)/(\d+) ", err)]
    assert steps and {total for _, total in steps} == {9} and all(n <= 9 for n, _ in steps)


def test_progress_counts_forward_then_backward_then_findings_and_ends_at_its_total():
    model = torchvision.models.resnet18(weights=None).eval()  # reuses its ReLUs: more calls (69) than modules (68)
    modules = len(list(model.named_modules()))
    bar = Progress(modules, backward=True, delay=3600.0)  # never drawn: counts only
    seen = []

    def progress(phase, done, total):
        seen.append(phase)
        bar(phase, done, total)
        assert bar.n <= bar.total
        steps.append(bar.n)

    steps = []
    cap = layerscope.capture(model, torch.randn(1, 3, 64, 64), progress=progress)
    assert len(cap.calls) > modules
    assert steps == sorted(steps) and steps[-1] == bar.total == 2 * modules + 1
    assert list(dict.fromkeys(seen)) == ["forward", "backward", "findings"]
    bar.close()


def test_repr_close_and_lazy_export(squeezenet):
    model, batch = squeezenet
    assert layerscope.ModelInspector is ModelInspector
    inspector = ModelInspector(model, batch)
    inspector.select("features.3")
    assert repr(inspector) == "ModelInspector(SqueezeNet, 68 modules, selected='features.3')"
    failed = ModelInspector(broken_model(), torch.randn(2, 3, 28, 28))
    assert repr(failed) == "ModelInspector(Sequential, 8 modules, failed, selected='head.1')"
    parts = [inspector.tree, inspector._hist, inspector._ex_class, inspector._findings]
    parts += [w.layout for w in parts] + [inspector.layout]
    inspector.close()
    assert inspector.comm is None and all(w.comm is None for w in parts)
    assert math.isfinite(inspector.capture.loss)


def test_a_loaded_capture_draws_every_panel_records_can_draw(squeezenet, tmp_path):
    model, batch = squeezenet
    live = layerscope.capture(model, batch)
    live.summary()
    path = tmp_path / "squeezenet.lsc"
    live.save(path)
    inspector = on_page(ModelInspector(layerscope.load(path)))
    assert repr(inspector) == "ModelInspector(loaded capture, 68 modules, selected='')"
    assert inspector.tree.rows == tree_rows_of(live)
    inspector.select("features.3.expand3x3")
    assert "(2, 64, 15, 15)" in inspector._header.value and inspector._hist.value[:4] == b"\x89PNG"
    s = live["features.3.expand3x3"].calls[0].stats
    assert f"{s.mean:.6g}" in inspector._stats.value
    inspector._tabs.selected_index = FEATURE_MAPS
    assert inspector._fm_image.value[:4] == b"\x89PNG" and inspector._fm_image.layout.display is None
    inspector._page(1)  # past the stored sample: one sentence, no failure
    assert "need the model" in inspector._fm_note.value and inspector._fm_image.layout.display == "none"
    inspector._tabs.selected_index = GRADIENTS
    grads = live["features.3.expand3x3"].param_grad_norms
    assert f"{grads['weight']:.4g}" in inspector._grad_text.value and inspector._grad_image.value[:4] == b"\x89PNG"
    inspector._tabs.selected_index = EXPLAIN
    assert "no model to run" in inspector._ex_note.value and inspector._ex_image.layout.display == "none"
    inspector._tabs.selected_index = SUMMARY
    assert html.escape(live.summary()) in inspector._summary.value
    with pytest.raises(ValueError, match="needs a model"):
        inspector.refresh()


def tree_rows_of(cap):
    from layerscope.widget.tree import tree_rows

    return tree_rows(cap)


def test_refresh_after_inserting_a_layer_keeps_the_same_module_selected():
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Linear(4 * 8 * 8, 10))  # no flatten
    inspector = on_page(ModelInspector(model, torch.randn(2, 1, 8, 8)))
    assert inspector.selected == "2" and inspector.capture.error.module == "2"
    linear = model[2]
    model.insert(2, nn.Flatten())  # the fix: the linear layer is "3" now
    inspector.refresh()
    assert inspector.capture.error is None
    assert inspector.selected == "3" and inspector.capture["3"].type_name == "Linear" and model[3] is linear

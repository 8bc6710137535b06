"""The HTML report: its data against the records, escaping, the inspector's Grad-CAM in it, the static view a
saved notebook keeps, and the command line. (The page itself is tested in test_report_browser.py.)"""

from __future__ import annotations

import math
import re
import subprocess
import sys
from collections import OrderedDict
from pathlib import Path

import nbformat
import numpy as np
import pytest
import torch
from matplotlib import colormaps
from nbclient import NotebookClient
from torch import nn
from torchvision.models import squeezenet1_1

import layerscope
import models
from layerscope.core import gradflow
from layerscope.report import cli, html, static_html
from layerscope.widget import ModelInspector, rows, text
from layerscope.widget.inspector import EXPLAIN

ROOT = Path(__file__).resolve().parents[1]
EVIL = "<img src=x onerror=alert(1)>"


class Evil(nn.Module):
    def __init__(self, fail: bool = False):
        super().__init__()
        self.blocks = nn.ModuleDict({EVIL: nn.Linear(4, 3 if fail else 4), "next": nn.Linear(4, 2)})

    def forward(self, x):
        return self.blocks["next"](self.blocks[EVIL](x))


@pytest.fixture(scope="module")
def squeezenet():
    torch.manual_seed(0)
    model = squeezenet1_1(weights=None).eval()
    return model, torch.randn(1, 3, 224, 224)


@pytest.fixture(scope="module")
def squeezenet_report(squeezenet, tmp_path_factory):
    model, batch = squeezenet
    cap = layerscope.capture(model, batch)
    path = tmp_path_factory.mktemp("report") / "squeezenet.html"
    cap.save_html(path)
    return cap, path.read_text(encoding="utf-8"), path


def maps_of(fm: dict, blob: bytes) -> np.ndarray:
    c, h, w = fm["shape"]
    return np.frombuffer(blob, dtype=np.uint8, count=c * h * w, offset=fm["offset"]).reshape(c, h, w)


def test_the_document_holds_every_record_the_page_shows(squeezenet_report):
    cap, page, path = squeezenet_report
    assert path.stat().st_size < 3_000_000  # the target for a 224 x 224 SqueezeNet
    doc, blob = html.read(page)
    assert doc["tree"]["rows"] == rows.tree_rows(cap)
    names = list(cap.modules)
    m = doc["modules"][names.index("features.3.expand3x3")]
    report = cap["features.3.expand3x3"]
    call = report.calls[0]
    header = dict(m["calls"][0]["header"])
    assert header["Parameters"] == "own 9,280 · total 9,280 · trainable 9,280"  # Conv2d(16, 64, 3): 16*64*9 + 64
    assert header["Shapes"] == "(1, 16, 55, 55) → (1, 64, 55, 55)"
    assert dict(m["calls"][0]["stats"])["mean"] == f"{call.stats.mean:.6g}"
    hist = m["calls"][0]["hist"]
    assert hist["counts"] == call.histogram.counts.tolist() and len(hist["counts"]) == 64
    assert hist["edges"] == pytest.approx([call.histogram.edges[0], call.histogram.edges[-1]], rel=1e-15)
    assert np.allclose(np.linspace(*hist["edges"], 65), call.histogram.edges, rtol=1e-12, atol=1e-12)
    assert hist["notes"] == [f"sampled {call.histogram.sampled:,} of {55 * 55 * 64:,} values"]
    grads = dict((p, g) for p, g, _, _ in m["grads"])
    assert grads == {k: f"{v:.4g}" for k, v in report.param_grad_norms.items()}
    ratios = {p: r for p, _, _, r in m["grads"]}  # grad / norm, as the findings judge a layer
    weight = report.params["weight"]
    assert ratios["weight"] == f"{weight.grad_norm / weight.norm:.3g}"
    scale = cap.output_numel if cap.loss_kind == "sum" else 1  # the findings divide a "sum" loss out
    own = [q for q in report.params.values() if q.trainable]
    layer = math.hypot(*[q.grad_norm for q in own]) / scale / math.hypot(*[q.norm for q in own])
    assert m["ratio"].startswith(f"{layer:.3g}")
    assert m["calls"][0]["grad"] == f"{call.grad_output_norm:.4g}"
    assert doc["summary"] == cap.summary() and "1,235,496" in doc["summary"]
    flow = doc["gradient_flow"]
    assert flow["title"] == "Gradient flow (loss: sum)"
    assert [layer[0] for layer in flow["layers"]] == [n for n, _, _ in gradflow.layer_gradients(cap)]
    own = {n: m for n, m in cap.modules.items() if m.num_own_params}
    assert len(flow["layers"]) == len(own) == 26
    for name, norm, why, kind in flow["layers"]:  # the norm over the layer's own parameters, against numpy
        grads = np.array([p.grad_norm for p in own[name].params.values()], dtype=np.float64)
        assert norm == pytest.approx(np.sqrt(np.sum(grads**2)), rel=1e-12) and why is None and kind is None
    assert doc["error"] is None and doc["findings"] == [] and doc["explain"] == []


def test_feature_maps_are_the_stored_sample_on_one_colour_scale(squeezenet_report):
    cap, page, _ = squeezenet_report
    doc, blob = html.read(page)
    names = list(cap.modules)
    stored = 0
    for name, module in zip(names, doc["modules"]):
        for record, entry in zip(cap[name].calls, module["calls"]):
            fm = entry["maps"]
            assert (fm is not None) == (record.feature_maps is not None and record.output_shapes[2] > 1), name
            if fm is None:
                continue
            stored += 1
            values = record.feature_maps.double().numpy()
            levels = maps_of(fm, blob).astype(np.float64)
            lo, hi = fm["lo"], fm["hi"]
            if values.min() < 0 < values.max():
                assert fm["cmap"] == "RdBu_r" and lo == -hi == -np.abs(values).max()
            else:
                assert fm["cmap"] == "viridis" and (lo, hi) == (values.min(), values.max())
            np.testing.assert_allclose(lo + levels * (hi - lo) / 255, values, atol=(hi - lo) / 510 * (1 + 1e-6))
    assert stored == 65  # every call with an (N, C, H, W) output but the last pooling (1 x 1)
    luts = {k: np.frombuffer(__import__("base64").b64decode(v), dtype=np.uint8).reshape(256, 3)
            for k, v in doc["colormaps"].items()}
    for name, lut in luts.items():
        expected = np.rint(colormaps[name](np.linspace(0, 1, 256))[:, :3] * 255)
        assert np.array_equal(lut, expected)


def test_the_page_is_one_file_with_our_own_code_only(squeezenet_report):
    _, page, _ = squeezenet_report
    tree_js = (ROOT / "src/layerscope/widget/tree.js").read_text()
    report_js = (ROOT / "src/layerscope/report/report.js").read_text()
    assert f'<script type="text/plain" id="ls-tree-js">{tree_js}</script>' in page  # the widget's tree, as it is
    assert f'<script type="module">{report_js}</script>' in page
    assert "innerHTML" not in report_js and "insertAdjacentHTML" not in report_js and "outerHTML" not in report_js
    assert "eval(" not in report_js and "new Function" not in report_js
    policy = re.search(r'http-equiv="Content-Security-Policy" content="([^"]+)"', page).group(1)
    assert policy.startswith("default-src 'none'; script-src 'sha256-")
    assert not re.search(r"""(src|href)\s*=\s*["']?https?:""", page)  # nothing to fetch
    assert page.count("<script") == page.count("</script>") == 4
    assert 'data-encoding="zlib+base64"' in page  # this document is big enough to be compressed


@pytest.mark.parametrize("compress", [False, True])
def test_strings_from_the_model_stay_data(tmp_path, monkeypatch, compress):
    monkeypatch.setattr(html, "COMPRESS_FROM", 0 if compress else 10**9)
    cap = layerscope.capture(Evil(), torch.randn(2, 4))
    path = tmp_path / "evil.html"
    cap.save_html(path)
    page = path.read_text()
    assert "<img" not in page and "<!--" not in page
    assert page.count("</script") == 4 and page.count("</style") == 1
    assert ('data-encoding="zlib+base64"' in page) == compress
    if not compress:
        assert "\\u003cimg src=x onerror=alert(1)>" in page  # JSON, with every < escaped
    doc, _ = html.read(page)
    assert doc["tree"]["rows"][2][:2] == [f"blocks.{EVIL}", EVIL]
    assert doc["modules"][2]["title"] == f"blocks.{EVIL}"
    failed = layerscope.capture(Evil(fail=True), torch.randn(2, 4))
    failed.save_html(path)
    page = path.read_text()
    doc, _ = html.read(page)
    assert "<img" not in page
    assert doc["error"] == {"lead": "Forward failed:", "message": failed.error.message, "module": "blocks.next"}
    assert doc["tree"]["selected"] == doc["tree"]["marked"] == "blocks.next"


def test_a_loaded_capture_makes_the_same_report(squeezenet_report, tmp_path):
    cap, page, _ = squeezenet_report
    cap.save(tmp_path / "squeezenet.lsc")
    loaded = layerscope.load(tmp_path / "squeezenet.lsc")
    loaded.save_html(tmp_path / "loaded.html")
    assert html.read((tmp_path / "loaded.html").read_text()) == html.read(page)


def test_the_inspector_report_holds_its_automatic_grad_cam(squeezenet, tmp_path):
    model, batch = squeezenet
    names = [f"class {i}" for i in range(1000)]
    inspector = ModelInspector(model, batch, class_names=names)
    inspector.save_html(tmp_path / "before.html")
    assert html.read((tmp_path / "before.html").read_text())[0]["explain"] == []  # none computed: none included
    inspector.tree._handle_custom_msg({"event": "shown"}, [])
    inspector._tabs.selected_index = EXPLAIN  # the model itself is selected: Grad-CAM at the automatic layer
    inspector.save_html(tmp_path / "after.html")
    doc, _ = html.read((tmp_path / "after.html").read_text())
    with torch.no_grad():
        probs = model(batch)[0].double().softmax(0)
    top = probs.topk(5)
    expected = layerscope.grad_cam(model, batch)
    [view] = doc["explain"]
    assert view["layer"] == expected.layer
    assert view["class"] == f"{int(top.indices[0])}: class {int(top.indices[0])}"
    [item] = view["items"]
    assert item["image"].startswith("data:image/png;base64,")
    assert item["top"] == [[f"{i}: class {i}", f"{p:.2%}"] for i, p in zip(top.indices.tolist(), top.values.tolist())]


def test_static_view_lists_the_tree_and_the_findings():
    broken = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU()),
        head=nn.Sequential(nn.Flatten(), nn.Linear(100, 10)),
        evil=Evil()))
    cap = layerscope.capture(broken, torch.randn(2, 3, 8, 8))
    out = static_html(cap)
    assert "<script" not in out and "<img" not in out
    assert f"<code>{'&lt;img src=x onerror=alert(1)&gt;'}</code> Linear" in out
    tree = out.split("<summary>Module tree</summary>")[1].split("</details>")[0]
    assert tree.count("<li>") == tree.count("</li>") == len(cap.modules)
    assert tree.count("<ul") == tree.count("</ul>") == 1 + sum(bool(m.children) for m in cap.modules.values())
    assert "<b>Forward failed:</b>" in out and text.finding_label(cap.findings[0]).split(" · ")[1] in out
    assert f"{len(cap.findings)} finding" in out


def test_static_view_of_a_big_model_stops_at_a_depth():
    model = nn.Sequential(*[nn.Sequential(nn.Linear(4, 4), nn.ReLU()) for _ in range(300)])
    out = static_html(layerscope.capture(model, torch.randn(2, 4), backward=False))
    tree = out.split("<summary>Module tree</summary>")[1].split("</details>")[0]
    assert tree.count("<li>") == 301 and "600 modules deeper than level 1 are not listed" in out


SAVED_NOTEBOOK = (
    "import torch\nfrom torch import nn\nfrom layerscope import ModelInspector",
    f"""\
EVIL = {EVIL!r}


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = nn.ModuleDict({{EVIL: nn.Linear(4, 4), "act": nn.ReLU()}})
        nn.init.constant_(self.block[EVIL].bias, -100.0)  # the ReLU after it is dead: a finding

    def forward(self, x):
        return self.block["act"](self.block[EVIL](x))
""",
    "torch.manual_seed(0)\nModelInspector(Model(), torch.randn(3, 4))",
)


def test_a_saved_notebook_keeps_the_static_view(tmp_path):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(source) for source in SAVED_NOTEBOOK]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    nbformat.write(nb, tmp_path / "saved.ipynb")
    saved = nbformat.read(tmp_path / "saved.ipynb", as_version=4)
    # the inspector's own output (a capture over PROGRESS_DELAY, such as the first one that counts FLOPs while
    # torch loads its dispatch machinery, also leaves a closed progress bar before it)
    outputs = saved.cells[2].outputs
    [k] = [i for i, o in enumerate(outputs) if "application/vnd.jupyter.widget-view+json" in o.get("data", {})
           and o["data"]["text/plain"].startswith("ModelInspector(")]
    widget, static = outputs[k]["data"], outputs[k + 1]["data"]  # the live widget, then the static copy after it
    assert "text/html" not in widget  # one static view, not two, where HTML is shown (GitHub, untrusted notebooks)
    fallback = static["text/html"]
    assert fallback.startswith("<style>") and "Error" not in fallback.split("</style>")[0]
    fallback = fallback.split("</style>", 1)[1]  # the style hides one output or the other in Jupyter
    assert 'class="layerscope-static"' in fallback and "<script" not in fallback and "<img" not in fallback
    assert "<code>block</code> ModuleDict" in fallback and "<code>&lt;img src=x onerror=alert(1)&gt;</code>" in fallback
    namespace: dict = {}
    exec("\n".join(SAVED_NOTEBOOK[:2]), namespace)  # the same model and batch, in this process
    torch.manual_seed(0)
    cap = layerscope.capture(namespace["Model"](), torch.randn(3, 4), costs=True)  # as the inspector captures
    assert any(f.kind == "dead_activation" for f in cap.findings)
    assert fallback == static_html(cap)


# -- the command line ------------------------------------------------------------------------------------


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "layerscope", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_cli_on_a_good_model_prints_findings_then_the_table_and_writes_both_files(tmp_path):
    out = run("torchvision.models:squeezenet1_1", "--input", "1,3,64,64", "--html", "s.html", "--save", "s.lsc",
              cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0] == "SqueezeNet from torchvision.models:squeezenet1_1, input (1, 3, 64, 64), seed 0, " \
                       "eval mode"
    assert lines[1] == "no findings"
    assert max(map(len, lines)) <= 100
    assert lines[3].split() == ["module", "type", "calls", "output", "mean", "std", "zeros", "grad", "params"]
    row = next(line for line in lines if line.startswith("features.3.expand3x3 ")).split()
    torch.manual_seed(0)
    model = squeezenet1_1(weights=None).eval()
    batch = torch.randn((1, 3, 64, 64), generator=torch.Generator().manual_seed(0))
    cap = layerscope.capture(model, batch)
    call = cap["features.3.expand3x3"].calls[0]
    assert row[:4] == ["features.3.expand3x3", "Conv2d", "1", "1x64x15x15"] and row[8] == "9.28K"
    assert float(row[4]) == pytest.approx(call.stats.mean, rel=1e-3)
    assert float(row[5]) == pytest.approx(call.stats.std, rel=1e-3)
    assert float(row[6].rstrip("%")) / 100 == pytest.approx(call.stats.zero_fraction, abs=5e-4)
    assert float(row[7]) == pytest.approx(call.grad_output_norm, rel=1e-3)
    loaded = layerscope.load(tmp_path / "s.lsc")
    assert loaded.loss == pytest.approx(cap.loss, rel=1e-6) and loaded.error is None
    doc, _ = html.read((tmp_path / "s.html").read_text())
    assert doc["title"] == "layerscope: SqueezeNet"
    assert f"wrote s.html ({(tmp_path / 's.html').stat().st_size / 1e6:.2f} MB)" in lines
    show = run("show", "s.lsc", cwd=tmp_path)
    assert show.returncode == 0 and show.stdout.splitlines()[1:] == lines[1:-2]


def test_cli_on_a_broken_model_exits_1_with_the_error_first(tmp_path):
    spec = f"{ROOT / 'tests' / 'models.py'}:missing_flatten"
    out = run(spec, "--input", "2,3,28,28", "--html", "b.html", "--save", "b.lsc", "--target", "3", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    lines = out.stdout.splitlines()
    body = " ".join(out.stdout.split())
    message = "head.0 (Linear, in_features=1568) got input of shape (2, 8, 14, 14), but expects the last " \
              "dimension to be 1568."
    assert f"Forward failed: {message}" in body
    assert f"1 finding (1 error, 0 warning, 0 info): error head.0: {message}" in body
    assert max(map(len, lines)) <= 100
    assert re.search(r"^head\.0 +Linear +1 failed +15\.7K$", out.stdout, re.MULTILINE)  # its failed call
    doc, _ = html.read((tmp_path / "b.html").read_text())
    assert doc["error"]["message"] == message
    assert layerscope.load(tmp_path / "b.lsc").error.message == message
    assert run("show", "b.lsc", cwd=tmp_path).returncode == 1


def test_cli_usage_errors_exit_2(tmp_path):
    missing = run("no_such_module:build", "--input", "1,4", cwd=tmp_path)
    assert missing.returncode == 2 and "No module named 'no_such_module'" in missing.stderr
    assert run("torchvision.models:squeezenet1_1", cwd=tmp_path).returncode == 2  # no --input
    bad_shape = run("torchvision.models:squeezenet1_1", "--input", "1,x", cwd=tmp_path)
    assert bad_shape.returncode == 2 and "positive integers separated by commas" in bad_shape.stderr
    not_module = run("math:pi", "--input", "1", cwd=tmp_path)
    assert not_module.returncode == 2 and "neither a callable nor a torch.nn.Module" in not_module.stderr
    (tmp_path / "junk.lsc").write_text("not a zip")
    junk = run("show", "junk.lsc", cwd=tmp_path)
    assert junk.returncode == 2 and "not a layerscope capture" in junk.stderr


def test_cli_help_explains_every_flag_with_examples():
    for parser, usage in ((cli.capture_parser(), "layerscope torchvision.models:squeezenet1_1 --input 1,3,224,224"),
                          (cli.show_parser(), "layerscope show squeezenet.lsc --html squeezenet.html")):
        helptext = parser.format_help()
        assert usage in helptext
        for action in parser._actions:
            assert action.help, action.dest
            for flag in action.option_strings:
                assert flag in helptext
    assert "Exit status: 0" in cli.capture_parser().format_help()


def test_cli_with_no_model_runs_the_demo(capsys, tmp_path):
    assert cli.main(["--no-backward", "--html", str(tmp_path / "demo.html")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("No model given: the demo, torchvision.models:squeezenet1_1 on --input 1,3,224,224")
    assert "\nSqueezeNet from torchvision.models:squeezenet1_1, input (1, 3, 224, 224)" in out
    assert (tmp_path / "demo.html").stat().st_size > 0


def test_the_table_shortens_long_names_in_the_middle():
    long = "a_rather_long_block_name_" * 4
    model = nn.Sequential(OrderedDict({long: nn.Sequential(OrderedDict(final_projection=nn.Linear(4, 2)))}))
    cap = layerscope.capture(model, torch.randn(3, 4))
    lines = cli.table(cap)
    assert max(map(len, lines)) <= 100
    name = f"{long}.final_projection"
    cell = lines[-1].split()[0]
    assert cell == cli.shorten(name, len(cell)) and "…" in cell
    head, tail = cell.split("…")
    assert name.startswith(head) and name.endswith(tail) and tail.endswith("final_projection")
    assert cli.shorten("features.12.expand3x3_activation", 21) == "features.1…activation"


def test_the_console_script_is_declared():
    project = (ROOT / "pyproject.toml").read_text()
    assert '[project.scripts]\nlayerscope = "layerscope.report.cli:main"\n' in project  # tomllib needs 3.11


def test_gradient_flow_data_marks_layers_without_a_norm():
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Linear(4, 2))
    model[0].requires_grad_(False)
    cap = layerscope.capture(model, torch.randn(3, 4))
    flow = html.data.gradient_flow(cap)
    assert [(name, why) for name, _, why, _ in flow["layers"]] == [("0", "frozen"), ("2", None), ("3", None)]
    assert flow["layers"][0][1] is None and flow["layers"][1][1] == pytest.approx(
        np.sqrt(sum(p.grad_norm ** 2 for p in cap["2"].params.values())), rel=1e-12)
    assert html.data.gradient_flow(layerscope.capture(model, torch.randn(3, 4), backward=False)) == {
        "title": "Gradient flow", "layers": [], "why": "no gradients were computed"}


@pytest.mark.parametrize("name, make", [
    ("dict in and out", lambda: (models.DictModel(), {"image": torch.randn(2, 3, 8, 8), "scale": torch.tensor(2.0)})),
    ("reused ReLU", lambda: (models.ReusedReLU(), torch.randn(3, 6))),
    ("tied LSTM", lambda: (models.TiedLM(), torch.randint(0, 50, (2, 5)))),
    ("containers", lambda: (models.Containers(), torch.randn(2, 4))),
    ("namedtuple out", lambda: (models.NamedTupleOut(), torch.randn(2, 5))),
    ("raises inside", lambda: (models.RaisesInside(), torch.randn(2, 4))),
    ("raises in backward", lambda: (models.RaisesInBackward(), torch.randn(2, 4))),
])
def test_odd_models_make_reports(tmp_path, name, make):
    model, batch = make()
    cap = layerscope.capture(model, batch)
    cap.save_html(tmp_path / "r.html")
    doc, _ = html.read((tmp_path / "r.html").read_text())
    assert [r[0] for r in doc["tree"]["rows"]] == list(cap.modules)
    for module, report in zip(doc["modules"], cap.modules.values()):
        assert len(module["calls"]) == len(report.calls)
    assert (doc["error"] is None) == (cap.error is None)


def test_a_meta_model_makes_a_report(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(*[nn.Linear(1024, 1024) for _ in range(4)])
    cap = layerscope.capture(model, torch.randn(2, 1024))
    cap.save_html(tmp_path / "meta.html")
    doc, _ = html.read((tmp_path / "meta.html").read_text())
    assert "meta device: shapes and counts only" in doc["subtitle"]
    m = doc["modules"][1]
    assert dict(m["calls"][0]["header"])["Shapes"] == "(2, 1024) → (2, 1024)"
    assert m["calls"][0]["stats"] is None and m["calls"][0]["hist"] is None
    assert doc["gradient_flow"]["why"] == "no gradients were computed"

"""The HTML report in headless Chromium, opened from file:// with no server, no kernel and no network: every
request the page makes is recorded, and only file: (the report itself), data: and blob: are allowed.

Screenshots land in test-artifacts/.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from matplotlib import colormaps
from torch import nn
from torchvision.models import squeezenet1_1

import layerscope
from lab_server import CHROMIUM, CHROMIUM_ARGS
from layerscope.report import html
from layerscope.widget import ModelInspector
from layerscope.widget.inspector import EXPLAIN

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EVIL = "<img src=x onerror=alert(1)>"


class Page:
    """A report opened in a fresh context, with everything that must not happen on it recorded."""

    def __init__(self, browser, path: Path):
        self.problems: list[str] = []
        self.context = browser.new_context(viewport={"width": 1400, "height": 1000})
        self.page = page = self.context.new_page()
        self.report = path.resolve().as_uri()
        page.on("console", lambda m: m.type in ("error", "warning") and self.problems.append(f"console: {m.text}"))
        page.on("pageerror", lambda e: self.problems.append(f"page error: {e}"))
        page.on("dialog", lambda d: (self.problems.append(f"dialog: {d.message}"), d.dismiss()))
        page.on("websocket", lambda ws: self.problems.append(f"websocket: {ws.url}"))
        page.on("request", self._check)
        page.goto(self.report)
        page.wait_for_function("() => document.documentElement.dataset.lsReady", timeout=30_000)

    def _check(self, request) -> None:
        url = request.url
        scheme = urlparse(url).scheme
        if (scheme == "file" and url != self.report) or scheme not in ("file", "data", "blob"):
            self.problems.append(f"request: {url}")

    def close(self) -> None:
        self.context.close()

    def row(self, name: str):
        return self.page.locator(f'.ls-row[data-name="{name}"]')

    def tab(self, title: str):
        return self.page.locator(".ls-tab", has_text=title)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            pytest.fail("needs Debian's chromium at /usr/bin/chromium")
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (make test installs it)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS))
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def squeezenet(tmp_path_factory):
    """SqueezeNet's report from an inspector that computed Grad-CAM at the automatic layer."""
    torch.manual_seed(0)
    model = squeezenet1_1(weights=None).eval()
    batch = torch.randn(1, 3, 224, 224)
    inspector = ModelInspector(model, batch)
    inspector.tree._handle_custom_msg({"event": "shown"}, [])
    inspector._tabs.selected_index = EXPLAIN
    path = tmp_path_factory.mktemp("report") / "squeezenet.html"
    inspector.save_html(path)
    return model, inspector.capture, path


def test_squeezenet_report_works_like_the_inspector(browser, squeezenet):
    ARTIFACTS.mkdir(exist_ok=True)
    model, cap, path = squeezenet
    module = model.get_submodule("features.3.expand3x3")
    params = sum(p.numel() for p in module.parameters())
    assert params == 16 * 64 * 9 + 64 == 9280
    assert path.stat().st_size < 3_000_000
    doc, blob = html.read(path.read_text())
    view = Page(browser, path)
    page = view.page
    expect(page.locator(".ls-tree-status")).to_have_text("68 modules")
    expect(view.row("features")).to_be_visible()
    expect(view.row("features.3")).to_have_count(0)  # the model is open, its blocks are not
    page.screenshot(path=ARTIFACTS / "report-first-display.png")

    page.locator(".ls-search").fill("expand3x3")
    names = list(cap.modules)
    matches = [n for n in names if "expand3x3" in n]
    expect(page.locator(".ls-tree-status")).to_have_text(f"{len(matches)} of {len(names)} modules match")
    view.row("features.3.expand3x3").click()
    header = page.locator(".ls-header")
    expect(header.locator(".ls-name")).to_have_text("features.3.expand3x3")
    expect(header).to_contain_text(f"own {params:,} · total {params:,} · trainable {params:,}")
    call = cap["features.3.expand3x3"].calls[0]
    expect(header).to_contain_text(f"{call.input_shapes} → {call.output_shapes}")
    expect(view.row("features.3.expand3x3")).to_have_class(re.compile("ls-selected"))
    bars = page.locator("svg.ls-histogram rect.ls-bar")
    expect(bars).to_have_count(len(call.histogram.counts))
    drawn = bars.evaluate_all("bars => bars.map((b) => [Number(b.dataset.count), b.getBBox().height])")
    assert [c for c, _ in drawn] == call.histogram.counts.tolist()
    tallest = max(h for _, h in drawn)
    for count, height in drawn:  # bar heights in proportion to the counts
        assert height == pytest.approx(tallest * count / call.histogram.counts.max(), abs=0.01)
    expect(page.locator(".ls-stats")).to_contain_text(f"{call.stats.mean:.6g}")
    page.screenshot(path=ARTIFACTS / "report-activations.png")

    view.tab("Feature maps").click()
    canvas = page.locator("canvas.ls-feature-maps")
    expect(canvas).to_be_visible()
    fm = doc["modules"][names.index("features.3.expand3x3")]["calls"][0]["maps"]
    c, h, w = fm["shape"]
    gap = max(1, round(max(h, w) / 16))
    width = min(8, c) * (w + gap) - gap
    level = blob[fm["offset"] + h * w - 1]  # the last pixel of channel 0 (its top-left holds the channel number)
    expected = np.rint(colormaps[fm["cmap"]](np.linspace(0, 1, 256))[level, :3] * 255).tolist()
    pixel = canvas.evaluate(f"""(canvas) => {{
        const scale = canvas.width / {width};
        const x = Math.floor(({w} - 0.5) * scale), y = Math.floor(({h} - 0.5) * scale);
        return Array.from(canvas.getContext("2d").getImageData(x, y, 1, 1).data);
    }}""")
    assert pixel == [*expected, 255]
    expect(page.locator(".ls-panel")).to_contain_text("Channels 0–15 of 64, item 0")
    page.screenshot(path=ARTIFACTS / "report-feature-maps.png")

    view.tab("Gradients").click()
    grads = cap["features.3.expand3x3"].param_grad_norms
    expect(page.locator(".ls-grads")).to_contain_text(f"{grads['weight']:.4g}")
    dots = page.locator("svg.ls-gradient-flow circle.ls-dot")
    expect(dots).to_have_count(len(doc["gradient_flow"]["layers"]))
    drawn = dots.evaluate_all("dots => dots.map((d) => [d.dataset.name, Number(d.dataset.norm), d.cx.baseVal.value,"
                              " d.cy.baseVal.value])")
    assert [name for name, *_ in drawn] == [layer[0] for layer in doc["gradient_flow"]["layers"]]
    slope, offset = np.polyfit([np.log10(n) for _, n, _, _ in drawn], [x for _, _, x, _ in drawn], 1)
    assert slope > 0  # a log axis, larger norms further right
    for _, norm, x, _ in drawn:
        assert x == pytest.approx(slope * np.log10(norm) + offset, abs=1e-3)
    rows = [y for *_, y in drawn]
    assert rows == sorted(rows) and len(set(np.round(np.diff(rows), 6))) == 1  # one row each, from the top
    names = page.locator("svg.ls-gradient-flow text.ls-layer")  # every name fits at 26 layers, none overlap
    expect(names).to_have_count(len(drawn))
    boxes = names.evaluate_all("ts => ts.map((t) => { const b = t.getBBox(); return [b.y, b.height]; })")
    assert all(b[0] + b[1] <= a[0] + 0.5 for b, a in zip(boxes, boxes[1:])) and min(h for _, h in boxes) >= 11
    band = page.locator("svg.ls-gradient-flow rect.ls-highlight")  # the selected layer is shaded
    expect(band).to_have_count(1)
    here = next(d for d in drawn if d[0] == "features.3.expand3x3")
    top, height = band.evaluate("r => [r.y.baseVal.value, r.height.baseVal.value]")
    assert top < here[3] < top + height and height == pytest.approx(rows[1] - rows[0]) and here[1] > 0
    expect(page.locator(".ls-grads")).to_contain_text(
        f"{grads['weight'] / cap['features.3.expand3x3'].params['weight'].norm:.3g}")  # grad / norm
    expect(page.locator(".ls-out-grad")).to_contain_text("what the findings judge")
    page.screenshot(path=ARTIFACTS / "report-gradients.png")

    view.tab("Explain").click()
    cam = page.locator("img.ls-explain")
    expect(cam).to_be_visible()
    assert cam.evaluate("img => img.complete && img.naturalWidth") > 0
    expect(page.locator(".ls-top5 tr")).to_have_count(5)
    expect(page.locator(".ls-panel")).to_contain_text(f"Grad-CAM at {doc['explain'][0]['layer']}")
    page.screenshot(path=ARTIFACTS / "report-explain.png")

    view.tab("Summary").click()
    expect(page.locator("pre.ls-summary")).to_contain_text("Total params: 1,235,496")
    view.tab("Findings").click()
    expect(page.locator(".ls-panel")).to_contain_text("No findings")

    page.locator(".ls-search").press("Escape")
    page.locator(".ls-rows").focus()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    expect(header.locator(".ls-name")).to_have_text("features.3.expand3x3_activation")
    assert view.problems == []
    view.close()


def broken_report(path: Path) -> layerscope.Capture:
    model = nn.Sequential(OrderedDict(
        features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
        head=nn.Sequential(nn.Flatten(), nn.Linear(100, 10)),
    ))
    cap = layerscope.capture(model, torch.randn(2, 3, 28, 28))
    cap.save_html(path)
    return cap


def test_broken_model_report_shows_the_error_and_findings_select_their_module(browser, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    cap = broken_report(tmp_path / "broken.html")
    view = Page(browser, tmp_path / "broken.html")
    page = view.page
    expect(page.locator(".ls-error-banner")).to_have_text(f"Forward failed: {cap.error.message}")
    expect(view.row("head.1")).to_have_class(re.compile("ls-selected"))
    expect(view.row("head.1")).to_have_class(re.compile("ls-marked"))
    expect(view.row("head.1").locator(".ls-badge-error")).to_have_text("1")
    view.row("").click()
    expect(page.locator(".ls-header .ls-name")).to_have_text("(model)")
    view.tab("Findings").click()
    items = page.locator(".ls-finding-item")
    expect(items).to_have_count(len(cap.findings))
    expect(items.first).to_have_text(f"error · head.1 · {cap.findings[0].message}")
    items.first.click()
    expect(page.locator(".ls-header .ls-name")).to_have_text("head.1")
    expect(view.row("head.1")).to_have_class(re.compile("ls-selected"))
    expect(page.locator(".ls-finding-detail")).to_contain_text(cap.findings[0].message)
    page.screenshot(path=ARTIFACTS / "report-broken.png")
    assert view.problems == []
    view.close()


class Evil(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({EVIL: nn.Linear(4, 4)})

    def forward(self, x):
        return self.blocks[EVIL](x)


def test_evil_names_stay_text(browser, tmp_path):
    layerscope.capture(Evil(), torch.randn(2, 4)).save_html(tmp_path / "evil.html")
    view = Page(browser, tmp_path / "evil.html")
    page = view.page
    view.row("blocks").locator(".ls-toggle").click()
    evil = page.locator(".ls-row").nth(2)
    expect(evil).to_have_attribute("data-name", f"blocks.{EVIL}")
    expect(evil.locator(".ls-label")).to_have_text(EVIL)
    evil.click()
    expect(page.locator(".ls-header .ls-name")).to_have_text(f"blocks.{EVIL}")
    for title in ("Activations", "Gradients", "Summary"):
        view.tab(title).click()
    expect(page.locator("pre.ls-summary")).to_contain_text(EVIL)
    assert page.locator('img[src="x"]').count() == 0 and page.locator("img[onerror]").count() == 0
    page.screenshot(path=ARTIFACTS / "report-evil.png")
    assert view.problems == []
    view.close()

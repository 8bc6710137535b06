"""ModelInspector in a real browser: headless Chromium driving JupyterLab 4 and Notebook 7 on 127.0.0.1.

Screenshots land in test-artifacts/. Timings are printed (run with -s to see them), not asserted.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from urllib.parse import urlparse

import pytest
import torch

from lab_server import JupyterServer
from layerscope.widget import text

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

CHROMIUM = "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"
EVIL = "<img src=x onerror=alert(1)>"
# Notebook 7.6 logs these even for an empty notebook (see BROWSER_TESTING.md)
NOTEBOOK7_NOISE = ("reading 'schema'", "'filebrowser:open-path' not registered", ".woff2")
CELL_TIMEOUT = 120_000  # ms: the first cell imports torch and torchvision in a fresh kernel

SETUP = """\
import time
from collections import OrderedDict

import torch
from torch import nn
from torchvision.models import squeezenet1_1

from layerscope import ModelInspector

EVIL = {evil!r}


def timed(label, model, batch):
    inspector = ModelInspector(model, batch)
    print(f"LS-TIMING {{label}} {{inspector._captured_at * 1000:.0f}}")
    return inspector


class Evil(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleDict({{EVIL: nn.Linear(4, 4)}})

    def forward(self, x):
        return self.blocks[EVIL](x)
"""

SQUEEZENET = """\
torch.manual_seed(0)
model = squeezenet1_1(weights=None).eval()
batch = torch.randn(1, 3, 224, 224)
timed("squeezenet", model, batch)
"""

STACK = """\
blocks = [(nn.Linear(32, 32), nn.ReLU(), nn.LayerNorm(32), nn.Dropout(0.1)) for _ in range(500)]
timed("stack", nn.Sequential(*[layer for block in blocks for layer in block]).eval(), torch.randn(4, 32))
"""

BROKEN = """\
broken = nn.Sequential(OrderedDict(
    features=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
    head=nn.Sequential(nn.Flatten(), nn.Linear(100, 10)),
))
ModelInspector(broken, torch.randn(2, 3, 28, 28))
"""

EVIL_CELL = "ModelInspector(Evil(), torch.randn(2, 4))\n"

# Records, for every tree that appears, when its rows were first in the page (after the next frame).
WATCH_TREES = """
window.__lsTrees = [];
new MutationObserver(() => {
  for (const tree of document.querySelectorAll(".layerscope-tree:not([data-ls-seen])")) {
    const first = tree.querySelector(".ls-row");
    if (!first) continue;
    tree.setAttribute("data-ls-seen", "1");
    const rows = tree.querySelectorAll(".ls-row").length;
    const type = first.querySelector(".ls-type").textContent;
    requestAnimationFrame(() => setTimeout(() => window.__lsTrees.push({type, rows, t: Date.now()}), 0));
  }
}).observe(document, {childList: true, subtree: true});
"""

# Clicks a row of the inspector and resolves with the milliseconds until its new histogram has loaded.
CLICK_TO_HISTOGRAM = """
(inspector, name) => new Promise((resolve, reject) => {
  const img = inspector.querySelector("img.ls-histogram");
  const before = img.src;
  const row = [...inspector.querySelectorAll(".ls-row")].find((r) => r.dataset.name === name);
  const t0 = performance.now();
  row.click();
  const check = () => {
    if (img.src !== before && img.complete && img.naturalWidth > 0) resolve(performance.now() - t0);
    else if (performance.now() - t0 > 20000) reject(new Error("the histogram did not change"));
    else requestAnimationFrame(check);
  };
  check();
})
"""


def notebook(*cells: str) -> str:
    return json.dumps({
        "cells": [{"cell_type": "code", "execution_count": None, "id": f"c{i}", "metadata": {}, "outputs": [],
                   "source": source} for i, source in enumerate(cells)],
        "metadata": {"kernelspec": {"display_name": "Python 3", "language": "python", "name": "python3"}},
        "nbformat": 4,
        "nbformat_minor": 5,
    })


class Monitor:
    """Collects what must not happen on a page: console errors, page errors, failed or foreign requests."""

    def __init__(self, page, server: JupyterServer, noise: tuple[str, ...] = ()):
        self.problems: list[str] = []
        self.noise = noise
        self.host = urlparse(server.url).netloc
        page.on("console", lambda m: m.type == "error" and self._add(f"console error: {m.text}"))
        page.on("pageerror", lambda e: self._add(f"page error: {e}"))
        page.on("dialog", lambda d: (self._add(f"dialog opened: {d.message}"), d.dismiss()))
        page.on("response", lambda r: r.status >= 400 and self._add(f"HTTP {r.status}: {r.url}"))
        page.on("request", lambda r: self._check_url(r.url))
        page.on("websocket", lambda ws: self._check_url(ws.url))

    def _check_url(self, url: str) -> None:
        parts = urlparse(url)
        if parts.scheme not in ("blob", "data") and parts.netloc != self.host:
            self._add(f"request leaving 127.0.0.1: {url}")

    def _add(self, problem: str) -> None:
        if not any(n in problem for n in self.noise):
            self.problems.append(problem)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # `make test` installs it: in CI a missing browser is a failure, not a skip
            pytest.fail("needs Debian's chromium at /usr/bin/chromium")
        pytest.skip("needs Debian's chromium at /usr/bin/chromium (make test installs it)")
    srv = JupyterServer(tmp_path_factory.mktemp("jupyter")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=[
            "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
            "--disable-background-networking", "--disable-component-update", "--disable-sync"])
        yield chromium
        chromium.close()


def open_and_run(browser, server: JupyterServer, path: str, noise: tuple[str, ...] = (), wait: bool = True):
    """Open a notebook and run all its cells; with ``wait``, return once they have all run."""
    context = browser.new_context(viewport={"width": 1500, "height": 1100})
    context.add_init_script(WATCH_TREES)
    page = context.new_page()
    monitor = Monitor(page, server, noise)
    page.goto(server.page_url(path))
    page.wait_for_function(
        "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
        " return k && k.status === 'idle'; }", timeout=60_000)
    if "lab/" in path:
        page.evaluate("window.jupyterapp.shell.collapseLeft()")  # room for the inspector
    run_all = "window.jupyterapp.commands.execute('notebook:run-all-cells')"  # its promise ends with the last cell
    page.evaluate(run_all if wait else f"() => {{ {run_all}; }}")
    return page, monitor


def inspector_with(page, name: str):
    """The inspector whose tree shows a row named ``name``, once its cell has run (fails at once on a
    cell error rather than waiting for the timeout)."""
    inspector = page.locator(".layerscope-inspector").filter(has=page.locator(f'.ls-row[data-name="{name}"]'))
    errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
    expect(inspector.or_(errors).first).to_be_attached(timeout=CELL_TIMEOUT)
    assert errors.count() == 0, errors.first.inner_text()
    index = page.locator(".layerscope-inspector").evaluate_all(
        "(all, name) => all.findIndex((el) =>"
        " [...el.querySelectorAll('.ls-row')].some((r) => r.dataset.name === name))",
        name)
    return page.locator(".layerscope-inspector").nth(index)  # stays the same inspector when rows are filtered


def row(inspector, name: str):
    return inspector.locator(f'.ls-row[data-name="{name}"]')


def tab(inspector, title: str):
    return inspector.locator(".lm-TabBar-tab", has_text=title)


def visible_image(inspector, cls: str):
    image = inspector.locator(f"img.{cls}")
    expect(image).to_be_visible()
    image.page.wait_for_function("img => img.complete && img.naturalWidth > 0", arg=image.element_handle())
    return image


def timings(page) -> dict[str, float]:
    """Milliseconds from the end of each timed capture (printed by the cell) to its tree in the page."""
    captured = {m.group(1): float(m.group(2)) for m in re.finditer(r"LS-TIMING (\w+) (\d+)", page.content())}
    seen = page.evaluate("window.__lsTrees")
    kinds = {"squeezenet": "SqueezeNet", "stack": "Sequential"}
    out = {}
    for label, t in captured.items():
        first = [s["t"] for s in seen if s["type"] == kinds[label]]
        out[label] = min(first) - t
    return out


def expected_for_squeezenet():
    from torchvision.models import squeezenet1_1

    torch.manual_seed(0)
    model = squeezenet1_1(weights=None).eval()
    module = model.get_submodule("features.3.expand3x3")
    shapes = []
    handle = module.register_forward_hook(lambda m, i, o: shapes.append(tuple(o.shape)))
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    handle.remove()
    params = sum(p.numel() for p in module.parameters())
    names = [n for n, _ in model.named_modules()]
    return model, params, shapes[0], names


def ancestors(name: str) -> list[str]:
    """'features.3.squeeze' -> ['', 'features', 'features.3']."""
    parts = name.split(".") if name else []
    return [".".join(parts[:i]) for i in range(len(parts))]


def shown(names: list[str], opened: set[str]) -> list[str]:
    """The rows a tree shows with the modules in ``opened`` expanded."""
    return [n for n in names if all(a in opened for a in ancestors(n))]


def search_result(names: list[str], query: str) -> list[str]:
    """The rows a tree shows for a query: every name that matches and the names above it."""
    keep = {k for n in names if query in n for k in (n, *ancestors(n))}
    return [n for n in names if n in keep]


def test_inspector_in_jupyterlab(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    model, params, out_shape, names = expected_for_squeezenet()
    assert params == 16 * 64 * 9 + 64  # Conv2d(16, 64, 3): the number we expect in the header
    assert text.count(params) == f"{params:,}"
    (server.root / "inspector.ipynb").write_text(
        notebook(SETUP.format(evil=EVIL), SQUEEZENET, STACK, BROKEN, EVIL_CELL))
    page, monitor = open_and_run(browser, server, "lab/tree/inspector.ipynb")

    squeeze = inspector_with(page, "classifier")
    # top-level blocks are open at once: features and classifier, not yet their children
    expect(row(squeeze, "features")).to_be_visible()
    expect(row(squeeze, "classifier")).to_be_visible()
    expect(row(squeeze, "features.3")).to_have_count(0)
    expect(page.locator(".layerscope-inspector")).to_have_count(4, timeout=CELL_TIMEOUT)
    page.wait_for_function("() => window.__lsTrees.length >= 4")
    squeeze.scroll_into_view_if_needed()
    page.screenshot(path=ARTIFACTS / "lab-first-display.png")

    row(squeeze, "features").locator(".ls-toggle").click()
    expect(row(squeeze, "features.3")).to_be_visible()
    click_ms = [squeeze.evaluate(CLICK_TO_HISTOGRAM, name) for name in ("features.3", "features.3.expand3x3")]
    header = squeeze.locator(".ls-header")
    expect(header).to_contain_text("features.3.expand3x3")
    expect(header).to_contain_text(f"total {params:,}")
    expect(header).to_contain_text("cpu")
    expect(header).to_contain_text(f"→ {out_shape}")
    expect(row(squeeze, "features.3.expand3x3")).to_have_class(re.compile("ls-selected"))
    visible_image(squeeze, "ls-histogram")
    expect(squeeze.locator(".ls-stats")).to_contain_text("mean")
    squeeze.screenshot(path=ARTIFACTS / "lab-activations.png")

    tab(squeeze, "Feature maps").click()
    visible_image(squeeze, "ls-feature-maps")
    expect(squeeze).to_contain_text("channels 0–15 of 64")
    squeeze.screenshot(path=ARTIFACTS / "lab-feature-maps.png")

    tab(squeeze, "Explain").click()
    visible_image(squeeze, "ls-explain")
    expect(squeeze.locator(".ls-top5 tr")).to_have_count(5)
    squeeze.screenshot(path=ARTIFACTS / "lab-explain.png")
    tab(squeeze, "Activations").click()

    # search narrows the tree to the matches and what holds them; Escape brings the tree back
    search = squeeze.locator(".ls-search")
    search.fill("expand3x3")
    expected = search_result(names, "expand3x3")
    expect(squeeze.locator(".ls-row")).to_have_count(len(expected))
    assert squeeze.locator(".ls-row").evaluate_all("rows => rows.map(r => r.dataset.name)") == expected
    expect(squeeze.locator(".ls-tree-status")).to_contain_text(
        f"{sum('expand3x3' in n for n in names)} of {len(names)} modules match")
    squeeze.screenshot(path=ARTIFACTS / "lab-search.png")
    search.press("Escape")
    expect(squeeze.locator(".ls-row")).to_have_count(len(shown(names, {"", "features", "features.3"})))
    # keyboard: the cursor is on the selected row; down then Enter selects the next row
    squeeze.locator(".ls-rows").focus()
    page.keyboard.press("ArrowDown")
    page.keyboard.press("Enter")
    expect(header).to_contain_text("features.3.expand3x3_activation")

    # the 2,001-row tree keeps only the rows in view in the page, and scrolls to the last one
    stack = inspector_with(page, "0")
    assert stack.locator(".ls-row").count() < 100
    stack.locator(".ls-rows").evaluate("el => { el.scrollTop = el.scrollHeight; }")
    expect(row(stack, "1999")).to_be_visible()
    expect(stack.locator(".ls-tree-status")).to_have_text("2001 modules")

    broken = inspector_with(page, "head.1")
    expect(broken.locator(".ls-banner")).to_contain_text("head.1 (Linear, in_features=100)")
    expect(row(broken, "head.1")).to_have_class(re.compile("ls-selected"))
    expect(row(broken, "head.1")).to_have_class(re.compile("ls-marked"))
    expect(row(broken, "head.1")).not_to_have_class(re.compile("ls-uncalled"))  # its failed call is recorded
    expect(row(broken, "head.1").locator(".ls-badge-error")).to_have_text("1")
    expect(broken.locator(".ls-header")).to_contain_text("head.1")
    broken.screenshot(path=ARTIFACTS / "lab-broken.png")
    # the Findings tab: picking a finding selects its module
    row(broken, "").click()
    expect(broken.locator(".ls-header .ls-name")).to_have_text("(model)")
    tab(broken, "Findings").click()
    broken.get_by_role("listbox").select_option(index=0)
    expect(broken.locator(".ls-header .ls-name")).to_have_text("head.1")
    expect(row(broken, "head.1")).to_have_class(re.compile("ls-selected"))
    broken.screenshot(path=ARTIFACTS / "lab-findings.png")

    evil = inspector_with(page, "blocks")
    row(evil, "blocks").locator(".ls-toggle").click()
    evil_row = evil.locator(".ls-row").nth(2)
    expect(evil_row).to_have_attribute("data-name", f"blocks.{EVIL}")
    expect(evil_row.locator(".ls-label")).to_have_text(EVIL)
    evil_row.click()
    expect(evil.locator(".ls-header .ls-name")).to_have_text(f"blocks.{EVIL}")
    assert page.locator('img[src="x"]').count() == 0
    evil.screenshot(path=ARTIFACTS / "lab-evil.png")

    times = timings(page)
    print(f"\nLS timings (JupyterLab): capture end -> tree visible: squeezenet {times['squeezenet']:.0f} ms, "
          f"2,001-module stack {times['stack']:.0f} ms; click -> Activations rendered: "
          f"features.3 {click_ms[0]:.0f} ms, features.3.expand3x3 {click_ms[1]:.0f} ms")
    assert monitor.problems == []
    page.context.close()


def test_inspector_in_notebook7(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    _, params, out_shape, _ = expected_for_squeezenet()
    (server.root / "short.ipynb").write_text(notebook(SETUP.format(evil=EVIL), SQUEEZENET, EVIL_CELL))
    page, monitor = open_and_run(browser, server, "notebooks/short.ipynb", NOTEBOOK7_NOISE)
    squeeze = inspector_with(page, "classifier")
    row(squeeze, "features").locator(".ls-toggle").click()
    row(squeeze, "features.3").locator(".ls-toggle").click()
    row(squeeze, "features.3.expand3x3").click()
    expect(squeeze.locator(".ls-header")).to_contain_text(f"total {params:,}")
    expect(squeeze.locator(".ls-header")).to_contain_text(f"→ {out_shape}")
    visible_image(squeeze, "ls-histogram")
    expect(page.locator(".layerscope-inspector")).to_have_count(2, timeout=CELL_TIMEOUT)
    evil = inspector_with(page, "blocks")
    row(evil, "blocks").locator(".ls-toggle").click()
    expect(evil.locator(".ls-row").nth(2).locator(".ls-label")).to_have_text(EVIL)
    assert page.locator('img[src="x"]').count() == 0
    page.screenshot(path=ARTIFACTS / "notebook7.png", full_page=True)
    assert monitor.problems == []
    page.context.close()


def test_squeezenet_tour_notebook_in_jupyterlab(server, browser):
    """The shipped demo notebook, as a person opens it: every cell runs, its inspector answers a click."""
    ARTIFACTS.mkdir(exist_ok=True)
    source = Path(__file__).resolve().parent.parent / "notebooks" / "01_squeezenet_tour.ipynb"
    (server.root / source.name).write_text(source.read_text())
    from torchvision.models import squeezenet1_1

    model = squeezenet1_1(weights=None).eval()
    fire = model.get_submodule("features.4")
    params = sum(p.numel() for p in fire.parameters())
    seen = []
    handle = fire.register_forward_hook(lambda m, args, out: seen.append((tuple(args[0].shape), tuple(out.shape))))
    with torch.no_grad():
        model(torch.zeros(1, 3, 224, 224))  # the notebook's batch: one 224 x 224 crop of the photo
    handle.remove()
    page, monitor = open_and_run(browser, server, f"lab/tree/{source.name}")
    inspector = inspector_with(page, "classifier")
    header = inspector.locator(".ls-header")
    # wait for every code cell to have run (later cells select() modules themselves); read from the notebook's
    # model, since JupyterLab only renders the cells in view
    cells = "window.jupyterapp.shell.currentWidget.content.widgets.filter((c) => c.model.type === 'code')"
    errors = f"{cells}.flatMap((c) => c.model.outputs.toJSON()).filter((o) => o.output_type === 'error')"
    page.wait_for_function(f"() => {cells}.every((c) => c.model.executionCount !== null) || {errors}.length > 0",
                           timeout=CELL_TIMEOUT)
    assert page.evaluate(f"() => {errors}.map((o) => o.ename + ': ' + o.evalue)") == []
    row(inspector, "features.4").click()
    expect(header.locator(".ls-name")).to_have_text("features.4")
    expect(header).to_contain_text(f"total {params:,}")
    expect(header).to_contain_text(f"{seen[0][0]} → {seen[0][1]}")
    visible_image(inspector, "ls-histogram")
    inspector.screenshot(path=ARTIFACTS / "lab-tour-notebook.png")
    assert monitor.problems == []
    page.context.close()


def wait_for_rows(page, inspector, names: list[str]) -> None:
    """Until the tree shows exactly these rows, in this order."""
    page.wait_for_function(
        "([el, want]) => JSON.stringify([...el.querySelectorAll('.ls-row')].map(r => r.dataset.name)) === want",
        arg=[inspector.element_handle(), json.dumps(names, separators=(",", ":"))])


def sorted_rows(cap, key: str, opened: set[str]) -> list[str]:
    """The rows a tree sorted by ``key`` shows with ``opened`` expanded: children largest first."""
    out = []

    def visit(name: str) -> None:
        out.append(name)
        if name in opened:
            for child in sorted(cap[name].children, key=lambda c: -(getattr(cap[c], key) or 0)):
                visit(child)

    visit("")
    return out


def test_tree_number_column_bars_and_sort_in_jupyterlab(server, browser):
    import layerscope
    from layerscope.core.records import human, human_bytes

    ARTIFACTS.mkdir(exist_ok=True)
    model, _, _, _ = expected_for_squeezenet()
    cap = layerscope.capture(model, torch.randn(1, 3, 224, 224), costs=True)  # FLOPs and bytes need no weights
    (server.root / "costs.ipynb").write_text(notebook(SETUP.format(evil=EVIL), SQUEEZENET))
    page, monitor = open_and_run(browser, server, "lab/tree/costs.ipynb")
    squeeze = inspector_with(page, "classifier")
    features = row(squeeze, "features")
    expect(features.locator(".ls-params")).to_have_text(human(cap["features"].num_params))
    squeeze.locator(".ls-column").select_option("flops")
    expect(features.locator(".ls-params")).to_have_text(human(cap["features"].flops))
    expect(row(squeeze, "").locator(".ls-params")).to_have_text(human(cap.flops))
    fill = features.locator(".ls-bar-fill")
    expect(fill).to_be_visible()
    width = fill.evaluate("el => el.getBoundingClientRect().width / el.parentElement.getBoundingClientRect().width")
    assert width == pytest.approx(cap["features"].flops / cap.flops, abs=0.02) and width > 0.5
    features.locator(".ls-toggle").click()
    opened = {"", "features"}
    names = squeeze.locator(".ls-row").evaluate_all("rows => rows.map(r => r.dataset.name)")
    assert names == shown([n for n in cap.modules], opened)  # as defined until sorted
    squeeze.locator(".ls-sort").click()
    expect(squeeze.locator(".ls-sort")).to_have_attribute("aria-pressed", "true")
    expected = sorted_rows(cap, "flops", opened)
    assert expected != names
    expect(squeeze.locator(".ls-row").first).to_have_attribute("data-name", "")
    wait_for_rows(page, squeeze, expected)
    squeeze.screenshot(path=ARTIFACTS / "lab-tree-flops-sorted.png")
    squeeze.locator(".ls-column").select_option("memory")
    expect(features.locator(".ls-params")).to_have_text(human_bytes(cap["features"].activation_bytes))
    wait_for_rows(page, squeeze, sorted_rows(cap, "activation_bytes", opened))
    row(squeeze, "features.3").click()  # the header: own and total FLOPs, bytes, shares
    header = squeeze.locator(".ls-header")
    expect(header).to_contain_text(f"total {human(cap['features.3'].flops)}")
    expect(header).to_contain_text(f"activations {human_bytes(cap['features.3'].activation_bytes)}")
    tab(squeeze, "Cost").click()
    visible_image(squeeze, "ls-cost")
    expect(squeeze.locator(".ls-largest").first).to_contain_text("Most FLOPs")
    squeeze.screenshot(path=ARTIFACTS / "lab-cost.png")
    assert monitor.problems == []
    page.context.close()


LOADED_CELLS = (
    "from layerscope import ModelInspector, load\n",
    "ModelInspector(load('squeezenet.lsc'))\n",
    "ModelInspector(load('evil.lsc'))\n",
)


def test_inspector_on_loaded_captures_in_jupyterlab(server, browser):
    """Captures saved in this process and opened in the notebook's kernel: no model there, the records draw."""
    import layerscope
    from layerscope.core.records import human

    ARTIFACTS.mkdir(exist_ok=True)
    model, params, out_shape, names = expected_for_squeezenet()
    cap = layerscope.capture(model, torch.randn(1, 3, 224, 224))
    cap.save(server.root / "squeezenet.lsc")
    namespace: dict = {}
    exec(SETUP.format(evil=EVIL), namespace)  # the same Evil model as the live test, built here
    layerscope.capture(namespace["Evil"](), torch.randn(2, 4)).save(server.root / "evil.lsc")
    (server.root / "loaded.ipynb").write_text(notebook(*LOADED_CELLS))
    page, monitor = open_and_run(browser, server, "lab/tree/loaded.ipynb")

    squeeze = inspector_with(page, "classifier")
    expect(row(squeeze, "classifier").locator(".ls-params")).to_have_text(human(cap["classifier"].num_params))
    expect(squeeze.locator(".ls-column option[value=flops]")).to_be_disabled()  # saved without costs
    row(squeeze, "features").locator(".ls-toggle").click()
    row(squeeze, "features.3").locator(".ls-toggle").click()
    row(squeeze, "features.3.expand3x3").click()
    header = squeeze.locator(".ls-header")
    expect(header).to_contain_text(f"total {params:,}")
    expect(header).to_contain_text(f"→ {out_shape}")
    visible_image(squeeze, "ls-histogram")
    expect(squeeze.locator(".ls-stats")).to_contain_text(f"{cap['features.3.expand3x3'].calls[0].stats.mean:.6g}")
    tab(squeeze, "Feature maps").click()
    visible_image(squeeze, "ls-feature-maps")
    tab(squeeze, "Gradients").click()
    visible_image(squeeze, "ls-gradient-flow")
    tab(squeeze, "Explain").click()
    expect(squeeze).to_contain_text("no model to run")
    squeeze.screenshot(path=ARTIFACTS / "lab-loaded.png")

    loaded_evil = inspector_with(page, "blocks")
    row(loaded_evil, "blocks").locator(".ls-toggle").click()
    expect(loaded_evil.locator(".ls-row").nth(2).locator(".ls-label")).to_have_text(EVIL)
    assert page.locator('img[src="x"]').count() == 0
    assert monitor.problems == []
    page.context.close()


RUN_SETUP = """\
import time

import torch
import torch.nn.functional as F
from torch import nn

import layerscope

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
opt = torch.optim.SGD(model.parameters(), lr=0.1)
x, y = torch.randn(64, 16), torch.randint(0, 4, (64,))
run = layerscope.watch(model, opt, every=1)
layerscope.ModelInspector(run)
"""

RUN_TRAIN = """\
with run:
    for step in range(40):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        run.log(loss=loss)
        time.sleep(0.2)
print("LS-DONE", run.step_count)
"""

# The step the slider shows, and whether the training cell has printed that it is done.
READOUT = """
(inspector) => [inspector.querySelector('.ls-step .widget-readout')?.textContent?.trim(),
                [...document.querySelectorAll('.jp-OutputArea-output')].some((o) => o.innerText.includes('LS-DONE'))]
"""


def test_run_inspector_updates_while_the_training_cell_runs(server, browser):
    """Displayed before the loop, the inspector of a watched run shows new steps while the training cell still runs;
    afterwards its Over time tab answers a click in the tree."""
    ARTIFACTS.mkdir(exist_ok=True)
    (server.root / "watch.ipynb").write_text(notebook(RUN_SETUP, RUN_TRAIN))
    page, monitor = open_and_run(browser, server, "lab/tree/watch.ipynb", wait=False)
    inspector = inspector_with(page, "2")
    live = inspector.evaluate_handle("el => el")
    seen_live = page.wait_for_function(  # a step between the first and the last while the cell runs
        f"(el) => {{ const [step, done] = ({READOUT})(el); return !done && Number(step) >= 1 && Number(step) < 39"
        f" && Number(step); }}", arg=live, timeout=CELL_TIMEOUT).json_value()
    page.wait_for_function(
        f"(el) => {{ const img = el.querySelector('img.ls-over-time'); return !({READOUT})(el)[1] && img &&"
        f" img.complete && img.naturalWidth > 0; }}", arg=live, timeout=CELL_TIMEOUT)  # drawn while training
    inspector.screenshot(path=ARTIFACTS / "lab-run-live.png")
    expect(page.locator(".jp-OutputArea-output", has_text="LS-DONE 40")).to_be_visible(timeout=CELL_TIMEOUT)
    expect(inspector.locator(".ls-step .widget-readout")).to_have_text("39")
    assert 1 <= seen_live < 39
    visible_image(inspector, "ls-scalars")
    expect(tab(inspector, "Over time")).to_be_visible()
    before = visible_image(inspector, "ls-over-time").get_attribute("src")
    row(inspector, "1").click()
    expect(inspector.locator(".ls-header .ls-name")).to_have_text("1")
    page.wait_for_function("([img, before]) => img.src !== before && img.complete && img.naturalWidth > 0",
                           arg=[inspector.locator("img.ls-over-time").element_handle(), before])
    expect(inspector.locator(".ls-over-time")).to_be_visible()
    expect(inspector).to_contain_text("over the 40 sampled steps kept")
    inspector.screenshot(path=ARTIFACTS / "lab-run-over-time.png")
    tab(inspector, "Activations").click()
    visible_image(inspector, "ls-histogram")
    assert monitor.problems == []
    page.context.close()


# -- the inspector in a classroom: dark theme, a narrow window, fast clicks, a reopened notebook ------------------

# The contrast ratio (WCAG 2) of an element's text against what is behind it, from the computed colours: the
# text colour (alpha blended over the background) and the first ancestor background that is not transparent.
CONTRAST = """
(el) => {
  const probe = document.createElement("canvas").getContext("2d");
  const rgba = (css) => { // any CSS colour (rgb(), color(srgb ...) from color-mix) as [r, g, b, a] in 0..255
    probe.clearRect(0, 0, 1, 1);
    probe.fillStyle = "#000"; probe.fillStyle = css; probe.fillRect(0, 0, 1, 1);
    const [r, g, b, a] = probe.getImageData(0, 0, 1, 1).data;
    return [r, g, b, a / 255];
  };
  let node = el, back = null;
  while (node && node.nodeType === 1) {
    const c = rgba(getComputedStyle(node).backgroundColor);
    if (c[3] > 0.99) { back = c; break; }
    node = node.parentElement;
  }
  back = back || [255, 255, 255, 1];
  const fore = rgba(getComputedStyle(el).color);
  for (let up = el; up && up.nodeType === 1; up = up.parentElement) { // a dimmed row dims its text (conservative)
    fore[3] *= Number(getComputedStyle(up).opacity);
  }
  const mixed = fore.slice(0, 3).map((v, i) => v * fore[3] + back[i] * (1 - fore[3]));
  const lum = (c) => c.map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; })
    .reduce((s, v, i) => s + v * [0.2126, 0.7152, 0.0722][i], 0);
  const [hi, lo] = [lum(mixed), lum(back.slice(0, 3))].sort((a, b) => b - a);
  return {ratio: (hi + 0.05) / (lo + 0.05), fore: mixed, back: back.slice(0, 3)};
}
"""

CLIPPED_TABS = """
(inspector) => [...inspector.querySelectorAll(".lm-TabBar-tab")].map((tab) => {
  const label = tab.querySelector(".lm-TabBar-tabLabel");
  const box = tab.getBoundingClientRect(), outer = inspector.getBoundingClientRect();
  return [label.textContent, label.scrollWidth, label.clientWidth, box.right <= outer.right + 0.5];
})
"""

TWO_ITEMS = """\
torch.manual_seed(0)
pair = squeezenet1_1(weights=None).eval()
ModelInspector(pair, torch.randn(2, 3, 64, 64), target=torch.tensor([3, 7]))
"""


def open_page(browser, server: JupyterServer, path: str, width: int, run: bool = True, sidebar: bool = True):
    context = browser.new_context(viewport={"width": width, "height": 1000})
    page = context.new_page()
    monitor = Monitor(page, server)
    page.goto(server.page_url(path))
    page.wait_for_function(
        "() => { const w = window.jupyterapp && window.jupyterapp.shell.currentWidget;"
        " const k = w && w.sessionContext && w.sessionContext.session && w.sessionContext.session.kernel;"
        " return k && k.status === 'idle'; }", timeout=60_000)
    if sidebar:
        page.evaluate("window.jupyterapp.commands.execute('filebrowser:activate')")  # the file browser open
    if run:
        page.evaluate("window.jupyterapp.commands.execute('notebook:run-all-cells')")
    return page, monitor


def dark(page) -> None:
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Dark'})")
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'false'", timeout=30_000)
    page.wait_for_function("() => getComputedStyle(document.body).getPropertyValue('--jp-layout-color1')"
                           ".trim().toLowerCase() !== '#ffffff'")


def tabs_whole(inspector) -> list:
    """The tab titles that are clipped (wider than their label box) or run past the inspector."""
    return [t for t in inspector.evaluate(CLIPPED_TABS) if t[1] > t[2] or not t[3]]


def test_dark_theme_and_a_900_px_window_in_jupyterlab(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    (server.root / "classroom.ipynb").write_text(notebook(SETUP.format(evil=EVIL), SQUEEZENET, BROKEN, TWO_ITEMS))
    page, monitor = open_page(browser, server, "lab/tree/classroom.ipynb", 900)
    dark(page)
    broken = inspector_with(page, "head.1")
    squeeze = page.locator(".layerscope-inspector").nth(0)
    expect(page.locator(".layerscope-inspector")).to_have_count(3, timeout=CELL_TIMEOUT)
    pair = page.locator(".layerscope-inspector").nth(2)
    expect(row(pair, "classifier")).to_be_visible()

    banner = broken.locator(".ls-error-banner")
    expect(banner).to_be_visible()
    found = {"banner": banner.evaluate(CONTRAST),
             "selected row": row(broken, "head.1").locator(".ls-label").evaluate(CONTRAST)}
    row(squeeze, "features").click()
    found["selected row (plain)"] = row(squeeze, "features").locator(".ls-label").evaluate(CONTRAST)
    print("\nLS contrast (JupyterLab Dark, 900 px):", {k: round(v["ratio"], 2) for k, v in found.items()})
    for what, c in found.items():
        assert c["ratio"] >= 4.5, (what, c)
        assert sum(c["back"]) < 3 * 128, (what, c)  # a dark background in the dark theme, not a pale one
    broken.scroll_into_view_if_needed()
    broken.screenshot(path=ARTIFACTS / "lab-dark-900-broken.png")

    for inspector in (squeeze, broken, pair):
        assert tabs_whole(inspector) == []
        outer = inspector.evaluate("el => [el.getBoundingClientRect().width, el.parentElement.getBoundingClientRect()"
                                   ".width, el.scrollWidth, el.clientWidth]")
        assert outer[0] <= outer[1] + 0.5 and outer[2] <= outer[3] + 1, outer  # nothing runs past the cell
    tree, panel = (squeeze.locator(sel).evaluate("el => el.getBoundingClientRect().toJSON()")
                   for sel in (".layerscope-tree", ".ls-panel"))
    width = squeeze.evaluate("el => el.getBoundingClientRect().width")
    print(f"LS inspector width at a 900 px window with the file browser open: {width:.0f} px")
    if width <= 800:
        assert panel["top"] >= tree["bottom"] - 1  # stacked: the panel under the tree

    # Explain: the pickers start with a value; the true label shows
    row(pair, "features").locator(".ls-toggle").click()
    row(pair, "features.12").click()
    tab(pair, "Explain").click()
    visible_image(pair, "ls-explain")
    pickers = pair.locator(".widget-dropdown select").filter(visible=True)
    expect(pickers).to_have_count(2)  # Item and Class
    values = pickers.evaluate_all("ss => ss.map((s) => [s.selectedIndex, s.value])")
    assert len(values) >= 2 and all(i >= 0 for i, _ in values), values  # Item and Class, neither blank
    expect(pair.locator(".ls-truth")).to_contain_text("3")
    pair.scroll_into_view_if_needed()
    pair.screenshot(path=ARTIFACTS / "lab-dark-900-explain.png")
    tab(pair, "Summary").click()
    summary = pair.locator("pre.ls-summary")
    expect(summary).to_contain_text("Total mult-adds (M)")
    lines = summary.evaluate("el => [el.scrollHeight, parseFloat(getComputedStyle(el).lineHeight),"
                             " el.textContent.split('\\n').length, el.scrollWidth > el.clientWidth]")
    assert lines[3]  # scrolls sideways rather than wrapping
    pair.locator(".ls-summary").evaluate("el => el.scrollTop = 0")
    pair.screenshot(path=ARTIFACTS / "lab-dark-900-summary.png")
    assert monitor.problems == []
    page.context.close()

    page, monitor = open_page(browser, server, "lab/tree/classroom.ipynb", 1400, sidebar=False)
    page.evaluate("window.jupyterapp.commands.execute('apputils:change-theme', {theme: 'JupyterLab Light'})")
    page.wait_for_function("() => document.body.dataset.jpThemeLight === 'true'", timeout=30_000)
    squeeze = inspector_with(page, "classifier")
    expect(page.locator(".layerscope-inspector")).to_have_count(3, timeout=CELL_TIMEOUT)
    expect(row(page.locator(".layerscope-inspector").nth(2), "classifier")).to_be_visible()
    for inspector in page.locator(".layerscope-inspector").all():
        assert tabs_whole(inspector) == []
    light = {"banner": page.locator(".ls-error-banner").evaluate(CONTRAST),
             "selected row": row(squeeze, "").locator(".ls-label").evaluate(CONTRAST)}
    print("LS contrast (JupyterLab Light, 1400 px):", {k: round(v["ratio"], 2) for k, v in light.items()})
    assert all(c["ratio"] >= 4.5 for c in light.values()), light
    squeeze.screenshot(path=ARTIFACTS / "lab-light-1400.png")
    assert monitor.problems == []
    page.context.close()


def test_fast_clicks_are_never_lost_in_jupyterlab(server, browser):
    """Rows and tabs clicked faster than the kernel draws: each round ends on the Explain tab, which must show the
    last selected module's picture, every time."""
    ARTIFACTS.mkdir(exist_ok=True)
    (server.root / "clicks.ipynb").write_text(notebook(SETUP.format(evil=EVIL), SQUEEZENET))
    page, monitor = open_and_run(browser, server, "lab/tree/clicks.ipynb")
    squeeze = inspector_with(page, "classifier")
    row(squeeze, "features").locator(".ls-toggle").click()
    names = ["features.3", "features.9", "features.12", "features.5", "features.10"]
    note = squeeze.locator(".ls-note").filter(has_text="Grad-CAM at")
    for k in range(12):
        first, last = names[k % len(names)], names[(k + 2) % len(names)]
        for step in (first, "Explain", "Gradients", last, "Activations", "Explain"):  # no waiting in between
            (row(squeeze, step) if step.startswith("features") else tab(squeeze, step)).click(no_wait_after=True)
        # a lost click never arrives; a loaded machine only draws the queued panels slowly: wait generously
        expect(squeeze.locator(".ls-header .ls-name")).to_have_text(last, timeout=30_000)
        expect(tab(squeeze, "Explain")).to_have_class(re.compile("lm-mod-current"), timeout=30_000)
        visible_image(squeeze, "ls-explain")
        expect(note).to_contain_text(last if last != "features.5" else "Grad-CAM at", timeout=30_000)
    squeeze.screenshot(path=ARTIFACTS / "lab-fast-clicks.png")
    assert monitor.problems == []
    page.context.close()


def test_a_reopened_notebook_shows_the_static_view_in_jupyterlab(server, browser):
    ARTIFACTS.mkdir(exist_ok=True)
    (server.root / "reopen.ipynb").write_text(notebook(SETUP.format(evil=EVIL), BROKEN))
    page, monitor = open_page(browser, server, "lab/tree/reopen.ipynb", 1400, sidebar=False)
    live = inspector_with(page, "head.1")
    expect(live).to_be_visible()
    expect(page.locator(".layerscope-static")).to_be_hidden()  # in the page, hidden while the widget is live
    page.evaluate("window.jupyterapp.commands.execute('docmanager:save')")
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.context.model.dirty")
    page.evaluate("window.jupyterapp.shell.currentWidget.sessionContext.shutdown()")  # the widgets' models go
    page.wait_for_function("() => !window.jupyterapp.shell.currentWidget.sessionContext.session")
    assert monitor.problems == []
    page.context.close()
    saved = json.loads((server.root / "reopen.ipynb").read_text())
    assert "application/vnd.jupyter.widget-view+json" in json.dumps(saved["cells"][1]["outputs"])

    page, monitor = open_page(browser, server, "lab/tree/reopen.ipynb", 1400, run=False, sidebar=False)
    static = page.locator(".layerscope-static")
    expect(static).to_be_visible(timeout=30_000)
    expect(static).to_contain_text("Forward failed")
    expect(static.locator("code", has_text="head")).to_be_visible()
    error = page.get_by_text("Error displaying widget")
    expect(error).to_have_count(1, timeout=30_000)  # JupyterLab's message is in the page, hidden by the style
    expect(error).to_be_hidden()
    assert page.locator(".layerscope-inspector").count() == 0
    page.screenshot(path=ARTIFACTS / "lab-reopened.png")
    page.context.close()


FINDINGS_CELLS = (SETUP.format(evil=EVIL), BROKEN, """\
stack = nn.Sequential(*[nn.Linear(64, 64) for _ in range(12)])
for p in stack.parameters():
    nn.init.normal_(p, std=1.5)
exploding = ModelInspector(stack, torch.randn(8, 64))
exploding
""")


def test_failed_call_grouped_findings_and_fix_lines_in_jupyterlab(server, browser):
    """The module that raised shows its failed call and the input it got; nine-odd exploding layers are one finding
    listing them, badged on each; the finding's fix line is on the page; the Findings tab has its count."""
    ARTIFACTS.mkdir(exist_ok=True)
    (server.root / "findings.ipynb").write_text(notebook(*FINDINGS_CELLS))
    page, monitor = open_and_run(browser, server, "lab/tree/findings.ipynb")

    broken = inspector_with(page, "head")
    header = broken.locator(".ls-header")
    expect(header).to_contain_text("1 (failed)")
    expect(header).to_contain_text("(2, 1568) → failed")
    expect(broken.locator(".ls-failed-call")).to_contain_text("it received (2, 1568) (float32 on cpu)")
    assert "ls-uncalled" not in (row(broken, "head.1").get_attribute("class") or "")
    tab(broken, "Findings (1)").click()
    expect(broken.locator(".ls-fix")).to_contain_text("Try: ")
    broken.screenshot(path=ARTIFACTS / "lab-failed-call.png")

    stack = inspector_with(page, "11")
    tab(stack, "Findings").click()
    detail = stack.locator(".ls-finding-full")
    expect(detail).to_contain_text("exploding_grad")
    expect(detail).to_contain_text("more modules")
    expect(detail.locator(".ls-fix")).to_contain_text("Try: lower the initial weights")
    box, panel = detail.bounding_box(), stack.locator(".ls-panel").bounding_box()
    assert box["x"] + box["width"] <= panel["x"] + panel["width"] + 1  # wraps inside the panel
    listed = [o for o in stack.locator(".widget-select option").all_inner_texts() if "exploding" in o]
    assert len(listed) == 1 and "more" in listed[0]  # one finding for all of them
    badged = [n for n in map(str, range(12)) if row(stack, n).locator(".ls-badge-warning").count()]
    assert len(badged) >= 3 and "0" in badged
    stack.screenshot(path=ARTIFACTS / "lab-grouped-findings.png")
    assert monitor.problems == []
    page.context.close()

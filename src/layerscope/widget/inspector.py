"""``ModelInspector``: the module tree on the left, the selected module's panels on the right.

A thin controller: the capture engine and the explanation functions compute, ``layerscope.plots``
draws, and this class wires them to widgets. Only the visible tab is drawn, on demand, and every
figure, fetched output and Grad-CAM is cached until the next capture.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import threading
import time
from collections.abc import Mapping
from typing import Any

import ipywidgets as widgets
import torch
import traitlets
from torch import nn

from .. import plots
from ..core import Capture, Run, kinds
from ..core import capture as run_capture
from ..core.nested import first_float_tensor
from ..core.recorder import FEATURE_CHANNELS
from ..core.rerun import Rerun, cam_layer, input_size
from ..plots.cost import cost_parts
from . import rows, text
from .progress import Progress
from .steps import StepsBar, Throttle
from .tree import TreeWidget

TABS = ("Activations", "Feature maps", "Gradients", "Explain", "Cost", "Findings", "Summary")
ACTIVATIONS, FEATURE_MAPS, GRADIENTS, EXPLAIN, COST, FINDINGS, SUMMARY = range(len(TABS))  # of a capture's inspector
OVER_TIME = "Over time"  # a run's inspector has this tab first
PROGRESS_DELAY = 1.0  # seconds a capture may take before it shows a progress bar


def _image(cls: str) -> widgets.Image:
    image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", height="auto"))
    image.add_class(cls)
    return image


def _shown(widget: widgets.DOMWidget, visible: bool) -> None:
    widget.layout.display = None if visible else "none"


NEEDS_MODEL = "this capture has no model to run (it was loaded from a file, or is a step of a watched run)"
ALL_HEADS = -1  # the Head picker's value for "all heads" (None would show as a blank picker)
FIND_FROM = 20  # classes from which the Explain tab offers a search box
UNIFORM = 0.99  # predictions whose entropy is above this share of the most possible get a note (untrained model)


class ModelInspector(widgets.VBox):
    """Click through ``model`` as it ran on ``batch``: the module tree, and for the selected module its
    activations, feature maps, gradients, Grad-CAM or attention, the findings and the torchinfo summary.

    ``ModelInspector(capture)`` shows a Capture instead, e.g. one from ``layerscope.load``: every panel
    that records can draw; Grad-CAM, attention and feature-map pages past the stored sample need the
    model, and say so when the capture has none.

    ``ModelInspector(run)`` shows a watched run (``layerscope.watch``): the tree with the badges of the
    findings over time, the logged scalars over the steps with a step cursor, an "Over time" tab for the selected
    module, and the other tabs for the sampled step under the cursor. Displayed before the loop, it follows the
    run as it trains (at most a few updates a second).

    ``target``, ``loss_fn``, ``backward`` and ``costs`` go to ``layerscope.capture`` (the inspector counts FLOPs
    and activation memory by default: the tree can show them and the Cost tab draws where they go);
    ``class_names`` label predictions, ``mean``/``std`` un-normalise the image under Grad-CAM, ``tokens``
    label attention maps; or ``tokenizer`` (a Hugging Face tokenizer, or anything with ``convert_ids_to_tokens``
    or ``decode``) labels them with the decoded tokens of the batch's ``input_ids``, where a map is over those
    tokens.
    """

    selected = traitlets.Unicode("")

    def __init__(self, model: nn.Module | Capture | Run, batch: Any = None, *, target: Any = None, loss_fn=None,
                 class_names=None, mean=None, std=None, tokens=None, tokenizer=None, backward: bool = True,
                 costs: bool = True):
        self._given = model if isinstance(model, Capture) else None
        self._watched = model if isinstance(model, Run) else None
        if self._given is not None:
            model, batch = self._given.model, self._given.batch
        if self._watched is not None:
            model = batch = None  # the model has moved on since the sampled steps: nothing re-runs it
        self._step: int | None = None  # the sampled step under the cursor (a run only)
        self._model, self._batch, self._target, self._backward = model, batch, target, backward
        self._loss_fn, self._costs = loss_fn, costs
        self.class_names, self.mean, self.std, self.tokens = class_names, mean, std, tokens
        self.tokenizer = tokenizer
        # Events can arrive on more than one thread (ipykernel 7): one lock runs them one at a time, and "quiet"
        # (set while panels set their own controls, whose events are not user input) is per thread. A user's
        # event counts itself in _events before it waits for the lock, so a draw in progress knows that what it
        # drew is stale and the event draws again once it has the lock (it is never taken for the panel's own).
        self._lock, self._local = threading.RLock(), threading.local()
        self._events = 0
        self._displayed = False  # panels are drawn once a tree view says it is on a page
        self._drawn: dict[int, tuple] = {}
        self._figure = functools.lru_cache(maxsize=256)(self._draw_figure)
        self._rerun = Rerun(model, batch) if model is not None else None
        self.tree = TreeWidget(layout=widgets.Layout(width="38%", min_width="280px"))
        self._banner, self._header = widgets.HTML(), widgets.HTML()
        self._banner.add_class("ls-banner")
        self._header.add_class("ls-header")
        self._tabs = widgets.Tab(layout=widgets.Layout(min_height="420px"))
        self._build_tabs()
        right = widgets.VBox([self._header, self._tabs], layout=widgets.Layout(flex="1", min_width="0"))
        right.add_class("ls-panel")
        body = widgets.HBox([self.tree, right], layout=widgets.Layout(width="100%"))
        body.add_class("ls-body")  # tree.css lays it out as a column when the inspector is narrow
        self._steps = StepsBar() if self._watched is not None else None
        super().__init__([self._banner, *([self._steps] if self._steps else []), body])
        self.add_class("layerscope-inspector")
        self._run()
        self.tree.observe(self._count, "selected")  # a click in the tree: counted before the link passes it on
        traitlets.link((self.tree, "selected"), (self, "selected"))
        self.observe(self._on_selected, "selected")
        self._tabs.observe(self._on_input, "selected_index")
        self.tree.on_msg(self._on_tree_message)
        self._select_initial()
        if self._watched is not None:
            self._throttle = Throttle()
            self._steps.slider.observe(self._on_step_chosen, "value")
            self._watched.on_step(self._on_run_step)

    # -- public -------------------------------------------------------------------------------------

    @property
    def capture(self):
        """The Capture on show (for a run: the sampled step under the cursor)."""
        return self._cap

    @property
    def step(self) -> int | None:
        """The sampled step under the cursor (a run only; None before the first sampled step)."""
        return self._step

    def show_step(self, step: int) -> None:
        """Move the cursor to the sampled step nearest ``step`` (a run only)."""
        if self._watched is None:
            raise ValueError("show_step() is for an inspector of a watched run")
        steps = self._watched.steps
        if not len(steps):
            raise ValueError("the run has no sampled step yet")
        self._steps.follow = False
        self._steps.slider.value = int(steps[abs(steps - step).argmin()])

    def select(self, name: str) -> None:
        """Select module ``name`` (a ``named_modules()`` name; "" is the model itself)."""
        if name not in self._cap.modules:
            raise KeyError(f"the model has no module named {name!r}")
        self.selected = name

    def refresh(self, batch: Any = None) -> None:
        """Capture again, on ``batch`` if given (else on the same batch), keeping the selection on the same module
        (by what it is: after a layer was inserted before it, it is selected under its new name). The inspector
        then shows the new capture; to keep the old one on the page too, make a new ModelInspector instead. A
        run's inspector shows the run's steps so far."""
        if self._watched is not None:
            with self._lock:
                self._refresh_run(done=True)
            return
        if self._model is None:
            raise ValueError(f"refresh() needs a model: {NEEDS_MODEL}")
        with self._lock:
            selected = self._modules.get(self.selected)
            if batch is not None:
                self._batch = batch
                self._rerun = Rerun(self._model, batch)
            self._given = None
            self._forget()
            self._run()
            names = {id(m): n for n, m in self._modules.items()}
            self._select_initial(keep=names.get(id(selected), self.selected))

    def save_html(self, path) -> None:
        """Write what the inspector shows to one self-contained HTML file that works with no kernel and no
        network (see ``Capture.save_html``), with the Grad-CAMs it computed at the automatically chosen layer."""
        from ..report import pictures, save_html

        cams = {target: result for (layer, target), result in self._rerun.computed_cams().items()
                if layer is None} if self._rerun is not None else {}
        explain = pictures.explain(cams, self._image_input(), self._logits(), mean=self.mean, std=self.std,
                                   class_names=self.class_names) if cams else None
        save_html(self._cap, path, explain=explain)

    def _ipython_display_(self) -> None:
        """Two outputs: the widget, then the tree and the findings as static HTML for every place the widget
        cannot be drawn: a saved notebook reopened in JupyterLab or Notebook 7 (whose widget output would say
        "Error displaying widget: model not found": the static output's style hides that output and shows itself,
        while a live inspector above it hides it), GitHub and nbviewer (which show the HTML)."""
        from IPython.display import display

        from ..report import notebook_fallback

        if self._watched is not None:
            # displayed before the training cell: while that cell runs the kernel reads no message from the page
            # (not even the tree's "shown"), so a run's inspector draws its panels from now on
            self._displayed = True
        display(super()._repr_mimebundle_(), raw=True)
        display({"text/html": notebook_fallback(self._cap), "text/plain": ""}, raw=True)

    def close(self) -> None:
        """Close every widget of the inspector (layouts included) and drop the cached pictures."""
        self._forget()
        for widget in [*self._descendants(), self]:
            for part in (getattr(widget, "layout", None), getattr(widget, "style", None)):
                if isinstance(part, widgets.Widget):
                    part.close()
            if widget is not self:
                widget.close()
        super().close()

    def _forget(self) -> None:
        self._figure.cache_clear()
        if self._rerun is not None:
            self._rerun.forget()

    def __repr__(self) -> str:
        cap = getattr(self, "_cap", None)
        size = f"{len(cap.modules)} modules" if cap is not None else "no capture"
        failed = ", failed" if cap is not None and cap.error is not None else ""
        what = type(self._model).__name__ if self._model is not None else "loaded capture"
        if self._watched is not None:
            what, failed = "run", f", step {self._step}"
        return f"ModelInspector({what}, {size}{failed}, selected={self.selected!r})"

    # -- capture ------------------------------------------------------------------------------------

    def _run(self) -> None:
        if self._watched is not None:
            steps = self._watched.steps
            self._step = int(steps[-1]) if len(steps) else None
            self._cap = self._step_capture()
            self._steps.set_steps([int(s) for s in steps], self._step)
            self._steps.describe(self._watched)
        elif self._given is not None:
            self._cap = self._given
        else:
            self._capture()
        # the modules by name as they were captured: refresh() follows the selected one to its new name
        self._modules = dict(kinds.unwrap(self._model)[0].named_modules()) if self._model is not None else {}
        self._captured_at = time.time()  # when the capture ended (the browser test times the tree from here)
        cap = self._cap
        self._banner.value = text.error(cap.error) if cap.error is not None else ""
        _shown(self._banner, cap.error is not None)
        self.tree.marked = cap.error.module if cap.error is not None else None
        self.tree.rows = rows.tree_rows(cap, self._all_findings())
        self._list_findings()
        with self._quietly():
            self._ex_class.options = []
        self._ex_class_item = None
        self._drawn.clear()

    def _capture(self) -> None:
        modules = sum(1 for _ in kinds.unwrap(self._model)[0].named_modules())
        progress = Progress(modules, self._backward, PROGRESS_DELAY)
        try:
            self._cap = run_capture(self._model, self._batch, target=self._target, loss_fn=self._loss_fn,
                                    backward=self._backward, costs=self._costs, progress=progress)
        finally:
            progress.close()

    def _select_initial(self, keep: str | None = None) -> None:
        name, self.tree.expanded = rows.start(self._cap, keep)  # the ancestors are open; the root always is
        if self.selected == name:
            self._on_selected()
        else:
            self.selected = name

    # -- layout -------------------------------------------------------------------------------------

    def _build_tabs(self) -> None:
        small = lambda width: widgets.Layout(width=width)
        self._call = widgets.Dropdown(description="Call", layout=small("180px"))
        self._hist, self._stats = _image("ls-histogram"), widgets.HTML()
        activations = widgets.VBox([self._call, self._hist, self._stats])

        self._fm_note, self._fm_image = widgets.HTML(), _image("ls-feature-maps")
        self._fm_item = widgets.Dropdown(description="Item", layout=small("160px"))
        self._fm_prev = widgets.Button(description="◀", tooltip="previous channels", layout=small("36px"))
        self._fm_next = widgets.Button(description="▶", tooltip="next channels", layout=small("36px"))
        self._fm_page = 0
        self._fm_prev.on_click(lambda _: self._page(-1))
        self._fm_next.on_click(lambda _: self._page(1))
        self._fm_controls = widgets.HBox([self._fm_item, self._fm_prev, self._fm_next, self._fm_note])
        feature_maps = widgets.VBox([self._fm_controls, self._fm_image])

        self._grad_text, self._grad_image = widgets.HTML(), _image("ls-gradient-flow")
        gradients = widgets.VBox([self._grad_text, self._grad_image])

        self._ex_note, self._ex_image, self._ex_top = widgets.HTML(), _image("ls-explain"), widgets.HTML()
        self._ex_item = widgets.Dropdown(description="Item", layout=small("160px"))
        self._ex_class = widgets.Dropdown(description="Class", layout=small("300px"))
        self._ex_head = widgets.Dropdown(description="Head", layout=small("200px"))
        self._ex_find = widgets.Combobox(placeholder="Find a class", ensure_option=True, layout=small("220px"))
        self._ex_find.observe(self._on_find, "value")
        self._ex_class_item = None  # the item whose top prediction the Class picker was set to
        self._ex_controls = widgets.HBox([self._ex_item, self._ex_class, self._ex_find, self._ex_head],
                                         layout=widgets.Layout(flex_flow="row wrap"))
        explain = widgets.VBox([self._ex_note, self._ex_controls, self._ex_image, self._ex_top])

        for control in (self._call, self._fm_item, self._ex_item, self._ex_class, self._ex_head):
            control.observe(self._on_input, "value")
        self._cost_note, self._cost_image, self._cost_table = widgets.HTML(), _image("ls-cost"), widgets.HTML()
        cost = widgets.VBox([self._cost_note, self._cost_image, self._cost_table])
        self._findings_note, self._finding_detail, self._summary = widgets.HTML(), widgets.HTML(), widgets.HTML()
        self._summary.add_class("ls-summary-box")  # as wide as the panel: the table scrolls inside it
        self._findings = widgets.Select(rows=14, layout=widgets.Layout(width="100%"))
        self._findings.observe(self._on_finding, "value")
        findings = widgets.VBox([self._findings_note, self._findings, self._finding_detail])
        self._over_note, self._over_image = widgets.HTML(), _image("ls-over-time")
        over_time = widgets.VBox([self._over_note, self._over_image])
        pages = [activations, feature_maps, gradients, explain, cost, findings, self._summary]
        self._titles = ((OVER_TIME,) if self._watched is not None else ()) + TABS
        self._tabs.children = ([over_time] if self._watched is not None else []) + pages
        self._tabs.titles = self._titles

    def tab_index(self, title: str) -> int:
        """The position of the tab called ``title`` ("Over time" comes first for a run)."""
        return self._titles.index(title)

    def _descendants(self):
        stack = [self]
        while stack:
            for child in getattr(stack.pop(), "children", ()):
                stack.append(child)
                yield child

    # -- events -------------------------------------------------------------------------------------

    @property
    def _quiet(self) -> bool:
        return getattr(self._local, "quiet", False)

    @contextlib.contextmanager
    def _quietly(self):
        quiet, self._local.quiet = self._quiet, True
        try:
            yield
        finally:
            self._local.quiet = quiet

    def _count(self, change=None) -> None:
        if not self._quiet:
            self._events += 1

    def _on_input(self, change=None) -> None:
        if not self._quiet:
            self._events += 1  # before the lock: a draw running on another thread will not record its state
            with self._lock:
                self._draw()

    def _on_tree_message(self, tree, content, buffers) -> None:
        if content.get("event") == "shown":
            with self._lock:
                self._displayed = True
                if self._watched is not None:
                    self._draw_scalars()
                self._draw()

    def _on_selected(self, change=None) -> None:
        self._count()  # select() from code, or the tree (counted twice then: only a change in the count matters)
        with self._lock:
            report = self._cap[self.selected]
            with self._quietly():
                self._call.options = [(f"{i + 1} of {len(report.calls)}", i) for i in range(len(report.calls))]
                self._call.value = 0 if report.calls else None
            _shown(self._call, len(report.calls) > 1)
            self._fm_page = 0
            self._draw()

    def _page(self, step: int) -> None:
        with self._lock:
            self._fm_page += step
            self._draw()

    def _state(self, tab: int) -> tuple:
        """What a tab's content depends on: it is redrawn only when this changes."""
        title = self._titles[tab]
        if title in ("Findings", "Summary"):
            return (id(self._cap),)
        if title == OVER_TIME:
            return (self._watched._version, self.selected, self._step)
        base = (id(self._cap), self.selected, self._call.value)
        if title == "Feature maps":
            return base + (self._fm_item.value, self._fm_page)
        if title == "Explain":
            return base + (self._ex_item.value, self._ex_class.value, self._ex_head.value)
        if title == "Cost":
            return (id(self._cap), self.selected)
        return base

    def _draw(self) -> None:
        """Draw the header and, once on a page, the visible tab for the current state (if not drawn yet)."""
        report, call = self._report_call()
        self._header.value = text.header(report, call, self._cap)
        tab = self._tabs.selected_index or 0
        if not self._displayed or self._drawn.get(tab) == self._state(tab):
            return
        panels = {"Activations": self._activations, "Feature maps": self._feature_maps, "Gradients": self._gradients,
                  "Explain": self._explain, "Cost": self._cost, "Findings": lambda: None, "Summary": self._summary_tab,
                  OVER_TIME: self._over_time}
        events = self._events
        with self._quietly():
            panels[self._titles[tab]]()
        # the state after the panel set its own controls; not recorded when a user's event came in meanwhile (its
        # control may already hold the new value the panel did not draw): that event then draws again
        self._drawn[tab] = self._state(tab) if self._events == events else None

    def _report_call(self):
        report = self._cap[self.selected]
        index = self._call.value or 0
        return report, report.calls[index] if index < len(report.calls) else None

    # -- panels -------------------------------------------------------------------------------------

    def _draw_figure(self, step: int | None, kind: str, name: str, *key) -> bytes:
        """PNG bytes of one figure (cached: revisiting a module or a page costs nothing); ``step`` is the sampled
        step a run's figure is of, so that each step has its own."""
        return text.png(self._make_figure(kind, name, *key))

    def _make_figure(self, kind: str, name: str, *key):
        if kind == "over_time":
            return plots.module_over_time(self._watched, name, step=self._step)
        if kind == "scalars":
            return plots.scalars_over_time(self._watched, step=self._step)
        report = self._cap[name]
        if kind == "histogram":
            return plots.activation_histogram(report.calls[key[0]])
        if kind == "feature_maps":
            call, item, page = key
            record = report.calls[call]
            if (item, page) != (0, 0):
                record = dataclasses.replace(record, feature_maps=self._rerun.feature_maps(name, call, item, page))
            fig = plots.feature_maps(record, max_channels=FEATURE_CHANNELS)
            first = page * FEATURE_CHANNELS
            fig.axes[0].set_title(f"Channels {first}–{first + len(record.feature_maps) - 1} of "
                                  f"{record.output_shapes[1]}, item {item}", loc="left", fontsize=10)
            return fig
        if kind == "gradient_flow":
            return plots.gradient_flow(self._cap, highlight=name)
        if kind == "cost":
            return plots.cost_breakdown(self._cap, name)
        if kind == "cam":
            layer, cls, item = key
            heatmap = self._rerun.grad_cam(layer, cls).heatmap[item]
            return plots.cam_overlay(self._image_input()[item], heatmap, mean=self.mean, std=self.std)
        if kind == "attention":
            call, item, head = key
            weights = self._attention_for(name, call)
            return plots.attention_heatmap(weights[item], tokens=self._tokens(item, weights.shape[-2:]), head=head)
        raise ValueError(f"unknown figure kind {kind!r}")

    def _show(self, image: widgets.Image, *key) -> None:
        image.value = self._figure(self._step, *key)
        _shown(image, True)

    def _activations(self) -> None:
        report, call = self._report_call()
        _shown(self._hist, call is not None)
        if call is None:
            self._stats.value = text.note("This module was never called in this pass.")
            return
        if call.failed:
            _shown(self._hist, False)
            self._stats.value = text.failed_call(call, self._cap.error)
            return
        self._show(self._hist, "histogram", report.name, self._call.value)
        self._stats.value = text.stats(call)

    def _feature_maps(self) -> None:
        report, call = self._report_call()
        spatial = call is not None and call.has_maps
        for control in (self._fm_item, self._fm_prev, self._fm_next):
            _shown(control, spatial)
        _shown(self._fm_image, spatial)
        if not spatial:
            shape = call.output_shapes if call is not None else None
            kept = self._watched is None or not (isinstance(shape, tuple) and len(shape) == 4)
            self._fm_note.value = text.note("This module has no spatial (N, C, H, W) output to show." if kept else
                                            "A watched run keeps no feature maps of its steps: capture() one batch "
                                            "to see them.")
            return
        n, channels = call.output_shapes[:2]
        pages = math.ceil(channels / FEATURE_CHANNELS)
        self._fm_page = min(max(self._fm_page, 0), pages - 1)
        item = self._item(self._fm_item, n)
        self._fm_prev.disabled, self._fm_next.disabled = self._fm_page == 0, self._fm_page == pages - 1
        first = self._fm_page * FEATURE_CHANNELS
        last = min(first + FEATURE_CHANNELS, channels) - 1
        self._fm_note.value = text.note(f"channels {first}–{last} of {channels}")
        if self._rerun is None and (item, self._fm_page) != (0, 0):
            _shown(self._fm_image, False)
            self._fm_note.value = text.note(f"Only channels 0–{len(call.feature_maps) - 1} of item 0 were stored; "
                                            f"the others need the model, and {NEEDS_MODEL}.")
            return
        try:
            self._show(self._fm_image, "feature_maps", report.name, self._call.value, item, self._fm_page)
        except Exception as exc:  # noqa: BLE001 - e.g. the model fails on the re-run: say why in the panel
            _shown(self._fm_image, False)
            self._fm_note.value = text.note(f"Could not fetch these channels: {exc}", "ls-note ls-warn")

    def _gradients(self) -> None:
        report, call = self._report_call()
        loss = text.loss_note(self._cap)
        self._grad_text.value = (text.note(loss, "ls-note ls-loss") if loss else "") + \
            text.gradients(report, call, self._cap.backward, self._cap)
        _shown(self._grad_image, self._cap.backward)
        if self._cap.backward:
            self._show(self._grad_image, "gradient_flow", report.name)

    def _explain(self) -> None:
        name = self.selected
        self._ex_top.value = ""
        if self._rerun is None:
            for widget in (self._ex_controls, self._ex_image):
                _shown(widget, False)
            self._ex_note.value = text.note(f"Grad-CAM and attention run the model again, and {NEEDS_MODEL}.")
            return
        try:
            weights = self._attention_for(name, self._call.value or 0)
            _shown(self._ex_head, weights is not None)
            _shown(self._ex_class, weights is None)
            _shown(self._ex_find, weights is None and len(self._ex_class.options) > FIND_FROM)
            if weights is not None:
                self._explain_attention(name, weights)
            else:
                self._explain_cam(name)
        except Exception as exc:  # noqa: BLE001 - e.g. a layer Grad-CAM cannot use: say why in the panel
            _shown(self._ex_image, False)
            self._ex_note.value = text.note(f"Cannot explain {text.display_name(name)}: {exc}", "ls-note ls-warn")

    def _explain_cam(self, name: str) -> None:
        image, logits = self._image_input(), self._logits()
        ok = image is not None and logits is not None and self._cap.error is None
        _shown(self._ex_controls, ok)
        _shown(self._ex_image, ok)
        if not ok:
            inside = self._attention_inside(name)
            if inside:
                self._ex_note.value = text.note(
                    f"{text.display_name(name)} holds attention layers: select one to see its weights "
                    f"({', '.join(inside[:6])}{', ...' if len(inside) > 6 else ''}).")
                return
            why = "the model failed" if self._cap.error is not None else \
                "it needs an image batch (N, C, H, W) as input and class scores (N, classes) as output"
            self._ex_note.value = text.note(f"No Grad-CAM here: {why}.")
            return
        item = self._item(self._ex_item, len(image))
        probs = torch.softmax(logits[item].double(), dim=0)
        top = torch.topk(probs, min(5, len(probs)))
        if len(self._ex_class.options) != len(probs):
            self._ex_class.options = [(text.class_label(i, self.class_names), i) for i in range(len(probs))]
            self._ex_find.options = [label for label, _ in self._ex_class.options]
            _shown(self._ex_find, len(probs) > FIND_FROM)
        if self._ex_class_item != item:  # a new item: explain its own top prediction
            self._ex_class.value, self._ex_class_item = int(top.indices[0]), item
        spread = float(-(probs * probs.clamp_min(1e-300).log()).sum() / math.log(len(probs))) if len(probs) > 1 else 0
        self._ex_top.value = text.predictions(zip(top.indices.tolist(), top.values.tolist()), self.class_names,
                                              truth=self._true_label(item), uniform=spread > UNIFORM)
        _, call = self._report_call()
        layer = name if cam_layer(call, len(image), input_size(self._batch)) else None
        cls = self._ex_class.value
        self._show(self._ex_image, "cam", name, layer, cls, item)
        where = f"Grad-CAM at {text.display_name(self._rerun.grad_cam(layer, cls).layer)}"
        if layer is None:
            where += f", the layer chosen automatically ({text.display_name(name)} has no spatial output)"
        self._ex_note.value = text.note(f"{where}, for class {text.class_label(cls, self.class_names)}")

    def _explain_attention(self, name: str, weights: torch.Tensor) -> None:
        n, heads = weights.shape[:2]
        _shown(self._ex_controls, True)
        item = self._item(self._ex_item, n)
        options = [("all", ALL_HEADS)] + [(str(h), h) for h in range(heads)]
        if list(self._ex_head.options) != options:
            self._ex_head.options = options
        if self._ex_head.value is None:
            self._ex_head.value = ALL_HEADS
        self._ex_note.value = text.note(f"Attention weights of {name}, item {item}")
        head = None if self._ex_head.value == ALL_HEADS else self._ex_head.value
        self._show(self._ex_image, "attention", name, self._call.value, item, head)

    def _cost(self) -> None:
        counted = self._cap.flops is not None
        _shown(self._cost_image, counted)
        if not counted:
            how = "capture(model, batch, costs=True) counts them"
            watched = self._watched is not None
            why = f"a watched run adds no counting to training steps; {how} for one pass" if watched else how
            self._cost_note.value = text.note(f"FLOPs and activation memory were not counted in this capture: {why}.")
            self._cost_table.value = ""
            return
        parent, _ = cost_parts(self._cap, self.selected)
        estimate = " Estimates from shapes (meta device)." if self._cap.meta else ""
        self._cost_note.value = text.note(f"Where the forward FLOPs and the memory saved for the backward of "
                                          f"{text.display_name(parent)} go, by submodule.{estimate}")
        self._show(self._cost_image, "cost", self.selected)
        self._cost_table.value = text.largest(self._cap)

    def _summary_tab(self) -> None:
        self._summary.value = text.summary(self._cap)

    def _over_time(self) -> None:
        run, name = self._watched, self.selected
        has = bool(run.records)
        _shown(self._over_image, has)
        if not has:
            self._over_note.value = text.note("No sampled step yet: the pictures come with the first step.")
            return
        self._over_note.value = text.note(f"{text.display_name(name)} over the {len(run.records)} sampled steps kept "
                                          f"(its first call in each); the red line is step {self._step}.")
        self._show(self._over_image, "over_time", name, run._version)

    # -- a watched run ------------------------------------------------------------------------------

    def _step_capture(self) -> Capture:
        run = self._watched
        return run.at(self._step) if self._step is not None else run.structure

    def _all_findings(self):
        return self._watched.findings if self._watched is not None else self._cap.findings

    def _on_run_step(self, run: Run, done: bool) -> None:
        """Called by the run after each step (from the training loop): update when due."""
        if self._throttle.due(done):
            started = time.monotonic()
            with self._lock:
                self._refresh_run(done)
            self._throttle.ran(started)

    def _refresh_run(self, done: bool) -> None:
        run = self._watched
        steps = [int(s) for s in run.steps]
        if steps and (self._steps.follow or self._step not in steps):
            self._step = steps[-1] if self._steps.follow else min(steps, key=lambda s: abs(s - self._step))
        with self._quietly():
            self._steps.set_steps(steps, self._step)
        self._steps.describe(run)
        self._cap = self._step_capture()
        tree = rows.tree_rows(self._cap, run.findings)
        if tree != self.tree.rows:
            self.tree.rows = tree
            self._list_findings()
        self._draw_scalars()
        self._draw()

    def _draw_scalars(self) -> None:
        if self._displayed and self._watched.scalar_names:
            self._steps.image.value = self._figure(self._step, "scalars", "", self._watched._version)
        _shown(self._steps.image, bool(self._watched.scalar_names))

    def _on_step_chosen(self, change) -> None:
        if self._quiet or change["new"] in (None, -1):
            return
        with self._lock:
            steps = self._watched.steps
            self._steps.follow = bool(len(steps)) and change["new"] == steps[-1]
            self._step = change["new"]
            self._cap = self._step_capture()
            self._on_selected()
            self._draw_scalars()

    def _list_findings(self) -> None:
        """All findings in one list box (one widget however many there are); picking one selects its module."""
        findings = self._listed = self._all_findings()
        counts = ", ".join(f"{sum(f.severity == s for f in findings)} {s}" for s in ("error", "warning", "info"))
        where = "its module and step" if self._watched is not None else "its module"
        nothing = "the run" if self._watched is not None else "this pass"
        self._findings_note.value = text.note(
            f"{len(findings)} finding{'s' * (len(findings) != 1)} ({counts}); pick one to select {where}."
            if findings else f"No findings: nothing in {nothing} looked wrong.")
        with self._quietly():
            self._findings.options = [(text.finding_label(f), i) for i, f in enumerate(findings)]
            self._findings.value = None
            self._findings.rows = min(max(len(findings), 2), 10)
        _shown(self._findings, bool(findings))
        self._finding_detail.value = text.finding(findings[0]) if findings else ""  # the first, until one is picked
        self._tabs.set_title(FINDINGS, f"{TABS[FINDINGS]} ({len(findings)})" if findings else TABS[FINDINGS])

    def _on_finding(self, change) -> None:
        if self._quiet or change["new"] is None:
            return
        self._events += 1
        with self._lock:
            finding = self._listed[change["new"]]
            self._finding_detail.value = text.finding(finding)
            if self._watched is not None and finding.step is not None and len(self._watched.steps):
                self.show_step(finding.step)
            self.select(finding.module)

    # -- on-demand computations (cached) ---------------------------------------------------------------

    def _attention_for(self, name: str, call: int) -> torch.Tensor | None:
        """The attention weights [N, heads, Lq, Lk] of a call, if the module is an attention layer."""
        if self._cap.error is not None or not self._cap[name].called:
            return None
        return self._rerun.attention(name, call)

    def _image_input(self) -> torch.Tensor | None:
        t = first_float_tensor(self._batch)
        return t if t is not None and t.dim() == 4 else None

    def _logits(self) -> torch.Tensor | None:
        out = first_float_tensor(self._cap.output)
        return out.detach().cpu() if out is not None and out.dim() == 2 else None

    def _tokens(self, item: int, positions: tuple[int, int]) -> list[str] | None:
        tokens = self.tokens
        if tokens is None:
            decoded = decoded_tokens(self.tokenizer, self._batch, item) if self.tokenizer is not None else None
            return decoded if decoded is not None and (len(decoded), len(decoded)) == tuple(positions) else None
        if len(tokens) and not isinstance(tokens[0], str):
            tokens = tokens[item]  # one list of tokens per item
        return [str(t) for t in tokens]

    @staticmethod
    def _item(dropdown: widgets.Dropdown, n: int) -> int:
        if len(dropdown.options) != n:
            dropdown.options = list(range(n))
        if dropdown.value is None and n:
            dropdown.value = 0  # a picker never shows blank
        _shown(dropdown, n > 1)
        return dropdown.value or 0

    def _on_find(self, change) -> None:
        """A class picked in the search box: the Class picker takes it (and the panel redraws for it)."""
        labels = [label for label, _ in self._ex_class.options]
        if self._quiet or change["new"] not in labels:
            return
        self._ex_class.value = self._ex_class.options[labels.index(change["new"])][1]

    def _true_label(self, item: int) -> int | None:
        """Item ``item``'s class in ``target``, when the target is one class index per item."""
        t = self._target
        if isinstance(t, torch.Tensor) and t.dim() == 1 and not t.is_floating_point() and item < len(t):
            return int(t[item])
        return None

    def _attention_inside(self, name: str) -> list[str]:
        """The attention layers in module ``name`` (not itself), as the Explain tab can show them."""
        if self._cap.error is not None:
            return []
        try:
            keys = self._rerun.attention_layers()
        except Exception:  # noqa: BLE001 - the model fails on the re-run: there is nothing to point to
            return []
        return [k for k in keys if k != name and (not name or k.startswith(name + "."))]


def input_ids(batch: Any) -> torch.Tensor | None:
    """The token ids of a text batch [N, L]: its "input_ids" entry, or its first integer tensor."""
    if isinstance(batch, Mapping) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"]
    items = batch.values() if isinstance(batch, Mapping) else batch if isinstance(batch, (tuple, list)) else [batch]
    ids = next((t for t in items if isinstance(t, torch.Tensor) and not t.is_floating_point()
                and not t.is_complex() and t.dtype != torch.bool), None)
    return ids if ids is not None and ids.dim() == 2 else None


def decoded_tokens(tokenizer: Any, batch: Any, item: int) -> list[str] | None:
    """Item ``item``'s tokens of the batch's ``input_ids``, one string per id, decoded by ``tokenizer``."""
    ids = input_ids(batch)
    if ids is None or item >= len(ids):
        return None
    row = ids[item].tolist()
    if hasattr(tokenizer, "convert_ids_to_tokens"):
        return [str(t) for t in tokenizer.convert_ids_to_tokens(row)]
    return [str(tokenizer.decode([i])) for i in row]


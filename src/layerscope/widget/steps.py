"""The inspector's bar for a watched run: the logged scalars over the steps and the step cursor."""

from __future__ import annotations

import time

import ipywidgets as widgets

from ..core import Run
from . import text

LIVE_INTERVAL = 0.5  # seconds: while the run trains, the inspector updates at most twice a second
LIVE_SHARE = 0.1  # ... and takes at most about this share of the training time to do it
LIVE_MAX = 5.0  # seconds: but updates at least this often


class StepsBar(widgets.VBox):
    """The scalars' picture, a slider over the sampled steps kept, and a line about the run."""

    def __init__(self):
        self.image = widgets.Image(format="png", layout=widgets.Layout(max_width="100%", height="auto"))
        self.image.add_class("ls-scalars")
        self.slider = widgets.SelectionSlider(options=[("-", -1)], description="Step", continuous_update=False,
                                              layout=widgets.Layout(width="55%"))
        self.slider.add_class("ls-step")
        self.note = widgets.HTML()
        self.note.add_class("ls-run-note")
        super().__init__([self.image, widgets.HBox([self.slider, self.note])])
        self.add_class("ls-steps")
        self.follow = True  # the cursor moves on to each new step until the user picks another one

    def set_steps(self, steps: list[int], current: int | None) -> None:
        options = [(str(s), s) for s in steps] or [("-", -1)]
        if list(self.slider.options) != options:
            self.slider.options = options
        self.slider.value = current if current is not None else options[-1][1]
        self.slider.disabled = not steps

    def describe(self, run: Run) -> None:
        state = "training" if run.live else "done"
        self.note.value = text.note(f"{run.step_count} steps ({state}), {len(run.records)} sampled kept, every "
                                    f"{run.every}; findings: {len(run.findings)}")


class Throttle:
    """Says when a live update is due: at most every LIVE_INTERVAL seconds, rarer when updates are slow (up to
    LIVE_MAX). The first update, which also warms matplotlib up, does not count as slow."""

    def __init__(self):
        self.last = -float("inf")
        self.interval = LIVE_INTERVAL
        self.updates = 0

    def due(self, done: bool) -> bool:
        return done or time.monotonic() - self.last >= self.interval

    def ran(self, started: float) -> None:
        self.last = time.monotonic()
        took = (self.last - started) if self.updates else 0.0
        self.interval = min(max(LIVE_INTERVAL, took / LIVE_SHARE), max(LIVE_MAX, LIVE_INTERVAL))
        self.updates += 1

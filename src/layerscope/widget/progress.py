"""The inspector's progress bar (tqdm) for a capture that takes a while: it counts what the pass does, the modules'
forwards, then their gradients, then the findings, and ends exactly at its total. It appears only once the
capture has run for ``delay`` seconds, and in a notebook it leaves nothing behind in the cell: the bar's widget is
shown under a display id and replaced by empty text when it ends (a saved notebook would otherwise hold a closed
widget, shown as "Error displaying widget: model not found")."""

from __future__ import annotations

import time

PHASES = {"forward": "forward pass", "backward": "backward pass", "findings": "findings"}


class Progress:
    """A ``progress(phase, done, total)`` callback for ``capture`` that draws one bar over the whole pass."""

    def __init__(self, modules: int, backward: bool, delay: float):
        passes = 2 if backward else 1
        self.total = modules * passes + 1
        self.offset = {"forward": 0, "backward": modules, "findings": modules * passes}
        self.delay, self.start = delay, time.monotonic()
        self.n, self.bar, self.handle = 0, None, None

    def __call__(self, phase: str, done: int, total: int) -> None:
        self.n = min(self.total, self.offset[phase] + done)
        if self.bar is None:
            if time.monotonic() - self.start < self.delay:
                return
            self._open(phase)
        self.bar.set_description(f"layerscope: {PHASES[phase]}", refresh=False)
        self.bar.update(self.n - self.bar.n)

    def _open(self, phase: str) -> None:
        from tqdm.auto import tqdm
        from tqdm.notebook import tqdm_notebook

        options = dict(total=self.total, initial=self.n, desc=f"layerscope: {PHASES[phase]}", unit="step", leave=False)
        if issubclass(tqdm, tqdm_notebook):
            from IPython.display import display

            self.bar = tqdm(**options, display=False)
            self.handle = display(self.bar.container, display_id=True)
        else:
            self.bar = tqdm(**options)

    def close(self) -> None:
        if self.bar is None:
            return
        self.bar.close()
        if self.handle is not None:
            self.handle.update({"text/plain": ""}, raw=True)  # no closed widget left in the cell

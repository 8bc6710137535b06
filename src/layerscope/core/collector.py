"""Pausing Python's cyclic garbage collector while layerscope builds many small objects.

A capture, a sampled training step or a merge keeps a few small objects per module call. In a process holding
torch's large object graph (hundreds of thousands of objects) every few thousand of them that survive set off a
full collection, which on a 2,000-module model costs as much as the pass itself. Reference counting still frees
everything as usual while the collector waits; only the search for reference cycles is put off until the end, and
the collector is put back as it was (a user who disabled it keeps it disabled)."""

from __future__ import annotations

import contextlib
import gc


class Pause:
    """A pause that can start in one hook and end in another: ``start()`` and ``end()``, each idempotent."""

    def __init__(self):
        self.held = False
        self.was_enabled = False

    def start(self) -> None:
        if not self.held:
            self.held, self.was_enabled = True, gc.isenabled()
            gc.disable()

    def end(self) -> None:
        if self.held:
            self.held = False
            if self.was_enabled:
                gc.enable()


@contextlib.contextmanager
def paused():
    """The collector paused for the length of a ``with`` block."""
    pause = Pause()
    pause.start()
    try:
        yield
    finally:
        pause.end()

"""Pausing Python's cyclic garbage collector while layerscope builds many small objects.

A capture, a sampled training step or a merge keeps a few small objects per module call. In a process holding
torch's large object graph (hundreds of thousands of objects) every few thousand of them that survive set off a
full collection, which on a 2,000-module model costs as much as the pass itself. Reference counting still frees
everything as usual while the collector waits; only the search for reference cycles is put off until the end, and
the collector is put back as it was (a user who disabled it keeps it disabled). A pause that ``settle``s hands what
it built straight to the oldest generation: a young collection at its end would look at every one of those objects
(a merge of the 2,001-module stack: ~60,000 of them, 10-20 ms) only to keep them all."""

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

    def end(self, settle: bool = False) -> None:
        """``settle``: what was built during the pause is kept for long (a merge), so it joins the oldest
        generation at once (``gc.freeze`` and ``gc.unfreeze``: two list splices), where only the rare full
        collections look at it, instead of a young collection looking at every object of it first. Only for pauses in
        which no user code runs: cyclic garbage the user's code left young would wait for a full collection too.
        Skipped when the process froze objects of its own (``gc.unfreeze`` would let those go)."""
        if self.held:
            self.held = False
            if settle and not gc.get_freeze_count():
                gc.freeze()
                gc.unfreeze()
            if self.was_enabled:
                gc.enable()


@contextlib.contextmanager
def paused(settle: bool = False):
    """The collector paused for the length of a ``with`` block (``settle``: see ``Pause.end``)."""
    pause = Pause()
    pause.start()
    try:
        yield
    finally:
        pause.end(settle)

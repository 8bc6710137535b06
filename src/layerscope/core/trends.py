"""Findings over training steps, read off a Run's records (its sampled steps and its logged scalars).

The kinds: ``loss_diverged``, ``loss_flat``, ``grad_accumulating``, ``update_too_large``, ``update_too_small``,
``param_not_in_optimizer``, ``eval_mode_training``, ``dead_units_growing``. Each names the step it was first seen
at, and like the one-pass findings the outermost module that holds all of the layers concerned.
"""

from __future__ import annotations

import math
from collections.abc import Container

import numpy as np

from .diagnose import label
from .findings import _Look, _plural
from .records import Finding

DEFAULTS = {
    # loss_diverged: the logged "loss" is NaN/Inf, or above diverge_ratio times its first value (a positive one)
    "diverge_ratio": 10.0,
    # loss_flat: the mean loss of the last flat_window logged steps is not below the mean of the first
    # flat_window by at least flat_tolerance (a share of it); needs 2 * flat_window logged steps
    "flat_window": 50,
    "flat_tolerance": 0.01,
    # update_too_large / update_too_small: a layer's median update ratio ||w after - w before|| / ||w before||
    # over the sampled steps is above update_high or below update_low. About 1e-3 is the usual size; these are
    # two orders of magnitude either side, a learning rate off by about a hundred times
    "update_high": 1e-1,
    "update_low": 1e-5,
    # dead_units_growing: the share of a ReLU's dead channels (0 for every item of the batch) rose by at least
    # dead_growth since the first sampled step
    "dead_growth": 0.25,
}


def find_trends(run, *, diverge_ratio: float = DEFAULTS["diverge_ratio"], flat_window: int = DEFAULTS["flat_window"],
                flat_tolerance: float = DEFAULTS["flat_tolerance"], update_high: float = DEFAULTS["update_high"],
                update_low: float = DEFAULTS["update_low"], dead_growth: float = DEFAULTS["dead_growth"]
                ) -> list[Finding]:
    """The findings over time of ``run`` (thresholds: see ``DEFAULTS``)."""
    look = _Trends(run)
    diverged = look.loss_diverged(diverge_ratio)
    found = [*diverged, *([] if diverged else look.loss_flat(int(flat_window), flat_tolerance))]
    found += [*look.grad_accumulating(), *look.not_in_optimizer(), *look.updates(update_high, update_low)]
    found += [*look.eval_mode(), *look.dead_growing(dead_growth)]
    return found


class _Trends:
    def __init__(self, run):
        self.run = run
        self.look = _Look(run.structure)
        self.records = run.records
        self.modules = run.structure.modules

    def label(self, name: str) -> str:
        return label(name, self.modules[name].type_name)

    def what(self, name: str) -> str:
        return "the model" if name == "" else self.label(name)

    def layers(self, name: str, among: Container[str]) -> list[str]:
        """The modules of ``among`` that are ``name`` or lie under it, in the order of the modules."""
        return [n for n in self.look.inside(name) if n in among]

    # -- the loss ---------------------------------------------------------------------------------------------

    def _loss(self) -> tuple[np.ndarray, np.ndarray]:
        if "loss" not in self.run.scalar_names:
            return np.zeros(0, dtype=np.int64), np.zeros(0)
        return self.run.scalars("loss")

    def loss_diverged(self, ratio: float) -> list[Finding]:
        steps, values = self._loss()
        if not len(values):
            return []
        finite = np.isfinite(values)
        start = float(values[np.argmax(finite)]) if finite.any() else math.nan
        bad = ~finite
        if start > 0:
            bad |= finite & (values > ratio * start)
        if not bad.any():
            return []
        i = int(np.argmax(bad))
        step, value = int(steps[i]), float(values[i])
        where = self._first_nonfinite()
        details = {"loss": value, "start": start, "ratio": ratio}
        if math.isfinite(value):
            message = (f"The loss blew up: {value:.4g} at step {step}, {value / start:.3g} times its start "
                       f"({start:.4g}).")
        else:
            message = f"The loss became {value} at step {step}" + (f" (it started at {start:.4g})." if
                                                                    math.isfinite(start) else ".")
        module = ""
        if where is not None:
            module, seen_at = where
            details.update(first_nonfinite_module=module, first_nonfinite_step=seen_at)
            message += (f" NaN/Inf first came out of {self.label(module)}, at sampled step {seen_at}.")
        elif self.records and not math.isfinite(value):
            message += " No sampled step shows NaN/Inf in the model: sample more often (every=1) to see where."
        message += " Lower the learning rate, clip the gradients, or look for a log/division of values near 0."
        return [Finding("loss_diverged", "error", module, message, details, step=step)]

    def _first_nonfinite(self) -> tuple[str, int] | None:
        """The module the one-pass rules name for the first NaN/Inf of the sampled steps, and that step."""
        first = [(f.step, f.module) for f in self.run._once() if f.kind in ("nan", "inf")]
        if not first:
            return None
        step, module = min(first)
        return module, step

    def loss_flat(self, window: int, tolerance: float) -> list[Finding]:
        steps, values = self._loss()
        if window < 1 or len(values) < 2 * window:
            return []
        first, last = values[:window], values[-window:]
        if not (np.isfinite(first).all() and np.isfinite(last).all()):
            return []
        before, now = float(first.mean()), float(last.mean())
        if now < before - tolerance * abs(before):
            return []
        a, b = int(steps[-window]), int(steps[-1])
        message = (f"The loss has not gone down: {now:.4g} on average over steps {a}–{b}, against {before:.4g} over "
                   f"the first {window} steps. The model is not learning: a learning rate far too low or too high, "
                   f"dead units, or gradients that do not reach the weights.")
        return [Finding("loss_flat", "warning", "", message,
                        {"first_mean": before, "last_mean": now, "window": window, "tolerance": tolerance}, step=a)]

    # -- gradients and the optimizer ------------------------------------------------------------------------------

    def _rows_of(self, name: str) -> np.ndarray:
        return self.run._own[name]

    def grad_accumulating(self) -> list[Finding]:
        from .run import PARAM_FIELDS

        col = PARAM_FIELDS.index("stale_grad")
        for record in self.records:
            stale = record.params[:, col]
            if not np.any(stale > 0):
                continue
            flagged = lambda n, stale=stale: bool(np.any(stale[self._rows_of(n)] > 0))
            relevant = lambda n: bool(len(self._rows_of(n)))
            names = self.look.highest(relevant, flagged)
            total = float(np.sqrt(np.square(stale[stale > 0]).sum()))
            count = int((stale > 0).sum())
            where = names[0] if len(names) == 1 else ""
            message = (f"At step {record.step} the first backward pass found .grad still holding earlier gradients "
                       f"({_plural(count, 'parameter')}, norm {total:.3g}): .grad was not cleared since the previous "
                       f"step, so gradients add up from step to step. Call optimizer.zero_grad() once per step.")
            return [Finding("grad_accumulating", "error", where, message,
                            {"parameters": count, "stale_grad_norm": total, "modules": names}, step=record.step)]
        return []

    def not_in_optimizer(self) -> list[Finding]:
        from .run import PARAM_FIELDS

        group, grad = PARAM_FIELDS.index("group"), PARAM_FIELDS.index("grad_norm")
        for record in self.records:
            outside = (record.params[:, group] == -1) & ~np.isnan(record.params[:, grad])
            if not outside.any():
                continue
            relevant = lambda n, r=record: bool(np.any(~np.isnan(r.params[self._rows_of(n), grad])))
            flagged = lambda n, out=outside: bool(np.any(out[self._rows_of(n)]))
            found = []
            for name in self.look.highest(relevant, flagged):
                params = [f"{m}.{local}" if m else local for (m, local), out in zip(self.run.param_keys, outside)
                          if out and (not name or m == name or m.startswith(name + "."))]
                shown = ", ".join(params[:4]) + (f" and {len(params) - 4} more" if len(params) > 4 else "")
                message = (f"{self.what(name)} gets gradients, but {shown} {'is' if len(params) == 1 else 'are'} in "
                           f"no param group of the optimizer: the optimizer never changes "
                           f"{'it' if len(params) == 1 else 'them'}. Create the optimizer after adding the layer, "
                           f"or add it with optimizer.add_param_group().")
                found.append(Finding("param_not_in_optimizer", "error", name, message, {"parameters": params},
                                     step=record.step))
            return found
        return []

    def _ratios(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """(steps, update ratios) of each layer that the optimizer updated, over the sampled steps."""
        out = {}
        for name in self.modules:
            if not len(self._rows_of(name)):
                continue
            steps, ratios = self.run.series(name, "update_ratio")
            keep = np.isfinite(ratios) & (ratios > 0)
            if keep.any():
                out[name] = steps[keep], ratios[keep]
        return out

    def updates(self, high: float, low: float) -> list[Finding]:
        ratios = self._ratios()
        median = {n: float(np.median(r)) for n, (_, r) in ratios.items()}
        found = []
        for kind, bad, word in (("update_too_large", lambda r: r > high, "above"),
                                ("update_too_small", lambda r: r < low, "below")):
            limit = high if kind == "update_too_large" else low
            small = kind == "update_too_small"  # embeddings: a batch updates only a few rows
            relevant = lambda n, small=small: n in median and not (small and self.look.has(n, "embedding"))
            for name in self.look.highest(relevant, lambda n, bad=bad: bad(median[n])):
                layers = [n for n in self.layers(name, median) if relevant(n)]
                typical = float(np.median([median[n] for n in layers]))
                step = min(int(ratios[n][0][np.argmax(bad(ratios[n][1]))]) for n in layers if bad(ratios[n][1]).any())
                lrs = self._lrs(layers)
                where = self.what(name) if len(layers) == 1 else f"{_plural(len(layers), 'layer')} in {self.what(name)}"
                factor = typical / 1e-3
                advice = (f"about {factor:.3g} times the usual 1e-3: the learning rate{lrs} looks too high"
                          if kind == "update_too_large" else
                          f"about {1 / factor:.3g} times under the usual 1e-3: the learning rate{lrs} looks too low")
                message = (f"Each optimizer step changes the weights of {where} by {typical:.3g} of their size "
                           f"(median over the sampled steps, {word} {limit:g}), {advice}.")
                found.append(Finding(kind, "warning", name, message,
                                     {"update_ratio": typical, "limit": limit, "layers": len(layers)}, step=step))
        return found

    def _lrs(self, layers: list[str]) -> str:
        from .run import PARAM_FIELDS

        if not self.records or not self.records[-1].lrs:
            return ""
        record = self.records[-1]
        groups = {int(g) for n in layers for g in record.params[self._rows_of(n), PARAM_FIELDS.index("group")]
                  if g == g and g >= 0}
        values = sorted({record.lrs[g] for g in groups if g < len(record.lrs)})
        return f" ({', '.join(f'{v:g}' for v in values)})" if values else ""

    # -- modules over the steps -----------------------------------------------------------------------------

    def eval_mode(self) -> list[Finding]:
        from .run import PARAM_FIELDS

        grad = PARAM_FIELDS.index("grad_norm")
        index = self.run._index
        relevant = lambda n: self.look.has(n, "train_dependent")
        for record in self.records:
            if not len(record.params) or np.all(np.isnan(record.params[:, grad])):
                continue  # no backward: not a training step
            flagged = lambda n, r=record: not r.training[index[n]]
            names = self.look.highest(relevant, flagged)
            found = []
            for name in names:
                layers = [n for n in self.layers(name, self.modules) if relevant(n)]
                verb = "was" if len(layers) == 1 else "were"
                message = (f"{_plural(len(layers), 'dropout or batch-norm layer')} in {self.what(name)} {verb} in "
                           f"eval mode while the model trained (step {record.step}): dropout is off, and batch norm "
                           f"normalises with its running statistics, which stop updating. Call model.train() before "
                           f"the training steps (and model.eval() only to evaluate).")
                found.append(Finding("eval_mode_training", "warning", name, message, {"layers": len(layers)},
                                     step=record.step))
            if found:
                return found
        return []

    def dead_growing(self, growth: float) -> list[Finding]:
        rising: dict[str, tuple[float, float, int, int, int]] = {}
        for name in self.modules:
            if not self.look.has(name, "relu"):
                continue
            steps, dead = self.run.series(name, "dead_fraction")
            ok = np.isfinite(dead)
            if ok.sum() < 2:
                continue
            steps, dead = steps[ok], dead[ok]
            up = dead - dead[0] >= growth
            if up[-1]:
                rising[name] = (float(dead[0]), float(dead[-1]), int(steps[0]), int(steps[np.argmax(up)]),
                                int(steps[-1]))
        found = []
        relevant = lambda n: self.look.has(n, "relu")
        for name in self.look.highest(relevant, lambda n: n in rising):
            layers = [n for n in self.layers(name, rising)]
            start = float(np.mean([rising[n][0] for n in layers]))
            end = float(np.mean([rising[n][1] for n in layers]))
            step = min(rising[n][3] for n in layers)
            first, last = min(rising[n][2] for n in layers), max(rising[n][4] for n in layers)
            where = self.label(name) if len(layers) == 1 and name in rising else \
                f"{_plural(len(layers), 'ReLU')} in {self.what(name)}"
            message = (f"The share of dead channels (0 for every item of the batch) of {where} rose from {start:.0%} "
                       f"at step {first} to {end:.0%} at step {last}: units die as training goes on and never come "
                       f"back, typically because the learning rate is too high.")
            found.append(Finding("dead_units_growing", "warning", name, message,
                                 {"start": start, "now": end, "layers": len(layers)}, step=step))
        return found

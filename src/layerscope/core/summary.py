"""The text summary, from torchinfo, run so that the model is left exactly as it was."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from torch import nn

from .hooks import HookSession


def summary(model: nn.Module, batch: Any, depth: int = 4) -> str:
    import torchinfo

    data = dict(batch) if isinstance(batch, Mapping) else list(batch) if isinstance(batch, (tuple, list)) else batch
    with HookSession(model):  # torchinfo resets every module to the root's mode afterwards: undo that
        try:
            stats = torchinfo.summary(
                model,
                input_data=data,
                mode="train" if model.training else "eval",
                depth=depth,
                verbose=0,
                col_names=("input_size", "output_size", "num_params", "trainable"),
                row_settings=("var_names",),
            )
        except Exception as exc:  # noqa: BLE001 - the summary of a broken model says why, not a traceback
            cause = exc.__cause__ or exc
            return f"torchinfo could not summarise this model: {type(cause).__name__}: {cause}"
    return units_named(str(stats), torchinfo.Units)


def units_named(summary_text: str, units) -> str:
    """torchinfo's footer with its units as torchinfo means them: on Python 3.11 it formats the enum member
    itself ("Total mult-adds (Units.MEGABYTES): 0.20"); its value is the unit ("Total mult-adds (M): 0.20")."""
    def unit(match: re.Match) -> str:
        member = units.__members__.get(match.group(1))
        if member is None:
            return match.group(0)
        return f" ({member.value})" if member.value else ""

    return re.sub(r" \(Units\.(\w+)\)", unit, summary_text)

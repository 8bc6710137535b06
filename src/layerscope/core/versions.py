"""The torch releases layerscope supports, checked in one place with a clear message."""

from __future__ import annotations

import re

import torch

TORCH_FLOOR = (2, 6)  # the oldest release CI tests (constraints-floor.txt); pyproject.toml says the same


def torch_version(version: str | None = None) -> tuple[int, int]:
    """(major, minor) of the running torch (or of ``version``): '2.6.0+cu124' -> (2, 6)."""
    found = re.match(r"(\d+)\.(\d+)", version if version is not None else torch.__version__)
    return (int(found.group(1)), int(found.group(2))) if found else (0, 0)


def require(what: str, minimum: tuple[int, int] = TORCH_FLOOR, version: str | None = None) -> None:
    """Raise a RuntimeError that says what needs which torch, when the running torch is older."""
    have = version if version is not None else torch.__version__
    if torch_version(have) < minimum:
        raise RuntimeError(f"{what} needs torch >= {minimum[0]}.{minimum[1]}, but this is torch {have}: "
                           f"upgrade with pip install 'torch>={minimum[0]}.{minimum[1]}'")


require("layerscope")

"""The capture engine: torch and numpy only (no widgets, no plotting)."""

from . import versions  # noqa: F401 - first: says clearly when torch is too old
from .attention import attention_maps, attention_rollout
from .cam import CAMResult, grad_cam
from .capture import capture
from .distributed import gather
from .findings import find
from .hooks import HookSession
from .records import CallRecord, Capture, CaptureError, Finding, InputRecord, ModuleReport, ParamRecord
from .run import Run, StepRecord
from .stats import Histogram, TensorStats
from .store import FormatError, load
from .watch import watch

__all__ = [
    "CAMResult",
    "CallRecord",
    "Capture",
    "CaptureError",
    "Finding",
    "FormatError",
    "Histogram",
    "HookSession",
    "InputRecord",
    "ModuleReport",
    "ParamRecord",
    "Run",
    "StepRecord",
    "TensorStats",
    "attention_maps",
    "attention_rollout",
    "capture",
    "find",
    "gather",
    "grad_cam",
    "load",
    "watch",
]

"""The capture engine: torch and numpy only (no widgets, no plotting)."""

from .capture import CallRecord, Capture, ModuleReport, capture
from .diagnose import CaptureError
from .hooks import HookSession
from .stats import Histogram, TensorStats

__all__ = [
    "CallRecord",
    "Capture",
    "CaptureError",
    "Histogram",
    "HookSession",
    "ModuleReport",
    "TensorStats",
    "capture",
]

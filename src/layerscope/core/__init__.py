"""The capture engine: torch and numpy only (no widgets, no plotting)."""

from .attention import attention_maps, attention_rollout
from .cam import CAMResult, grad_cam
from .capture import CallRecord, Capture, ModuleReport, capture
from .diagnose import CaptureError
from .findings import Finding
from .hooks import HookSession
from .stats import Histogram, TensorStats

__all__ = [
    "CAMResult",
    "CallRecord",
    "Capture",
    "CaptureError",
    "Finding",
    "Histogram",
    "HookSession",
    "ModuleReport",
    "TensorStats",
    "attention_maps",
    "attention_rollout",
    "capture",
    "grad_cam",
]

"""layerscope: look inside a PyTorch model, from a notebook or a script."""

from .core import CallRecord, Capture, CaptureError, Histogram, ModuleReport, TensorStats, capture

__version__ = "0.1.0"

__all__ = [
    "CallRecord",
    "Capture",
    "CaptureError",
    "Histogram",
    "ModuleReport",
    "TensorStats",
    "capture",
]

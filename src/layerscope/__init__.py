"""layerscope: look inside a PyTorch model, from a notebook or a script."""

from .core import (
    CallRecord,
    CAMResult,
    Capture,
    CaptureError,
    Finding,
    FormatError,
    Histogram,
    InputRecord,
    ModuleReport,
    ParamRecord,
    Run,
    TensorStats,
    attention_maps,
    attention_rollout,
    capture,
    gather,
    grad_cam,
    load,
    watch,
)
from .core import find as findings

__version__ = "0.1.0"

__all__ = [
    "CAMResult",
    "CallRecord",
    "Capture",
    "CaptureError",
    "Finding",
    "FormatError",
    "Histogram",
    "InputRecord",
    "ModuleReport",
    "ParamRecord",
    "Run",
    "TensorStats",
    "attention_maps",
    "attention_rollout",
    "capture",
    "findings",
    "gather",
    "grad_cam",
    "load",
    "watch",
    "ModelInspector",
]


def __getattr__(name: str):
    if name == "ModelInspector":  # imported on first use: `import layerscope` stays free of ipywidgets
        from .widget import ModelInspector

        return ModelInspector
    raise AttributeError(f"module 'layerscope' has no attribute {name!r}")

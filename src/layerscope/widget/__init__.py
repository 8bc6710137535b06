"""The notebook side: ``ModelInspector`` (the only package that imports ipywidgets and anywidget)."""

from .inspector import ModelInspector

__all__ = ["ModelInspector"]

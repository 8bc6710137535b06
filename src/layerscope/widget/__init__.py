"""The notebook side: ``ModelInspector`` (the only package that imports ipywidgets and anywidget).

``rows`` and ``text`` (what the tree and the panels show, as data and escaped HTML) are pure Python, shared
with the HTML report; ipywidgets and anywidget are imported with ``ModelInspector``, on first use."""

__all__ = ["ModelInspector"]


def __getattr__(name: str):
    if name == "ModelInspector":
        from .inspector import ModelInspector

        return ModelInspector
    raise AttributeError(f"module 'layerscope.widget' has no attribute {name!r}")

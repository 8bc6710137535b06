"""The self-contained HTML report (``save_html``), the static view a saved notebook keeps (``static_html``) and
the command line (``cli``). Reads records only; imports no widget library."""

from .html import save_html
from .static import notebook_fallback, static_html

__all__ = ["notebook_fallback", "save_html", "static_html"]

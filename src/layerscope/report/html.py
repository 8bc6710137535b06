"""One self-contained HTML file for one capture: script, style, pictures and data inline, nothing fetched.

The page holds, in order: the style (the tree's ``tree.css`` and ``report.css``), the data, the tree's own
``tree.js`` as text, and ``report.js`` as an inline module. ``report.js`` decompresses the data with the
browser's ``DecompressionStream``, imports ``tree.js`` from a blob: URL and calls its ``render({model, el})``
with a small stand-in for anywidget's model, so the notebook's tree and the file's tree are the same code.

The data is a JSON document (``data.document``) and the feature maps' bytes. Each sits in a non-executed
``<script>``: JSON with every ``<`` written as ``\\u003c`` (so no ``</script>`` or ``<!--`` can occur in it),
or, when compressing pays, zlib-compressed and base64-encoded. A Content-Security-Policy allows only the
page's own inline script and style (by hash), the blob: it imports, and data: pictures: no request leaves it.
"""

from __future__ import annotations

import base64
import hashlib
import html
import json
import os
import pathlib
import re
import zlib

from ..core import Capture
from ..widget.rows import TREE_CSS, TREE_JS
from . import data

_HERE = pathlib.Path(__file__).parent
REPORT_JS, REPORT_CSS = _HERE / "report.js", _HERE / "report.css"
COMPRESS_FROM = 16 * 1024  # bytes: smaller JSON is embedded as it is
LEVEL = 6  # zlib level: 9 makes files about 1% smaller and takes twice as long


def _source(path: pathlib.Path, closing: str) -> str:
    """Our own JS/CSS, checked to be safe to put between tags as it is."""
    source = path.read_text(encoding="utf-8")
    if re.search(rf"</{closing}|<!--", source, re.IGNORECASE):
        raise ValueError(f"{path.name} cannot be inlined: it contains '</{closing}' or '<!--'")
    return source


def _hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode("utf-8")).digest()).decode("ascii") + "'"


def _embed(element_id: str, payload: bytes, json_text: bool) -> str:
    """A non-executed script element holding ``payload``: as it is (escaped JSON), or zlib + base64."""
    if json_text and len(payload) < COMPRESS_FROM:
        body, encoding, kind = payload.decode("utf-8").replace("<", "\\u003c"), "json", "application/json"
    else:
        if json_text or len(payload) >= COMPRESS_FROM:
            payload, encoding = zlib.compress(payload, LEVEL), "zlib+base64"
        else:
            encoding = "base64"
        body, kind = base64.b64encode(payload).decode("ascii"), "application/octet-stream"
    return f'<script type="{kind}" id="{element_id}" data-encoding="{encoding}">{body}</script>'


def page(doc: dict, blob: bytes) -> str:
    """The HTML text of the report for ``data.document``'s output."""
    style = _source(TREE_CSS, "style") + "\n" + _source(REPORT_CSS, "style")
    tree_js, report_js = _source(TREE_JS, "script"), _source(REPORT_JS, "script")
    document = json.dumps(doc, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")
    policy = (f"default-src 'none'; script-src {_hash(report_js)} blob:; style-src {_hash(style)}; "
              f"img-src data: blob:")
    return "\n".join([
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f'<meta http-equiv="Content-Security-Policy" content="{policy}">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{html.escape(doc['title'])}</title>",
        f"<style>{style}</style>",
        "</head><body>",
        '<div id="ls-report" class="layerscope-inspector layerscope-report">'
        '<noscript>This report needs JavaScript to show the model.</noscript></div>',
        _embed("ls-data", document, json_text=True),
        _embed("ls-maps", blob, json_text=False),
        f'<script type="text/plain" id="ls-tree-js">{tree_js}</script>',
        f'<script type="module">{report_js}</script>',
        "</body></html>",
    ])


def save_html(cap: Capture, path: str | os.PathLike, *, explain: list[dict] | None = None,
              title: str | None = None) -> None:
    """Write the report of ``cap`` to ``path``: one HTML file that works offline, with no kernel."""
    doc, blob = data.document(cap, explain=explain, title=title)
    pathlib.Path(path).write_text(page(doc, blob), encoding="utf-8")


def read(source: str) -> tuple[dict, bytes]:
    """The document and bytes inside a report's HTML text (what the page decodes; for tests and tools)."""
    found = {}
    for element_id in ("ls-data", "ls-maps"):
        match = re.search(rf'<script type="[^"]+" id="{element_id}" data-encoding="([^"]+)">([^<]*)</script>', source)
        encoding, body = match.groups()
        if encoding == "json":
            found[element_id] = body.encode("utf-8")
        else:
            raw = base64.b64decode(body)
            found[element_id] = zlib.decompress(raw) if encoding == "zlib+base64" else raw
    return json.loads(found["ls-data"]), found["ls-maps"]

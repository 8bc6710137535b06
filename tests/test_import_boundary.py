import subprocess
import sys

import pytest


def test_core_imports_no_widget_or_plotting_library():
    code = (
        "import sys, layerscope.core, layerscope\n"
        "bad = [m for m in ('ipywidgets', 'anywidget', 'matplotlib.pyplot', 'seaborn') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_report_and_command_line_import_no_widget_library():
    code = (
        "import sys, layerscope.report, layerscope.report.cli, layerscope.widget.rows, layerscope.widget.text\n"
        "bad = [m for m in ('ipywidgets', 'anywidget', 'matplotlib', 'seaborn') if m in sys.modules]\n"
        "print(','.join(bad))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_too_old_a_torch_says_which_release_is_needed():
    from layerscope.core.versions import TORCH_FLOOR, require, torch_version

    assert torch_version("2.6.0+cu124") == (2, 6) and torch_version("2.14.1") == (2, 14)
    assert torch_version() >= TORCH_FLOOR  # the running torch is supported
    require("this feature")  # no error on a supported torch
    with pytest.raises(RuntimeError, match=r"distributed capture needs torch >= 2\.6, but this is torch 2\.5\.1"):
        require("distributed capture", (2, 6), version="2.5.1")

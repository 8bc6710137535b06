import subprocess
import sys


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

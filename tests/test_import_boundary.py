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

"""Binder: binder/ asks for a CPU build of torch and torchvision and installs layerscope from the repository,
and a fresh environment built from it the way repo2docker builds one (minus Docker) runs every notebook."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from test_notebooks import LIMITS, NOTEBOOKS

ROOT = Path(__file__).resolve().parents[1]
BINDER = ROOT / "binder"
CPU_INDEX = "--extra-index-url https://download.pytorch.org/whl/cpu"

# repo2docker's Python build pack runs `pip install -r binder/requirements.txt` from the repository root, in an
# environment that already holds the Jupyter server and ipykernel. This machine reaches PyPI but not the PyTorch
# CPU wheel index, and the only torch/torchvision it can install without downloading several GB are 2.14.1 and
# 0.29.1 (a local package cache). So the fresh environment gets the requirements with the CPU index line dropped
# and the two pins swapped for those; every other line is installed exactly as written.
LOCAL_PINS = {"torch": "torch==2.14.1", "torchvision": "torchvision==0.29.1"}
JUPYTER_BASE = ["ipykernel", "nbclient"]  # what repo2docker's base environment brings to run notebooks

RUN_NOTEBOOKS = """
import json, sys, time
import nbformat
from nbclient import NotebookClient

folder, limits = sys.argv[1], json.loads(sys.argv[2])
times = {}
for name, limit in limits.items():
    nb = nbformat.read(f"{folder}/{name}", as_version=4)
    deadline = time.monotonic() + limit
    start = time.monotonic()
    NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": folder}},
                   timeout_func=lambda cell: max(1, round(deadline - time.monotonic()))).execute()
    times[name] = round(time.monotonic() - start, 1)
    errors = [o for c in nb.cells for o in c.get("outputs", []) if o.output_type == "error"]
    assert not errors, (name, errors)
print(json.dumps(times))
"""


def requirement_name(line: str) -> str:
    return re.split(r"[\s=<>!~\[;@]", line, maxsplit=1)[0].lower()


def requirement_lines() -> list[str]:
    lines = (line.split("#", 1)[0].strip() for line in (BINDER / "requirements.txt").read_text().splitlines())
    return [line for line in lines if line]


def local_requirements() -> str:
    """binder/requirements.txt as this machine can install it (see LOCAL_PINS)."""
    out = []
    for line in requirement_lines():
        if line == CPU_INDEX:
            continue
        out.append(LOCAL_PINS.get(requirement_name(line), line))
    return "\n".join(out) + "\n"


def test_binder_requirements_ask_for_cpu_torch_and_the_package():
    lines = requirement_lines()
    assert CPU_INDEX in lines
    pins = {requirement_name(line): line for line in lines}
    assert re.fullmatch(r"torch==\d+\.\d+\.\d+\+cpu", pins["torch"])
    assert re.fullmatch(r"torchvision==\d+\.\d+\.\d+\+cpu", pins["torchvision"])
    assert "scikit-learn" in pins  # the notebooks' data sets ship inside it
    assert "." in lines  # layerscope from the repository root, where repo2docker runs pip
    assert (BINDER / "runtime.txt").read_text().strip() == "python-3.11"
    swapped = local_requirements().splitlines()
    assert CPU_INDEX not in swapped and "torch==2.14.1" in swapped and "torchvision==0.29.1" in swapped
    assert len(swapped) == len(lines) - 1


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("LAYERSCOPE_SLOW") != "1",
                    reason="builds a fresh 6 GB environment (several minutes); set LAYERSCOPE_SLOW=1")
def test_notebooks_run_in_a_fresh_binder_environment():
    with tempfile.TemporaryDirectory(prefix="layerscope-binder-") as tmp:
        tmp = Path(tmp)
        env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
        env.update(PATH=f"{tmp / 'env' / 'bin'}{os.pathsep}{env.get('PATH', '')}", JUPYTER_RUNTIME_DIR=str(tmp / "rt"),
                   JUPYTER_CONFIG_DIR=str(tmp / "cfg"), IPYTHONDIR=str(tmp / "ipython"))
        python = tmp / "env" / "bin" / "python"
        run = lambda *args, **kw: subprocess.run([str(a) for a in args], env=env, check=True, **kw)
        start = time.monotonic()
        run(sys.executable, "-m", "venv", tmp / "env")
        (tmp / "requirements.txt").write_text(local_requirements())
        run(python, "-m", "pip", "install", "-q", "-r", tmp / "requirements.txt", cwd=ROOT)
        run(python, "-m", "pip", "install", "-q", *JUPYTER_BASE, cwd=tmp)
        built = time.monotonic() - start
        where = run(python, "-c", "import layerscope, torch; print(layerscope.__file__, torch.__version__)",
                    cwd=tmp, capture_output=True, text=True).stdout.split()
        assert Path(where[0]).is_relative_to(tmp / "env") and where[1].startswith("2.14.1")  # installed, not ./src
        done = subprocess.run([str(python), "-c", RUN_NOTEBOOKS, str(NOTEBOOKS), json.dumps(LIMITS)], env=env, cwd=tmp,
                              capture_output=True, text=True)
        assert done.returncode == 0, done.stderr[-5000:]
        times = json.loads(done.stdout.strip().splitlines()[-1])
        print(f"\nbinder environment built in {built:.0f} s; notebooks: {times}")
        assert set(times) == set(LIMITS)

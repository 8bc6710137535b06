"""A throw-away JupyterLab server on 127.0.0.1 for the browser tests (serves Notebook 7 as well).

Every Jupyter directory points into a temporary folder, so nothing of ``$HOME`` is read or written.
"""

from __future__ import annotations

import json
import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import psutil

JUPYTER_DIRS = ("JUPYTER_CONFIG_DIR", "JUPYTER_RUNTIME_DIR", "JUPYTER_DATA_DIR", "IPYTHONDIR",
                "JUPYTERLAB_SETTINGS_DIR", "JUPYTERLAB_WORKSPACES_DIR")
CHROMIUM = "/usr/bin/chromium"  # Debian's; Playwright's own browser download does not work offline
# without the networking flags Chromium tries the network
CHROMIUM_ARGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_lab_settings(settings_dir: Path, extra: dict[str, dict] | None = None) -> None:
    """JupyterLab user settings for tests; ``extra`` adds files (name relative to the settings dir: value)."""
    files = {
        # no "get Jupyter news?" toast over the widgets
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings":
            {"fetchNews": "false", "checkForUpdates": False},
        # every cell stays in the DOM (no virtual scrolling), so locators find every inspector
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        **(extra or {}),
    }
    for name, value in files.items():
        path = settings_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


def jupyter_env(base: Path, settings: dict[str, dict] | None = None) -> dict[str, str]:
    """``os.environ`` with every Jupyter directory in a new folder under ``base`` and the lab settings written
    (plus ``settings``, as in ``write_lab_settings``)."""
    env = dict(os.environ)
    for var in JUPYTER_DIRS:
        path = base / var.lower()
        path.mkdir(parents=True, exist_ok=True)
        env[var] = str(path)
    write_lab_settings(Path(env["JUPYTERLAB_SETTINGS_DIR"]), settings)
    return env


class JupyterServer:
    def __init__(self, base: Path):
        self.base = base
        self.root = base / "notebooks"
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None

    def _env(self) -> dict[str, str]:
        env = jupyter_env(self.base)
        env["MPLBACKEND"] = "Agg"
        return env

    def start(self, timeout: float = 60) -> JupyterServer:
        self.root.mkdir(parents=True, exist_ok=True)
        env = self._env()
        cmd = [
            sys.executable, "-m", "jupyterlab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
            "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}",
            f"--ServerApp.root_dir={self.root}", "--allow-root", "--LabApp.news_url=None",
            "--LabApp.extension_manager=readonly", "--expose-app-in-browser",
            "--JupyterNotebookApp.expose_app_in_browser=True",
        ]
        self.log = open(self.base / "server.log", "wb")  # closed in stop()
        self.process = subprocess.Popen(cmd, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"jupyterlab exited: {(self.base / 'server.log').read_text()[-2000:]}")
            try:
                urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2).read()
                return self
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("jupyterlab did not answer in time")

    def page_url(self, path: str) -> str:
        # ?reset: JupyterLab would otherwise restore the notebooks an earlier page opened, and one of
        # them could end up as the current widget
        reset = "&reset" if path.startswith("lab/") else ""
        return f"{self.url}/{path}?token={self.token}{reset}"

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            children = psutil.Process(self.process.pid).children(recursive=True)  # kernels too
        except psutil.NoSuchProcess:
            children = []
        try:
            request = urllib.request.Request(f"{self.url}/api/shutdown?token={self.token}", method="POST")
            urllib.request.urlopen(request, timeout=5).read()
            self.process.wait(timeout=10)
        except (urllib.error.URLError, ConnectionError, TimeoutError, subprocess.TimeoutExpired):
            self.process.kill()
            self.process.wait(timeout=10)
        for child in children:
            try:
                child.kill()
            except psutil.NoSuchProcess:
                pass
        self.log.close()
        self.process = None

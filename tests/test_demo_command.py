"""The README's main command, `make demo`, run exactly as written, headless, as root and as a normal user.

It must start JupyterLab on 127.0.0.1 with the demo notebook and print the URL to open. The test waits for
that URL, asks the server's contents API for the notebook, opens the URL in headless Chromium, runs the
notebook's first code cell, and then stops the server by its PID and checks that nothing of it is left.
Every Jupyter directory and ``$HOME`` point into a temporary folder; the notebook in the repository is
left as it was.
"""

from __future__ import annotations

import contextlib
import json
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

from lab_server import CHROMIUM, CHROMIUM_ARGS, jupyter_env

playwright_api = pytest.importorskip("playwright.sync_api")
expect = playwright_api.expect

pytestmark = [pytest.mark.browser, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
NOTEBOOK = NOTEBOOKS / "01_squeezenet_tour.ipynb"
JUPYTER_LAB = REPO / ".venv" / "bin" / "jupyter-lab"
ARTIFACTS = REPO / "test-artifacts"
PRINTED_URL = re.compile(r"https?://\S+\?token=\w+")
URL = re.compile(r"http://127\.0\.0\.1:(\d+)/lab/tree/01_squeezenet_tour\.ipynb\?token=(\w+)")  # what it must be
# What a caller's environment could slip into `make demo`: make's own state when the suite runs under
# `make test`, a display (Jupyter would open a browser on it), and variables that Make or Jupyter read.
NOT_PASSED_ON = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "DISPLAY", "WAYLAND_DISPLAY", "BROWSER",
                 "JUPYTER_ARGS", "JUPYTER_PORT", "JUPYTER_TOKEN", "VENV", "XDG_CONFIG_HOME", "XDG_CACHE_HOME",
                 "XDG_DATA_HOME")
# JupyterLab would save the notebook, outputs and all, into the repository after two minutes
NO_AUTOSAVE = {"@jupyterlab/docmanager-extension/plugin.jupyterlab-settings": {"autosave": False}}
START_TIMEOUT = 300  # s: only a stale .venv (pyproject.toml or constraints.txt changed) installs before starting
CELL_TIMEOUT = 60_000  # ms: the first cell imports torch, torchvision and scikit-learn in a fresh kernel


@dataclass
class Demo:
    url: str
    token: str
    port: int
    server: psutil.Process  # the jupyter-lab process that make started
    log: Path

    def api(self, path: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/api/{path}?token={self.token}", timeout=5) as r:
            return json.load(r)

    def kernels(self) -> list:
        """The running kernels, none while the server cannot list them: jupyter_server answers 500 when asked while
        a kernel starts (it reads the kernel's last activity before that is set, a race of its own)."""
        try:
            return self.api("kernels")
        except urllib.error.HTTPError as error:
            if error.code == 500:
                return []
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def as_nobody() -> list[str]:
    """A prefix that runs a command as the user ``nobody`` (its uid and gid, no other groups), from root.

    If ``nobody`` may not run the venv's interpreter (e.g. a pyenv Python under /root, mode 0700),
    the command also gets the one capability CAP_DAC_READ_SEARCH: it may then read any file, but writes,
    ``id -u`` and Jupyter's root check are still those of a normal user."""
    if shutil.which("setpriv") is None:
        pytest.skip("needs setpriv (util-linux) to run make demo as a normal user")
    user = pwd.getpwnam("nobody")
    prefix = ["setpriv", f"--reuid={user.pw_uid}", f"--regid={user.pw_gid}", "--clear-groups"]
    for extra in ([], ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]):
        # through `env`, as make runs it: setpriv itself resolves the path it executes with root's rights
        probe = subprocess.run([*prefix, *extra, "env", str(JUPYTER_LAB), "--version"], capture_output=True)
        if probe.returncode == 0:
            return [*prefix, *extra]
    reason = f"user nobody cannot run {JUPYTER_LAB}: {probe.stderr.decode(errors='replace')[-300:]}"
    if os.environ.get("CI"):  # CI runs as root and must test both kinds of user
        pytest.fail(reason)
    pytest.skip(reason)


def answers(port: int, token: str) -> bool:
    try:
        urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status?token={token}", timeout=2).read()
        return True
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def is_jupyter_lab(process: psutil.Process) -> bool:
    with contextlib.suppress(psutil.NoSuchProcess):
        return any(part.endswith("jupyter-lab") for part in process.cmdline())
    return False


def wait_for(condition, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, message
        time.sleep(0.2)


def tail(text: str) -> str:
    return text[-3000:]


@contextlib.contextmanager
def make_demo(base: Path, prefix: list[str], checkout: Path):
    """Runs `make demo` in ``checkout`` (as the user ``prefix`` switches to) until the server answers,
    yields it, then stops it by its PID and checks that none of its processes is left."""
    env = {k: v for k, v in jupyter_env(base / "jupyter", NO_AUTOSAVE).items() if k not in NOT_PASSED_ON}
    # opening a notebook makes a checkpoint copy of it, by default in notebooks/.ipynb_checkpoints
    config = {"FileCheckpoints": {"checkpoint_dir": str(base / "checkpoints")}}
    (Path(env["JUPYTER_CONFIG_DIR"]) / "jupyter_server_config.json").write_text(json.dumps(config))
    env["HOME"] = str(base / "home")
    (base / "home").mkdir()
    if prefix:  # base is the other user's (not what its symlinks point to: the venv stays root's)
        nobody = pwd.getpwnam("nobody")
        for top, dirs, files in os.walk(base):
            for name in [top, *(os.path.join(top, n) for n in dirs + files)]:
                os.chown(name, nobody.pw_uid, nobody.pw_gid, follow_symlinks=False)
    log = base / "make-demo.log"
    with open(log, "wb") as out:
        # its own session: a process group of make and jupyter, away from pytest's terminal
        make = subprocess.Popen([*prefix, "make", "demo"], cwd=checkout, env=env, stdin=subprocess.DEVNULL,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    processes: list[psutil.Process] = []
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while not (printed := PRINTED_URL.search(log.read_text(errors="replace"))):
            if make.poll() is not None:
                pytest.fail(f"make demo exited with {make.returncode} before printing the URL:\n"
                            f"{tail(log.read_text(errors='replace'))}")
            if time.monotonic() > deadline:
                pytest.fail(f"make demo printed no URL in {START_TIMEOUT} s:\n{tail(log.read_text())}")
            time.sleep(0.2)
        match = URL.fullmatch(printed.group(0))
        assert match, f"the URL printed does not open the demo notebook on 127.0.0.1: {printed.group(0)}"
        port, token = int(match.group(1)), match.group(2)
        deadline = time.monotonic() + 30
        while not answers(port, token):
            assert make.poll() is None, f"make demo exited with {make.returncode}:\n{tail(log.read_text())}"
            assert time.monotonic() < deadline, "the printed URL does not answer"
            time.sleep(0.2)
        servers = [p for p in psutil.Process(make.pid).children(recursive=True) if is_jupyter_lab(p)]
        assert len(servers) == 1, [p.cmdline() for p in psutil.Process(make.pid).children(recursive=True)]
        yield Demo(match.group(0), token, port, servers[0], log)
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            # now, not at the start: the kernel and jupyter's helpers are children of the server by now
            processes = [psutil.Process(make.pid), *psutil.Process(make.pid).children(recursive=True)]
        for server in [p for p in processes if is_jupyter_lab(p)]:
            server.send_signal(signal.SIGTERM)  # by its PID: Jupyter shuts its kernels down and exits
        _, alive = psutil.wait_procs(processes, timeout=20)
        for p in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        psutil.wait_procs(alive, timeout=10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(make.pid, signal.SIGKILL)  # anything else in make's process group
        make.wait(timeout=10)
    left = [p.pid for p in processes if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
    assert left == [], f"processes of make demo still running: {left}"
    # nothing that ran with this test's Jupyter directories (a kernel has its connection file there)
    strays = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        if any(str(base) in part for part in p.info["cmdline"] or ()):
            strays.append((p.info["pid"], p.info["cmdline"]))
    assert strays == []
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, f"port {port} still answers"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):  # `make test` installs it: in CI a missing browser is a failure, not a skip
            pytest.fail(f"needs Debian's chromium at {CHROMIUM}")
        pytest.skip(f"needs Debian's chromium at {CHROMIUM} (make test installs it)")
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=list(CHROMIUM_ARGS))
        yield chromium
        chromium.close()


def own_checkout(base: Path) -> Path:
    """What `make demo` reads of the repository, copied into ``base`` for a user who owns it (with the
    modification times, so the stamps in the shared venv stay up to date) and using the repository's venv.
    In a checkout owned by root, JupyterLab would open the notebook read-only and refuse to run it."""
    checkout = base / "layerscope"
    checkout.mkdir()
    for name in ("Makefile", "pyproject.toml", "constraints.txt"):
        shutil.copy2(REPO / name, checkout / name)
    shutil.copytree(NOTEBOOKS, checkout / "notebooks", ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    (checkout / ".venv").symlink_to(REPO / ".venv")
    return checkout


def notebooks_snapshot() -> dict[str, bytes]:
    return {p.name: p.read_bytes() if p.is_file() else b"" for p in NOTEBOOKS.iterdir()}


@pytest.mark.parametrize("user", ["current", "nobody"])
def test_make_demo(user, browser):
    if user == "nobody":
        if os.geteuid() != 0:
            pytest.skip("the current user is a normal user already")
        prefix = as_nobody()
        # the venv's owner brings it up to date (a no-op when make test or the run as root just did)
        subprocess.run(["make", "-s", ".venv/.layerscope-demo-installed"], cwd=REPO, check=True,
                       env={k: v for k, v in os.environ.items() if k not in NOT_PASSED_ON})
        expected_uid = pwd.getpwnam("nobody").pw_uid
    else:
        prefix, expected_uid = [], os.geteuid()
    before = notebooks_snapshot()
    first_code = next(c for c in json.loads(NOTEBOOK.read_text())["cells"] if c["cell_type"] == "code")
    first_line = "".join(first_code["source"]).splitlines()[0]
    ARTIFACTS.mkdir(exist_ok=True)
    base = Path(tempfile.mkdtemp(prefix="layerscope-demo-"))  # not under pytest's tmp: root-only (0700)
    t0 = time.monotonic()
    try:
        # as root, the repository itself; as a normal user, a checkout of one's own
        with make_demo(base, prefix, own_checkout(base) if prefix else REPO) as demo:
            started = time.monotonic() - t0
            flags = demo.server.cmdline()
            assert demo.server.uids().real == expected_uid
            assert ("--allow-root" in flags) == (expected_uid == 0), flags
            assert "--no-browser" in flags, flags  # no display here
            assert "--ip=127.0.0.1" in flags, flags
            assert "http://127.0.0.1:" in demo.output()

            listing = demo.api("contents")
            assert NOTEBOOK.name in [item["name"] for item in listing["content"]], listing
            assert demo.api(f"contents/{NOTEBOOK.name}")["type"] == "notebook"

            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            problems: list[str] = []
            local = (f"http://127.0.0.1:{demo.port}/", f"ws://127.0.0.1:{demo.port}/", "blob:", "data:")
            page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
            page.on("console", lambda m: m.type == "error" and problems.append(f"console error: {m.text}"))
            page.on("response", lambda r: r.status >= 400 and problems.append(f"HTTP {r.status}: {r.url}"))
            page.on("request", lambda r: r.url.startswith(local) or problems.append(f"request leaving: {r.url}"))
            page.goto(demo.url)  # the URL exactly as printed
            cell = page.locator(".jp-Notebook .jp-CodeCell").first
            expect(cell.locator(".jp-InputArea-editor")).to_contain_text(first_line, timeout=60_000)
            # the page's kernel connection exists (a cell run before it would be dropped) and the kernel is idle
            wait_for(lambda: [(k["connections"], k["execution_state"]) for k in demo.kernels()] == [(1, "idle")],
                     60, "the notebook's kernel did not start and connect")
            expect(page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']")).to_be_attached()
            cell.locator(".jp-InputArea-editor").click()
            page.keyboard.press("Shift+Enter")
            try:
                expect(cell.locator(".jp-InputPrompt")).to_have_text("[1]:", timeout=CELL_TIMEOUT)
            except AssertionError:
                page.screenshot(path=ARTIFACTS / f"make-demo-{user}-failed.png")
                raise
            errors = cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.error']")
            assert errors.count() == 0, errors.first.inner_text()
            ran = time.monotonic() - t0
            page.screenshot(path=ARTIFACTS / f"make-demo-{user}.png")

            sessions = demo.api("sessions")
            assert [s["path"] for s in sessions] == [NOTEBOOK.name]
            kernels = [p for p in demo.server.children(recursive=True) if "ipykernel_launcher" in " ".join(p.cmdline())]
            assert [k.uids().real for k in kernels] == [expected_uid]
            assert problems == []
            page.close()
        print(f"\nmake demo as {user}: URL answered after {started:.1f} s, first cell ran after {ran:.1f} s, "
              f"stopped after {time.monotonic() - t0:.1f} s")
    finally:
        with contextlib.suppress(FileNotFoundError):
            shutil.copy(base / "make-demo.log", ARTIFACTS / f"make-demo-{user}.log")
        shutil.rmtree(base, ignore_errors=True)
    assert notebooks_snapshot() == before  # nothing saved or added in notebooks/

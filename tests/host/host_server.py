"""Server plumbing for the host tiers: start a WebUI-like server as a child process, wait for its
API, read its log and memory, stop it by its PID.

Host-independent (AUTOMATIC1111, Forge or ComfyUI): what to start is the caller's. Used by every
tier: tests/host/conftest.py (A1111), tests/host/forge/conftest.py (Forge) and
tests/host/comfy/conftest.py (ComfyUI).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time

import host_helpers as H
import pytest
import requests


class Server:
    """What the tests know about a live server. `env_prefix`: the prefix of the tier's variables
    (LR_WEBUI, LR_FORGE), named when an attached server lacks its <prefix>_LOG or <prefix>_PID."""

    def __init__(
        self,
        url,
        pid=None,
        log_path=None,
        data_dir=None,
        models=None,
        proc=None,
        what="WebUI",
        env_prefix="LR_WEBUI",
    ):
        self.url = url
        self.pid = pid
        self.log_path = log_path
        self.data_dir = data_dir
        self.models = models or {}
        self.proc = proc
        self.what = what
        self.env_prefix = env_prefix
        self.titles = {}  # stem -> checkpoint title
        self.started_s = None  # seconds from start to a ready API (started mode only)

    def log_mark(self) -> int:
        return (
            os.path.getsize(self.log_path) if self.log_path and os.path.exists(self.log_path) else 0
        )

    def log_since(self, mark: int, settle: float = 0.3) -> str:
        if not self.log_path:
            pytest.skip(
                f"the {self.what}'s stdout is not available (attached without {self.env_prefix}_LOG)"
            )
        time.sleep(settle)  # let the server flush what it printed for the request
        with open(self.log_path, "rb") as f:
            f.seek(mark)
            return f.read().decode("utf-8", "replace")

    def rss_mib(self, peak: bool = False) -> float:
        """VmRSS (or VmHWM, the peak, with peak=True) of the server process, in MiB."""
        if not self.pid:
            pytest.skip(
                f"the {self.what}'s PID is not known (attached without {self.env_prefix}_PID)"
            )
        key = "VmHWM:" if peak else "VmRSS:"
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError(f"no {key}")

    def alive(self) -> bool:
        try:
            return requests.get(self.url + "/sdapi/v1/sd-models", timeout=30).status_code == 200
        except requests.RequestException:
            return False

    def read_titles(self) -> None:
        for m in H.get(self.url, "/sdapi/v1/sd-models"):
            self.titles[m["model_name"]] = m["title"]

    def title(self, stem: str) -> str:
        if stem not in self.titles:
            pytest.skip(f"checkpoint {stem} is not in this {self.what}'s list")
        return self.titles[stem]


def find_source(
    prefix: str,
    default_dir: str,
    default_python: str,
    none: str,
    check=None,
    launcher: str = "launch.py",
):
    """Where the tier's server comes from: ('url', url) | ('dir', host_dir, python) | (None, reason).

    <prefix>_URL attaches; else <prefix>_DIR (default `default_dir` when it has the `launcher` script;
    "none", "0" or empty turn the default off) is started with <prefix>_PYTHON (default
    `default_python`). `none`: the reason when there is nothing; `check(dir)`: why a folder with the
    launcher is still the wrong host (None: it is right)."""
    url = os.environ.get(prefix + "_URL")
    if url:
        return ("url", url.rstrip("/"))
    d = os.environ.get(prefix + "_DIR")
    if d is not None and d.strip().lower() in ("", "none", "0"):
        return (None, none)  # explicitly off (also hides the default folder)
    if d is None and os.path.isfile(os.path.join(default_dir, launcher)):
        d = default_dir
    if not d:
        return (None, none)
    py = os.environ.get(prefix + "_PYTHON", default_python)
    if not os.path.isfile(os.path.join(d, launcher)):
        return (None, f"{prefix}_DIR={d} has no {launcher}; {none}")
    wrong = check(d) if check else None
    if wrong:
        return (None, f"{prefix}_DIR={d} {wrong}; {none}")
    if not os.path.exists(py):
        return (None, f"{prefix}_PYTHON={py} does not exist; {none}")
    return ("dir", d, py)


def skip_unless_asked(config, items, folder: str, prefix: str, why: str) -> None:
    """A tier that runs only when asked (Forge, ComfyUI): unless its `folder` (or a file in it) is
    named on the command line, or <prefix>_DIR / <prefix>_URL is set, its collected tests are
    skipped with `why` — so `pytest tests/host` (the A1111 tier) never starts that host."""
    if os.environ.get(prefix + "_URL") or os.environ.get(prefix + "_DIR"):
        return
    root = str(config.invocation_params.dir)
    for a in config.invocation_params.args:
        if a.startswith("-"):
            continue
        p = os.path.realpath(os.path.join(root, a.split("::")[0]))
        if p == folder or p.startswith(folder + os.sep):
            return
    skip = pytest.mark.skip(reason=why)
    for it in items:
        if str(it.fspath).startswith(folder + os.sep):
            it.add_marker(skip)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tail(path, n=4000) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(max(0, os.path.getsize(path) - n))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return "(no log)"


STARTED_LINE = "Startup time:"  # printed by webui.py (A1111 and Forge) once the app is complete


def _log_says_started(server: Server) -> bool:
    try:
        with open(server.log_path, "rb") as f:
            return STARTED_LINE.encode() in f.read()
    except OSError:
        return False


def wait_ready(server: Server, timeout: float) -> None:
    """Wait until the server answers /sdapi/v1/sd-models. A server we started is not touched before
    its log says "Startup time:": with its UI, webui.py opens the port *before* it adds its middleware
    and API, and a request in that window makes Starlette build the app early — the WebUI then dies
    with "Cannot add middleware after an application has started"."""
    t0 = time.monotonic()
    proc = server.proc
    while time.monotonic() - t0 < timeout:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"the {server.what} exited with {proc.returncode}:\n{tail(server.log_path)}"
            )
        if proc is not None and server.log_path and not _log_says_started(server):
            time.sleep(1)
            continue
        try:
            if requests.get(server.url + "/sdapi/v1/sd-models", timeout=5).status_code == 200:
                return
        except requests.RequestException:
            pass
        time.sleep(1)
    raise RuntimeError(
        f"the {server.what} did not answer /sdapi/v1/sd-models within {timeout:.0f}s:\n"
        f"{tail(server.log_path)}"
    )


def _die_with_parent() -> None:
    """In the child: get SIGTERM when pytest dies, even by SIGKILL (Linux), so no server is orphaned."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def start(
    args: list, cwd: str, env: dict, url: str, log_path: str, timeout: float, what: str, **server_kw
) -> Server:
    """Popen `args` (stdout+stderr to log_path) and wait until its API answers; stopped again on failure."""
    t0 = time.monotonic()
    log = open(log_path, "wb")
    proc = subprocess.Popen(
        args,
        cwd=cwd,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,
    )
    log.close()
    s = Server(url, pid=proc.pid, log_path=log_path, proc=proc, what=what, **server_kw)
    try:
        wait_ready(s, timeout)
    except BaseException:
        stop(s)
        raise
    s.started_s = time.monotonic() - t0
    return s


def stop(s: Server) -> None:
    proc = s.proc
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
    return dst


# --- the browser tiers (A1111 and Forge): Debian's Chromium driven by Playwright -------------------
CHROMIUM = os.environ.get("LR_CHROMIUM", "/usr/bin/chromium")


def browser_missing() -> str | None:
    """Why a browser tier cannot run here (None: it can)."""
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "no Playwright: pip install playwright (into the Python that runs pytest)"
    if not os.path.exists(CHROMIUM):
        return f"no Chromium at {CHROMIUM}: apt-get install -y chromium (or set LR_CHROMIUM)"
    return None


def chromium():
    """A headless Chromium for one test module (a generator for a pytest fixture)."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()

"""Drive JupyterLab in Debian's Chromium the way a learner does: open, Run All, read, click.

Used by tests/test_browser_e2e.py. Everything runs on 127.0.0.1 in temporary folders: its own
Jupyter config/runtime/data dirs and a copy of the notebooks, so autosave never touches the
checkout and no earlier kernel or saved output can make a check pass.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import nbformat
import requests

from helpers.config import REPO_URL

REPO = Path(__file__).resolve().parents[1]
GITHUB_REPO = REPO_URL.split("github.com/", 1)[1].removesuffix(".git")  # owner/name
CHROMIUM = Path("/usr/bin/chromium")
# Without the networking flags Chromium keeps calling home, which floods a closed network.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
KERNEL_IDLE = re.compile(r"Python 3 \(ipykernel\) \| Idle")
ERROR_OUTPUT = ".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"


def chromium_missing_reason() -> str | None:
    """Why the browser test cannot run here, or None when it can."""
    if not CHROMIUM.exists():
        return f"{CHROMIUM} not found: install Debian's chromium (apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[dev]')"
    return None


def strip_notebook(path: Path) -> None:
    """Remove every output and execution count, so only a real run can produce them."""
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
            cell.execution_count = None
    nbformat.write(nb, path)


def copy_tree_for_lab(target: Path, folders: tuple[str, ...] = ("notebooks", "docs")) -> Path:
    """Copy the notebooks (and the pictures they show) into ``target``, outputs stripped."""
    for name in folders:
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, target / name, ignore=shutil.ignore_patterns(
                ".ipynb_checkpoints", "__pycache__"))
    for notebook in target.rglob("*.ipynb"):
        strip_notebook(notebook)
    return target


class JupyterLab:
    """``jupyter lab --no-browser`` on 127.0.0.1 with a token and throw-away config dirs."""

    def __init__(self, root: Path, state: Path, port: int, env: Mapping[str, str] = ()) -> None:
        self.root, self.state, self.port = root, state, port
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{port}"
        self.extra_env = dict(env)
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = state / "jupyter.log"

    def __enter__(self) -> JupyterLab:
        config, runtime, data = (self.state / d for d in ("config", "runtime", "data"))
        # The "get notified about Jupyter news?" toast would cover the notebook.
        settings = config / "lab/user-settings/@jupyterlab/apputils-extension"
        settings.mkdir(parents=True)
        (settings / "notification.jupyterlab-settings").write_text(
            json.dumps({"fetchNews": "false", "checkForUpdates": False})
        )
        runtime.mkdir()
        data.mkdir()
        env = {**os.environ, **self.extra_env, "JUPYTER_CONFIG_DIR": str(config),
               "JUPYTER_RUNTIME_DIR": str(runtime), "JUPYTER_DATA_DIR": str(data),
               "JUPYTER_PLATFORM_DIRS": "1"}
        jupyter = Path(sys.executable).parent / "jupyter"
        cmd = [str(jupyter), "lab", "--no-browser", "--ip=127.0.0.1", f"--port={self.port}",
               f"--ServerApp.token={self.token}", "--allow-root",
               f"--ServerApp.root_dir={self.root}", "--ServerApp.port_retries=0"]
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.root, env=env, stdout=log,
                                         stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"jupyter lab exited at start:\n{self.log()}")
            with contextlib.suppress(requests.RequestException):
                if self.api("GET", "status").ok:
                    return self
            time.sleep(0.2)
        self.__exit__()
        raise TimeoutError(f"jupyter lab did not answer within 60 s:\n{self.log()}")

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            # Shut the kernels down first, and wait for it: a kernel orphaned by a slow shutdown
            # would keep notebook 02's server on port 7871 for every test after this one.
            with contextlib.suppress(requests.RequestException, ValueError):
                sessions = self.api("GET", "sessions").json()
                with ThreadPoolExecutor(max(len(sessions), 1)) as pool:  # each waits for its kernel
                    list(pool.map(lambda s: self.api("DELETE", f"sessions/{s['id']}"), sessions))
            self.proc.terminate()  # SIGTERM: the server shuts any remaining kernels down
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def api(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """Call the Jupyter server's REST API with the token."""
        headers = {"Authorization": f"token {self.token}"}
        kwargs.setdefault("timeout", 10)
        return requests.request(method, f"{self.url}/api/{path}", headers=headers, **kwargs)

    def start_kernel(self, notebook: str) -> None:
        """Start the notebook's kernel ahead of its tab: the session JupyterLab itself creates when
        the notebook opens, and attaches to when it exists. Starting the next notebooks' kernels
        while one runs saves ~5 s per notebook."""
        self.api("POST", "sessions", timeout=120, json={
            "path": notebook, "name": Path(notebook).name, "type": "notebook",
            "kernel": {"name": "python3"}}).raise_for_status()

    def reset(self, notebook: str, keep_kernel: bool = False) -> None:
        """Strip the notebook's outputs; unless ``keep_kernel``, delete its sessions (kernels)."""
        for session in [] if keep_kernel else self.api("GET", "sessions").json():
            if session.get("path") == notebook:
                self.api("DELETE", f"sessions/{session['id']}")
        strip_notebook(self.root / notebook)

    def lab_url(self, notebook: str) -> str:
        # ``reset`` keeps JupyterLab from restoring tabs and kernels of an earlier visit.
        return f"{self.url}/lab/tree/{notebook}?reset&token={self.token}"

    def log(self, tail: int = 4000) -> str:
        """The server's log (the kernels' stderr lands here too)."""
        return self.log_path.read_text(errors="replace")[-tail:] if self.log_path.exists() else ""


@contextlib.contextmanager
def chromium_page(user_data_dir: Path, width: int = 1280, height: int = 900) -> Iterator[Any]:
    """A playwright page in headless Debian Chromium with a fresh profile."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(user_data_dir), executable_path=str(CHROMIUM), headless=True,
            args=CHROMIUM_ARGS, viewport={"width": width, "height": height}, locale="zh-CN",
        )
        try:
            # Notebooks show pictures by their GitHub address (so Colab finds them); this network
            # is closed, so answer those requests from the checkout instead.
            context.route(f"https://raw.githubusercontent.com/{GITHUB_REPO}/**", _serve_from_repo)
            page = context.pages[0] if context.pages else context.new_page()
            yield page
        finally:
            context.close()


def _serve_from_repo(route: Any) -> None:
    parts = route.request.url.split(f"/{GITHUB_REPO}/", 1)[1].split("/", 1)  # branch, path
    path = REPO / parts[1] if len(parts) == 2 else None
    if path is not None and path.is_file() and REPO in path.resolve().parents:
        route.fulfill(path=str(path))
    else:
        route.fulfill(status=404)


def wait_kernel_idle(page: Any, timeout_s: float) -> None:
    """Wait until the status bar says the kernel is idle (the toolbar is 'idle' before a kernel)."""
    from playwright.sync_api import expect

    expect(page.locator("#jp-main-statusbar")).to_contain_text(KERNEL_IDLE, timeout=timeout_s * 1000)


def run_all_and_wait(page: Any, timeout_s: float) -> None:
    """Run > Run All Cells, then wait until no cell is queued or running and the kernel idles."""
    page.locator("#jp-MainMenu .lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
    page.locator(".lm-Menu-item[data-command='runmenu:run-all']").click()
    deadline = time.monotonic() + timeout_s
    started = False
    settled_since = None
    while time.monotonic() < deadline:
        # "[*]:" marks queued and running cells (all of them at once, from the click on); Run All
        # stops at the first error, leaving "[ ]:". Before the first mark nothing has started.
        marks = prompts(page)
        busy = any("*" in p for p in marks)
        started = started or busy or any(re.search(r"\[\d+\]", p) for p in marks)
        idle = bool(KERNEL_IDLE.search(page.locator("#jp-main-statusbar").inner_text()))
        if started and idle and not busy:
            settled_since = settled_since or time.monotonic()
            if time.monotonic() - settled_since > 0.5:
                return
        else:
            settled_since = None
        page.wait_for_timeout(250)
    raise TimeoutError(f"Run All did not finish within {timeout_s:.0f} s; prompts: {prompts(page)}")


def prompts(page: Any) -> list[str]:
    """The code cells' prompts ("[3]:", "[*]:", "[ ]:"), off-screen cells included."""
    # textContent, not innerText: JupyterLab skips rendering cells outside the viewport
    # (content-visibility), and innerText of a skipped cell is empty.
    return page.locator(".jp-CodeCell .jp-InputArea-prompt").all_text_contents()


def error_outputs(page: Any) -> list[str]:
    """Texts of the error outputs (tracebacks) shown in the notebook."""
    texts = page.locator(ERROR_OUTPUT).all_text_contents()  # textContent: off-screen cells too
    return [text[-2000:] for text in texts if _is_error(text)]


def _is_error(text: str) -> bool:
    # stderr (warnings, logs, tqdm) and errors share the mime type; only errors carry a traceback.
    return "Traceback" in text or bool(re.search(r"^\w*(Error|Exception)\b", text, re.M))


def unexecuted_code_cells(page: Any) -> int:
    """Code cells whose prompt shows no execution count."""
    return sum(1 for p in prompts(page) if not re.search(r"\[\d+\]", p))


def save_and_wait(page: Any, notebook: Path, timeout_s: float = 10) -> None:
    """Ctrl+S, then wait until JupyterLab has written the file."""
    before = notebook.stat().st_mtime_ns
    page.keyboard.press("Control+s")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if notebook.stat().st_mtime_ns != before:
            with contextlib.suppress(ValueError):  # written in place: may be half-written
                json.loads(notebook.read_text(encoding="utf-8"))
                return
        time.sleep(0.05)
    raise AssertionError(f"{notebook.name} was not saved within {timeout_s:.0f} s")


def saved_errors(notebook: Path) -> list[str]:
    """Error outputs in the notebook file as saved by JupyterLab."""
    nb = nbformat.read(notebook, as_version=4)
    return [f"{o.get('ename')}: {o.get('evalue')}" for c in nb.cells if c.cell_type == "code"
            for o in c.get("outputs", []) if o.get("output_type") == "error"]


def saved_text(notebook: Path) -> str:
    """Every stream and plain-text output in the notebook file as saved by JupyterLab.

    The page alone cannot tell: JupyterLab renders only the cells near the viewport.
    """
    nb = nbformat.read(notebook, as_version=4)
    texts = [o.get("text") or o.get("data", {}).get("text/plain", "")
             for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    return "\n".join(t if isinstance(t, str) else "".join(t) for t in texts)

"""The learner's view. One JupyterLab in headless Chromium runs every notebook in order, 01 -> 05,
each kernel left running (as a learner leaves them), failing on any error output. The learner here
has no cloud key and no vLLM (the commonest case, e.g. offline or in mainland China): notebook 04's
SDK cells then run against the learner's own ``dhllm serve``, and 05 takes its no-vLLM path. nbval
runs the same notebooks the other way (keys for the local fakes, vLLM where installed), so each
notebook runs twice per ``make test``, once per kind of learner. Notebook 05's chat
box is used like a person would: type, click send, watch the answer stream, follow up, clear.
Notebook 01's downloads must draw a progress bar widget.

Skipped (with the reason in pytest's summary) when /usr/bin/chromium is missing; .ci/run installs
it, so CI always runs this. Screenshots go to $DHLLM_SCREENSHOT_DIR when set (``make images``
sets docs/images), else to the test's temporary folder, so ``make test`` leaves git clean.
"""

from __future__ import annotations

import os
import re
import time
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.e2e_lab import (
    REPO,
    JupyterLab,
    chromium_missing_reason,
    chromium_page,
    copy_tree_for_lab,
    error_outputs,
    run_all_and_wait,
    save_and_wait,
    saved_errors,
    saved_text,
    unexecuted_code_cells,
    wait_kernel_idle,
)
from tests.notebook_env import notebook_lock, notebook_services

RUN_ALL_TIMEOUT_S = 540  # per notebook; 02 loads, serves and measures the embedded model on CPU
ANSWER_TIMEOUT_S = 120

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(chromium_missing_reason() is not None,
                       reason=f"browser test skipped: {chromium_missing_reason()}"),
]


@pytest.fixture
def shots(tmp_path: Path) -> Path:
    """Where screenshots go: docs/images for ``make images``, a temporary folder otherwise."""
    target = Path(os.environ.get("DHLLM_SCREENSHOT_DIR") or tmp_path / "shots")
    if not target.is_absolute():
        target = REPO / target
    target.mkdir(parents=True, exist_ok=True)
    return target


NOTEBOOKS = sorted(p.name for p in (REPO / "notebooks").glob("*.ipynb"))
NO_KEY_HINT = "没有 OPENAI_API_KEY：同样的 SDK 代码连你自己的服务"  # notebook 04, printed without a key


def run_notebook(page, lab: JupyterLab, root: Path, notebook: str,  # noqa: ANN001
                 kernel: Future[None] | None = None) -> None:
    """Open ``notebook`` in ``page`` (on its ``kernel`` started ahead, if given), Run All, and
    fail on any error output or unexecuted cell."""
    if kernel is not None:
        kernel.result()  # raises if the kernel did not start
    lab.reset(notebook, keep_kernel=kernel is not None)
    page.goto(lab.lab_url(notebook))
    wait_kernel_idle(page, 90)
    run_all_and_wait(page, RUN_ALL_TIMEOUT_S)
    errors = error_outputs(page)
    assert not errors, f"{notebook}: cells show errors:\n\n" + "\n\n".join(errors)
    assert unexecuted_code_cells(page) == 0, f"{notebook}: Run All left cells unexecuted"
    save_and_wait(page, root / notebook)  # the saved file must agree: no error outputs
    assert saved_errors(root / notebook) == [], notebook
    page.keyboard.press("Control+b")  # hide the file browser for the pictures


def learner_without_keys_or_vllm(services: dict[str, str]) -> tuple[dict[str, str], set[str]]:
    """The notebooks' test environment less every cloud key, with vLLM turned off; and the keys."""
    from helpers.chat.presets import GEMINI_KEY_ENVS, PRESETS

    keys = {*GEMINI_KEY_ENVS, *(p.key_env for p in PRESETS.values() if p.key_env)}
    env = {k: v for k, v in services.items() if k not in keys}
    return {**env, "DHLLM_VLLM_PYTHON": "none"}, keys


def test_every_notebook_in_one_jupyterlab(tmp_path: Path, shots: Path,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """01 -> 05 in one JupyterLab, like a learner with no key and no vLLM: no kernel is restarted
    or shut down (05's server stays up for its chat box), and every cell of every notebook succeeds."""
    assert NOTEBOOKS[:5] == ["01_download.ipynb", "02_linly_api.ipynb", "03_qwen.ipynb",
                             "04_cloud_llms.ipynb", "05_digital_human.ipynb"], NOTEBOOKS
    root = copy_tree_for_lab(tmp_path / "root")
    state = tmp_path / "state"
    state.mkdir()
    # Each notebook's lock, taken before its tab opens, is held until JupyterLab has stopped its
    # kernel: nbval may run the same notebook on the same ports from the other xdist worker.
    with ExitStack() as locks, notebook_services() as services, \
            JupyterLab(root, state, free_port(), env=_no_keys(monkeypatch, services)) as lab, \
            chromium_page(tmp_path / "chromium-profile") as first_page, \
            ThreadPoolExecutor(1) as starter:
        page = first_page
        # The next notebooks' kernels start one by one in the background while 01 runs.
        kernels = {name: starter.submit(lab.start_kernel, f"notebooks/{name}")
                   for name in NOTEBOOKS[1:]}
        try:
            for name in NOTEBOOKS:
                notebook = f"notebooks/{name}"
                if name != NOTEBOOKS[0]:
                    # A fresh tab per notebook; the last one closes without its unload prompt.
                    # Its kernel keeps running on the server, as it would for a learner.
                    previous, page = page, page.context.new_page()
                    previous.close(run_before_unload=False)
                locks.enter_context(notebook_lock(name))
                run_notebook(page, lab, root, notebook, kernels.get(name))
                if name == "01_download.ipynb":
                    check_download_progress_bar(page, shots)
                elif name == "04_cloud_llms.ipynb":  # no key: the SDK cells reach our own server
                    outputs = saved_text(root / notebook)
                    for hint in (NO_KEY_HINT, "网关后面是你自己的服务"):
                        assert hint in outputs, outputs[-3000:]
                elif name == "05_digital_human.ipynb":  # the chat widget left 02 for 05
                    check_chat_box(page, shots)
            kernels = [s["path"] for s in lab.api("GET", "sessions").json()]
            assert sorted(kernels) == [f"notebooks/{n}" for n in NOTEBOOKS], kernels
        except BaseException:
            # What the browser showed when it failed, for the person reading the CI log.
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"failure screenshot: {tmp_path / 'failure.png'}\njupyter log:\n{lab.log()}")
            raise


def _no_keys(monkeypatch: pytest.MonkeyPatch, services: dict[str, str]) -> dict[str, str]:
    """The kernels inherit this process's environment too: no key may come from there either."""
    env, keys = learner_without_keys_or_vllm(services)
    for key in keys:
        monkeypatch.delenv(key, raising=False)
    return env


def check_chat_box(page, shots: Path) -> None:  # noqa: ANN001
    """Notebook 05's chat box, used like a person would: type, send, watch it stream, follow up."""
    chat = page.locator(".dhllm-chat").last
    center(chat)

    first = ask_like_a_person(page, chat, "What is the capital of France?", press_enter=False)
    assert len(first) >= 2, f"the answer did not grow piece by piece: {first}"
    center(chat)
    page.screenshot(path=str(shots / "jupyterlab_notebook02.png"))
    # The follow-up goes out with Enter; the widget keeps and shows both turns.
    ask_like_a_person(page, chat, "And what is the capital of Germany?", press_enter=True)
    assert chat.locator(".dhllm-msg-user").count() == 2
    assert chat.locator(".dhllm-msg-assistant").count() == 2
    assert "2 轮对话" in chat.locator(".dhllm-chat-status").inner_text()
    shoot(page, chat, shots / "chat_widget.png")
    # A longer answer, photographed while it is still streaming in.
    ask_like_a_person(page, chat, "Tell me a short story about a robot.", press_enter=True,
                      streaming_shot=shots / "chat_widget_streaming.png")

    chat.get_by_role("button", name="清空").click()
    page.wait_for_function(
        "el => el.querySelectorAll('.dhllm-msg').length === 0",
        arg=chat.element_handle(), timeout=10_000)
    assert "还没有对话" in chat.locator(".dhllm-chat-log").inner_text()
    assert "0 轮对话" in chat.locator(".dhllm-chat-status").inner_text()


def check_download_progress_bar(page, shots: Path) -> None:  # noqa: ANN001
    """Notebook 01's downloads draw a progress bar widget (tqdm.auto in Jupyter)."""
    bars = page.locator(".jp-CodeCell", has=page.locator(".widget-hprogress"))
    cell = bars.filter(has_text="linly_dir = download(")
    assert cell.count() == 1, "no progress bar widget under the Linly download in notebook 01"
    center(cell, "start")
    shoot(page, cell, shots / "download_progress.png")


def center(element, block: str = "center") -> None:  # noqa: ANN001
    """Scroll the element to the middle (or top: block="start") of the notebook view."""
    element.evaluate(f"el => el.scrollIntoView({{block: '{block}'}})")


def shoot(page, element, path: Path, margin: int = 8) -> None:  # noqa: ANN001
    """Screenshot of one element with a little room around it, cut to the visible notebook."""
    box = element.bounding_box()
    view = page.locator(".jp-NotebookPanel-notebook:visible").bounding_box()
    left, top = max(box["x"] - margin, view["x"]), max(box["y"] - margin, view["y"])
    right = min(box["x"] + box["width"] + margin, view["x"] + view["width"])
    bottom = min(box["y"] + box["height"] + margin, view["y"] + view["height"])
    page.screenshot(path=str(path),
                    clip={"x": left, "y": top, "width": right - left, "height": bottom - top})


# Records every text the newest answer shows, however fast the pieces come (polling could miss
# intermediate states): each widget update is one DOM mutation.
WATCH_ANSWER = """([el, before]) => {
    const log = el.querySelector('.dhllm-chat-log');
    if (window.__dhllmWatch) window.__dhllmWatch.disconnect();
    window.__dhllmSeen = [];
    window.__dhllmWatch = new MutationObserver(() => {
        const answers = log.querySelectorAll('.dhllm-msg-assistant');
        if (answers.length > before) window.__dhllmSeen.push(answers[answers.length - 1].textContent);
    });
    window.__dhllmWatch.observe(log, {childList: true, subtree: true, characterData: true});
}"""


def ask_like_a_person(page, chat, question: str, press_enter: bool,  # noqa: ANN001
                      streaming_shot: Path | None = None) -> list[str]:
    """Type a question, send it, and watch the answer; returns the distinct texts it showed."""
    answers = chat.locator(".dhllm-msg-assistant")
    before = answers.count()
    page.evaluate(WATCH_ANSWER, [chat.element_handle(), before])
    box = chat.locator(".dhllm-chat-input input")
    send = chat.get_by_role("button", name="发送")
    box.click()
    box.press_sequentially(question, delay=5)
    if press_enter:
        box.press("Enter")
    else:
        send.click()
    deadline = time.monotonic() + ANSWER_TIMEOUT_S
    while time.monotonic() < deadline:
        if answers.count() > before:
            if streaming_shot is not None and not send.is_enabled() and answer_text(answers.last):
                center(chat)
                shoot(page, chat, streaming_shot)
                streaming_shot = None
            if send.is_enabled():
                break
        page.wait_for_timeout(50)
    else:
        raise TimeoutError(f"no complete answer to {question!r} within {ANSWER_TIMEOUT_S} s")
    errors = chat.locator(".dhllm-msg-error").all_inner_texts()
    assert not errors, f"the chat box shows an error: {errors}"
    users = chat.locator(".dhllm-msg-user").all_inner_texts()
    assert users[-1].endswith(question), users
    assert box.input_value() == ""
    assert answer_text(answers.last), "the answer is empty"
    seen: list[str] = []
    for text in page.evaluate("window.__dhllmSeen"):
        text = re.sub(r"^助手：", "", text).strip()
        if text and text != "…" and (not seen or text != seen[-1]):
            seen.append(text)
    return seen


def answer_text(answer) -> str:  # noqa: ANN001
    """An answer's text without the speaker label ("…" while nothing has arrived yet)."""
    text = re.sub(r"^助手：", "", answer.inner_text()).strip()
    return "" if text == "…" else text

"""A chat box for notebooks: type a question, watch the answer stream in, ask a follow-up.

It talks to our API server over HTTP (``helpers.client.LinlyClient``), like the digital human's
front end would, so it works with any OpenAI-compatible server, not only a model in this kernel.
"""

from __future__ import annotations

import html
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import ipywidgets as widgets

from helpers.config import DEFAULT_URL

# Inline styles: the HTML widget has no stylesheet of its own, and this must look the same in
# JupyterLab, classic Notebook, VS Code and Colab.
_STYLES = {
    "user": "background:#e8f0fe;border-radius:8px;padding:6px 10px;margin:4px 0 4px 20%;",
    "assistant": "background:#f1f3f4;border-radius:8px;padding:6px 10px;margin:4px 20% 4px 0;",
    "error": "background:#fce8e6;color:#a50e0e;border-radius:8px;padding:6px 10px;margin:4px 0;",
}
_LABELS = {"user": "你", "assistant": "助手", "error": "出错了"}

StreamFn = Callable[[Sequence[dict[str, str]]], Iterator[str]]


class ChatBox(widgets.VBox):
    """The chat widget; ``chat_box()`` builds one. ``ask()``/``clear()`` are what the buttons do."""

    def __init__(self, stream: StreamFn, url: str = DEFAULT_URL, system: str | None = None) -> None:
        self._stream = stream
        self.url = url
        self.system = system
        self.history: list[dict[str, str]] = []  # user/assistant turns, without the system prompt
        self._shown: list[tuple[str, str]] = []  # (kind, text) as displayed, errors included
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

        self.conversation = widgets.HTML(layout=widgets.Layout(max_height="400px", overflow="auto"))
        self.conversation.add_class("dhllm-chat-log")
        self.input = widgets.Text(
            placeholder="输入问题，按回车或点“发送”", layout=widgets.Layout(flex="1 1 auto")
        )
        self.input.add_class("dhllm-chat-input")
        self.send_button = widgets.Button(description="发送", button_style="primary", icon="paper-plane")
        self.send_button.add_class("dhllm-chat-send")
        self.clear_button = widgets.Button(description="清空", icon="trash")
        self.clear_button.add_class("dhllm-chat-clear")
        self._streaming = False
        self.status = widgets.HTML()
        self.status.add_class("dhllm-chat-status")

        self.send_button.on_click(lambda _button: self._ask_soon())
        self.clear_button.on_click(lambda _button: self.clear())
        # Enter in the box: ipywidgets 8 deprecates Text.on_submit but still sends the "submit"
        # event, so listen for it directly.
        self.input.on_msg(self._on_input_msg)

        controls = widgets.HBox([self.input, self.send_button, self.clear_button])
        super().__init__([self.conversation, controls, self.status])
        self.add_class("dhllm-chat")
        self._render()

    # -- what the buttons do ----------------------------------------------------------------

    def ask(self, text: str | None = None) -> threading.Thread | None:
        """Ask ``text`` (default: what is typed); the answer streams in from a background thread.

        Returns the thread (join it to wait), or None when there is nothing to send or an answer
        is still streaming.
        """
        question = (self.input.value if text is None else text).strip()
        with self._lock:
            if not question or self.busy:
                return None
            self.input.value = ""
            self.history.append({"role": "user", "content": question})
            self._shown.append(("user", question))
            self._shown.append(("assistant", ""))
            self._set_busy(True)
            messages = ([{"role": "system", "content": self.system}] if self.system else [])
            messages += [dict(m) for m in self.history]
            # Kernel stays responsive: the HTTP stream runs here, widget updates go out from it.
            self._thread = threading.Thread(
                target=self._answer, args=(messages,), name="dhllm-chat", daemon=True
            )
            self._thread.start()
        self._render()
        return self._thread

    def clear(self) -> None:
        """Forget the conversation and empty the display (ignored while an answer streams)."""
        with self._lock:
            if self.busy:
                return
            self.history.clear()
            self._shown.clear()
        self._render()

    def wait(self, timeout: float | None = None) -> None:
        """Block until the current answer is complete (for scripts and tests)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    @property
    def busy(self) -> bool:
        """True while an answer is streaming."""
        return self._streaming

    @property
    def transcript(self) -> list[tuple[str, str]]:
        """What the box shows, as ``(kind, text)`` pairs; kind is user, assistant or error."""
        return list(self._shown)

    # -- internals --------------------------------------------------------------------------

    # The browser throttles a text box's value updates (one message in flight per widget) but
    # sends clicks and Enter at once, so the last keystrokes can reach the kernel just *after*
    # the click. Reading the value a moment later gets all of it.
    SETTLE_S = 0.3

    def _ask_soon(self) -> None:
        timer = threading.Timer(self.SETTLE_S, self.ask)
        timer.daemon = True
        timer.start()

    def _on_input_msg(self, _widget: Any, content: dict[str, Any], _buffers: Any) -> None:
        if content.get("event") == "submit":
            self._ask_soon()

    def _answer(self, messages: list[dict[str, str]]) -> None:
        answer = ""
        try:
            for piece in self._stream(messages):
                if not piece:
                    continue
                answer += piece
                self._shown[-1] = ("assistant", answer)
                self._render()
            self.history.append({"role": "assistant", "content": answer})
        except Exception as exc:  # shown to the learner; a traceback in a widget helps no one
            # Drop the unanswered question so a retry or follow-up is not confused by it.
            self.history.pop()
            if not answer:
                self._shown.pop()
            self._shown.append(("error", describe_error(exc, self.url)))
        finally:
            self._set_busy(False)
            self._render()

    def _set_busy(self, busy: bool) -> None:
        self._streaming = busy
        self.send_button.disabled = busy
        self.clear_button.disabled = busy

    def _status(self) -> str:
        if self._streaming:
            return "<small><i>正在生成回答……</i></small>"
        turns = sum(1 for m in self.history if m["role"] == "assistant")
        return f"<small>服务器 {html.escape(self.url)} · 已有 {turns} 轮对话</small>"

    def _render(self) -> None:
        parts = []
        for kind, text in self._shown:
            body = html.escape(text).replace("\n", "<br>") or "…"
            parts.append(
                f'<div class="dhllm-msg dhllm-msg-{kind}" style="{_STYLES[kind]}">'
                f"<b>{_LABELS[kind]}：</b>{body}</div>"
            )
        empty = '<div class="dhllm-msg-empty"><i>还没有对话。</i></div>'
        self.conversation.value = "".join(parts) or empty
        self.status.value = self._status()


def describe_error(exc: BaseException, url: str = DEFAULT_URL) -> str:
    """One readable line for an error while chatting, with a hint at the usual cause."""
    message = str(exc).strip() or type(exc).__name__
    name = type(exc).__name__
    if isinstance(exc, ConnectionError) or "Connect" in name:
        # requests' message nests three exception reprs; the errno line is the useful part.
        reason = re.search(r"\[Errno -?\d+\][^\"')]*", message)
        return (
            f"连不上服务器 {url}（{reason.group(0).strip() if reason else name}）。服务器启动了吗？"
            "先运行上面启动服务器的单元格，或者在终端里运行 make serve。"
        )
    if isinstance(exc, TimeoutError) or "Timeout" in name:
        return f"服务器 {url} 太久没有回应：{message}"
    return f"{name}: {message}"


def chat_box(
    url: str = DEFAULT_URL, api_key: str | None = None, system: str | None = None, **params: Any
) -> ChatBox:
    """A chat widget that streams answers from the API server at ``url`` and keeps the history."""
    from helpers.client import LinlyClient

    client = LinlyClient(url, api_key=api_key)
    return ChatBox(lambda messages: client.stream(messages, **params), url=url, system=system)

"""Issue 23: a provider that accepts the connection and never answers (OpenAI or Gemini from
mainland China without a VPN) must not hang a notebook cell. Through the real SDKs, against a
TCP server on 127.0.0.1 that accepts and stays silent: our backends, and the SDK calls that
notebook 04 writes out, return within their timeout with a Chinese message that names the fix.
"""

from __future__ import annotations

import ast
import json
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from helpers.chat import GeminiChat, OpenAIChat, UnavailableError, explained, get_chat_model
from helpers.config import get_settings
from tests.fakes import HISTORY, SilentServer

KEY = "sk-dhllm-timeout-Secret-T3mq"
TIMEOUT = 1.0  # seconds; the calls below must come back within a few of these, never hang
NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "04_cloud_llms.ipynb"


@pytest.fixture
def silent(monkeypatch: pytest.MonkeyPatch) -> Iterator[SilentServer]:
    for name in ("OPENAI_BASE_URL", "GOOGLE_GEMINI_BASE_URL", "HTTPS_PROXY", "https_proxy",
                 "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    with SilentServer() as server:
        yield server


def returns_in_time(call: Callable[[], Any], limit: float = 10 * TIMEOUT) -> BaseException:
    """Run ``call`` in a thread; fail if it is still waiting after ``limit`` s (a hang), else
    return what it raised. A generous limit: this checks for a hang, not for speed."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            outcome.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(limit)
    assert not thread.is_alive(), f"still waiting after {limit:g} s: the call hangs"
    assert outcome and outcome[0] is not None, "a silent server cannot have answered"
    return outcome[0]


@pytest.mark.parametrize("build", [
    lambda url: OpenAIChat("gpt-6-luna", api_key=KEY, base_url=url + "/v1", timeout=TIMEOUT,
                           max_retries=0),
    lambda url: GeminiChat("gemini-3.5-flash", api_key=KEY, base_url=url, timeout=TIMEOUT,
                           max_retries=0),
], ids=["openai", "gemini"])
def test_a_silent_provider_gives_a_chinese_timeout_with_the_fix(
        silent: SilentServer, build: Callable[[str], Any]) -> None:
    chat = build(silent.url)
    for call in (lambda: chat.chat(HISTORY), lambda: list(chat.stream(HISTORY))):
        error = returns_in_time(call)
        assert isinstance(error, UnavailableError), repr(error)
        message = str(error)
        assert f"{TIMEOUT:g} 秒内没有回答（超时）" in message
        assert "中国大陆" in message and 'get_chat_model("deepseek")' in message
        assert "HTTPS_PROXY" in message
        assert KEY not in message
    assert silent.connections >= 2


def test_a_provider_reachable_from_china_gets_other_advice(silent: SilentServer) -> None:
    chat = OpenAIChat.from_preset("deepseek", api_key=KEY, base_url=silent.url, timeout=TIMEOUT,
                                  max_retries=0)
    message = str(returns_in_time(lambda: chat.chat(HISTORY)))
    assert "秒内没有回答" in message and "DHLLM_CLOUD_TIMEOUT" in message
    assert "VPN" not in message


def test_timeouts_come_from_the_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DHLLM_CLOUD_TIMEOUT", "42")
    monkeypatch.setenv("DHLLM_CLOUD_CONNECT_TIMEOUT", "4")
    chat = get_chat_model("openai:gpt-6-luna", api_key=KEY)
    assert (chat.client.timeout.read, chat.client.timeout.connect) == (42, 4)
    gemini = get_chat_model("gemini:gemini-3.5-flash", api_key=KEY)
    assert gemini.timeout == 42
    assert gemini.client._api_client._http_options.timeout == 42_000  # milliseconds
    monkeypatch.delenv("DHLLM_CLOUD_TIMEOUT")
    assert get_chat_model("zhipu", api_key=KEY).client.timeout.read == get_settings().cloud_timeout


def notebook_code() -> str:
    cells = json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code"
                     and not "".join(c["source"]).lstrip().startswith("!"))


def sdk_clients(code: str) -> list[ast.Call]:
    """Every ``OpenAI(...)`` and ``genai.Client(...)`` call in ``code`` (shell lines dropped)."""
    plain = "\n".join(line for line in code.splitlines() if not line.lstrip().startswith("!"))
    return [node for node in ast.walk(ast.parse(plain)) if isinstance(node, ast.Call)
            and ast.unparse(node.func) in ("OpenAI", "genai.Client")]


def test_every_sdk_client_in_notebook_04_has_a_timeout() -> None:
    calls = sdk_clients(notebook_code())
    assert len(calls) >= 3, "notebook 04 writes out the OpenAI and Gemini SDK calls"
    for call in calls:
        keywords = {k.arg for k in call.keywords}
        wanted = "timeout" if ast.unparse(call.func) == "OpenAI" else "http_options"
        assert wanted in keywords, f"no {wanted}= in {ast.unparse(call)}"


def test_the_notebooks_sdk_calls_time_out_with_the_chinese_message(silent: SilentServer) -> None:
    """The same constructors and ``explained`` as notebook 04, against the silent server."""
    import openai
    from google import genai
    from google.genai import types

    timeout = TIMEOUT
    client = openai.OpenAI(base_url=silent.url + "/v1", api_key=KEY, timeout=timeout,
                           max_retries=0)
    assert isinstance(returns_in_time(lambda: client.models.list()), openai.APITimeoutError)

    def listed() -> None:
        with explained("openai", timeout):
            client.models.list()

    error = returns_in_time(listed)
    assert isinstance(error, UnavailableError) and "1 秒内没有回答（超时）" in str(error)
    assert "中国大陆" in str(error)

    gclient = genai.Client(api_key=KEY, http_options=types.HttpOptions(
        base_url=silent.url, timeout=int(timeout * 1000)))

    def generated() -> None:
        with explained("gemini", timeout):
            gclient.models.generate_content(model="gemini-3.5-flash", contents="hi")

    error = returns_in_time(generated)
    assert isinstance(error, UnavailableError) and "1 秒内没有回答（超时）" in str(error)
    with pytest.raises(ZeroDivisionError), explained("openai", timeout):  # others pass through
        1 / 0  # noqa: B018


def test_notebook_04_skips_what_does_not_answer_and_says_why(silent: SilentServer,
                                                              capsys: pytest.CaptureFixture[str],
                                                              monkeypatch: pytest.MonkeyPatch
                                                              ) -> None:
    """Mainland China without a VPN, rehearsed: Gemini and OpenAI silent, the providers reachable
    from China answering (the OpenAI-compatible fake). Notebook 04's probe cell, Gemini cell and
    section-5 cell, run as written: Gemini is skipped with the reason and the advice, never
    called; the three providers are called; the gateway's choice starts with zhipu."""
    from tests.fakes import provider_env
    from tests.fakes.openai_fake import start_fake_openai

    cells = [c for c in json.loads(NOTEBOOK.read_text(encoding="utf-8"))["cells"]
             if c["cell_type"] == "code"]
    source = {name: "".join(c["source"]) for name, c in zip(
        ["setup", "probe", "own", "gemini", "openai", "calls", "providers"], cells, strict=False)}
    assert "probe_clouds" in source["probe"] and "genai.Client" in source["gemini"]
    assert 'for name in ["zhipu", "deepseek", "dashscope"]' in source["providers"]
    with start_fake_openai(api_key=KEY) as china:
        for name, value in provider_env(china, None, key=KEY).items():
            monkeypatch.setenv(name, value)
        monkeypatch.setenv("GEMINI_API_KEY", KEY)
        for name in ("GOOGLE_GEMINI_BASE_URL", "OPENAI_BASE_URL", "DHLLM_OPENAI_BASE_URL"):
            monkeypatch.setenv(name, silent.url)
        # What the skipped OpenAI cell would have imported (it needs the notebook's own server).
        namespace: dict[str, Any] = {}
        exec("from openai import OpenAI\nfrom helpers.chat import PRESETS", namespace)  # noqa: S102
        exec(source["probe"], namespace)  # noqa: S102 - the notebook's own cells
        reachable = namespace.get("reachable", {})
        assert reachable.get("gemini") is False and reachable.get("openai") is False
        for part in ("gemini", "providers"):
            exec(source[part], namespace)  # noqa: S102
        out = capsys.readouterr().out
        assert "OpenAI / Gemini 连不上" in out and "HTTPS_PROXY" in out
        assert "跳过：Gemini 连不上" in out
        assert all(f"{name}（" in out for name in ("zhipu", "deepseek", "dashscope")), out
        assert len(china.model_requests) == 3
        from helpers.chat import clouds_with_keys

        order = [n for n in clouds_with_keys() if namespace["reachable"].get(n)]
        assert order[0] == "zhipu" and "gemini" not in order and "openai" not in order

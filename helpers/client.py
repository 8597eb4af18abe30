"""HTTP client for the dhllm server (or any server with the same contracts); knows only HTTP.

- ``get_completion(prompt)``: the chapter's one-liner against ``POST /``;
- ``LinlyClient``: ``.chat(prompt, history)`` on ``POST /``, ``.stream(messages)`` on
  ``/v1/chat/completions`` (Server-Sent Events), ``.health()``;
- ``iter_sse_data(lines)``: the ``data:`` payloads of a Server-Sent Events stream;
- ``curl_command(prompt, url, shell)``: the chapter's ``curl`` for bash, Windows cmd.exe or
  PowerShell, quoted so that the server receives exactly this JSON.
"""

from __future__ import annotations

import json
import re
import shlex
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, Literal

import requests

# The chapter's server, as helpers.config.DEFAULT_URL; a literal because the client imports
# nothing from the package (tests/test_architecture.py checks that the two agree).
DEFAULT_URL = "http://127.0.0.1:7871"


Shell = Literal["bash", "cmd", "powershell"]


def _cmd_quote(text: str) -> str:
    """One argument for a Windows program (``CommandLineToArgvW`` rules), in double quotes.

    A quote becomes ``\\"``; backslashes are doubled only where a quote follows them. cmd.exe
    itself sees the ``\\"`` as quote toggles, so its specials (``& | < > ^ %``) are refused.
    """
    if re.search(r'[&|<>^%\r\n]', text):
        raise ValueError("cmd.exe would interpret & | < > ^ % or a line break in this text; "
                         "use shell='powershell', or put the JSON in a file and pass -d @body.json")
    quoted = re.sub(r'(\\*)"', lambda m: m.group(1) * 2 + '\\"', text)
    quoted = re.sub(r'(\\+)$', lambda m: m.group(1) * 2, quoted)
    return f'"{quoted}"'


def curl_command(prompt: str, url: str = DEFAULT_URL, shell: Shell = "bash",
                 **params: Any) -> str:
    """The chapter's ``curl -X POST`` for ``shell``, quoted so the server gets exactly this JSON.

    - ``bash`` (Linux, macOS, Git Bash, WSL): the body in single quotes, as in the chapter;
    - ``cmd`` (Windows cmd.exe, ``curl.exe`` ships with Windows 10+): double quotes with ``\\"``;
    - ``powershell``: ``Invoke-RestMethod`` with the body sent as UTF-8 bytes (``curl`` is an
      alias of ``Invoke-WebRequest`` in Windows PowerShell 5.1, and passing ``"`` inside an
      argument to ``curl.exe`` breaks before PowerShell 7.3).
    """
    body = json.dumps({"prompt": prompt, **params}, ensure_ascii=False)
    if shell == "bash":
        # The chapter writes the address in double quotes; keep that where it is safe.
        where = f'"{url}"' if re.fullmatch(r"[\w.:/?=&%+-]+", url) else shlex.quote(url)
        return (f"curl -X POST {where} -H 'Content-Type: application/json' "
                f"-d {shlex.quote(body)}")
    if shell == "cmd":
        return (f'curl -X POST {_cmd_quote(url)} -H "Content-Type: application/json" '
                f"-d {_cmd_quote(body)}")
    if shell == "powershell":
        literal = "'" + body.replace("'", "''") + "'"  # single quotes: nothing is expanded
        return (f"$body = {literal}\n"
                f"Invoke-RestMethod -Uri '{url.replace(chr(39), chr(39) * 2)}' -Method Post "
                f"-ContentType 'application/json; charset=utf-8' "
                f"-Body ([System.Text.Encoding]::UTF8.GetBytes($body))")
    raise ValueError(f"shell must be 'bash', 'cmd' or 'powershell', not {shell!r}")


class ServerError(RuntimeError):
    """The server answered 4xx/5xx; ``status`` and the server's own ``message`` are kept."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        where = f" (field: {param})" if param else ""
        super().__init__(f"server answered {status}: {message}{where}")
        self.status = status
        self.message = message
        self.param = param


def _raise_for_status(response: requests.Response) -> None:
    if response.status_code < 400:
        return
    message, param = response.text.strip() or response.reason, None
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict):  # OpenAI's shape
            message, param = str(error.get("message", message)), error.get("param")
        elif "detail" in body:
            message, param = str(body["detail"]), body.get("param")
    raise ServerError(response.status_code, message, param)


def iter_sse_data(lines: Iterable[bytes | str]) -> Iterator[str]:
    """Each ``data:`` payload of a Server-Sent Events stream, as text (``[DONE]`` included)."""
    for line in lines:
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        if text.startswith("data:"):
            yield text[5:].strip()


def get_completion(prompt: str, url: str = DEFAULT_URL, **params: Any) -> str:
    """The chapter's ``get_completion``: POST the prompt, return ``response``."""
    headers = {"Content-Type": "application/json"}
    data = {"prompt": prompt, **params}
    response = requests.post(url=url, headers=headers, data=json.dumps(data), timeout=600)
    _raise_for_status(response)
    return response.json()["response"]


class LinlyClient:
    """A client for both contracts of one server."""

    def __init__(self, url: str = DEFAULT_URL, api_key: str | None = None,
                 timeout: float = 600.0) -> None:
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.session = requests.Session()
        if api_key:
            self.session.headers["Authorization"] = f"Bearer {api_key}"

    def health(self) -> dict[str, Any]:
        """``GET /health``: model name, engine kind and counters."""
        response = self.session.get(f"{self.url}/health", timeout=10)
        _raise_for_status(response)
        return response.json()

    def chat(self, prompt: str, history: Sequence[Any] | None = None,
             **params: Any) -> tuple[str, list[list[str]]]:
        """``POST /``: the answer and the new history (pass it back for the next turn)."""
        body = {"prompt": prompt, "history": list(history or []), **params}
        response = self.session.post(f"{self.url}/", json=body, timeout=self.timeout)
        _raise_for_status(response)
        data = response.json()
        return data["response"], data["history"]

    def stream(self, messages: Sequence[dict[str, str]] | str, **params: Any) -> Iterator[str]:
        """Text pieces from ``/v1/chat/completions`` with ``stream: true``, as they arrive.

        ``messages`` may be a plain string (one user message). Closing the iterator closes the
        connection, which stops the server's generation for this request.
        """
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        body = {"messages": list(messages), "stream": True, **params}
        response = self.session.post(f"{self.url}/v1/chat/completions", json=body,
                                     stream=True, timeout=self.timeout)
        with response:
            _raise_for_status(response)
            for data in iter_sse_data(response.iter_lines(decode_unicode=False)):
                if data == "[DONE]":
                    return
                chunk = json.loads(data)
                if "error" in chunk:
                    error = chunk["error"]
                    raise ServerError(int(error.get("code") or 500), error.get("message", ""),
                                      error.get("param"))
                for choice in chunk.get("choices", []):
                    text = (choice.get("delta") or {}).get("content")
                    if text:
                        yield text

    def close(self) -> None:
        self.session.close()

    def __enter__(self) -> LinlyClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

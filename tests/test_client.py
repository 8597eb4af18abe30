"""helpers.client against a real server on 127.0.0.1 (sentences for TTS: tests/test_speech.py)."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

from helpers.client import LinlyClient, ServerError, get_completion
from helpers.server import ServerHandle, serve_in_background
from tests.conftest import free_port
from tests.shell_args import windows_argv


@pytest.fixture(scope="module")
def server(tiny_chat) -> Iterator[ServerHandle]:
    with serve_in_background(tiny_chat, port=free_port(), default_max_new_tokens=8) as handle:
        yield handle


def test_chat_returns_history_that_the_next_turn_extends(server):
    client = LinlyClient(server.url)
    answer, history = client.chat("你好", temperature=0)
    assert answer and history == [["你好", answer]]
    answer2, history2 = client.chat("再说一遍", history=history, temperature=0)
    assert history2 == [["你好", answer], ["再说一遍", answer2]]
    assert client.health()["stats"]["completed"] >= 2


def test_stream_yields_the_same_text_as_a_plain_call(server, tiny_chat):
    client = LinlyClient(server.url)
    messages = [{"role": "user", "content": "Hi"}]
    pieces = list(client.stream(messages, max_tokens=6, temperature=0))
    assert len(pieces) > 1
    assert "".join(pieces) == tiny_chat.chat(messages, max_new_tokens=6, temperature=0)
    assert get_completion("Hi", url=server.url, max_length=2)


def test_errors_carry_the_servers_message(server):
    client = LinlyClient(server.url)
    with pytest.raises(ServerError, match="max_length") as info:
        client.chat("x", max_length=0)
    assert info.value.status == 422 and info.value.param == "max_length"
    with pytest.raises(ServerError, match="role") as info:
        list(client.stream([{"role": "robot", "content": "x"}]))
    assert info.value.param == "messages.0.role"
    with pytest.raises(ServerError, match="prompt"):
        get_completion("", url=server.url)


def test_client_never_imports_the_server():
    tree = ast.parse(Path("helpers/client.py").read_text(encoding="utf-8"))
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not {m for m in imported if m and m.startswith("helpers")}


# The chapter's curl for three shells: parse each string back the way that shell would (for
# these simple commands) and check that the server would receive exactly the JSON we meant.

def _bash_args(command: str) -> list[str]:
    import shlex

    return shlex.split(command)


def _powershell_body(command: str) -> str:
    import re

    match = re.match(r"\$body = '((?:[^']|'')*)'\n", command)
    assert match, command
    return match.group(1).replace("''", "'")


PROMPTS = ["如何应对压力", 'say "hi"', "it's fine", "a \\ backslash", 'end with \\"quote\\"', "tab\there"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_curl_command_quotes_the_json_for_each_shell(prompt):
    import json

    from helpers.client import curl_command

    url = "http://127.0.0.1:7871"
    for shell, split in [("bash", _bash_args), ("cmd", windows_argv)]:
        args = split(curl_command(prompt, url, shell=shell, max_length=32))
        assert args[:3] == ["curl", "-X", "POST"] and args[3] == url, (shell, args)
        assert args[4:6] == ["-H", "Content-Type: application/json"], (shell, args)
        assert args[6] == "-d" and json.loads(args[7]) == {"prompt": prompt, "max_length": 32}
    ps = curl_command(prompt, url, shell="powershell")
    assert json.loads(_powershell_body(ps)) == {"prompt": prompt}
    assert f"-Uri '{url}'" in ps and "UTF8.GetBytes($body)" in ps


def test_curl_command_is_the_chapters_for_a_simple_prompt():
    from helpers.client import curl_command

    assert curl_command("如何应对压力") == (
        'curl -X POST "http://127.0.0.1:7871" -H \'Content-Type: application/json\' '
        "-d '{\"prompt\": \"如何应对压力\"}'")
    assert curl_command("如何应对压力", shell="cmd") == (
        'curl -X POST "http://127.0.0.1:7871" -H "Content-Type: application/json" '
        '-d "{\\"prompt\\": \\"如何应对压力\\"}"')


def test_curl_command_refuses_what_cmd_would_interpret():
    from helpers.client import curl_command

    with pytest.raises(ValueError, match="powershell"):
        curl_command("A & B", shell="cmd")
    with pytest.raises(ValueError, match="shell"):
        curl_command("x", shell="fish")  # type: ignore[arg-type]

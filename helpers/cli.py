"""The ``dhllm`` command line (also ``python -m helpers``), built with typer like ``hf``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from helpers.config import get_settings

app = typer.Typer(
    help="dhllm: download, chat with and serve LLMs for a digital human.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="registry name, local path, or backend spec (e.g. embedded)"),
]


@app.callback()
def _root() -> None:
    """dhllm: download, chat with and serve LLMs for a digital human."""


def _fail(message: str) -> None:
    typer.secho(f"error: {message}", err=True, fg=typer.colors.RED)
    raise typer.Exit(2)


@app.command()
def chat(
    question: Annotated[str | None, typer.Argument(help="ask once and exit; omit for a session")] = None,
    model: ModelOption = None,
    max_new_tokens: Annotated[int, typer.Option(help="longest answer in tokens")] = 256,
    temperature: Annotated[float, typer.Option(help="0 = greedy (deterministic)")] = 0.7,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
) -> None:
    """Chat with a model: one question, or an interactive session (empty line or Ctrl-D ends)."""
    from helpers.chat import GenerationParams, get_chat_model

    try:
        params = GenerationParams(max_new_tokens=max_new_tokens, temperature=temperature)
        chat_model = get_chat_model(model or get_settings().model)
    except (ValueError, KeyError, RuntimeError) as exc:
        _fail(str(exc))
    messages = [{"role": "system", "content": system}] if system else []
    questions = [question] if question is not None else _ask_forever()
    for text in questions:
        messages.append({"role": "user", "content": text})
        answer = ""
        for piece in chat_model.stream(messages, **vars(params)):
            answer += piece
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": answer})


def _ask_forever():
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            return
        if not text:
            return
        yield text


def main() -> None:
    """Entry point of the ``dhllm`` console script."""
    app()

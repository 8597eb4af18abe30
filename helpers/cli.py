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
        try:
            for piece in chat_model.stream(messages, **vars(params)):
                answer += piece
                sys.stdout.write(piece)
                sys.stdout.flush()
        except (ValueError, RuntimeError) as exc:  # ChatModelError is a RuntimeError
            sys.stdout.write("\n")
            _fail(str(exc))
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


# ---------------------------------------------------------------- download and mirror (issue 4)


@app.command()
def download(
    repo: Annotated[str, typer.Argument(help="hub id (org/name) or registry name, e.g. qwen-1.8b-chat")],
    source: Annotated[str, typer.Option(help="hf | hf-mirror | modelscope | git")] = "hf",
    local_dir: Annotated[str | None, typer.Option(help="target folder (default: cache)")] = None,
    endpoint: Annotated[str | None, typer.Option(help="hub address, overrides the source's")] = None,
    revision: Annotated[str | None, typer.Option(help="branch, tag or commit")] = None,
    include: Annotated[list[str] | None, typer.Option(help="glob of files to fetch; repeatable")] = None,
) -> None:
    """Download a model with a progress bar; a killed download resumes; the result is verified."""
    from helpers.download import DownloadError, VerificationError
    from helpers.download import download as do_download

    try:
        path = do_download(repo, source, local_dir, revision, include or None, endpoint)  # type: ignore[arg-type]
    except (DownloadError, VerificationError, ValueError, KeyError) as exc:
        _fail(str(exc))
    typer.echo(str(path))


mirror_app = typer.Typer(help="A local hub serving model folders (HF and ModelScope APIs).", no_args_is_help=True)
app.add_typer(mirror_app, name="mirror")


@mirror_app.command("serve")
def mirror_serve(
    directory: Annotated[str, typer.Argument(help="folder of DIR/org/name model folders")],
    host: Annotated[str, typer.Option(help="127.0.0.1 = this machine only")] = "127.0.0.1",
    port: Annotated[int | None, typer.Option(help="default: settings.mirror_port (8090)")] = None,
    throttle: Annotated[float | None, typer.Option(help="bytes/s per connection (demos)")] = None,
) -> None:
    """Serve DIR so HF_ENDPOINT / MODELSCOPE_ENDPOINT=http://HOST:PORT clients download from it."""
    from helpers.mirror import serve_mirror
    from helpers.server.background import PortInUseError

    try:
        serve_mirror(directory, host, port or get_settings().mirror_port, throttle=throttle)
    except (PortInUseError, FileNotFoundError) as exc:
        _fail(str(exc))


@mirror_app.command("add")
def mirror_add(
    repo: Annotated[str, typer.Argument(help="org/name to serve it as")],
    source: Annotated[str, typer.Option("--from", help="hf | hf-mirror | modelscope | PATH")] = "hf",
    directory: Annotated[str, typer.Option("--dir", help="the mirror folder")] = "mirror",
    endpoint: Annotated[str | None, typer.Option(help="hub address, overrides the source's")] = None,
) -> None:
    """Fill the mirror: download org/name from a hub, or link/copy a local model folder."""
    from helpers.download import DownloadError, VerificationError
    from helpers.mirror import add_to_mirror

    try:
        path = add_to_mirror(repo, directory, source, endpoint=endpoint)
    except (DownloadError, VerificationError, ValueError, KeyError) as exc:
        _fail(str(exc))
    typer.echo(str(path))


def main() -> None:
    """Entry point of the ``dhllm`` console script."""
    app()

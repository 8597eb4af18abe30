"""The ``dhllm`` command line (also ``python -m helpers``), built with typer like ``hf``."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from helpers.config import DEFAULT_PORT, DEFAULT_TEMPERATURE, get_settings

app = typer.Typer(
    help="dhllm: download, chat with and serve LLMs for a digital human.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

ModelOption = Annotated[
    str | None,
    typer.Option("--model", "-m", help="registry name, local path, or backend spec (embedded, "
                 "openai:MODEL; a bare provider such as openai uses its first listed default)"),
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
    max_new_tokens: Annotated[int | None, typer.Option(
        help="longest answer in tokens (default: DHLLM_DEFAULT_MAX_NEW_TOKENS, 256)")] = None,
    temperature: Annotated[float, typer.Option(help="0 = greedy (deterministic)")] = DEFAULT_TEMPERATURE,
    system: Annotated[str | None, typer.Option(help="system prompt")] = None,
) -> None:
    """Chat with a model: one question, or an interactive session (empty line or Ctrl-D ends)."""
    from helpers.chat import GenerationParams, get_chat_model

    try:
        limit = get_settings().default_max_new_tokens if max_new_tokens is None else max_new_tokens
        params = GenerationParams(max_new_tokens=limit, temperature=temperature)
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


# ---------------------------------------------------------------- download and mirror


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
    from helpers.hub import DownloadError, VerificationError
    from helpers.hub import download as do_download
    from helpers.models import hub_id

    try:
        repo_id = hub_id(repo, source)
        path = do_download(repo_id, source, local_dir, revision, include or None, endpoint)  # type: ignore[arg-type]
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
    from helpers.background_server import PortInUseError
    from helpers.hub.mirror import serve_mirror

    try:
        serve_mirror(directory, host, port, throttle=throttle)
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
    from helpers.hub import DownloadError, VerificationError
    from helpers.hub.mirror_store import add_to_mirror
    from helpers.models import hub_id

    try:
        hub_source = source if source in ("hf", "hf-mirror", "modelscope") else "hf"
        path = add_to_mirror(hub_id(repo, hub_source), directory, source, endpoint=endpoint)
    except (DownloadError, VerificationError, ValueError, KeyError) as exc:
        _fail(str(exc))
    typer.echo(str(path))


# ---------------------------------------------------------------- API server and benchmark


def bind_warning(host: str, api_key: str | None) -> str | None:
    """A warning when the server would be reachable from other machines without a key."""
    if host not in ("127.0.0.1", "localhost", "::1") and not api_key:
        return (f"--host {host} makes the server reachable from other machines, and no API key "
                "is set: anyone on the network can use it. Add --api-key KEY (or set "
                "DHLLM_API_KEY).")
    return None


@app.command()
def serve(
    model: ModelOption = None,
    host: Annotated[str | None, typer.Option(help="127.0.0.1 = this machine only")] = None,
    port: Annotated[int | None, typer.Option(help=f"default: {DEFAULT_PORT}, the chapter's")] = None,
    api_key: Annotated[str | None, typer.Option(
        help="require 'Authorization: Bearer KEY' (default: DHLLM_API_KEY)")] = None,
    log_prompts: Annotated[bool, typer.Option(help="write prompts into the request log")] = False,
    engine: Annotated[str, typer.Option(
        help="builtin (continuous batching here) or vllm (vLLM in its own venv)")] = "builtin",
    replicas: Annotated[int | None, typer.Option(
        min=1, help="vLLM replicas behind vllm-router (one per GPU, or per share of CPU "
        "cores); default 1 (DHLLM_VLLM_REPLICAS)")] = None,
    policy: Annotated[str | None, typer.Option(
        help="vllm-router's policy: cache_aware (default), round_robin, power_of_two, "
        "consistent_hash, random")] = None,
) -> None:
    """Serve a model: the chapter's POST / and an OpenAI-compatible /v1 (docs at /docs)."""
    from helpers.server import PortInUseError
    from helpers.server import serve as run_server

    settings = get_settings()
    host = host or settings.host
    port = port or settings.port
    key = api_key or (settings.api_key.get_secret_value() if settings.api_key else None)
    warning = bind_warning(host, key)
    if warning:
        typer.secho(f"warning: {warning}", err=True, fg=typer.colors.YELLOW)
    try:
        run_server(model or settings.model, host, port, key, log_prompts or settings.log_prompts,
                   engine=engine, replicas=replicas, policy=policy)
    except (PortInUseError, ValueError, KeyError, RuntimeError) as exc:
        _fail(str(exc))


@app.command()
def bench(
    model: ModelOption = None,
    tokens: Annotated[int, typer.Option(help="new tokens per request")] = 48,
    clients: Annotated[str, typer.Option(
        help="client counts every server runs, e.g. 1,8,16 (8 is the headline)")] = "1,8,16",
    chapter: Annotated[int, typer.Option(
        help="clients with the chapter's sampling (top_k 20, penalty 1.15; 0 = skip)")] = 8,
    sweep: Annotated[str, typer.Option(help="client counts for the plot ('' = none)")] = "1,2,4,8,16",
    rounds: Annotated[int, typer.Option(help="requests per client in the headline runs")] = 1,
    repeats: Annotated[int, typer.Option(
        help="interleaved rounds: every server runs once per round, A B A B")] = 2,
    classroom: Annotated[int, typer.Option(help="requests sent at once for p50/p95 (0 = skip)")] = 30,
    servers: Annotated[str, typer.Option(
        help="our servers to run: dhllm,serial ('' = none)")] = "dhllm,serial",
    peers: Annotated[str, typer.Option(
        help="peers to compare, by name: plain,cb (transformers serve), vllm, dhllm-vllm")] = "plain,cb",
    builtin: Annotated[bool, typer.Option(help="also measure transformers' generate_batch")] = True,
    turns: Annotated[int, typer.Option(help="turns of the persona conversation (0 = skip)")] = 8,
    quick: Annotated[bool, typer.Option(help="a small, fast run (few tokens, 2 turns)")] = False,
    plot: Annotated[str, typer.Option(help="PNG to draw ('' = none)")] = "docs/images/throughput.png",
    json_out: Annotated[str | None, typer.Option("--json", help="also write the JSON here")] = None,
    faults: Annotated[bool, typer.Option(
        help="run the fault bench instead: faults under load, every request counted "
        "(python -m helpers.bench.faults --help for its options)")] = False,
) -> None:
    """Throughput, first token / sentence, persona turns and pauses, against peer servers."""
    from pathlib import Path

    if faults:
        from helpers.bench.faults import main as run_faults

        run_faults(["--json", json_out] if json_out else [])
        return
    from helpers.bench import BenchConfig
    from helpers.bench import main as run_bench

    def counts(text: str) -> tuple[int, ...]:
        return tuple(int(c) for c in text.split(",") if c.strip())

    def names(text: str) -> tuple[str, ...]:
        return tuple(p.strip() for p in text.split(",") if p.strip())

    try:
        chosen = {"model": model or "embedded", "servers": names(servers), "peers": names(peers),
                  "plot": Path(plot) if plot else None,
                  "json_path": Path(json_out) if json_out else None}
        if quick:
            cfg = BenchConfig.quick(**chosen)
        else:
            cfg = BenchConfig(**chosen, tokens=tokens, clients=counts(clients),
                              sweep=counts(sweep), rounds=rounds, repeats=repeats,
                              classroom=classroom, builtin=builtin, persona_turns=turns,
                              chapter_clients=chapter)
    except ValueError as exc:
        _fail(f"client counts must be integers like 1,8: {exc}")
    run_bench(cfg)


@app.command()
def doctor(
    hubs: Annotated[bool, typer.Option(help="probe Hugging Face, hf-mirror and ModelScope")] = True,
) -> None:
    """Check this machine for what would trip up the notebooks, with a fix for each problem.

    Exit code 0: no problem found (notes are fine); 1: at least one problem.
    """
    from helpers.doctor import report, run_checks

    findings = run_checks(hubs=hubs)
    typer.echo(report(findings))
    if any(f.level == "problem" for f in findings):
        raise typer.Exit(1)


def main() -> None:
    """Entry point of the ``dhllm`` console script."""
    app()

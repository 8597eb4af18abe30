"""Faults under load, in one go: ``dhllm bench --faults`` or ``python -m helpers.bench.faults``.

Each fault runs while clients send greedy requests (streamed and whole), and every request is
counted in one column: whole, ended with an error the client can see, silently short, still
hanging after 30 s (see ``fault_load``). Also: processes left over after the fault, and the
time until the server answers whole again. The faults (``fault_cases``, ``fault_vllm``):

- an exception in each stage of the builtin engine, then a stop of that server under load;
- on ``dhllm serve --engine vllm --replicas 2``: ``kill -9`` of a replica, SIGSTOP of an
  engine core (SIGCONT after 45 s), ``kill -9`` of the router, ``kill -9`` of dhllm itself;
  on a second one, SIGTERM (a stop) under load.

Writes the figures as JSON and the table into a Markdown file, each under a label (``--label``),
so a later run sits beside an earlier one. ~10-12 min on 2 cores, most of it vLLM starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from helpers.bench.fault_cases import STAGES, Baseline, builtin_faults, kill_ours
from helpers.bench.fault_load import FaultResult, Load
from helpers.bench.fault_vllm import vllm_faults

COLUMNS = ("fault", "sent", "whole", "error", "silently short", "hanging > 30 s", "left over",
           "served again after", "notes")


def run_faults(parts: Sequence[str] = ("builtin", "vllm"), load: Load | None = None,
               builtin_load: Load | None = None, stages: Sequence[str] | None = None,
               log: Any = print) -> list[FaultResult]:
    """Run the faults of ``parts``; whatever happens, no process of this run survives it."""
    run, before = uuid.uuid4().hex, Baseline()
    results: list[FaultResult] = []
    try:
        if "builtin" in parts:
            try:
                from helpers.chat import TransformersChat

                log("builtin engine: loading the embedded model ...")
                chat = TransformersChat.load("embedded", verbose=False)
                builtin_faults(chat, builtin_load or Load(clients=6, tokens=32, after_s=4.0,
                                                          recover_s=20.0),
                               log, before, stages, results=results)
            except Exception as exc:  # noqa: BLE001 - a row says so; the other part still runs
                results.append(_failed("builtin engine", exc, log))
        if "vllm" in parts:
            try:
                vllm_faults(run, load or Load(), log, before, results=results)
            except Exception as exc:  # noqa: BLE001 - a row says so; the report is still written
                results.append(_failed("vLLM", exc, log))
    finally:
        killed = kill_ours(run, before)
        if killed:
            log(f"killed {killed} process(es) this run had left")
    return results


def _failed(part: str, exc: Exception, log: Any) -> FaultResult:
    log(f"{part}: the bench could not go on: {type(exc).__name__}: {exc}")
    return FaultResult(f"{part}: the bench stopped here",
                       notes=[f"{type(exc).__name__}: {str(exc)[:300]}"])


def markdown(results: Sequence[FaultResult]) -> str:
    """The table, one row per fault."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in results:
        left = "-" if r.left_over is None else str(r.left_over)
        notes = "; ".join(r.notes).replace("|", "/")
        if r.differs:
            notes += f"; {r.differs} whole answer(s) differ from the greedy reference"
        lines.append(f"| {r.fault} | {r.sent} | {r.whole} | {r.error} | {r.short} | "
                     f"{r.hanging} | {left} | {r.served_again} | {notes} |")
    return "\n".join(lines)


def write_block(path: Path, label: str, text: str) -> None:
    """Put ``text`` between this label's markers in ``path`` (replaced if there, else appended)."""
    begin, end = f"<!-- faults table: {label} -->", f"<!-- end of faults table: {label} -->"
    block = f"{begin}\n{text}\n{end}"
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(re.escape(begin) + ".*?" + re.escape(end), re.S)
    new = (pattern.sub(lambda _: block, old) if pattern.search(old)
           else f"{old.rstrip()}\n\n### {label}\n\n{block}\n".lstrip())
    path.write_text(new, encoding="utf-8")


def _version() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=10, check=False)
        return out.stdout.strip() or "unknown"
    except OSError:
        return "unknown"


def report(results: Sequence[FaultResult], label: str, command: str, minutes: float,
           json_path: Path | None, md_path: Path | None) -> str:
    """The Markdown table with its heading lines; also written to the two files."""
    commit = _version()
    table = (f"{label}: commit {commit}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
             f"{len(os.sched_getaffinity(0))} cores, {minutes:.1f} min; `{command}`\n\n"
             + markdown(results))
    if json_path is not None:
        data = json.loads(json_path.read_text(encoding="utf-8")) if json_path.exists() else {}
        data[label] = {"commit": commit, "command": command, "minutes": round(minutes, 1),
                       "results": [asdict(r) for r in results]}
        json_path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n",
                             encoding="utf-8")
    if md_path is not None:
        write_block(md_path, label, table)
    return table


def main(argv: list[str] | None = None) -> list[FaultResult]:
    """``python -m helpers.bench.faults [--only builtin|vllm] [--label L] [--json P] [--md P]``."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", choices=("builtin", "vllm"), help="run one part only")
    parser.add_argument("--stages", help=f"builtin stages, comma-separated: {', '.join(STAGES)}")
    parser.add_argument("--label", default="latest run", help="the table's name in the files")
    parser.add_argument("--json", type=Path, default=Path("docs/faults.json"))
    parser.add_argument("--md", type=Path, default=Path("docs/faults.md"))
    args = parser.parse_args(argv)
    stages = [s.strip() for s in args.stages.split(",")] if args.stages else None
    unknown = [s for s in stages or () if s not in STAGES]
    if unknown:
        parser.error(f"unknown stage(s): {', '.join(unknown)}")
    started = time.monotonic()

    def log(message: str) -> None:
        elapsed = time.monotonic() - started
        print(f"[{elapsed // 60:02.0f}:{elapsed % 60:02.0f}] {message}", file=sys.stderr,
              flush=True)

    parts = (args.only,) if args.only else ("builtin", "vllm")
    results = run_faults(parts, stages=stages, log=log)
    command = shlex.join(["python", "-m", "helpers.bench.faults",
                          *(argv if argv is not None else sys.argv[1:])])
    print(report(results, args.label, command.strip(), (time.monotonic() - started) / 60,
                 args.json, args.md))
    return results


if __name__ == "__main__":
    main()

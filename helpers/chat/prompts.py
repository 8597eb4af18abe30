"""Prompt formats: the chapter's Linly template (with history folded in) and history shapes."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from helpers.chat.base import Message, validate_messages

LINLY_PREFIX = "请用少于25个字回答以下问题"
LINLY_STOP = ("### Instruction", "###")
_LINLY_TURN = re.compile(r"User:\s*(.*?)\s*Bot:\s*(.*?)(?=\s*User:|\s*$)", re.S)


def render_linly_prompt(messages: Sequence[Message]) -> str:
    """The chapter's template, with system prompt and earlier turns folded in as Linly-Talker does.

    Without history this is exactly the chapter's
    ``请用少于25个字回答以下问题 ### Instruction:{prompt}  ### Response:``.
    """
    messages = validate_messages(messages)
    system = " ".join(m["content"] for m in messages if m["role"] == "system")
    turns = [m for m in messages[:-1] if m["role"] != "system"]
    context = " ".join(
        f"{'User' if m['role'] == 'user' else 'Bot'}: {m['content']}" for m in turns
    )
    body = " ".join(part for part in (system, context) if part)
    head = f"{LINLY_PREFIX}\n\n{body} " if body else f"{LINLY_PREFIX} "
    return f"{head}### Instruction:{messages[-1]['content']}  ### Response:"


def is_linly_prompt(prompt: str) -> bool:
    """True for a prompt that already carries the Linly template (Linly-Talker's api client)."""
    return "### Instruction:" in prompt and prompt.rstrip().endswith("### Response:")


def parse_linly_prompt(prompt: str) -> list[dict[str, str]]:
    """Split a Linly-template prompt back into system / history / user messages."""
    if not is_linly_prompt(prompt):
        raise ValueError("not a Linly prompt: it needs '### Instruction:' and a final '### Response:'")
    head, _, rest = prompt.rpartition("### Instruction:")
    message = rest.rstrip()[: -len("### Response:")].strip()
    head = head.strip()
    if head.startswith(LINLY_PREFIX):
        head = head[len(LINLY_PREFIX) :].strip()
    first_turn = head.find("User:")
    system = (head if first_turn < 0 else head[:first_turn]).strip()
    messages = [{"role": "system", "content": system}] if system else []
    if first_turn >= 0:
        for user, bot in _LINLY_TURN.findall(head[first_turn:]):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": bot}]
    messages.append({"role": "user", "content": message})
    return messages


def history_to_messages(history: Iterable[Any], prompt: str | None = None) -> list[dict[str, str]]:
    """Accept ``[[user, assistant], ...]`` pairs or role dicts, plus an optional new prompt."""
    messages: list[dict[str, str]] = []
    for i, item in enumerate(history or []):
        if isinstance(item, Mapping):
            messages.append({"role": item.get("role"), "content": item.get("content")})
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            messages += [
                {"role": "user", "content": item[0]},
                {"role": "assistant", "content": item[1]},
            ]
        else:
            raise ValueError(f"history[{i}] must be a [user, assistant] pair or a role dict")
    if prompt is not None:
        messages.append({"role": "user", "content": prompt})
    return validate_messages(messages) if prompt is not None else messages


def messages_to_pairs(messages: Sequence[Message]) -> list[list[str]]:
    """``[[user, assistant], ...]`` from role dicts (system messages dropped), the chapter's shape."""
    pairs: list[list[str]] = []
    pending_user: str | None = None
    for m in messages:
        if m["role"] == "user":
            pending_user = m["content"]
        elif m["role"] == "assistant" and pending_user is not None:
            pairs.append([pending_user, m["content"]])
            pending_user = None
    return pairs

"""The chapter's contract: ``POST /`` with ``prompt`` and ``history``, as Linly-Talker calls it."""

from __future__ import annotations

from datetime import datetime

from fastapi import APIRouter, Request

from helpers.chat.base import validate_messages
from helpers.chat.prompts import (
    history_to_messages,
    is_linly_prompt,
    messages_to_pairs,
    parse_linly_prompt,
)
from helpers.server import protocol as p
from helpers.server.context import Defaults, ServerContext, collect
from helpers.server.errors import APIError

router = APIRouter(tags=["chapter"])

# The chapter's sampling defaults (its api.py), for fields a request leaves out.
CHAPTER_DEFAULTS = Defaults(temperature=p.CHAPTER_TEMPERATURE, top_p=p.CHAPTER_TOP_P,
                            top_k=p.CHAPTER_TOP_K,
                            repetition_penalty=p.CHAPTER_REPETITION_PENALTY)


@router.post("/", response_model=p.ChapterResponse,
             responses={400: {}, 413: {}, 422: {}, 503: {}})
async def chapter(body: p.ChapterRequest, request: Request) -> p.ChapterResponse:
    """The chapter's contract: prompt + history in, response + history out."""
    ctx: ServerContext = request.app.state.ctx
    linly_model = getattr(ctx.chat_model, "prompt_format", None) == "linly"
    messages, prompt_text, question = chapter_messages(body, linly_model)
    ctx.check_size([m["content"] for m in messages] if prompt_text is None else [prompt_text],
                   "prompt")
    params = ctx.params(CHAPTER_DEFAULTS, max_tokens=body.max_length,
                        max_tokens_param="max_length", temperature=body.temperature,
                        top_p=body.top_p, top_k=body.top_k,
                        repetition_penalty=body.repetition_penalty)
    stream = ctx.submit(request, messages, params, prompt_text)
    text = await collect(stream, request)
    history = messages_to_pairs(messages[:-1]) + [[question, text]]
    return p.ChapterResponse(response=text, history=history,
                             time=datetime.now().strftime("%Y-%m-%d %H:%M:%S"))


def chapter_messages(
    body: p.ChapterRequest, linly_model: bool
) -> tuple[list[dict[str, str]], str | None, str]:
    """Messages for the engine, a raw prompt to use as is (or None), and the clean question.

    A prompt that already carries the Linly template (Linly-Talker's api client folds system,
    history and question into it) is never wrapped again: a Linly model gets it verbatim; any
    other model gets it parsed back into messages and rendered with its own template.
    """
    try:
        history = history_to_messages(
            [h.model_dump() if isinstance(h, p.Message) else h for h in body.history or []]
        )
        if is_linly_prompt(body.prompt):
            parsed = parse_linly_prompt(body.prompt)
            system = [m for m in parsed if m["role"] == "system"]
            turns = [m for m in parsed if m["role"] != "system"]
            messages = validate_messages(system + history + turns)
            verbatim = linly_model and not history
            return messages, (body.prompt if verbatim else None), turns[-1]["content"]
        messages = validate_messages([*history, {"role": "user", "content": body.prompt}])
    except ValueError as exc:
        param = getattr(exc, "param", None) or "prompt"
        raise APIError(422, str(exc), "history" if "history" in str(exc) else param) from exc
    return messages, None, body.prompt

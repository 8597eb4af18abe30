"""The ``ChatModel`` interface, its messages and sampling parameters, validated in one place.

``chat(messages, **params) -> str`` and ``stream(messages, **params) -> Iterator[str]``, with
OpenAI-style messages. Knows nothing of HTTP; the server, the CLI and every backend build on it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Protocol, runtime_checkable

from helpers.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_TEMPERATURE
from helpers.errors import InvalidParamError

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]

# ---------------------------------------------------------------------------------------------
# Messages and parameters: validated once here, so every backend and the server agree.


def validate_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts; ValueError names the bad field and why."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise InvalidParamError("messages", "messages must be a list of {'role', 'content'} dicts")
    if not messages:
        raise InvalidParamError("messages", "messages must not be empty: send at least one user message")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise InvalidParamError(f"messages[{i}]", f"messages[{i}] must be a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidParamError(f"messages[{i}]", f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise InvalidParamError(f"messages[{i}]", f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "user":
        raise InvalidParamError("messages", "the last message must have role 'user': it is what the model answers")
    return clean


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters shared by all backends; ``temperature=0`` means greedy."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    temperature: float = DEFAULT_TEMPERATURE
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k filter
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = field(default_factory=tuple)

    def __post_init__(self) -> None:
        checks = [
            ("max_new_tokens", isinstance(self.max_new_tokens, int) and self.max_new_tokens > 0,
             "must be a positive integer"),
            ("temperature", _number(self.temperature) and self.temperature >= 0,
             "must be >= 0 (0 means greedy)"),
            ("top_p", _number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("top_k", isinstance(self.top_k, int) and self.top_k >= 0, "must be an integer >= 0"),
            ("repetition_penalty", _number(self.repetition_penalty)
             and self.repetition_penalty > 0, "must be > 0 (1.0 means none)"),
            ("seed", self.seed is None or isinstance(self.seed, int), "must be an integer"),
        ]
        for name, ok, why in checks:
            if not ok:
                raise InvalidParamError(name, f"{name} {why}; got {getattr(self, name)!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise InvalidParamError("stop", "stop must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)

    @classmethod
    def from_kwargs(cls, **params: Any) -> GenerationParams:
        """Build from keyword arguments, rejecting unknown names (no silent typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidParamError(unknown[0], f"unknown parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in params.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0



def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


# ---------------------------------------------------------------------------------------------


# The interface.


class ChatModel(ABC):
    """Anything that answers chat messages: local or cloud."""

    name: str = "model"
    # A capability the server reads: "linly" when a prompt already in the chapter's template
    # (as Linly-Talker's client sends it) is what this model should see verbatim.
    prompt_format: str | None = None

    @abstractmethod
    def stream(self, messages: Sequence[Message], **params: Any) -> Iterator[str]:
        """Yield the answer in decoded text pieces as they are generated."""

    def chat(self, messages: Sequence[Message], **params: Any) -> str:
        """The whole answer as one string."""
        return "".join(self.stream(messages, **params))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


@runtime_checkable
class TokenBatchable(Protocol):
    """A capability: a local model whose requests can share one decode loop (continuous batching).

    The server's batching engine needs exactly this and nothing else of a backend: the torch
    model and tokenizer, how a request becomes token ids, and when a reply ends.
    """

    model: Any
    tokenizer: Any
    can_batch: bool  # False when prompts are built inside the model's own code
    default_stop: tuple[str, ...]

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt for ``messages``."""

    def raw_prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt already in this model's format, used as is."""

    def eos_token_ids(self) -> set[int]:
        """Every id that ends a reply."""

"""One ``ChatModel`` interface for every LLM: local transformers models here, cloud APIs too.

``chat(messages, **params) -> str`` and ``stream(messages, **params) -> Iterator[str]``, with
OpenAI-style messages. Knows nothing of HTTP; the server and the CLI build on it.
"""

from __future__ import annotations

import re
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from queue import Queue
from typing import Any

ROLES = ("system", "user", "assistant")
Message = Mapping[str, str]

# ---------------------------------------------------------------------------------------------
# Messages and parameters: validated once here, so every backend and the server agree.


def validate_messages(messages: Sequence[Message]) -> list[dict[str, str]]:
    """Plain ``{"role", "content"}`` dicts; ValueError names the bad field and why."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ValueError("messages must be a list of {'role', 'content'} dicts")
    if not messages:
        raise ValueError("messages must not be empty: send at least one user message")
    clean = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ValueError(f"messages[{i}] must be a dict with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise ValueError(f"messages[{i}].role must be one of {', '.join(ROLES)}; got {role!r}")
        if not isinstance(content, str):
            raise ValueError(f"messages[{i}].content must be a string")
        clean.append({"role": role, "content": content})
    if clean[-1]["role"] != "user":
        raise ValueError("the last message must have role 'user': it is what the model answers")
    return clean


@dataclass(frozen=True)
class GenerationParams:
    """Sampling parameters shared by all backends; ``temperature=0`` means greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.7
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
                raise ValueError(f"{name} {why}; got {getattr(self, name)!r}")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if not all(isinstance(s, str) and s for s in stop):
            raise ValueError("stop must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)

    @classmethod
    def from_kwargs(cls, **params: Any) -> GenerationParams:
        """Build from keyword arguments, rejecting unknown names (no silent typos)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(params) - known)
        if unknown:
            raise ValueError(f"unknown parameter(s) {unknown}; known: {sorted(known)}")
        return cls(**{k: v for k, v in params.items() if v is not None})

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == value


# ---------------------------------------------------------------------------------------------
# Errors any backend may raise; the server maps them to HTTP statuses without knowing backends.


class ChatModelError(RuntimeError):
    """A backend failed; ``provider_message`` keeps what the provider said (never a key)."""

    status_code = 502

    def __init__(self, message: str, provider_message: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.provider_message = provider_message
        self.retry_after = retry_after


class AuthenticationError(ChatModelError):
    """The provider rejected the API key (or none was given)."""

    status_code = 502  # our server is fine; its upstream credentials are not


class RateLimitError(ChatModelError):
    """The provider said 429 and retries ran out."""

    status_code = 429


class BadRequestError(ChatModelError, ValueError):
    """The provider rejected the request itself (4xx other than auth/rate limit)."""

    status_code = 400


class UnavailableError(ChatModelError):
    """The provider timed out or answered 5xx after retries."""

    status_code = 503


# ---------------------------------------------------------------------------------------------
# The interface.


class ChatModel(ABC):
    """Anything that answers chat messages: local or cloud."""

    name: str = "model"

    @abstractmethod
    def stream(self, messages: Sequence[Message], **params: Any) -> Iterator[str]:
        """Yield the answer in decoded text pieces as they are generated."""

    def chat(self, messages: Sequence[Message], **params: Any) -> str:
        """The whole answer as one string."""
        return "".join(self.stream(messages, **params))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


# ---------------------------------------------------------------------------------------------
# Text streaming helpers shared by TransformersChat and the server's engine.


class IncrementalDecoder:
    """Turn token ids into text pieces without ever emitting half a UTF-8 character.

    Decoding token by token breaks Chinese (one character can span several byte-level tokens, and
    a lone piece decodes to U+FFFD). We re-decode a short window and hold back text that still ends
    in U+FFFD, as vLLM and TGI do.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.prefix_offset = 0
        self.read_offset = 0

    def push(self, token_id: int) -> str:
        """Add one token; return the newly completed text (possibly empty)."""
        self.ids.append(int(token_id))
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=True)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=True)
        if len(text) > len(prefix) and not text.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return text[len(prefix) :]
        return ""


class StopMatcher:
    """Cut a text stream at the first stop string, holding back text that may start one."""

    def __init__(self, stop: Iterable[str]) -> None:
        self.stop = tuple(stop)
        self.pending = ""
        self.stopped = False

    def push(self, piece: str) -> str:
        """Feed a piece; return the text that is safe to emit now."""
        if self.stopped:
            return ""
        if not self.stop:
            return piece
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[: min(hits)], ""
            return out
        hold = max((_overlap(self.pending, s) for s in self.stop), default=0)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out

    def flush(self) -> str:
        """The held-back text once the stream has ended without a stop string."""
        out, self.pending = ("" if self.stopped else self.pending), ""
        return out


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0


# ---------------------------------------------------------------------------------------------
# Prompt formats.

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


# ---------------------------------------------------------------------------------------------
# Local transformers models.


class TransformersChat(ChatModel):
    """A local transformers model behind ``ChatModel``, with one of three prompt formats.

    - ``linly``: the chapter's instruction template, history folded in;
    - ``chat_template``: the tokenizer's own chat template (SmolLM2, Qwen2.5, GLM-4-hf);
    - ``remote_chat``: the model's own ``model.chat(tokenizer, query, history)`` (Qwen-1, ChatGLM3).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        prompt_format: str = "chat_template",
        name: str = "local",
    ) -> None:
        if prompt_format not in ("linly", "chat_template", "remote_chat"):
            raise ValueError(f"prompt_format must be linly, chat_template or remote_chat; got {prompt_format!r}")
        if prompt_format == "chat_template" and not getattr(tokenizer, "chat_template", None):
            raise ValueError("this tokenizer has no chat template; use prompt_format='linly'")
        self.model = model
        self.tokenizer = tokenizer
        self.prompt_format = prompt_format
        self.name = name
        self.lock = threading.Lock()  # one generate at a time on a shared model

    @classmethod
    def load(
        cls, name_or_path: str, device: str = "auto", dtype: str = "auto", verbose: bool = True
    ) -> TransformersChat:
        """Load a registry name, hub id or folder, with the registry's prompt format."""
        from helpers.models import load_model, resolve

        spec, _ = resolve(name_or_path)
        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, verbose=verbose)
        if spec is not None:
            prompt_format = spec.prompt_format
        else:
            prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "linly"
        return cls(model, tokenizer, prompt_format, name=str(name_or_path))

    @property
    def can_batch(self) -> bool:
        """True when prompts can be tokenised and decoded together (not remote ``model.chat``)."""
        return self.prompt_format != "remote_chat"

    @property
    def default_stop(self) -> tuple[str, ...]:
        """Stop strings the prompt format needs (Linly models run on into the next '###')."""
        return LINLY_STOP if self.prompt_format == "linly" else ()

    def render_prompt(self, messages: Sequence[Message]) -> str:
        """The prompt text the model sees for ``messages``."""
        messages = validate_messages(messages)
        if self.prompt_format == "linly":
            return render_linly_prompt(messages)
        if self.prompt_format == "chat_template":
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=True
            )
        raise ValueError("remote_chat models build their prompt inside model.chat")

    def prompt_ids(self, messages: Sequence[Message]) -> list[int]:
        """Token ids of the prompt for ``messages``."""
        text = self.render_prompt(messages)
        # Chat templates already contain the BOS/role tokens; the Linly template wants BOS.
        add_special = self.prompt_format == "linly"
        return self.tokenizer(text, add_special_tokens=add_special)["input_ids"]

    def eos_token_ids(self) -> set[int]:
        """Every id that ends a reply (generation config and tokenizer may differ)."""
        ids: set[int] = set()
        for source in (getattr(self.model, "generation_config", None), self.tokenizer):
            eos = getattr(source, "eos_token_id", None)
            if isinstance(eos, int):
                ids.add(eos)
            elif eos:
                ids.update(int(i) for i in eos)
        return ids

    def stream(self, messages: Sequence[Message], **params: Any) -> Iterator[str]:
        """Generate in a worker thread and yield decoded pieces; closing the iterator stops it."""
        gen = GenerationParams.from_kwargs(**params)
        messages = validate_messages(messages)
        if self.prompt_format == "remote_chat":
            yield self._remote_chat(messages, gen)
            return
        yield from self._stream_generate(messages, gen)

    def _remote_chat(self, messages: list[dict[str, str]], gen: GenerationParams) -> str:
        history = [tuple(pair) for pair in messages_to_pairs(messages[:-1])]
        kwargs: dict[str, Any] = {"max_new_tokens": gen.max_new_tokens, "top_p": gen.top_p}
        if gen.greedy:
            kwargs["do_sample"] = False
        else:
            kwargs["temperature"] = gen.temperature
        with self.lock:
            response, _ = self.model.chat(
                self.tokenizer, messages[-1]["content"], history=history, **kwargs
            )
        return response

    def _stream_generate(self, messages: list[dict[str, str]], gen: GenerationParams) -> Iterator[str]:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        ids = torch.tensor([self.prompt_ids(messages)], device=self.model.device)
        tokens: Queue[int | None] = Queue()
        cancelled = threading.Event()
        error: list[BaseException] = []

        class _IdStreamer(BaseStreamer):
            # The first put() is the prompt; later ones are the new token(s).
            def __init__(self) -> None:
                self.seen_prompt = False

            def put(self, value: Any) -> None:
                if not self.seen_prompt:
                    self.seen_prompt = True
                    return
                for token in value.reshape(-1).tolist():
                    tokens.put(token)

            def end(self) -> None:
                tokens.put(None)

        class _Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        kwargs = self._generate_kwargs(gen)

        def work() -> None:
            try:
                with self.lock, torch.inference_mode():
                    if gen.seed is not None:
                        torch.manual_seed(gen.seed)
                    self.model.generate(
                        ids,
                        attention_mask=torch.ones_like(ids),
                        streamer=_IdStreamer(),
                        stopping_criteria=StoppingCriteriaList([_Cancelled()]),
                        **kwargs,
                    )
            except BaseException as exc:  # re-raised in the consumer's thread
                error.append(exc)
                tokens.put(None)

        thread = threading.Thread(target=work, name="dhllm-generate", daemon=True)
        thread.start()
        decoder = IncrementalDecoder(self.tokenizer)
        stopper = StopMatcher(gen.stop + self.default_stop)
        eos = self.eos_token_ids()
        try:
            while (token := tokens.get()) is not None:
                if token in eos:
                    continue
                piece = stopper.push(decoder.push(token))
                if piece:
                    yield piece
                if stopper.stopped:
                    break
            if error:
                raise error[0]
            tail = stopper.flush()
            if tail:
                yield tail
        finally:
            cancelled.set()  # a client that stops reading stops the generation too
            thread.join()

    def _generate_kwargs(self, gen: GenerationParams) -> dict[str, Any]:
        eos = sorted(self.eos_token_ids())
        kwargs: dict[str, Any] = {
            "max_new_tokens": gen.max_new_tokens,
            "repetition_penalty": gen.repetition_penalty,
            "eos_token_id": eos or None,
            "pad_token_id": self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
            else (eos[0] if eos else None),
        }
        if gen.greedy:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        else:
            kwargs.update(do_sample=True, temperature=gen.temperature, top_p=gen.top_p,
                          top_k=gen.top_k or None)
        return kwargs


# ---------------------------------------------------------------------------------------------
# One string picks any backend.


def get_chat_model(spec: str, **options: Any) -> ChatModel:
    """Build a ChatModel from one string: ``local:NAME_OR_PATH``, a bare registry name or path,
    ``gemini:MODEL`` or an OpenAI-compatible preset ``PRESET:MODEL`` (openai, deepseek, zhipu,
    dashscope, moonshot, vllm, ollama, dhllm). An empty MODEL (``zhipu`` or ``zhipu:``) means the
    provider's default. Keyword options go to the backend (``api_key=``, ``base_url=``,
    ``timeout=`` for cloud models; ``device=``, ``dtype=`` for local ones).
    """
    import os

    from helpers.cloud import CLOUD_PREFIXES, get_cloud_model  # cheap: no SDK imported yet

    kind, _, rest = spec.partition(":")
    if kind == "local":
        return TransformersChat.load(rest, **options)
    if kind in CLOUD_PREFIXES and not os.path.exists(spec):
        return get_cloud_model(kind, rest or None, **options)
    if not rest or len(kind) == 1:  # a bare name, or a Windows path like C:\models
        return TransformersChat.load(spec, **options)
    known = ", ".join(f"{p}:MODEL" for p in ("local", *CLOUD_PREFIXES))
    raise ValueError(f"unknown backend {kind!r} in {spec!r}; known: {known}, or a bare "
                     f"registry name or path")

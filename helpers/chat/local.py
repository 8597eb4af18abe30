"""``TransformersChat``: a local transformers model behind ``ChatModel``."""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from queue import Queue
from typing import Any

from helpers.chat.base import ChatModel, GenerationParams, Message, validate_messages
from helpers.chat.decoding import IncrementalDecoder, StopMatcher
from helpers.chat.prompts import LINLY_STOP, messages_to_pairs, render_linly_prompt
from helpers.models import ModelChoice, load_model, resolve


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
        cls,
        name_or_path: str | ModelChoice,
        device: str = "auto",
        dtype: str = "auto",
        verbose: bool = True,
        quantize: str | None = None,
        endpoint: str | None = None,
    ) -> TransformersChat:
        """Load a registry name, ``choose_model``'s choice, hub id or folder (see ``load_model``)."""
        model, tokenizer = load_model(name_or_path, device=device, dtype=dtype, verbose=verbose,
                                      quantize=quantize, endpoint=endpoint)
        return cls.wrap(model, tokenizer, name=str(name_or_path))

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, name: str = "local") -> TransformersChat:
        """A model and tokenizer you loaded yourself (``from_pretrained``), prompt format guessed:
        the registry's for a registry name, else the tokenizer's chat template, else Linly's."""
        spec, _ = resolve(name)
        if spec is not None:
            prompt_format = spec.prompt_format
        else:
            prompt_format = "chat_template" if getattr(tokenizer, "chat_template", None) else "linly"
        return cls(model, tokenizer, prompt_format, name=str(name))

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
        return self.raw_prompt_ids(self.render_prompt(messages))

    def raw_prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a prompt already in this model's format (e.g. a Linly-template prompt)."""
        # Chat templates already contain the BOS/role tokens; the Linly template wants BOS.
        add_special = self.prompt_format == "linly"
        return self.tokenizer(prompt, add_special_tokens=add_special)["input_ids"]

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
        """Run ``model.generate`` in a thread; decode its tokens here as they arrive."""
        ids = self.prompt_ids(messages)
        tokens: Queue[int | None] = Queue()
        cancelled = threading.Event()
        error: list[BaseException] = []

        def work() -> None:
            try:
                self._generate(ids, gen, tokens, cancelled)
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

    def _generate(self, ids: list[int], gen: GenerationParams, tokens: Queue[int | None],
                  cancelled: threading.Event) -> None:
        """``model.generate`` putting each new token on ``tokens``; stops once ``cancelled``."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList
        from transformers.generation.streamers import BaseStreamer

        class IdStreamer(BaseStreamer):
            # The first put() is the prompt; later ones are the new token(s).
            def __init__(self) -> None:
                self.seen_prompt = False

            def put(self, value: Any) -> None:
                if self.seen_prompt:
                    for token in value.reshape(-1).tolist():
                        tokens.put(token)
                self.seen_prompt = True

            def end(self) -> None:
                tokens.put(None)

        class Cancelled(StoppingCriteria):
            def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
                return torch.full((input_ids.shape[0],), cancelled.is_set(), dtype=torch.bool,
                                  device=input_ids.device)

        prompt = torch.tensor([ids], device=self.model.device)
        # A seed applies to this call only: fork_rng restores the process-wide RNG after.
        devices = [self.model.device] if self.model.device.type == "cuda" else []
        with self.lock, torch.inference_mode(), torch.random.fork_rng(devices=devices):
            if gen.seed is not None:
                torch.manual_seed(gen.seed)
            self.model.generate(prompt, attention_mask=torch.ones_like(prompt),
                                streamer=IdStreamer(),
                                stopping_criteria=StoppingCriteriaList([Cancelled()]),
                                **self._generate_kwargs(gen))

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


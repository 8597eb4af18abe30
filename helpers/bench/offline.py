"""Offline figures (no HTTP): one stream through model.generate, and engines side by side."""

from __future__ import annotations

import time
from typing import Any

from helpers.bench.load import PROMPT


def direct_tokens_per_s(chat: Any, tokens: int, temperature: float, repeats: int = 2) -> float:
    """One stream straight through ``model.generate`` (no server): the overhead baseline."""
    import torch

    ids = torch.tensor([chat.prompt_ids([{"role": "user", "content": PROMPT}])],
                       device=chat.model.device)
    total, seconds = 0, 0.0
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            out = chat.model.generate(ids, attention_mask=torch.ones_like(ids),
                                      max_new_tokens=tokens, do_sample=True,
                                      temperature=temperature, top_p=1.0, top_k=None,
                                      pad_token_id=chat.tokenizer.pad_token_id)
            seconds += time.perf_counter() - started
            total += out.shape[1] - ids.shape[1]
    return total / seconds


def offline_engines(chat: Any, n: int, tokens: int, temperature: float) -> dict[str, Any]:
    """transformers' generate_batch (paged continuous batching) against our engine, no HTTP."""
    from transformers import GenerationConfig

    from helpers.chat import GenerationParams
    from helpers.server.engine import BatchingEngine

    messages = [{"role": "user", "content": PROMPT}]
    ids = chat.prompt_ids(messages)
    out: dict[str, Any] = {}
    config = GenerationConfig(max_new_tokens=tokens, do_sample=True, temperature=temperature,
                              top_p=1.0, top_k=0, eos_token_id=sorted(chat.eos_token_ids()),
                              pad_token_id=chat.tokenizer.pad_token_id)
    try:
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        # By default the paged cache takes most of the RAM, which costs seconds per call on a CPU;
        # a modest cache, allocated once (persistent manager), is the fair comparison.
        cb_config = ContinuousBatchingConfig(max_memory_percent=0.1, max_requests_per_batch=n)
        run = lambda k: chat.model.generate_batch(  # noqa: E731
            [ids] * k, generation_config=config, continuous_batching_config=cb_config,
            persistent_manager=True)
        try:
            run(n)  # warm-up, at the size measured
            for k in (1, n):
                started = time.perf_counter()
                made = sum(len(r.generated_tokens) for r in run(k).values())
                out[f"builtin_{k}"] = made / (time.perf_counter() - started)
        finally:
            chat.model.destroy_cached_continuous_batching_manager()
    except Exception as exc:  # an API that changes between releases: report, go on
        out["builtin_error"] = f"{type(exc).__name__}: {exc}"
    engine = BatchingEngine(chat, max_batch_size=max(n, 1))
    engine.start()
    try:
        params = GenerationParams(max_new_tokens=tokens, temperature=temperature)
        list(engine.submit(messages, params))  # warm-up
        for k in (1, n):
            started = time.perf_counter()
            streams = [engine.submit(messages, params) for _ in range(k)]
            for stream in streams:
                list(stream)
            made = sum(s.finish.completion_tokens for s in streams if s.finish)
            out[f"ours_{k}"] = made / (time.perf_counter() - started)
    finally:
        engine.stop()
    return out

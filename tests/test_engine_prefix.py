"""Prefix (KV) reuse and chunked prefill: outputs never change, only the work done does."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from helpers.bench.persona import PERSONA, TURNS, conversation
from helpers.chat import GenerationParams, TransformersChat
from helpers.server.engine import BatchingEngine, Finish
from helpers.server.engine.prefix_cache import BLOCK_TOKENS

# Greedy with a strong repetition penalty: the random tiny models then say varied tokens
# (with 1.3 they answer a long system prompt with one repeated token).
GREEDY = GenerationParams(max_new_tokens=12, temperature=0, repetition_penalty=5.0)
SYSTEM = PERSONA[:700]  # ~150 tokens: several blocks shared by every turn
# Its own system prompt: it shares no block with the requests under test.
RUNNER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Go on."}]
LONG = GenerationParams(max_new_tokens=400, temperature=0, repetition_penalty=1.3)


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


def wait_for(condition, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine never got there"
        time.sleep(0.001)


def started(chat: TransformersChat, **kwargs: object) -> BatchingEngine:
    engine = BatchingEngine(chat, max_batch_size=8, **kwargs)  # type: ignore[arg-type]
    engine.start()
    return engine


def converse(answer, turns: int = 3) -> tuple[list[str], list[list[dict[str, str]]]]:
    """Answers of a multi-turn conversation with the persona, history carried as answered."""
    answers: list[str] = []
    prompts = []
    for turn in range(turns):
        messages = conversation(answers, turn)
        messages[0]["content"] = SYSTEM
        prompts.append(messages)
        answers.append(answer(messages))
    return answers, prompts


def run(engine: BatchingEngine, messages: list[dict[str, str]], params: GenerationParams,
        finishes: list[Finish] | None = None) -> str:
    stream = engine.submit(messages, params)
    text = "".join(stream)
    if finishes is not None and stream.finish is not None:
        finishes.append(stream.finish)
    return text


@pytest.fixture(scope="module")
def tiny_llama_chat(tiny_llama_dir: Path) -> TransformersChat:
    return TransformersChat.load(str(tiny_llama_dir), verbose=False)


@pytest.mark.parametrize("which", ["tiny_chat", "tiny_llama_chat"])
def test_multi_turn_reuse_gives_the_same_greedy_output(request, which):
    chat = request.getfixturevalue(which)
    reference, prompts = converse(lambda m: chat.chat(m, **vars(GREEDY)))  # model.generate
    plain, cached = started(chat, prefix_cache_mb=0), started(chat)
    finishes: list[Finish] = []
    try:
        without, _ = converse(lambda m: run(plain, m, GREEDY))
        with_reuse, _ = converse(lambda m: run(cached, m, GREEDY, finishes))
        held = cached.stats.cache_bytes  # (a stopped engine gives its cache back)
    finally:
        plain.stop()
        cached.stop()
    assert with_reuse == without == reference
    assert len(set(reference)) > 1
    assert plain.stats.cached_tokens == 0 and plain.prefix_cache is None
    # Turn 2 and 3 reuse at least every full block of the turn before's prompt.
    for turn in (1, 2):
        previous = len(chat.prompt_ids(prompts[turn - 1]))
        assert finishes[turn].cached_tokens >= previous // BLOCK_TOKENS * BLOCK_TOKENS
    assert finishes[0].cached_tokens == 0
    assert cached.stats.cache_hits == 2
    assert cached.stats.cached_tokens == sum(f.cached_tokens for f in finishes)
    assert 0 < held <= cached.prefix_cache.budget_bytes


def test_rows_with_different_cached_prefixes_share_one_prefill(tiny_chat):
    """Left padding, per-row sampling, cached lengths 0 / some / most, all in one group."""
    sampled = GenerationParams(max_new_tokens=12, temperature=1.0, top_p=0.9, seed=11)
    first = conversation([], 0)
    first[0]["content"] = SYSTEM
    answer = "".join(tiny_chat.stream(first, **vars(GREEDY)))
    requests = [
        (conversation([answer], 1), GREEDY),  # most of it cached
        ([{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi!"}], sampled),
        ([{"role": "user", "content": "Something else entirely."}], GREEDY),  # nothing cached
    ]
    for messages, _ in requests[:1]:
        messages[0]["content"] = SYSTEM
    solo_engine = started(tiny_chat, prefix_cache_mb=0)
    try:
        solo = [run(solo_engine, m, p) for m, p in requests]
    finally:
        solo_engine.stop()
    engine = started(tiny_chat, prefill_chunk_tokens=8)  # the blocker's prefill takes a while
    try:
        assert run(engine, first, GREEDY) == answer  # primes the cache
        runner = engine.submit(RUNNER, LONG)  # running rows make prefills go in chunks
        next(iter_runner := iter(runner))
        chunks = engine.stats.prefill_chunks
        blocker = engine.submit([{"role": "system", "content": "Summarise."},
                                 {"role": "user", "content": PERSONA[:1200]}], GREEDY)
        wait_for(lambda: engine.stats.prefill_chunks > chunks)  # the blocker's group is under way
        streams = [engine.submit(m, p) for m, p in requests]  # they wait, then go as one group
        texts = ["".join(s) for s in streams]
        "".join(blocker)
        runner.cancel()
        list(iter_runner)
    finally:
        engine.stop()
    assert texts == solo
    cached = [s.finish.cached_tokens for s in streams]
    assert cached[0] > cached[1] > cached[2] == 0
    assert engine.stats.prefills == 4  # primer, runner, blocker, then the three together


def test_eviction_under_a_tiny_budget_stays_correct(tiny_chat):
    reference, _ = converse(lambda m: tiny_chat.chat(m, **vars(GREEDY)), turns=4)
    other = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": TURNS[1]}]
    other_reference = tiny_chat.chat(other, **vars(GREEDY))
    engine = started(tiny_chat, prefix_cache_mb=0.03)  # 3 blocks of the tiny model
    try:
        answers, _ = converse(lambda m: run(engine, m, GREEDY), turns=4)
        hits = engine.stats.cache_hits
        assert run(engine, other, GREEDY) == other_reference  # evicts the persona's blocks
    finally:
        engine.stop()
    assert answers == reference
    # The head of the persona's chain stays while the conversation goes on: turns 2-4 hit.
    assert hits == 3
    assert engine.stats.cache_evictions > 0
    assert engine.stats.cache_bytes <= engine.prefix_cache.budget_bytes


def test_cancelled_requests_leave_the_cache_consistent(tiny_chat):
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": TURNS[0]}]
    reference = tiny_chat.chat(messages, **vars(GREEDY))
    engine = started(tiny_chat, prefill_chunk_tokens=8)
    try:
        runner = engine.submit(RUNNER, LONG)  # running rows make prefills go in chunks
        wait_for(lambda: engine.stats.cache_blocks > 0)  # running, its prompt's blocks stored
        blocks = engine.stats.cache_blocks  # the runner's own prompt
        # Cancelled between prefill chunks: its partial KV must never be stored.
        chunks = engine.stats.prefill_chunks
        victim = engine.submit(messages, GREEDY)
        wait_for(lambda: engine.stats.prefill_chunks >= chunks + 2)
        victim.cancel()
        assert "".join(victim) == "" and victim.finish.reason == "cancelled"
        assert engine.stats.cache_blocks == blocks
        runner.cancel()
        list(runner)
        # Cancelled while decoding: what it stored is still right for the next request.
        decoding = engine.submit(messages, LONG)
        pieces = iter(decoding)
        next(pieces)
        decoding.cancel()
        list(pieces)
        assert decoding.finish.reason == "cancelled"
        finishes: list[Finish] = []
        assert run(engine, messages, GREEDY, finishes) == reference
    finally:
        engine.stop()
    assert finishes[0].cached_tokens > 0
    assert engine.stats.cancelled == 3


def test_chunked_prefill_lets_a_running_row_decode_between_chunks(tiny_chat):
    running_params = GenerationParams(max_new_tokens=200, temperature=0, repetition_penalty=1.3)
    short = [{"role": "user", "content": "Tell me a story."}]
    long = [{"role": "user", "content": PERSONA[:1500]}]
    solo_engine = started(tiny_chat, prefix_cache_mb=0)
    try:
        solo_running, solo_long = run(solo_engine, short, running_params), run(solo_engine, long, GREEDY)
    finally:
        solo_engine.stop()
    engine = started(tiny_chat, prefill_chunk_tokens=16, prefix_cache_mb=0)
    try:
        running = engine.submit(short, running_params)
        pieces = iter(running)
        head = [next(pieces) for _ in range(3)]  # mid-flight now
        chunks_before = engine.stats.prefill_chunks
        arriving = engine.submit(long, GREEDY)
        arriving_pieces = iter(arriving)
        first = next(arriving_pieces)
        # Pieces the running row produced while the long prompt was being prefilled.
        produced_meanwhile = running._queue.qsize()
        long_text = first + "".join(arriving_pieces)
        running_text = "".join(head) + "".join(pieces)
    finally:
        engine.stop()
    assert long_text == solo_long and running_text == solo_running
    long_chunks = engine.stats.prefill_chunks - chunks_before
    assert long_chunks >= len(tiny_chat.prompt_ids(long)) // 16
    assert engine.stats.decode_steps_during_prefill >= long_chunks - 1
    assert produced_meanwhile >= long_chunks // 2  # a few pieces may be held (partial UTF-8)


@pytest.mark.slow
def test_embedded_multi_turn_reuse_gives_the_same_greedy_output(embedded_chat):
    """Turns 2 and 3 reuse the cached persona and earlier turns, and answer exactly as plain
    ``generate`` does without any cache."""
    params = GenerationParams(max_new_tokens=24, temperature=0)
    engine = started(embedded_chat, prefix_cache_mb=256)
    finishes: list[Finish] = []
    answers: list[str] = []
    try:
        for turn in range(3):
            answers.append(run(engine, conversation(answers, turn), params, finishes))
    finally:
        engine.stop()
    reference: list[str] = []
    for turn in range(3):
        reference.append(embedded_chat.chat(conversation(reference, turn), **vars(params)))
    assert answers == reference
    assert [f.cached_tokens for f in finishes][0] == 0
    assert all(f.cached_tokens > 600 for f in finishes[1:])  # the persona (~630 tokens) and more


def test_a_stopped_engine_gives_its_prefix_cache_back(tiny_chat):
    engine = started(tiny_chat)
    try:
        run(engine, conversation([], 0), GREEDY)
        assert len(engine.prefix_cache) > 0 and engine.stats.cache_bytes > 0
    finally:
        engine.stop()
    assert len(engine.prefix_cache) == 0 and engine.prefix_cache.bytes == 0
    assert engine.stats.cache_bytes == 0


def test_a_short_prompt_prefills_beside_a_long_one_already_under_way(tiny_chat):
    # vLLM's chunked-prefill scheduling: an arrival does not wait for an earlier group's prefill.
    running_params = GenerationParams(max_new_tokens=300, temperature=0, repetition_penalty=1.3)
    long, short = [{"role": "user", "content": PERSONA[:1500]}], user("Hi.")
    solo_engine = started(tiny_chat, prefix_cache_mb=0)
    try:
        solo_long, solo_short = run(solo_engine, long, GREEDY), run(solo_engine, short, GREEDY)
    finally:
        solo_engine.stop()
    engine = started(tiny_chat, prefill_chunk_tokens=8, prefix_cache_mb=0)
    order: list[int] = []
    finish_prefill = engine.kv.finish_prefill

    def record(prefilling):
        order.extend(len(r.prompt_ids) for r in prefilling.rows)
        finish_prefill(prefilling)

    engine.kv.finish_prefill = record  # type: ignore[method-assign]
    try:
        runner = engine.submit(RUNNER, running_params)  # decoding: prefills go in chunks
        pieces = iter(runner)
        next(pieces)
        arriving_long = engine.submit(long, GREEDY)
        wait_for(lambda: engine.stats.prefill_chunks >= 3)  # the long prompt is under way
        arriving_short = engine.submit(short, GREEDY)
        texts = ["".join(arriving_short), "".join(arriving_long)]
        runner.cancel()
    finally:
        engine.stop()
    assert texts == [solo_short, solo_long]
    long_ids, short_ids = len(tiny_chat.prompt_ids(long)), len(tiny_chat.prompt_ids(short))
    assert order[-2:] == [short_ids, long_ids]  # the later, shorter prompt was done first

"""The batching engine: batched output equals one-by-one output, rows join and leave mid-flight."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest

from helpers.chat import ChatModel, GenerationParams, TransformersChat
from helpers.server.engine import (
    BatchingEngine,
    EngineStoppedError,
    Finish,
    QueueFullError,
    ThreadedEngine,
    create_engine,
)

PROMPTS = ["What is the capital of France?", "Name three colors.",
           "Write one sentence about the sea.", "你好，请介绍一下你自己。"]


def user(text: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": text}]


@pytest.fixture
def engine(tiny_chat: TransformersChat) -> Iterator[BatchingEngine]:
    eng = BatchingEngine(tiny_chat, max_batch_size=8, max_queue=8)
    eng.start()
    yield eng
    eng.stop()


# Greedy with a repetition penalty: the random tiny model then says varied tokens, not one.
GREEDY = GenerationParams(max_new_tokens=12, temperature=0, repetition_penalty=1.3)


def test_batched_greedy_equals_sequential_and_generate(engine, tiny_chat):
    sequential = ["".join(engine.submit(user(p), GREEDY)) for p in PROMPTS]
    streams = [engine.submit(user(p), GREEDY) for p in PROMPTS]
    batched = ["".join(s) for s in streams]
    reference = [tiny_chat.chat(user(p), **vars(GREEDY)) for p in PROMPTS]  # model.generate
    assert batched == sequential == reference
    assert len(set(batched)) > 1
    assert engine.stats.max_batch_seen > 1  # they really ran together
    assert all(s.finish.completion_tokens == 12 and s.finish.reason == "length" for s in streams)


def test_rows_joining_a_running_batch_get_their_solo_output(engine):
    long = GenerationParams(max_new_tokens=40, temperature=0, repetition_penalty=1.3)
    solo_long = "".join(engine.submit(user(PROMPTS[2]), long))
    solo = ["".join(engine.submit(user(p), GREEDY)) for p in PROMPTS[:2]]
    first = engine.submit(user(PROMPTS[2]), long)
    pieces = iter(first)
    head = [next(pieces) for _ in range(5)]  # the first row is mid-flight now
    assert 0 < engine.stats.kv_slot_tokens <= engine.kv_budget_tokens  # its slots, in budget
    joined = [engine.submit(user(p), GREEDY) for p in PROMPTS[:2]]
    assert ["".join(s) for s in joined] == solo
    assert "".join(head) + "".join(pieces) == solo_long
    assert engine.stats.prefills >= 2 and engine.stats.max_batch_seen >= 2


def test_cancel_stops_one_row_without_disturbing_others(engine):
    other_solo = "".join(engine.submit(user(PROMPTS[0]), GREEDY))
    victim = engine.submit(user(PROMPTS[1]), GenerationParams(max_new_tokens=1500, temperature=0))
    other = engine.submit(user(PROMPTS[0]), GREEDY)
    next(iter(victim))
    victim.cancel()
    assert "".join(other) == other_solo
    list(victim)  # drains to the end of the stream
    assert victim.finish.reason == "cancelled"
    assert victim.finish.completion_tokens < 1500
    assert engine.stats.cancelled == 1


def test_per_row_limits_stop_strings_and_seeds(engine):
    sampled = GenerationParams(max_new_tokens=20, temperature=1.0, top_p=0.9, top_k=50, seed=7)
    requests = [
        (user("a"), GenerationParams(max_new_tokens=3, temperature=0)),
        (user("b"), sampled),
        (user("b"), sampled),
        (user("c"), GenerationParams(max_new_tokens=9, temperature=0.5, seed=1)),
    ]
    alone = ["".join(engine.submit(m, p)) for m, p in requests]  # one at a time: the reference
    streams = [engine.submit(m, p) for m, p in requests]
    texts = ["".join(s) for s in streams]
    assert engine.stats.max_batch_seen >= 2
    assert [s.finish.completion_tokens for s in streams] == [3, 20, 20, 9]
    # Seeded sampling inside a batch draws exactly what the same seed draws alone.
    assert texts == alone
    assert texts[1] == texts[2] and texts[3] and texts[3] != texts[1]
    # A stop string taken from a greedy reply cuts the reply just before it.
    full = "".join(engine.submit(user("d"), GREEDY))
    # Characters from the middle, not a word: the tiny random model's reply may be one word.
    cut = full[len(full) // 2:][:3]
    assert len(full) >= 4 and cut.strip(), full
    stopped = engine.submit(user("d"), GenerationParams(
        max_new_tokens=12, temperature=0, repetition_penalty=1.3, stop=(cut,)))
    text = "".join(stopped)
    assert text == full[: full.index(cut)] and stopped.finish.reason == "stop"


def test_queue_full_and_stopped_engine(tiny_chat):
    eng = BatchingEngine(tiny_chat, max_batch_size=1, max_queue=1)
    with pytest.raises(EngineStoppedError):
        eng.submit(user("x"), GREEDY)
    eng.start()
    try:
        running = eng.submit(user("x"), GenerationParams(max_new_tokens=1500, temperature=0))
        # Keep the iterator: dropping it closes it, and closing a stream's iterator cancels the
        # request (a client that went away), which would let "y" in before "z" arrives.
        pieces = iter(running)
        next(pieces)  # in the batch now; the next one waits
        waiting = eng.submit(user("y"), GREEDY)
        with pytest.raises(QueueFullError):
            eng.submit(user("z"), GREEDY)
        assert eng.stats.rejected == 1
        running.cancel()
        pieces.close()
        assert "".join(waiting)
    finally:
        eng.stop()


def test_bad_input_is_a_value_error(engine):
    with pytest.raises(ValueError, match="role"):
        engine.submit([{"role": "robot", "content": "x"}], GREEDY)
    with pytest.raises(ValueError, match="context"):
        engine.submit(user("x"), GenerationParams(max_new_tokens=5000))


class GatedChat(ChatModel):
    """A backend that yields one piece, then waits for the test: proves streaming order."""

    name = "gated"

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.seen: list = []

    def stream(self, messages, **params):
        self.seen.append((messages, params))
        yield "first. "
        self.gate.wait(10)
        yield "second."


def test_threaded_engine_streams_any_chat_model():
    model = GatedChat()
    eng = create_engine(model, max_workers=2, max_queue=4)
    assert isinstance(eng, ThreadedEngine)
    eng.start()
    try:
        stream = eng.submit(user("hi"), GenerationParams(max_new_tokens=5, temperature=0.3))
        pieces = iter(stream)
        assert next(pieces) == "first. "  # arrives while the backend is still generating
        model.gate.set()
        assert list(pieces) == ["second."]
        assert stream.finish.reason == "stop"
        assert model.seen[0][1]["temperature"] == 0.3
    finally:
        eng.stop()


@pytest.mark.slow
def test_embedded_batched_equals_sequential(embedded_chat):
    eng = BatchingEngine(embedded_chat, max_batch_size=4)
    eng.start()
    try:
        params = GenerationParams(max_new_tokens=16, temperature=0)
        prompts = PROMPTS[:3]
        sequential = ["".join(eng.submit(user(p), params)) for p in prompts]
        batched = ["".join(s) for s in [eng.submit(user(p), params) for p in prompts]]
    finally:
        eng.stop()
    assert batched == sequential
    assert "Paris" in batched[0]


@pytest.mark.parametrize("params", [
    GenerationParams(max_new_tokens=3, temperature=1e-300),
    GenerationParams(max_new_tokens=3, temperature=0.7, repetition_penalty=1e-300),
    GenerationParams(max_new_tokens=3, temperature=0, repetition_penalty=1e300),
    GenerationParams(max_new_tokens=3, temperature=1e300, top_p=1e-9, top_k=1),
])
def test_extreme_parameters_still_produce_tokens(engine, params):
    # Found by schemathesis: overflowing scores once made torch.multinomial fail (a 500).
    stream = engine.submit(user("x"), params)
    list(stream)
    assert stream.finish.reason in ("length", "stop") and stream.finish.completion_tokens >= 1


def read(stream, timeout: float = 30.0) -> BaseException | None:
    """Read ``stream`` to its end in a thread; its error. Fails the test if it never closes."""
    out: list[BaseException | None] = [None]

    def run() -> None:
        try:
            list(stream)
        except Exception as exc:
            out[0] = exc

    reader = threading.Thread(target=run, daemon=True)
    reader.start()
    reader.join(timeout)
    assert not reader.is_alive(), "the stream never closed"
    return out[0]


class BlockingChat(ChatModel):
    """A backend whose first reply waits for the test: later requests queue behind it."""

    name = "blocking"

    def __init__(self) -> None:
        self.gate = threading.Event()

    def stream(self, messages, **params):
        self.gate.wait(30)
        yield "done."


def test_threaded_stop_ends_queued_requests_with_an_error():
    model = BlockingChat()
    eng = ThreadedEngine(model, max_workers=1, max_queue=4)
    eng.start()
    first = eng.submit(user("hi"), GREEDY)
    queued = eng.submit(user("hi"), GREEDY)  # waits for the only worker
    eng.stop()
    assert isinstance(read(queued), EngineStoppedError)  # closed by the stop, not left to hang
    model.gate.set()
    assert list(first) == ["done."]  # the running one still finishes
    assert eng.stats.waiting == 0 and eng.stats.errors == 1


class BadTokenizer:
    def __call__(self, text, **kwargs):
        raise RuntimeError("the tokenizer failed")


class BadTokenizerChat(BlockingChat):
    tokenizer = BadTokenizer()


def test_threaded_token_counting_failure_closes_the_stream():
    model = BadTokenizerChat()
    model.gate.set()
    eng = ThreadedEngine(model, max_workers=1, max_queue=4)
    eng.start()
    try:
        stream = eng.submit(user("hi"), GREEDY)
        assert isinstance(read(stream), RuntimeError) and stream.finish.reason == "error"
    finally:
        eng.stop()


@pytest.mark.parametrize("stop", ["###", "\n\n"])
def test_text_held_back_for_a_stop_string_is_sent_at_eos(tiny_chat, stop):
    # Linly's prompt stops at "###": a reply that ends in "#" (or "\n" with stop "\n\n") must
    # still deliver that last character when the model says EOS.
    from helpers.server.engine.base import Stream
    from helpers.server.engine.rows import Row

    text = "Hi " + stop[0]
    eos = min(tiny_chat.eos_token_ids())
    stream = Stream()
    row = Row.new(stream, [1, 2], GenerationParams(max_new_tokens=50, stop=(stop,)), tiny_chat)
    for token in [*tiny_chat.tokenizer.encode(text, add_special_tokens=False), eos]:
        row.next_token, row.fresh = token, True
        row.tokens.append(token)
        row.emit({eos})
    assert row.finish_reason == "stop"
    stream.close(Finish("stop"))
    assert "".join(stream) == text

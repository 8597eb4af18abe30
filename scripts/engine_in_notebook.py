"""The builtin engine as a notebook runs it: in the process whose main thread ran the model first.

``python scripts/engine_in_notebook.py [TOKENS] [STREAMS]``: loads the embedded model, answers
once in the main thread (``chat.chat``, as notebook 02 does before it starts the server), then
makes a ``BatchingEngine`` and times ``STREAMS`` seeded streams of ``TOKENS`` tokens (after one
warm-up batch); prints tokens/s. Run it with ``PYTHONPATH=/another/checkout`` to time that
checkout's engine the same way, in turns, under the heavy lock.
"""

from __future__ import annotations

import os
import sys
import time

from helpers.chat import GenerationParams, TransformersChat
from helpers.server.engine import BatchingEngine


def main(tokens: int, streams: int) -> None:
    """One warm-up batch, then one timed batch of ``streams`` streams."""
    chat = TransformersChat.load("embedded", verbose=False)
    chat.chat([{"role": "user", "content": "hi"}], max_new_tokens=8)  # the main thread runs it
    engine = BatchingEngine(chat, max_batch_size=streams)
    engine.start()
    try:
        for _ in range(2):  # the first batch warms up
            submitted = [engine.submit([{"role": "user", "content": f"Tell me a story ({i})."}],
                                       GenerationParams(max_new_tokens=tokens, temperature=0.7,
                                                        seed=i))
                         for i in range(streams)]
            started = time.perf_counter()
            for stream in submitted:
                "".join(stream)
            seconds = time.perf_counter() - started
        done = sum(s.finish.completion_tokens for s in submitted if s.finish)
        print(f"{os.environ.get('PYTHONPATH') or 'this checkout'}: {streams} streams, "
              f"{done / seconds:.1f} tokens/s", flush=True)
    finally:
        engine.stop()


if __name__ == "__main__":
    main(int(sys.argv[1]) if len(sys.argv) > 1 else 48,
         int(sys.argv[2]) if len(sys.argv) > 2 else 8)

"""The batching engine's parts, one by one: prefix cache, KV helpers, sampling, prefill, scheduler.

References are built by hand (plain loops, one row at a time), never by the code under test.
"""

from __future__ import annotations

import pytest
import torch
from transformers import DynamicCache

from helpers.chat import GenerationParams
from helpers.server.engine.base import QueueFullError, Stream
from helpers.server.engine.kv import keep_rows, kv_bytes_per_token, kv_tensors, row_kv
from helpers.server.engine.kv_slots import SlotKV, SlotLimits
from helpers.server.engine.prefill import PrefillGroup
from helpers.server.engine.prefix_cache import PrefixCache
from helpers.server.engine.runner import ModelRunner
from helpers.server.engine.sampling import BatchSampler
from helpers.server.engine.scheduler import PATIENCE, BatchLoad, Request, Scheduler

LAYERS, HEADS, DIM, BLOCK = 2, 2, 3, 4


def token_kv(ids: list[int]) -> torch.Tensor:
    """A made-up KV ``[layers, 2, heads, tokens, dim]`` whose values say which token it is."""
    kv = torch.zeros((LAYERS, 2, HEADS, len(ids), DIM))
    for t, token in enumerate(ids):
        kv[:, 0, :, t] = token * 10 + t  # keys: token and position
        kv[:, 1, :, t] = -(token * 10 + t)  # values
    return kv


def store(cache: PrefixCache, ids: list[int]) -> int:
    reference = token_kv(ids)
    return cache.store(ids, lambda a, b: reference[:, :, :, a:b])


BLOCK_BYTES = LAYERS * 2 * HEADS * BLOCK * DIM * 4


# PrefixCache.

def test_prefix_cache_hit_returns_the_stored_kv_of_the_longest_prefix():
    cache = PrefixCache(100 * BLOCK_BYTES, block_tokens=BLOCK)
    ids = list(range(1, 12))  # 11 tokens: 2 full blocks
    assert store(cache, ids) == 2 and len(cache) == 2
    cached, kv = cache.lookup(ids + [99, 98])
    assert cached == 8
    assert torch.equal(kv, token_kv(ids)[:, :, :, :8])
    # One token is always left to compute: a prompt of exactly 8 tokens reuses one block.
    assert cache.lookup(ids[:8])[0] == 4
    assert cache.lookup([0] + ids[1:])[0] == 0  # the first block differs: nothing matches
    assert store(cache, ids) == 0  # held already: nothing copied


def test_prefix_cache_evicts_least_recently_used_tails_first():
    cache = PrefixCache(4 * BLOCK_BYTES, block_tokens=BLOCK)
    a, b = list(range(1, 9)), list(range(50, 58))  # two chains of 2 blocks each
    store(cache, a)
    store(cache, b)
    assert cache.lookup(a + [0])[0] == 8  # a is now the most recent
    c = list(range(100, 104))
    store(cache, c)  # one block must go: b's tail, never its root before it
    assert cache.evictions == 1
    assert cache.lookup(b + [0])[0] == 4 and cache.lookup(a + [0])[0] == 8
    store(cache, list(range(200, 204)))  # now c is the least recently used: it goes
    assert cache.evictions == 2 and cache.bytes <= cache.budget_bytes
    assert cache.lookup(c + [0])[0] == 0
    assert cache.lookup(b + [0])[0] == 4 and cache.lookup(a + [0])[0] == 8


def test_prefix_cache_keeps_within_its_byte_budget_and_keeps_a_long_chain_head():
    cache = PrefixCache(3 * BLOCK_BYTES, block_tokens=BLOCK)
    ids = list(range(1, 30))  # 7 full blocks, only 3 fit
    assert store(cache, ids) == 3
    assert cache.bytes == 3 * BLOCK_BYTES <= cache.budget_bytes
    cached, kv = cache.lookup(ids)
    assert cached == 12 and torch.equal(kv, token_kv(ids)[:, :, :, :12])
    store(cache, list(range(40, 60)))  # another chain takes the room, the old one goes
    assert cache.bytes <= cache.budget_bytes and cache.evictions == 3
    assert PrefixCache(0, block_tokens=BLOCK).store(ids, lambda a, b: 1 / 0) == 0


# KV helpers, against rows aligned by hand.

def batch(rows: list[list[int]]) -> tuple[DynamicCache, torch.Tensor]:
    """A left-padded batch of ``token_kv`` rows, and its mask."""
    width = max(len(r) for r in rows)
    kv = torch.zeros((LAYERS, 2, len(rows), HEADS, width, DIM))
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        kv[:, :, i, :, width - len(ids):] = token_kv(ids)
        mask[i, width - len(ids):] = 1
    return DynamicCache(ddp_cache_data=[(kv[n, 0], kv[n, 1]) for n in range(LAYERS)]), mask


def real_kv(cache: DynamicCache, mask: torch.Tensor, i: int) -> torch.Tensor:
    """Row ``i``'s KV over its unmasked columns, by a plain loop."""
    columns = [c for c in range(mask.shape[1]) if mask[i, c]]
    return torch.stack([torch.stack([layer.keys[i][:, columns], layer.values[i][:, columns]])
                        for layer in cache.layers])


def slot_rows(slots: SlotKV, mask: torch.Tensor) -> list[torch.Tensor]:
    """Each row of the slots' live KV over its unmasked columns (``real_kv`` of its layers)."""
    return [real_kv(slots.cache, mask, i) for i in range(slots.rows)]


def test_slots_join_and_leave_move_only_the_rows_concerned():
    a, b, c = [[1, 2, 3], [4, 5]], [[6, 7, 8, 9, 10], [11]], [[12]]
    first = batch(a)
    slots = SlotKV.for_group(first[0], 3, future=40, limits=SlotLimits(8, 10**6))
    assert slots.slots == 2  # the rows it has: more only when a join needs them
    mask = slots.join(*first, None, future=40)
    assert [r.tolist() for r in mask] == [[1, 1, 1], [0, 1, 1]]
    mask = slots.join(*batch(b), mask, future=40)  # wider than the room on the left: one move
    assert mask.shape == (4, 5) and slots.rows == 4 and slots.slots == 4  # twice as many
    for got, ids in zip(slot_rows(slots, mask), a + b, strict=True):
        assert torch.equal(got, token_kv(ids))
    assert torch.equal(row_kv(kv_tensors(slots.cache), mask[2], 2, 1, 5),
                       token_kv(b[0])[:, :, :, 1:])
    buffers = [t.data_ptr() for t in slots.keys + slots.values]
    order, mask = slots.keep([1, 3], mask)  # rows [4, 5] and [11]: 3 dead columns go
    assert order == [3, 1] and mask.shape == (2, 2) and slots.width == 2
    assert [r.tolist() for r in mask] == [[0, 1], [1, 1]]
    assert torch.equal(real_kv(slots.cache, mask, 0), token_kv([11]))
    assert torch.equal(real_kv(slots.cache, mask, 1), token_kv([4, 5]))
    mask = slots.join(*batch(c), mask, future=40)  # into a freed slot: no new buffer
    assert [t.data_ptr() for t in slots.keys + slots.values] == buffers
    assert [r.tolist() for r in mask] == [[0, 1], [1, 1], [0, 1]]
    assert torch.equal(real_kv(slots.cache, mask, 2), token_kv([12]))


def test_slots_stay_within_the_kv_budget_beyond_the_rows_needed():
    assert SlotLimits(8, 100).slots(2, 4, 30) == 3  # 3 x 30 tokens fit in 100
    assert SlotLimits(8, 100).slots(5, 10, 30) == 5  # rows already admitted are never refused
    assert SlotLimits(4, 10**6).slots(1, 8, 30) == 4  # the row cap
    assert SlotLimits(8, 10**6).slots(3, 4, 30) == 4  # what was asked for


def test_keep_rows_drops_a_groups_ended_rows_and_dead_columns():
    cache, mask = batch([[1, 2, 3], [4, 5], [6]])
    kept = keep_rows(cache, mask, [1, 2])  # rows [4, 5] and [6]: 1 dead column goes
    assert kept.tolist() == [[1, 1], [0, 1]] and cache.layers[0].keys.shape[2] == 2
    assert torch.equal(real_kv(cache, kept, 0), token_kv([4, 5]))
    assert torch.equal(real_kv(cache, kept, 1), token_kv([6]))


def test_slots_grow_in_place_and_move_when_full():
    cache, mask = batch([[1, 2], [3]])
    slots = SlotKV.for_group(cache, 2, future=3, limits=SlotLimits(2, 10))
    mask = slots.join(cache, mask, None, future=3)
    assert slots.columns == 2 + 3  # room for the rows' 3 more tokens, no more
    buffers = [t.data_ptr() for t in slots.keys]
    for step in range(5):
        slots.make_room(1, future=3 - step)
        new = token_kv([50 + step])  # the same token in both rows
        for n, layer in enumerate(slots.cache.layers):
            keys, values = layer.update(new[n, 0].expand(2, -1, -1, -1),
                                        new[n, 1].expand(2, -1, -1, -1), {})
            assert keys.shape[2] == slots.width + 1
        slots.advance(1)
        mask = torch.cat([mask, mask.new_ones((2, 1))], dim=1)
        moved = [t.data_ptr() for t in slots.keys] != buffers
        assert moved == (step >= 3)  # the reserved room lasts 3 steps; the 4th moves once
    tail = [50 + s for s in range(5)]
    assert torch.equal(real_kv(slots.cache, mask, 0)[:, :, :, :2], token_kv([1, 2]))
    assert torch.equal(real_kv(slots.cache, mask, 1)[:, :, :, 0], token_kv([3])[:, :, :, 0])
    for t, token in enumerate(tail):
        assert torch.equal(real_kv(slots.cache, mask, 0)[:, :, :, 2 + t],
                           token_kv([token])[:, :, :, 0])
        assert torch.equal(real_kv(slots.cache, mask, 1)[:, :, :, 1 + t],
                           token_kv([token])[:, :, :, 0])
    assert slots.cache.get_seq_length() == slots.width == 7


def test_row_kv_skips_a_gap_in_the_middle():
    cache, mask = batch([[1, 2, 3, 4, 5]])
    mask[0, 2] = 0  # a cached prefix, padding, then new tokens (prefill.py's layout)
    expected = token_kv([1, 2, 3, 4, 5])[:, :, :, [0, 1, 3, 4]]
    assert torch.equal(row_kv(kv_tensors(cache), mask[0], 0, 0, 4), expected)


def test_kv_bytes_per_token_of_a_llama_like_config():
    class Config:
        num_hidden_layers, num_attention_heads, num_key_value_heads, hidden_size = 30, 9, 3, 576

    assert kv_bytes_per_token(Config, torch.float32) == 46080  # SmolLM2-135M: 45 KiB
    assert kv_bytes_per_token(Config, torch.float16) == 23040


# Sampling (BatchSampler: tests/test_sampling.py compares it with transformers' processors).

LOGITS = torch.tensor([[0.0, 3.0, 1.0, 2.0], [4.0, 0.0, 0.0, 3.9]])


def sampler(*params: GenerationParams, prompts: list[list[int]] | None = None) -> BatchSampler:
    """A sampler over 4 tokens with one admitted slot per ``params``, in order."""
    result = BatchSampler(len(params), 4)
    for slot, p in enumerate(params):
        result.admit(slot, p, (prompts or [[]] * len(params))[slot])
    return result


def test_greedy_and_top_k_one_take_the_most_likely_token():
    greedy = GenerationParams(temperature=0)
    top1 = GenerationParams(temperature=1.0, top_k=1)
    assert sampler(greedy, top1).pick(LOGITS, [0, 1]).tolist() == [1, 0]


def test_top_p_that_rounds_to_zero_keeps_the_most_likely_token():
    params = GenerationParams(temperature=1.0, top_p=1e-300)  # 0 in float32
    picker = sampler(params, params)
    for _ in range(20):
        assert picker.pick(LOGITS, [0, 1]).tolist() == [1, 0]


def test_top_k_draws_only_among_the_k_best():
    params = GenerationParams(temperature=5.0, top_k=2, max_new_tokens=200)  # hot: all 4 else
    picker = sampler(params)
    drawn = {int(picker.pick(LOGITS[:1], [0])[0]) for _ in range(200)}
    assert drawn == {1, 3}


def test_seeded_rows_are_reproducible_and_independent_of_their_batch():
    params = GenerationParams(temperature=1.5, seed=3)

    def draws(rows: int) -> list[int]:
        picker = BatchSampler(rows, 50)
        for slot in range(rows):
            picker.admit(slot, params if slot == 0 else GenerationParams(temperature=1.5), [])
        logits = torch.zeros((rows, 50))
        return [int(picker.pick(logits, list(range(rows)))[0]) for _ in range(10)]

    assert draws(1) == draws(1) == draws(3)
    assert len(set(draws(1))) > 1


def test_repetition_penalty_divides_positive_and_multiplies_negative_scores():
    logits = torch.tensor([[2.0, -1.0, 1.9, -1.5]])
    penalised = GenerationParams(temperature=0, repetition_penalty=2.0)
    assert sampler(GenerationParams(temperature=0), prompts=[[0, 1]]).pick(logits, [0]).tolist() == [0]
    # 2.0 -> 1.0 and -1.0 -> -2.0: token 2 (1.9) wins now.
    assert sampler(penalised, prompts=[[0, 1]]).pick(logits, [0]).tolist() == [2]


def test_extreme_scores_and_parameters_still_give_a_token():
    logits = torch.tensor([[float("nan"), float("inf"), 1.0, -float("inf")],
                           [float("nan")] * 4])
    params = GenerationParams(temperature=1e-9, top_p=0.5, repetition_penalty=1e-300)
    picker = sampler(params, params, prompts=[[0], [0]])
    for _ in range(5):
        first, second = picker.pick(logits, [0, 1]).tolist()
        assert first == 1 and 0 <= second < 4  # +inf wins; an all-nan row still gives a token


# PrefillGroup on a tiny random model: chunks give the logits of one pass.

def test_chunked_prefill_equals_one_pass(tiny_chat):
    model = tiny_chat.model
    forward = ModelRunner(model).forward
    prompts = [list(range(100, 137)), list(range(300, 311)), list(range(500, 523))]

    with torch.inference_mode():
        alone = [model(input_ids=torch.tensor([ids])).logits[0, -1].float() for ids in prompts]
        for chunk in (0, 7, 16):
            group = PrefillGroup(prompts, [(0, None)] * 3, pad_id=0, device=model.device)
            logits, steps = None, 0
            while logits is None:
                logits = group.step(forward, chunk or group.size * group.width)
                steps += 1
            assert steps == (1 if not chunk else -(-37 // max(1, chunk // 3)))
            for i in range(3):
                assert torch.allclose(logits[i], alone[i], atol=1e-4), (chunk, i)


# Scheduler: memory decides how many rows run.

def request(prompt: int, new: int) -> Request:
    return Request(Stream(), list(range(prompt)), GenerationParams(max_new_tokens=new))


def test_scheduler_admits_while_the_kv_budget_holds_then_waits():
    scheduler = Scheduler(max_rows=64, kv_budget_tokens=1000, chunk_tokens=64, max_queue=8)
    for _ in range(5):
        scheduler.add(request(100, 200))  # 300 tokens each: 3 fit in 1000
    plan = scheduler.plan(BatchLoad())
    assert len(plan.admit) == 3 and plan.stage == "prefill" and not plan.decode
    assert plan.prefill_tokens is None  # nothing runs: whole prompts in one pass
    running = BatchLoad(running=3, widest=300)
    assert scheduler.plan(running).admit == [] and len(scheduler.waiting) == 2
    assert len(scheduler.plan(BatchLoad(running=1, widest=300)).admit) == 2


def test_scheduler_counts_the_padded_rectangle_the_batch_really_holds():
    # Three running rows of 100 tokens each, one newcomer of 300: the sum (600) would fit a
    # budget of 1000, but the batch pads every row to the widest: 4 x 300 = 1200 does not.
    scheduler = Scheduler(max_rows=64, kv_budget_tokens=1000, chunk_tokens=64, max_queue=8)
    scheduler.add(request(100, 200))
    assert scheduler.plan(BatchLoad(running=3, widest=100)).admit == []
    assert len(scheduler.plan(BatchLoad(running=2, widest=100)).admit) == 1  # 3 x 300 fits


def test_scheduler_lets_smaller_requests_past_one_that_does_not_fit_then_holds_them():
    scheduler = Scheduler(max_rows=64, kv_budget_tokens=1000, chunk_tokens=64, max_queue=64)
    big, small = request(300, 100), request(50, 50)  # 400 and 100 tokens
    scheduler.add(big)
    scheduler.add(small)
    load = BatchLoad(running=2, widest=300)  # 3 x 400 = 1200 > 1000; 3 x 300 = 900 fits
    assert scheduler.plan(load).admit == [small] and list(scheduler.waiting) == [big]
    assert big.passed_over == 1
    for _ in range(PATIENCE - 1):
        scheduler.add(request(50, 50))
        assert len(scheduler.plan(load).admit) == 1
    scheduler.add(request(50, 50))
    assert scheduler.plan(load).admit == []  # passed over often enough: it goes next
    assert scheduler.plan(BatchLoad(running=1, widest=100)).admit[0] is big


def test_scheduler_hard_cap_lone_big_request_and_queue_limit():
    scheduler = Scheduler(max_rows=2, kv_budget_tokens=10**6, chunk_tokens=64, max_queue=3)
    for _ in range(3):
        scheduler.add(request(10, 10))
    with pytest.raises(QueueFullError):
        scheduler.add(request(10, 10))
    assert len(scheduler.plan(BatchLoad()).admit) == 2  # the cap, whatever the memory
    tight = Scheduler(max_rows=8, kv_budget_tokens=10, chunk_tokens=64, max_queue=3)
    tight.add(request(100, 100))
    assert len(tight.plan(BatchLoad()).admit) == 1  # alone, it runs even over the budget


def test_scheduler_plans_one_stage_per_step_and_sizes_the_prefill_chunk():
    scheduler = Scheduler(max_rows=64, kv_budget_tokens=10**6, chunk_tokens=64, max_queue=64)
    plan = scheduler.plan(BatchLoad(running=2, prefilled=3, prefill_rows=0, storing=True))
    assert plan.decode and plan.stage == "join"
    assert scheduler.plan(BatchLoad(running=2, storing=True)).stage == "store"
    one_long = scheduler.plan(BatchLoad(running=3, prefill_rows=1))
    assert one_long.stage == "prefill" and one_long.prefill_tokens == 64
    classroom = scheduler.plan(BatchLoad(running=1, prefill_rows=29))
    assert classroom.prefill_tokens == 64 * 29
    assert scheduler.plan(BatchLoad()).stage is None

"""The model runner: forward passes and token picking, nothing else (vLLM's ``ModelRunner``).

It holds no KV: the KV manager hands it a batch or a prefill group, it runs the model on it and
writes each row's next token. Each live row holds a slot of its ``BatchSampler`` (sampling
parameters, seed, the ids the repetition penalty counts) from ``admit`` to ``release``.
"""

from __future__ import annotations

import inspect
from typing import Any

from helpers.models.cpu_linear import pack_cpu_linears
from helpers.server.engine.kv_manager import Prefilling, RunningBatch
from helpers.server.engine.rows import Row
from helpers.server.engine.sampling import BatchSampler


class ModelRunner:
    """Runs one causal LM on the tensors the KV manager keeps."""

    def __init__(self, model: Any, slots: int = 1, pack: bool = False) -> None:
        self.model = model
        if pack:  # float32 on a CPU: oneDNN on packed weights (a no-op elsewhere)
            pack_cpu_linears(model)
        head = model.get_output_embeddings()  # its width is the logits' width
        vocab = head.weight.shape[0] if head is not None else model.config.vocab_size
        self.sampler = BatchSampler(max(1, slots), vocab, model.device)
        self._free = list(range(self.sampler.slots))[::-1]
        forward_params = inspect.signature(model.forward).parameters
        self._keep_logits = "logits_to_keep" in forward_params
        # transformers 5 renamed forward's past_key_values to cache; Colab may have either.
        self._cache_kwarg = "cache" if "cache" in forward_params else "past_key_values"

    @property
    def device(self) -> Any:
        """Where the model's tensors live."""
        return self.model.device

    def forward(self, input_ids: Any, mask: Any, positions: Any, cache: Any) -> Any:
        """The last column's next-token logits (float32); ``cache`` grows by the new columns."""
        kwargs: dict[str, Any] = {"logits_to_keep": 1} if self._keep_logits else {}
        out = self.model(input_ids=input_ids, attention_mask=mask, position_ids=positions,
                         use_cache=True, **{self._cache_kwarg: cache}, **kwargs)
        return out.logits[:, -1, :].float()

    def decode(self, batch: RunningBatch) -> Any:
        """One token for every row of the batch; the mask over the grown cache (the KV manager
        records it with ``KVManager.advance``)."""
        input_ids, positions, mask = batch.decode_inputs(self.device)
        logits = self.forward(input_ids, mask, positions, batch.cache)
        self.pick(batch.rows, logits)
        return mask

    def prefill_chunk(self, prefilling: Prefilling, budget: int | None) -> bool:
        """One chunk of the group's prompts (``budget`` tokens, None: all); True once done.

        When done, every row's first token is picked.
        """
        group = prefilling.group
        logits = group.step(self.forward, group.size * group.width if budget is None else budget)
        if logits is None:
            return False
        self.pick(prefilling.rows, logits)
        return True

    def admit(self, row: Row) -> None:
        """Give a new row a sampler slot (its parameters, seed and prompt)."""
        if not self._free:
            raise RuntimeError(f"all {self.sampler.slots} sampler slots are taken")
        slot = self._free[-1]
        self.sampler.admit(slot, row.params, row.prompt_ids)
        row.slot = self._free.pop()

    def release(self, row: Row) -> None:
        """Free the row's slot (a second call does nothing)."""
        if row.slot is not None:
            self.sampler.release(row.slot)
            self._free.append(row.slot)
            row.slot = None

    def pick(self, rows: list[Row], logits: Any) -> None:
        """Each row's next token from its logits, by its own sampling parameters."""
        tokens = self.sampler.pick(logits, [r.slot for r in rows])
        for r, token in zip(rows, tokens.tolist(), strict=True):
            r.next_token, r.fresh = token, True
            r.tokens.append(token)

"""Per-row token picking for a batch: each row keeps its own sampling parameters and seed.

Written by hand because transformers' logits processors apply one configuration to a whole
batch, while rows of a continuous batch each bring their own temperature, top-k/top-p, penalty
and seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from helpers.chat import GenerationParams


def pick_tokens(logits: Any, params: Sequence[GenerationParams], generators: Sequence[Any],
                seen: Sequence[Any]) -> Any:
    """The next token of every row (a 1-D tensor): penalty, temperature, top-k/p, seeded draws.

    ``generators[i]`` is a ``torch.Generator`` or None (the global RNG); ``seen[i]`` holds the
    row's prompt + generated ids, read only when its repetition penalty is not 1.
    """
    import torch

    x = _penalise(logits, params, seen)
    # Extreme parameters (a penalty of 1e-300, say) overflow to inf/nan: keep the scores usable.
    x = torch.nan_to_num(x, nan=float("-inf"), posinf=torch.finfo(x.dtype).max)
    tokens = torch.empty(len(params), dtype=torch.long, device=x.device)
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if greedy:
        index = torch.tensor(greedy, device=x.device)
        tokens[index] = x[index].argmax(-1)
    sampled = [i for i, p in enumerate(params) if not p.greedy]
    if sampled:
        _sample(x, tokens, sampled, params, generators)
    return tokens


def _penalise(x: Any, params: Sequence[GenerationParams], seen: Sequence[Any]) -> Any:
    """As transformers' repetition penalty: divide positive scores, multiply negative ones."""
    import torch

    penalised = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if not penalised:
        return x
    x = x.clone()
    for i in penalised:
        penalty = params[i].repetition_penalty
        score = x[i].gather(0, seen[i])
        x[i].scatter_(0, seen[i], torch.where(score < 0, score * penalty, score / penalty))
    return x


def _sample(x: Any, tokens: Any, sampled: list[int], params: Sequence[GenerationParams],
            generators: Sequence[Any]) -> None:
    """Fill ``tokens[sampled]`` by temperature, top-k/top-p filtering and a multinomial draw."""
    import torch

    index = torch.tensor(sampled, device=x.device)
    # A temperature below 1e-4 behaves like greedy anyway; the floor avoids inf scores.
    temperature = torch.tensor([max(params[i].temperature, 1e-4) for i in sampled],
                               device=x.device, dtype=x.dtype)
    y = x[index] / temperature.unsqueeze(1)
    y = torch.nan_to_num(y, nan=float("-inf"), posinf=torch.finfo(y.dtype).max)
    for j, i in enumerate(sampled):
        p = params[i]
        if p.top_k or p.top_p < 1.0:
            y[j] = _filter(y[j], p)
    probs = y.softmax(-1)
    # One multinomial call for rows on the global RNG; seeded rows use their own generator.
    shared = [j for j, i in enumerate(sampled) if generators[i] is None]
    if shared:
        tokens[index[shared]] = torch.multinomial(probs[shared], 1).squeeze(1)
    for j, i in enumerate(sampled):
        if generators[i] is not None:
            tokens[i] = torch.multinomial(probs[j], 1, generator=generators[i])[0]


def _filter(y: Any, p: GenerationParams) -> Any:
    """One row's scores with everything outside top-k / the top-p nucleus set to -inf."""
    import torch

    if p.top_k:
        values, order = y.topk(min(p.top_k, y.shape[0]))
    else:
        values, order = y.sort(descending=True)
    if p.top_p < 1.0:
        probs = values.softmax(-1)
        keep = (probs.cumsum(-1) - probs) < p.top_p
        keep[0] = True  # the most likely token stays, even for a top_p that float32 rounds to 0
        values, order = values[keep], order[keep]
    filtered = torch.full_like(y, float("-inf"))
    filtered[order] = values
    return filtered

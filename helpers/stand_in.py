"""Stand-ins for big models: tiny random models built offline, and serving them from the mirror.

A stand-in is always called one: its folder carries a note saying what it really is.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from helpers.embedded import embedded_model_dir
from helpers.hub.mirror_store import MirrorRoot, add_to_mirror

STAND_IN_NOTE = "STAND-IN.md"


def build_tiny_model(
    target: str | os.PathLike[str],
    tokenizer_dir: str | os.PathLike[str] | None = None,
    arch: str = "qwen2",
    seed: int = 0,
) -> Path:
    """Save a 2-layer random Llama or Qwen2 (3.2 M params) with SmolLM2's tokenizer to ``target``.

    For tests and offline demos: it loads, chats and serves like a real model in milliseconds,
    but its answers are noise. The folder carries a README saying so.
    """
    import torch
    from transformers import (
        AutoTokenizer,
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
    )

    architectures = {"llama": (LlamaConfig, LlamaForCausalLM), "qwen2": (Qwen2Config, Qwen2ForCausalLM)}
    if arch not in architectures:
        raise ValueError(f"arch must be one of {sorted(architectures)}; got {arch!r}")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir or embedded_model_dir(verbose=False))
    config_class, model_class = architectures[arch]
    config = config_class(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    target = Path(target)
    model_class(config).save_pretrained(target)
    tokenizer.save_pretrained(target)
    (target / "README.md").write_text(
        f"# Tiny random {arch} stand-in\n\nBuilt by dhllm for offline tests and demos: "
        "random weights, SmolLM2 tokenizer. Its answers are noise.\n"
    )
    return target



def add_stand_in(
    root: str | Path,
    repo_id: str,
    model: Literal["tiny", "embedded"] = "tiny",
    progress: bool = True,
) -> Path:
    """Serve a small stand-in as ``repo_id`` (e.g. Linly-AI/Chinese-LLaMA-2-7B-hf) with no hub.

    ``tiny``: a 16 MB random 2-layer model (Llama for ids naming llama, else Qwen2; built in
    ~0.2 s; downloads in a blink; its answers are noise). ``embedded``: the real
    SmolLM2-135M-Instruct (538 MB, hard-linked, answers in English). The folder gets a
    STAND-IN.md saying what it really is.
    """
    root = Path(root).expanduser()
    if model == "embedded":
        source, what = embedded_model_dir(verbose=progress), "SmolLM2-135M-Instruct (embedded)"
    elif model == "tiny":
        arch = "llama" if "llama" in repo_id.lower() else "qwen2"
        source = root / ".dhllm" / f"tiny-{arch}"  # hidden: the mirror never lists it
        if not (source / "config.json").is_file():
            build_tiny_model(source, arch=arch)
        what = f"a tiny random 2-layer {arch} model (its answers are noise)"
    else:
        raise ValueError(f"model must be 'tiny' or 'embedded', not {model!r}")
    target = add_to_mirror(repo_id, root, source, progress=progress)
    note = target / STAND_IN_NOTE
    if not note.exists():
        note.write_text(
            f"# Stand-in\n\nThis is {what}, served as {repo_id} by dhllm's local mirror so "
            f"that downloads can be practised offline. It is not {repo_id}.\n"
        )
        MirrorRoot(root).index(progress=False)
    return target

"""scripts/gpu_check.py's stand-in tokenizer: Linly's 40076 ids, every text still encodable."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from transformers import AutoTokenizer

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_cut_tokenizer_stays_below_linly_vocab_and_round_trips(embedded_dir, tmp_path):
    gpu_check = load_script()
    vocab = gpu_check.LINLY["vocab_size"]
    text = "请用少于25个字回答以下问题 ### Instruction:如何应对压力  ### Response: A brave robot 🤖"
    full = AutoTokenizer.from_pretrained(embedded_dir)
    assert max(full(text).input_ids) >= vocab  # the uncut tokenizer would overflow Linly's embedding
    gpu_check.linly_sized_tokenizer(embedded_dir, tmp_path, vocab)
    cut = AutoTokenizer.from_pretrained(tmp_path, use_fast=False)
    ids = cut(text).input_ids
    assert len(cut) == vocab and max(ids) < vocab
    assert cut.decode(ids) == text

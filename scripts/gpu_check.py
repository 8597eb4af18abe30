"""Notebook 02's path on a GPU with Linly-7B-shaped random weights: memory and server speed.

    python scripts/gpu_check.py --out DIR

No download: a Llama with Linly-AI/Chinese-LLaMA-2-7B-hf's config (hidden 4096, 32 layers,
vocab 40076, ...) is built with random weights, saved as safetensors, then loaded the way the
chapter does (``AutoModelForCausalLM.from_pretrained(path, dtype=..., device_map="cuda:0",
quantization_config=...)``, ``model.eval()``) in fp16 and in 4-bit (nf4). For each: GPU memory
after loading and at the peak of a 2048-token context (1920 prompt + 128 new), then the model
behind our server (``create_app``) over real HTTP: the chapter's ``POST /`` and 1 and 8
concurrent OpenAI streaming requests. Random weights write garbage: only memory and speed count.
Without CUDA it runs the same steps in float32 on the CPU (``--tiny`` makes that quick).
Writes ``gpu_check.json`` (rewritten after every step) and ``gpu_check.log`` to ``--out``.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import shutil
import sys
import tempfile
import time
import traceback
import weakref
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import requests
import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, LlamaConfig

from helpers.background_server import free_port
from helpers.bench.load import run_load
from helpers.chat import TransformersChat
from helpers.hardware import GIB, Gpu, detect_gpu
from helpers.models.choice import Placement, choose_precision, quantization_config
from helpers.models.registry import get_spec
from helpers.server import create_app, serve_in_background

# Linly-AI/Chinese-LLaMA-2-7B-hf's config.json on the hub (shared facts of this project).
LINLY = {"vocab_size": 40076, "hidden_size": 4096, "intermediate_size": 11008,
         "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 32,
         "max_position_embeddings": 2048, "rms_norm_eps": 1e-6, "tie_word_embeddings": False,
         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
TINY = {"hidden_size": 64, "intermediate_size": 172, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 4}
# The learners' GPUs choose_precision is asked about (total_memory as torch reports it).
CARDS = {"T4 (14.74 GiB, cc 7.5)": Gpu("Tesla T4", 14.74, (7, 5)),
         "8 GB card (7.6 GiB, cc 8.6)": Gpu("RTX 3070", 7.6, (8, 6))}
T4_GIB = 14.74
PROMPT_TOKENS, NEW_TOKENS = 1920, 128  # a full 2048-token context, Linly's maximum


class Report:
    """Results as nested dicts, written to ``DIR/gpu_check.json`` after every step; a log beside."""

    def __init__(self, out: Path) -> None:
        out.mkdir(parents=True, exist_ok=True)
        self.path, self.log_path, self.data = out / "gpu_check.json", out / "gpu_check.log", {}
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        line = f"[{time.perf_counter() - self.started:6.1f} s] {message}"
        print(line, flush=True)
        with self.log_path.open("a") as f:
            f.write(line + "\n")

    def put(self, section: str, key: str, value: Any) -> None:
        self.data.setdefault(section, {})[key] = value
        self.path.write_text(json.dumps(self.data, indent=2, ensure_ascii=False, default=str))
        self.log(f"{section}.{key} = {json.dumps(value, ensure_ascii=False, default=str)}")


def gpu_memory() -> dict[str, float]:
    """torch's allocator (now and peak) and the device's used memory (CUDA context included)."""
    if not torch.cuda.is_available():
        return {}
    torch.cuda.synchronize()
    free, total = torch.cuda.mem_get_info()
    gib = {"allocated": torch.cuda.memory_allocated(), "reserved": torch.cuda.memory_reserved(),
           "peak_allocated": torch.cuda.max_memory_allocated(),
           "peak_reserved": torch.cuda.max_memory_reserved(), "device_used": total - free}
    return {k: round(v / GIB, 3) for k, v in gib.items()}


def free_gpu() -> None:
    """Return every cached block, and start a new peak."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def linly_sized_tokenizer(src: Path, dst: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer cut to ``vocab_size`` ids: no id it makes overflows the model.

    Linly's own tokenizer is a download; the embedded SmolLM2's (49152 ids) stands in, cut to
    Linly's 40076 so that the model keeps Linly's exact embedding size (its ids grow with merge
    order, so dropping the last merges keeps every text encodable, byte by byte at worst).
    """
    data = json.loads((src / "tokenizer.json").read_text())
    vocab = {token: i for token, i in data["model"]["vocab"].items() if i < vocab_size}
    merges = [m if isinstance(m, list) else m.split(" ") for m in data["model"]["merges"]]
    data["model"]["vocab"] = vocab
    data["model"]["merges"] = [m for m in merges if m[0] in vocab and m[1] in vocab
                               and m[0] + m[1] in vocab]
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "tokenizer.json").write_text(json.dumps(data, ensure_ascii=False))
    shutil.copy(src / "tokenizer_config.json", dst / "tokenizer_config.json")


def build_checkpoint(path: Path, config: LlamaConfig, device: str, dtype: torch.dtype,
                     tokenizer_dir: Path) -> dict[str, Any]:
    """Random weights in ``dtype``, built on ``device``, saved with the tokenizer as safetensors."""
    torch.manual_seed(0)
    t0 = time.perf_counter()
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    params = sum(p.numel() for p in model.parameters())
    built = time.perf_counter() - t0
    model.save_pretrained(path)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(path)
    del model
    free_gpu()
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    return {"params_b": round(params / 1e9, 3), "build_s": round(built, 1),
            "save_s": round(time.perf_counter() - t0 - built, 1), "safetensors_gib": round(size / GIB, 3)}


def load_like_chapter(path: Path, device: str, dtype: torch.dtype, quantize: str | None):
    """The chapter's loading code; ``quantization_config`` as ``helpers.models.choice`` builds it."""
    bnb_kwargs = quantization_config(quantize, Placement(device, dtype, "gpu_check"))
    tokenizer = AutoTokenizer.from_pretrained(path, use_fast=False)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=dtype, device_map=device,
        quantization_config=BitsAndBytesConfig(**bnb_kwargs) if bnb_kwargs else None,
    )
    model.eval()
    return model, tokenizer


def generate_full_context(model: Any, vocab_size: int) -> dict[str, Any]:
    """Prefill time, then memory peak and speed of 1920 prompt tokens + 128 new (the chapter's sampling)."""
    ids = torch.randint(17, vocab_size, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    inputs = {"input_ids": ids.to(model.device), "attention_mask": torch.ones_like(ids).to(model.device)}
    sampling = {"do_sample": True, "top_k": 20, "temperature": 0.84, "repetition_penalty": 1.15,
                "pad_token_id": 0}
    with torch.no_grad():
        model.generate(**inputs, max_new_tokens=1, **sampling)  # warm-up, and prefill time
        free_gpu()
        t0 = time.perf_counter()
        model.generate(**inputs, max_new_tokens=1, **sampling)
        _sync()
        prefill = time.perf_counter() - t0
        t0 = time.perf_counter()
        out = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, **sampling)
        _sync()
        seconds = time.perf_counter() - t0
    new = out.shape[1] - PROMPT_TOKENS
    return {"context_tokens": out.shape[1], "prefill_s": round(prefill, 3),
            "generate_s": round(seconds, 2),
            "decode_tokens_per_s": round((new - 1) / max(seconds - prefill, 1e-9), 1),
            "memory_gib": gpu_memory()}


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def serve_and_measure(model: Any, tokenizer: Any, report: Report, section: str) -> None:
    """Our server around the loaded model: POST / once, then 1 and 8 streaming clients (64 tokens)."""
    chat = TransformersChat(model, tokenizer, "linly", name="linly-7b")
    for text in ("如何应对压力", "Tell me a short story about a brave little robot."):
        top = max(tokenizer(chat.render_prompt([{"role": "user", "content": text}])).input_ids)
        assert top < model.config.vocab_size, f"token id {top} >= vocab {model.config.vocab_size}"
    handle = serve_in_background(create_app(chat), port=free_port())
    try:
        free_gpu()
        t0 = time.perf_counter()
        answer = requests.post(handle.url, json={"prompt": "如何应对压力"}, timeout=600)
        answer.raise_for_status()
        text = answer.json()["response"]
        report.put(section, "chapter_post", {
            "seconds": round(time.perf_counter() - t0, 2), "status": answer.status_code,
            "response_chars": len(text), "response_tokens_approx": len(tokenizer(text).input_ids),
            "default_max_new_tokens": 256})
        run_load(handle.url, 1, tokens=8, model=chat.name)  # warm-up: first batch shapes
        for clients in (1, 8):
            result = run_load(handle.url, clients, tokens=64, temperature=0.7, model=chat.name)
            report.put(section, f"openai_stream_{clients}_clients", {
                "tokens": result.tokens, "seconds": round(result.seconds, 2),
                "tokens_per_s": round(result.tokens_per_s, 1),
                "ttft_p50_ms": round(result.ttft_p50 * 1000), "full_p50_s": round(result.full_p50, 2),
                "errors": result.errors})
        report.put(section, "memory_while_serving_gib", gpu_memory())
    finally:
        handle.stop()


def precision_decisions() -> dict[str, Any]:
    """``choose_precision`` for Linly-7B on a T4, an 8 GB card and this machine's GPU."""
    spec = get_spec("linly-7b")
    cards = dict(CARDS)
    here = detect_gpu()
    if here is not None:
        cards[f"this GPU: {here.name} ({here.memory_gib:.1f} GiB)"] = here
    return {name: vars(choose_precision(spec, gpu)) for name, gpu in cards.items()}


def machine() -> dict[str, Any]:
    """Versions and the GPU, as torch sees them."""
    info = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda,
            "transformers": transformers.__version__}
    try:
        import bitsandbytes

        info["bitsandbytes"] = bitsandbytes.__version__
    except ImportError:
        info["bitsandbytes"] = None
    gpu = detect_gpu()
    if gpu is not None:
        info.update(gpu=gpu.name, gpu_total_gib=round(gpu.memory_gib, 2), capability=gpu.capability)
    return info


def t4_verdict(run: dict[str, Any]) -> dict[str, Any]:
    """The most the device held (torch's peak + the CUDA context beyond it), against a T4.

    ``peak_reserved`` (blocks torch kept) bounds it from above, ``peak_allocated`` (tensors
    alive) from below: on a full card the allocator frees cached blocks and retries first.
    """
    after, gen = run["memory_after_load_gib"], run["generate_2048"]["memory_gib"]
    context = after["device_used"] - after["reserved"]
    verdict: dict[str, Any] = {"non_torch_gib_here": round(context, 3), "t4_total_gib": T4_GIB}
    for kind in ("peak_reserved", "peak_allocated"):
        need = max(after[kind], gen[kind]) + context
        verdict[f"need_gib_{kind}"] = round(need, 3)
        verdict[f"t4_headroom_gib_{kind}"] = round(T4_GIB - need, 3)
    return verdict


def run_precision(report: Report, path: Path, name: str, dtype: torch.dtype,
                  quantize: str | None, device: str, vocab_size: int) -> None:
    """Load one precision the chapter's way, measure memory and the server, then free it."""
    free_gpu()
    report.put(name, "memory_before_load_gib", gpu_memory())
    t0 = time.perf_counter()
    model, tokenizer = load_like_chapter(path, device, dtype, quantize)
    report.put(name, "load_s", round(time.perf_counter() - t0, 1))
    report.put(name, "memory_after_load_gib", gpu_memory())
    report.put(name, "generate_2048", generate_full_context(model, vocab_size))
    if torch.cuda.is_available():
        report.put(name, "t4", t4_verdict(report.data[name]))
    serve_and_measure(model, tokenizer, report, name)
    alive = weakref.ref(model)
    del model, tokenizer
    free_gpu()  # what notebook 02 tells learners to do before 03: stop, del, gc, empty_cache
    report.put(name, "model_freed_after_stop", alive() is None)
    report.put(name, "memory_after_free_gib", gpu_memory())


def main(argv: list[str] | None = None) -> None:
    """Build, save, then load and measure each precision; see the module docstring."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for gpu_check.json/.log")
    parser.add_argument("--tokenizer", type=Path, help="a folder with SmolLM2's tokenizer.json "
                        "(default: the embedded model's)")
    parser.add_argument("--work", type=Path, help="where the ~13 GB checkpoint goes (default: temp)")
    parser.add_argument("--tiny", action="store_true", help="2 layers, hidden 64: a quick rehearsal")
    parser.add_argument("--precisions", nargs="+", choices=["float16", "4bit", "float32"],
                        help="default: float16 4bit on CUDA, float32 on the CPU")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = "cuda:0" if cuda else "cpu"
    precisions = args.precisions or (["float16", "4bit"] if cuda else ["float32"])
    report = Report(args.out)
    report.put("machine", "info", machine())
    report.put("choose_precision", "linly-7b", precision_decisions())
    work = Path(tempfile.mkdtemp(prefix="gpu_check.", dir=args.work))
    try:
        if args.tokenizer is None:
            from helpers.embedded import embedded_model_dir

            args.tokenizer = embedded_model_dir()
        config = LlamaConfig(**{**LINLY, **(TINY if args.tiny else {})})
        linly_sized_tokenizer(args.tokenizer, work / "tokenizer", config.vocab_size)
        checkpoint = work / "Chinese-LLaMA-2-7B-hf-random"
        build_dtype = torch.float16 if cuda else torch.float32
        report.put("checkpoint", "build", build_checkpoint(checkpoint, config, device, build_dtype,
                                                           work / "tokenizer"))
        for name in precisions:
            dtype = {"float32": torch.float32}.get(name, torch.float16)
            if name == "4bit":  # the 8 GB card's case: compute in that card's 16-bit dtype
                dtype = getattr(torch, CARDS["8 GB card (7.6 GiB, cc 8.6)"].dtype)
            try:
                run_precision(report, checkpoint, name, dtype, "4bit" if name == "4bit" else None,
                              device, config.vocab_size)
            except Exception as exc:  # keep what was measured, go on with the next precision
                report.put(name, "error", "".join(traceback.format_exception(exc))[-3000:])
                free_gpu()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report.log("done")


if __name__ == "__main__":
    sys.exit(main())

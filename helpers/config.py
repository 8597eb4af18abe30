"""Settings in one place: every knob reads ``DHLLM_*`` environment variables.

Depends on nothing else in the package, so any module (and any test) can import it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

# The repository the notebooks' setup cell installs from on Colab. Kept here and, literally, in
# each notebook's setup cell and the README (a test checks that they agree).
REPO_URL = "https://github.com/dhllm/dhllm"

DEFAULT_HOST = "127.0.0.1"  # this machine only; 0.0.0.0 only when asked for
DEFAULT_PORT = 7871  # the chapter's port
DEFAULT_URL = f"http://{DEFAULT_HOST}:{DEFAULT_PORT}"  # where the chapter's server answers
DEFAULT_MIRROR_PORT = 8090
# One JupyterLab runs the four notebooks 01 -> 04 side by side, each kernel keeping its servers:
# the chapter's port stays notebook 02's, the later notebooks use their own.
NOTEBOOK_PORTS = {
    "02": DEFAULT_PORT,  # the chapter's server (and the chat box that stays on it)
    "02-key": 7875,  # notebook 02's short demo of a server with an API key
    "03": 7872,  # Qwen behind the same POST /
    "04": 7873,  # a cloud model behind POST / (the gateway)
    "04-vllm": 7874,  # dhllm in front of vLLM
    "04-vllm-engine": 8000,  # vLLM itself (its usual port; the "vllm:" preset's default)
    "04-own": 7879,  # notebook 04's own dhllm serve: the OpenAI SDK's target without a key
    "05": 7876,  # notebook 05: the digital human that speaks
    "05-vllm": 7877,  # notebook 05: dhllm in front of vLLM
    "05-replicas": 7878,  # notebook 05: dhllm in front of vllm-router and two vLLM replicas
}
# 256 new tokens: on a 2-core CPU that is ~10 s for the embedded model, while the chapter's
# 2048 would take minutes per request. 0.7: the usual chat default (OpenAI's API uses 1.0).
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_TEMPERATURE = 0.7
# Prefix (KV) cache budget: the embedded SmolLM2-135M needs 45 KiB per token (30 layers x 3 KV
# heads x 64 dims x keys+values x fp32), so 256 MiB keeps ~5.8k tokens: a persona prompt plus
# several conversations. A 7B Llama in fp16 needs 0.5 MiB per token (~500 tokens).
DEFAULT_PREFIX_CACHE_MB = 256
# Tokens of a new prompt prefilled between two decode steps while other streams run. Measured on
# a 2-core CPU, embedded model, 3 running streams (decode step ~70 ms), a 1583-token prompt
# arriving: a chunk of 64 costs 95-150 ms (more as its past grows), 128: 220-290, 256: 360-440,
# 512: 700-840; the longest pause of the running streams was 3.2x their median gap with 64, 5.3x
# with 128, ~7x with 256, ~13x with 512 (the arriving prompt's own first token: 4.1 s, 3.1 s,
# 2.5 s, 2.5 s). 64 keeps pauses under 4x. On a GPU a chunk costs little: raise it (e.g. 512).
DEFAULT_PREFILL_CHUNK_TOKENS = 64
# Cloud APIs. From mainland China without a VPN, OpenAI and Gemini are not reachable (neither
# lists China among its supported regions) and a request can wait on connect for minutes: every
# SDK call gets these timeouts, and the notebooks probe a provider before calling it.
# Connecting (TCP + TLS) to a reachable provider takes well under a second: 10 s means blocked.
# An answer of a few hundred tokens takes seconds, a long one up to about a minute: 60 s.
CLOUD_CONNECT_TIMEOUT = 10.0
CLOUD_TIMEOUT = 60.0
CLOUD_PROBE_TIMEOUT = 3.0  # the notebooks' reachability probe (any HTTP answer counts)


class Settings(BaseSettings):
    """All settings; each field can be set with ``DHLLM_<FIELD>`` (e.g. ``DHLLM_PORT=8000``)."""

    model_config = SettingsConfigDict(env_prefix="DHLLM_", extra="ignore")

    cache_dir: Path = Field(
        default=Path("~/.cache/dhllm"), description="converted embedded model, downloads"
    )
    model: str = Field(default="embedded", description="model name, path or backend spec")
    # Unset: choose_model decides from the GPU's memory. "none": full precision (bf16/fp16).
    quantize: Literal["4bit", "8bit", "none"] | None = Field(
        default=None, description="4bit, 8bit or none; unset: choose_model decides"
    )
    offline: bool = Field(default=False, description="never probe or download from a hub")
    # huggingface_hub's own variables (no DHLLM_ prefix): a mirror's address, and its offline mode.
    hf_endpoint: str | None = Field(default=None, validation_alias=AliasChoices("HF_ENDPOINT", "hf_endpoint"))
    hf_hub_offline: bool = Field(
        default=False, validation_alias=AliasChoices("HF_HUB_OFFLINE", "hf_hub_offline"))
    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    api_key: SecretStr | None = None
    log_prompts: bool = False

    # Generation limits.
    default_max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_new_tokens_cap: int = 2048
    max_prompt_chars: int = 32_000

    # Engine (the builtin batching engine reads these, and only from here). Memory decides how
    # many sequences decode together: each reserves the KV of its prompt plus max_new_tokens,
    # and newcomers join while the reservations fit kv_cache_mb. 1024 MiB holds ~23k tokens of
    # the embedded model (45 KiB each): 64 replies of 256 tokens, or a classroom of 30 in one
    # wave; a 7B Llama in fp16 (0.5 MiB per token) gets ~2k tokens: raise it on a big GPU.
    # max_batch_size is the hard cap on rows whatever the memory (a decode step of 64 rows
    # already takes ~4x one of 8 on a 2-core CPU); 1 serves requests one by one.
    kv_cache_mb: float = 1024
    max_batch_size: int = 64
    max_queue: int = 64
    # Prefix reuse (0 = off) and chunked prefill; see the DEFAULT_* constants above for why.
    prefix_cache_mb: float = DEFAULT_PREFIX_CACHE_MB
    prefill_chunk_tokens: int = DEFAULT_PREFILL_CHUNK_TOKENS
    # A float32 model on a CPU multiplies through oneDNN with its weights packed once
    # (helpers/models/cpu_linear.py: 1.31x the tokens/s at 8 clients here; twice the weights'
    # memory, up to 2 GiB). False keeps PyTorch's default (MKL).
    cpu_packed_linear: bool = True

    mirror_port: int = DEFAULT_MIRROR_PORT

    # Cloud APIs, in seconds (see CLOUD_* above): per request, its connect part, the probe.
    cloud_timeout: float = Field(default=CLOUD_TIMEOUT, gt=0)
    cloud_connect_timeout: float = Field(default=CLOUD_CONNECT_TIMEOUT, gt=0)
    cloud_probe_timeout: float = Field(default=CLOUD_PROBE_TIMEOUT, gt=0)

    # vLLM (``dhllm serve --engine vllm``): its own venv's python (else .venv-vllm, else `vllm`
    # on PATH), extra command-line arguments, and its CPU KV cache in GiB (CPU builds only).
    vllm_python: str | None = None  # "none": never use vLLM, even where installed
    vllm_url: str | None = None  # an already running vLLM (or a router in front of replicas)
    vllm_args: str = ""
    vllm_kvcache_gb: int = 2
    vllm_start_timeout: float = 600.0
    # Past one engine (``--replicas N``): N vLLM behind vllm-router, which routes by this policy
    # (cache_aware keeps a conversation on the replica that holds its prefix), found beside vLLM
    # unless DHLLM_VLLM_ROUTER_PYTHON names a python that has it.
    vllm_replicas: int = Field(default=1, ge=1)
    vllm_policy: str = "cache_aware"
    vllm_router_python: str | None = None

    @field_validator("hf_hub_offline", mode="before")
    @classmethod
    def _hf_true(cls, value: object) -> object:
        """As huggingface_hub reads it: 1/ON/YES/TRUE is on, anything else (even "") off."""
        return value.strip().upper() in ("1", "ON", "YES", "TRUE") if isinstance(value, str) else value

    def offline_mode(self) -> bool:
        """True when no hub may be probed or downloaded from (DHLLM_OFFLINE or HF_HUB_OFFLINE)."""
        return self.offline or self.hf_hub_offline

    def resolved_cache_dir(self) -> Path:
        """The cache directory with ``~`` expanded."""
        return self.cache_dir.expanduser()


def get_settings(**overrides: object) -> Settings:
    """Fresh settings from the environment, with keyword overrides applied."""
    return Settings(**overrides)

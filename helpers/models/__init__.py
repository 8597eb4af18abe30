"""The chapter's models: a registry, a choice (what fits this machine) and loading.

- ``registry``: ``ModelSpec``, the named models, ``get_spec``, ``hub_id``, the remote-code check;
- ``choice``: placement, ``choose_precision`` (the one precision rule both engines follow),
  quantization, ``choose_model`` / ``plan_model``;
- ``load``: ``model_folder`` (a local folder, downloaded first if need be) and ``load_model``.

Knows nothing of HTTP. Hub probing (``find_hub``, local copies) lives in ``helpers.hub.locate``.
"""

from helpers.hub.locate import HUB_PROBE_TIMEOUT, find_hub
from helpers.models.choice import (
    CPU_MODEL,
    GPU_EXTRA,
    GPU_FALLBACKS,
    ModelChoice,
    Placement,
    Precision,
    QuantizationError,
    choose_model,
    choose_placement,
    choose_precision,
    describe_environment,
    local_model_dir,
    plan_model,
    precision_ladder,
    quantization_config,
)
from helpers.models.load import load_model, model_folder
from helpers.models.registry import (
    REGISTRY,
    ModelSpec,
    PromptFormat,
    UnsupportedModelError,
    check_remote_code_support,
    get_spec,
    hub_id,
    resolve,
)

__all__ = [
    "CPU_MODEL",
    "GPU_EXTRA",
    "GPU_FALLBACKS",
    "HUB_PROBE_TIMEOUT",
    "REGISTRY",
    "ModelChoice",
    "ModelSpec",
    "Placement",
    "Precision",
    "PromptFormat",
    "QuantizationError",
    "UnsupportedModelError",
    "check_remote_code_support",
    "choose_model",
    "choose_placement",
    "choose_precision",
    "describe_environment",
    "find_hub",
    "get_spec",
    "hub_id",
    "load_model",
    "local_model_dir",
    "model_folder",
    "plan_model",
    "precision_ladder",
    "quantization_config",
    "resolve",
]

"""``choose_downloaded_model``: what ``choose_model`` picks, from this machine's disk only.

Notebook 05 reuses the model notebook 02 downloaded (Linly-7B is ~13.6 GB): it must never start
a second download by itself. It looks in the same folders ``model_folder`` does
(``local_model_dir``: ``models/<name>`` beside the notebook, then the download cache) and, when
the model is not there, loads the built-in stand-in and says how to download the real one.
"""

from __future__ import annotations

from helpers.config import get_settings
from helpers.models.choice import CPU_MODEL, ModelChoice, choose_precision, plan_model
from helpers.models.registry import get_spec


def choose_downloaded_model(preferred: str = "linly-7b", fallback: str = "embedded",
                            verbose: bool = True) -> ModelChoice:
    """``choose_model``'s pick if its folder is already on disk, else ``fallback``; never downloads."""
    # online=False: no hub is probed, so every pick is a local folder, a path, or the fallback.
    choice = plan_model(preferred, fallback, online=False)
    settings = get_settings()
    forced = settings.model if "model" in settings.model_fields_set else None
    if choice.path or forced == fallback:
        result = choice  # a folder on disk, or the stand-in asked for by DHLLM_MODEL
    else:
        spec = get_spec(fallback)
        need = choose_precision(spec, None).need_gib or 0.0
        missing = (f"DHLLM_MODEL={forced} 指定的模型还不在本机" if forced else
                   f"本机还没有 02 号 notebook 下载的模型（有 GPU 时通常是 {preferred}，只有 CPU 时是 {CPU_MODEL}）")
        message = (
            f"{missing}。本 notebook 不会自己下载模型（Linly-7B 约 13.6 GB）：先用内置的替代模型 {fallback}"
            f"（{spec.hf_id}，只会英文，约 {need:.1f} GiB 内存，在 CPU 上运行）。想用会说中文的模型：先运行"
            f" 02 号 notebook 的下载单元格，再重新运行本单元格。"
        )
        result = ModelChoice(fallback, "cpu", "float32", None, round(need, 2), message=message)
    if verbose:
        print(result.message)
    return result


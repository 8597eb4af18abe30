"""What the notebooks need under test: no hub (01 uses its local mirror) and the cloud fakes (04).

Notebook 04 reads keys and addresses from the environment only, so pointing it at the fakes
is a matter of environment variables; the notebook itself hard-codes none of them.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock

from tests.fakes import provider_env
from tests.fakes.gemini_fake import start_fake_gemini
from tests.fakes.openai_fake import start_fake_openai

FAKE_KEY = "test-key-for-local-fakes"  # the fakes reject any other key


@contextmanager
def notebook_services() -> Iterator[dict[str, str]]:
    """Start the provider fakes; yield the environment variables that point notebooks at them."""
    with start_fake_openai(api_key=FAKE_KEY) as openai_fake, \
            start_fake_gemini(api_key=FAKE_KEY) as gemini_fake, \
            tempfile.TemporaryDirectory(prefix="dhllm-gitconfig-") as git_home:
        yield {
            # Notebook 01 runs the chapter's `git lfs install`: let it write to a throw-away
            # global git config, not to the user's ~/.gitconfig.
            "GIT_CONFIG_GLOBAL": str(Path(git_home) / "gitconfig"),
            "DHLLM_OFFLINE": "1",  # notebook 01 uses its local mirror, never a real hub
            # The chapter's curl sends no max_length: keep CPU answers short under test.
            "DHLLM_DEFAULT_MAX_NEW_TOKENS": "24",
            # Notebook 05 starts vLLM when one is installed (make vllm): skip torch.compile and
            # CUDA graphs, ~25 s to start instead of ~60-95 s on a 2-core CPU.
            "DHLLM_VLLM_ARGS": "--enforce-eager",
            **provider_env(openai_fake, gemini_fake, key=FAKE_KEY),
        }


def notebook_lock(notebook: str, timeout_s: float = 900) -> FileLock:
    """One runner at a time per notebook: nbval and the browser test run the same notebook on the
    same fixed ports, from two pytest-xdist workers. Waiting longer than ``timeout_s`` fails."""
    name = Path(notebook).stem
    return FileLock(Path(tempfile.gettempdir()) / f"dhllm-test-{name}.lock", timeout=timeout_s)

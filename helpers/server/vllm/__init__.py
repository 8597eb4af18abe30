"""vLLM behind dhllm's contract, in one folder.

- ``venv``: finding a Python that has vLLM (its own venv: it pins its own torch).
- ``process``: one vLLM OpenAI server as a subprocess (started, stopped with its whole process
  group), and the command a learner runs on a GPU.
- ``router``: vllm-router in front of several vLLM servers (cache-aware by default).
- ``replicas``: N replicas, one per GPU or per share of CPU cores, supervised behind the router.
- ``relay``: the ``Engine`` that relays dhllm's requests to vLLM (or the router).
- ``gpu``: whether vLLM can start on this machine's GPUs (the memory it takes up front).
- ``launch``: ``dhllm serve --engine vllm [--replicas N]`` puts these together.

Importing this package is cheap (standard library and ``requests``).
"""

from __future__ import annotations

from helpers.server.vllm.process import VLLMProcess
from helpers.server.vllm.venv import VLLMError, find_vllm_python

__all__ = ["VLLMError", "VLLMProcess", "find_vllm_python"]

"""vLLM's command lines (the one we start and the one a learner runs on a GPU are the same argv),
where replicas run (GPUs, CPU cores), and vllm-router's command line: no process started here.

Starting vLLM itself is tested in ``test_vllm.py`` (one server) and ``test_vllm_replicas.py``
(two replicas behind vllm-router); both skip where vLLM is not installed.
"""

from __future__ import annotations

import shlex

import pytest

from helpers.server.vllm.process import VLLMProcess, cpu_range, gpu_command
from helpers.server.vllm.replicas import gpu_ids, placements
from helpers.server.vllm.router import RouterProcess
from helpers.server.vllm.venv import VLLMError


def test_gpu_command_names_dtype_and_quantization() -> None:
    cmd = gpu_command("/m/linly", "linly", dtype="float16", quantization="bitsandbytes")
    assert "pip install vllm bitsandbytes" in cmd
    assert "--dtype float16" in cmd and "--quantization bitsandbytes" in cmd
    assert "--host 127.0.0.1" in cmd
    with pytest.raises(ValueError):
        gpu_command("/m", dtype="float32")


def test_the_gpu_command_is_the_argv_we_start() -> None:
    served = VLLMProcess("/m/linly", "linly", 8000, ".venv-vllm/bin/python", dtype="float16",
                         max_model_len=4096, extra_args=["--quantization", "bitsandbytes"])
    printed = gpu_command("/m/linly", "linly", dtype="float16", quantization="bitsandbytes",
                          install=False)
    assert shlex.split(printed) == served.command()


@pytest.mark.parametrize(("cpus", "expected"), [
    ([0], "0"), ([0, 1], "0-1"), ([0, 2, 3], "0,2-3"), ([4, 5, 6, 9], "4-6,9"),
])
def test_cpu_ranges_as_vllm_wants_them(cpus: list[int], expected: str) -> None:
    assert cpu_range(cpus) == expected


def test_one_replica_per_gpu_and_tensor_parallel_over_a_larger_share() -> None:
    assert placements(2, gpus=["0", "1"]) == [({"CUDA_VISIBLE_DEVICES": "0"}, []),
                                              ({"CUDA_VISIBLE_DEVICES": "1"}, [])]
    tp = ["--tensor-parallel-size", "2"]
    assert placements(2, gpus=["4", "5", "6", "7"]) == [({"CUDA_VISIBLE_DEVICES": "4,5"}, tp),
                                                        ({"CUDA_VISIBLE_DEVICES": "6,7"}, tp)]
    with pytest.raises(VLLMError, match="3 replicas need at least 3 GPUs"):
        placements(3, gpus=["0", "1"])


def test_on_a_cpu_each_replica_gets_cores_of_its_own() -> None:
    binds = [env["VLLM_CPU_OMP_THREADS_BIND"] for env, _ in placements(2, gpus=[], cpus=[0, 1])]
    assert binds == ["0", "1"]
    binds = [env["VLLM_CPU_OMP_THREADS_BIND"] for env, _ in placements(3, gpus=[],
                                                                         cpus=range(8))]
    assert binds == ["0-1", "2-3", "4-5"]
    with pytest.raises(VLLMError, match="--replicas 2 or fewer"):
        placements(3, gpus=[], cpus=[0, 1])


def test_gpu_ids_follow_cuda_visible_devices(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2, 3")
    assert gpu_ids() == ["2", "3"]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "-1")  # "no GPU" by convention
    assert gpu_ids() == []


def test_the_router_command_and_bad_policies() -> None:
    router = RouterProcess(["http://127.0.0.1:8001/", "http://127.0.0.1:8002"], 9000, "py",
                           policy="round_robin")
    argv = router.command()
    urls = argv[argv.index("--worker-urls") + 1:argv.index("--policy")]
    assert urls == ["http://127.0.0.1:8001", "http://127.0.0.1:8002"]
    assert argv[argv.index("--policy") + 1] == "round_robin"
    assert argv[argv.index("--port") + 1] == "9000"
    with pytest.raises(ValueError, match="cache_aware, round_robin"):
        RouterProcess(["http://127.0.0.1:8001"], 9000, "py", policy="fastest")
    with pytest.raises(ValueError, match="at least one worker"):
        RouterProcess([], 9000, "py")


def test_replicas_need_the_vllm_engine() -> None:
    from helpers.server import serve

    with pytest.raises(ValueError, match="--engine vllm"):
        serve("embedded", port=0, engine="builtin", replicas=2)


def test_vllm_python_none_turns_vllm_off_even_where_installed(tmp_path) -> None:
    """DHLLM_VLLM_PYTHON=none: the no-vLLM path, whatever is installed; a wrong path is an error."""
    from helpers.server.vllm import VLLMError
    from helpers.server.vllm.venv import find_vllm_python

    assert find_vllm_python("none") is None
    assert find_vllm_python(" None ") is None
    with pytest.raises(VLLMError, match="not a Python interpreter with vLLM"):
        find_vllm_python(str(tmp_path / "no-such-venv"))

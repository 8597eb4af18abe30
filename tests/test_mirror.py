"""The local mirror against the real clients (hf CLI, huggingface_hub, transformers, modelscope),
over real HTTP on 127.0.0.1. Fixtures here are shared with test_download.py."""

from __future__ import annotations

import hashlib
import http.client
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from helpers.hub.mirror import mirror_in_background
from helpers.hub.mirror_store import add_to_mirror
from helpers.stand_in import add_stand_in
from tests.conftest import free_port

REPO = "org/tiny"
WEIGHTS = "model.safetensors"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_files(source: Path, copy: Path) -> None:
    """Every visible file of ``source`` is in ``copy`` with identical bytes."""
    names = sorted(p.name for p in source.iterdir() if p.is_file() and not p.name.startswith("."))
    assert names and WEIGHTS in names
    for name in names:
        assert sha256_of(copy / name) == sha256_of(source / name), name


def clean_env(**extra: str) -> dict[str, str]:
    """The environment for a client subprocess: no real hub, no user caches."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "MODELSCOPE_"))}
    env.update(HF_HUB_DISABLE_TELEMETRY="1", PYTHONUNBUFFERED="1", **extra)
    return env


@pytest.fixture(scope="module")
def mirror_root(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """A mirror folder holding the tiny model as org/tiny and under the registry's ModelScope id."""
    root = tmp_path_factory.mktemp("mirror")
    shutil.copytree(tiny_model_dir, root / "org" / "tiny")
    add_to_mirror("qwen/Qwen-1_8B-Chat", root, tiny_model_dir, progress=False)
    return root


@pytest.fixture(scope="module")
def mirror(mirror_root: Path):
    with mirror_in_background(mirror_root, port=free_port(), progress=False) as handle:
        yield handle


def test_hf_download_cli_through_mirror(mirror, mirror_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "tiny"
    hf = Path(sys.executable).with_name("hf")
    result = subprocess.run(
        [str(hf), "download", REPO, "--local-dir", str(target)],
        env=clean_env(HF_ENDPOINT=mirror.url, HF_HOME=str(tmp_path / "hf-home")),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert_same_files(mirror_root / REPO, target)


def test_snapshot_download_and_hf_hub_download(mirror, mirror_root: Path, tmp_path: Path) -> None:
    from huggingface_hub import hf_hub_download, snapshot_download

    folder = snapshot_download(REPO, local_dir=tmp_path / "snap", endpoint=mirror.url)
    assert_same_files(mirror_root / REPO, Path(folder))
    # Cache mode (blobs named by ETag, symlinked snapshots) works too.
    cached = hf_hub_download(REPO, "config.json", cache_dir=tmp_path / "cache", endpoint=mirror.url)
    assert Path(cached).read_bytes() == (mirror_root / REPO / "config.json").read_bytes()
    assert "snapshots" in cached


def test_from_pretrained_with_hf_endpoint(mirror, tmp_path: Path) -> None:
    # HF_ENDPOINT is read when huggingface_hub is imported: set it before, in a fresh process.
    code = (
        "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
        f"model = AutoModelForCausalLM.from_pretrained({REPO!r})\n"
        f"tokenizer = AutoTokenizer.from_pretrained({REPO!r})\n"
        "print('params', model.num_parameters(), 'vocab', len(tokenizer))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(HF_ENDPOINT=mirror.url, HF_HOME=str(tmp_path / "hf-home")),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "params" in result.stdout
    params = int(result.stdout.split()[1])
    assert 3_000_000 < params < 4_000_000  # the 2-layer tiny model


def test_modelscope_snapshot_download_with_env(mirror, mirror_root: Path, tmp_path: Path) -> None:
    target = tmp_path / "ms"
    code = (
        "from modelscope import snapshot_download\n"
        f"print(snapshot_download({REPO!r}, local_dir={str(target)!r}))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(MODELSCOPE_ENDPOINT=mirror.url, MODELSCOPE_CACHE=str(tmp_path / "ms-cache")),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert_same_files(mirror_root / REPO, target)


def test_missing_things_answer_404_with_hub_error_codes(mirror) -> None:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError

    cases = {
        f"/{REPO}/resolve/main/nope.json": "EntryNotFound",
        f"/api/models/{REPO}/tree/main/additional_chat_templates": "EntryNotFound",
        "/org/missing/resolve/main/config.json": "RepoNotFound",
        "/api/models/org/missing": "RepoNotFound",
        f"/{REPO}/resolve/v9.9/config.json": "RevisionNotFound",
    }
    for path, code in cases.items():
        method = "HEAD" if "/resolve/" in path else "GET"
        response = requests.request(method, mirror.url + path, timeout=10)
        assert response.status_code == 404, path
        assert response.headers["X-Error-Code"] == code, path
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(REPO, "nope.json", endpoint=mirror.url)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json", endpoint=mirror.url)
    ms = requests.get(mirror.url + "/api/v1/models/org/missing/repo/files", timeout=10)
    assert ms.status_code == 404 and ms.json()["Success"] is False


def test_range_etag_and_commit_headers(mirror, mirror_root: Path) -> None:
    weights = (mirror_root / REPO / WEIGHTS).read_bytes()
    url = f"{mirror.url}/{REPO}/resolve/main/{WEIGHTS}"
    part = requests.get(url, headers={"Range": "bytes=1000-1999"}, timeout=10)
    assert part.status_code == 206
    assert part.content == weights[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(weights)}"
    head = requests.head(url, timeout=10)
    # LFS-size files: the ETag is the sha256 (huggingface_hub names blobs by it).
    assert head.headers["ETag"] == f'"{hashlib.sha256(weights).hexdigest()}"'
    assert int(head.headers["Content-Length"]) == len(weights)
    commit = requests.get(f"{mirror.url}/api/models/{REPO}", timeout=10).json()["sha"]
    assert head.headers["X-Repo-Commit"] == commit and len(commit) == 40
    # Small files: the git blob sha1, as the hub sends.
    config = (mirror_root / REPO / "config.json").read_bytes()
    git_sha1 = hashlib.sha1(b"blob %d\0" % len(config) + config).hexdigest()
    head = requests.head(f"{mirror.url}/{REPO}/resolve/{commit}/config.json", timeout=10)
    assert head.headers["ETag"] == f'"{git_sha1}"'
    # ModelScope's listing carries sha256 (its client checks it) and its file URL takes Range.
    files = requests.get(f"{mirror.url}/api/v1/models/{REPO}/repo/files", timeout=10).json()
    listed = {f["Path"]: f for f in files["Data"]["Files"]}
    assert listed[WEIGHTS]["Sha256"] == hashlib.sha256(weights).hexdigest()
    ms = requests.get(
        f"{mirror.url}/api/v1/models/{REPO}/repo",
        params={"Revision": "master", "FilePath": WEIGHTS},
        headers={"Range": f"bytes={len(weights) - 10}-"},
        timeout=10,
    )
    assert ms.status_code == 206 and ms.content == weights[-10:]


def raw_get(url: str, path: str) -> tuple[int, bytes]:
    """GET an unnormalised path (requests/urllib3 would resolve the dot segments first)."""
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.putrequest("GET", path, skip_accept_encoding=True)
        conn.endheaders()
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def test_path_traversal_is_refused(mirror, mirror_root: Path, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("root:x:0:0 secret outside the mirror")
    evil = mirror_root / "org" / "evil"
    evil.mkdir(exist_ok=True)
    (evil / "config.json").write_text("{}")
    (evil / "secret.txt").symlink_to(secret)  # a symlink that leads out of the root
    (evil / "outside").symlink_to(tmp_path, target_is_directory=True)
    attempts = [
        f"/{REPO}/resolve/main/../../../etc/passwd",
        f"/{REPO}/resolve/main/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
        f"/{REPO}/resolve/main/..%2f..%2f..%2fetc%2fpasswd",
        f"/{REPO}/resolve/main/%2e%2e%2f%2e%2e%2f%2e%2e%2fetc%2fpasswd",
        f"/{REPO}/resolve/main//etc/passwd",
        f"/{REPO}/resolve/main/%2fetc%2fpasswd",
        f"/{REPO}/resolve/main/..\\..\\..\\etc\\passwd",
        f"/{REPO}/resolve/main/config.json%00.txt",
        f"/{REPO}/resolve/main/../../.dhllm/hashes.json",
        f"/{REPO}/resolve/main/.dhllm/hashes.json",
        "/../../etc/passwd",
        "/%2e%2e/%2e%2e/resolve/main/etc/passwd",
        "/org/evil/resolve/main/secret.txt",
        "/org/evil/resolve/main/outside/secret.txt",
        f"/api/models/{REPO}/tree/main/..%2f..%2f..",
        f"/api/v1/models/{REPO}/repo?FilePath=../../../etc/passwd",
        f"/api/v1/models/{REPO}/repo?FilePath=%2Fetc%2Fpasswd",
        f"/api/v1/models/{REPO}/repo?FilePath=..%2F..%2F..%2Fetc%2Fpasswd",
    ]
    for path in attempts:
        status, body = raw_get(mirror.url, path)
        assert status in (400, 404), (path, status)
        assert b"root:" not in body, path
    listing = requests.get(f"{mirror.url}/api/models/org/evil/tree/main?recursive=true", timeout=10)
    assert [item["path"] for item in listing.json()] == ["config.json"]


def test_loopback_throughput(mirror, mirror_root: Path) -> None:
    """Measures MB/s of full GETs of the weights on loopback (printed, not asserted)."""
    url = f"{mirror.url}/{REPO}/resolve/main/{WEIGHTS}"
    expected = sha256_of(mirror_root / REPO / WEIGHTS)
    before = mirror.stats.bytes_served
    start = time.perf_counter()
    for _ in range(5):
        body = requests.get(url, timeout=30).content
        assert hashlib.sha256(body).hexdigest() == expected
    seconds = time.perf_counter() - start
    served = mirror.stats.bytes_served - before
    assert served == 5 * len(body)
    print(f"\nmirror loopback throughput: {served / seconds / 1e6:.0f} MB/s ({served} bytes)")


def test_add_to_mirror_from_folder_links_and_refuses_pointers(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    from helpers.hub import VerificationError

    root = tmp_path / "root"
    target = add_to_mirror("Linly-AI/Chinese-LLaMA-2-7B-hf", root, tiny_model_dir, progress=False)
    assert target == root / "Linly-AI" / "Chinese-LLaMA-2-7B-hf"
    assert_same_files(tiny_model_dir, target)
    assert (target / WEIGHTS).stat().st_nlink >= 2  # hard-linked: no second copy on disk
    assert add_to_mirror("Linly-AI/Chinese-LLaMA-2-7B-hf", root, tiny_model_dir, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    (broken / WEIGHTS).write_text("version https://git-lfs.github.com/spec/v1\noid sha256:ab\n")
    with pytest.raises(VerificationError, match="pointer"):
        add_to_mirror("org/broken", root, broken, progress=False)
    with pytest.raises(ValueError, match="org/name"):
        add_to_mirror("no-slash", root, tiny_model_dir, progress=False)


def test_cli_mirror_add_and_serve(tiny_model_dir: Path, tmp_path: Path) -> None:
    root = tmp_path / "classroom"
    dhllm = [sys.executable, "-m", "helpers"]
    added = subprocess.run(
        [
            *dhllm,
            "mirror",
            "add",
            "Linly-AI/Chinese-LLaMA-2-7B-hf",
            "--from",
            str(tiny_model_dir),
            "--dir",
            str(root),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert added.returncode == 0, added.stderr
    port = free_port()
    server = subprocess.Popen(
        [*dhllm, "mirror", "serve", str(root), "--host", "127.0.0.1", "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                info = requests.get(f"{url}/api/models/Linly-AI/Chinese-LLaMA-2-7B-hf", timeout=2)
                break
            except requests.ConnectionError:
                assert server.poll() is None, server.communicate()[1]
                time.sleep(0.1)
        else:
            pytest.fail("dhllm mirror serve did not answer")
        assert WEIGHTS in {s["rfilename"] for s in info.json()["siblings"]}
    finally:
        server.terminate()
        server.wait(10)


def test_busy_port_and_missing_folder_fail_clearly(mirror, tmp_path: Path) -> None:
    from helpers.background_server import PortInUseError

    busy = int(mirror.url.rsplit(":", 1)[1])
    with pytest.raises(PortInUseError, match="already in use"):
        mirror_in_background(mirror.root, port=busy, progress=False)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        mirror_in_background(tmp_path / "nowhere", port=free_port(), progress=False)


def test_stand_in_under_the_chapter_id_downloads_and_loads(
    embedded_dir: Path, tmp_path: Path
) -> None:
    from helpers.hub import download
    from helpers.models import hub_id, load_model

    root = tmp_path / "root"
    target = add_stand_in(root, "Linly-AI/Chinese-LLaMA-2-7B-hf", progress=False)
    assert "not Linly-AI/Chinese-LLaMA-2-7B-hf" in (target / "STAND-IN.md").read_text()
    with mirror_in_background(root, port=free_port(), progress=False) as handle:
        path = download(hub_id("linly-7b"), "hf", tmp_path / "linly", endpoint=handle.url,
                        progress=False)
    model, tokenizer = load_model(path, verbose=False)
    assert model.config.model_type == "llama" and len(tokenizer) > 1000

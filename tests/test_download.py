"""download(), verify(), download_command() and resume, against the local mirror on 127.0.0.1."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers.hub import (
    GIT_LFS_MISSING,
    DownloadError,
    VerificationError,
    download,
    download_command,
    git_lfs_available,
    hub_reachable,
    verify,
)
from helpers.models import hub_id
from tests import test_mirror
from tests.conftest import free_port
from tests.test_mirror import REPO, WEIGHTS, assert_same_files, clean_env, sha256_of

# The mirror fixtures (module scope: this module gets its own mirror folder and server).
mirror_root = test_mirror.mirror_root
mirror = test_mirror.mirror

POINTER = (
    "version https://git-lfs.github.com/spec/v1\n"
    "oid sha256:4d7a214614ab2935c943f9e0ff69d22eadbb8f32b1258daaa5e2ca24d17e2393\n"
    "size 12345678\n"
)


def test_download_with_endpoint_after_huggingface_hub_import(
    mirror, mirror_root: Path, tmp_path: Path
) -> None:
    import huggingface_hub.constants

    # huggingface_hub is imported and read HF_ENDPOINT already: only endpoint= can redirect it.
    assert "127.0.0.1" not in huggingface_hub.constants.ENDPOINT
    path = download(REPO, "hf", tmp_path / "tiny", endpoint=mirror.url, progress=False)
    assert path == tmp_path / "tiny"
    assert_same_files(mirror_root / REPO, path)
    verify(path, REPO, endpoint=mirror.url)  # full check against the mirror's listing passes
    # A second call finds everything in place: only metadata requests, no weights again.
    before = mirror.stats.per_path[f"/{REPO}/resolve/main/{WEIGHTS}"]
    download(REPO, "hf", path, endpoint=mirror.url, progress=False)
    assert mirror.stats.per_path[f"/{REPO}/resolve/main/{WEIGHTS}"] == before


def test_hf_reads_the_metadata_we_record(mirror, tmp_path: Path) -> None:
    """Pins huggingface_hub's private local-folder metadata (hub.resume.write_hf_metadata): what
    our resumable fetch records, hf reads back as its own, so it neither re-hashes nor re-fetches."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub._local_folder import read_download_metadata

    from helpers.hub.files import local_hash_cache
    from helpers.hub.resume import fetch_resumable

    api = HfApi(endpoint=mirror.url)
    commit = api.repo_info(REPO).sha
    [weights] = [f for f in api.list_repo_tree(REPO, recursive=True) if f.path == WEIGHTS]
    path = tmp_path / "rec"
    fetch_resumable(f"{mirror.url}/{REPO}/resolve/{commit}/{WEIGHTS}", path, WEIGHTS,
                    weights.lfs.size, weights.lfs.sha256, commit, {}, False,
                    local_hash_cache(path))
    recorded = read_download_metadata(path, WEIGHTS)  # before hf has seen the folder
    assert recorded is not None, "hf no longer reads the metadata we write"
    assert (recorded.etag, recorded.commit_hash) == (weights.lfs.sha256, commit)

    def weight_bytes() -> int:
        return sum(n for p, n in mirror.stats.per_path.items() if p.endswith(WEIGHTS))

    before = weight_bytes()
    snapshot_download(REPO, local_dir=path, endpoint=mirror.url)
    assert weight_bytes() == before


def test_download_subset_with_allow_patterns(mirror, tmp_path: Path) -> None:
    path = download(
        REPO,
        "hf-mirror",
        tmp_path / "cfg",
        allow_patterns="*.json",
        endpoint=mirror.url,
        progress=False,
    )
    names = {p.name for p in path.iterdir() if not p.name.startswith(".")}
    assert "config.json" in names and WEIGHTS not in names


def test_modelscope_download_by_registry_name(mirror, mirror_root: Path, tmp_path: Path) -> None:
    # "qwen-1.8b-chat" is qwen/Qwen-1_8B-Chat on ModelScope (Qwen/Qwen-1_8B-Chat on HF).
    qwen = hub_id("qwen-1.8b-chat", "modelscope")
    path = download(qwen, "modelscope", tmp_path / "qwen", endpoint=mirror.url, progress=False)
    assert_same_files(mirror_root / "qwen" / "Qwen-1_8B-Chat", path)
    with pytest.raises(ValueError, match="no ModelScope id"):
        hub_id("linly-7b", "modelscope")


def test_unknown_repo_and_unreachable_hub_fail_clearly(mirror, tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="not found"):
        download("org/missing", "hf", tmp_path / "a", endpoint=mirror.url, progress=False)
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DownloadError, match="cannot download"):
        download(REPO, "hf", tmp_path / "b", endpoint=dead, progress=False)
    with pytest.raises(ValueError, match="unknown source"):
        download(REPO, "ftp", tmp_path / "c")  # type: ignore[arg-type]
    assert hub_reachable(mirror.url, timeout=2)
    assert not hub_reachable(dead, timeout=1)


def test_killed_download_resumes_in_a_new_process(
    mirror, mirror_root: Path, tmp_path: Path
) -> None:
    """`dhllm download` killed half-way, restarted: the second run fetches only the rest."""
    target = tmp_path / "resume"
    total = (mirror_root / REPO / WEIGHTS).stat().st_size
    weights_path = f"/{REPO}/resolve/"
    command = [
        sys.executable,
        "-m",
        "helpers",
        "download",
        REPO,
        "--endpoint",
        mirror.url,
        "--local-dir",
        str(target),
    ]

    def served() -> int:
        return sum(
            n
            for p, n in mirror.stats.per_path.items()
            if p.startswith(weights_path) and p.endswith(WEIGHTS)
        )

    mirror.stats.throttle = total / 4  # about 4 s for the whole file
    try:
        start_bytes = served()
        first = subprocess.Popen(
            command, env=clean_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        deadline = time.monotonic() + 90
        partial: list[Path] = []
        while time.monotonic() < deadline:
            partial = list(target.glob(".cache/huggingface/download/*.dhllm.incomplete"))
            if partial and partial[0].stat().st_size > total * 0.6:
                break
            assert first.poll() is None, first.communicate()[1].decode()[-2000:]
            time.sleep(0.05)
        else:
            pytest.fail("the first download never got to 60 %")
        first.kill()
        first.wait(10)
        kept = partial[0].stat().st_size
        first_run = served() - start_bytes
    finally:
        mirror.stats.throttle = None
    assert not (target / WEIGHTS).exists()

    before = served()
    second = subprocess.run(command, env=clean_env(), capture_output=True, text=True, timeout=120)
    assert second.returncode == 0, second.stderr[-3000:]
    second_run = served() - before
    assert "resumed" in second.stderr and "B/s" in second.stderr  # the bar: resumed, speed
    assert second_run <= total - kept
    assert second_run < 0.5 * total
    assert sha256_of(target / WEIGHTS) == sha256_of(mirror_root / REPO / WEIGHTS)
    print(
        f"\nresume: file {total} B, first run served {first_run} B (kept {kept} B), "
        f"second run served {second_run} B ({second_run / total:.0%} of the file)"
    )


def make_clone_like(tiny_model_dir: Path, target: Path, git: bool) -> Path:
    shutil.copytree(tiny_model_dir, target)
    (target / WEIGHTS).write_text(POINTER)
    if git:
        (target / ".git").mkdir()
    return target


def test_pointer_file_fails_verify_and_load_model(tiny_model_dir: Path, tmp_path: Path) -> None:
    from helpers.models import load_model

    clone = make_clone_like(tiny_model_dir, tmp_path / "clone", git=True)
    with pytest.raises(VerificationError) as verify_error:
        verify(clone, quick=True)
    message = str(verify_error.value)
    assert WEIGHTS in message and "git-lfs pointer" in message
    assert "git lfs install && git lfs pull" in message
    with pytest.raises(VerificationError) as load_error:
        load_model(clone, verbose=False)
    assert str(load_error.value) == message  # the same words, before any "invalid load key"
    # Not a git clone: the fix is the hf command for this folder.
    folder = make_clone_like(tiny_model_dir, tmp_path / "folder", git=False)
    with pytest.raises(VerificationError, match="hf download org/x --local-dir"):
        verify(folder, "org/x", quick=True)


def test_corrupted_weights_fail_the_sha256_check(mirror, tmp_path: Path) -> None:
    path = download(REPO, "hf", tmp_path / "tiny", endpoint=mirror.url, progress=False)
    weights = path / WEIGHTS
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, header intact: only a hash can tell
    weights.write_bytes(bytes(data))
    verify(path, quick=True)  # the cheap check cannot see it
    with pytest.raises(VerificationError, match=r"model.safetensors: sha256 .* differs") as err:
        verify(path, REPO, endpoint=mirror.url)
    assert f"hf download {REPO} --local-dir" in str(err.value)
    assert f"HF_ENDPOINT={mirror.url}" in str(err.value)
    # Offline, against the sha256 that hf recorded when it downloaded the file.
    with pytest.raises(VerificationError, match="sha256"):
        verify(path)


def test_truncated_or_incomplete_folders_fail_quick_verify(
    tiny_model_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "cut"
    shutil.copytree(tiny_model_dir, folder)
    weights = folder / WEIGHTS
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(VerificationError, match="truncated"):
        verify(folder, quick=True)
    weights.unlink()
    with pytest.raises(VerificationError, match="no weight file"):
        verify(folder, quick=True)
    with pytest.raises(VerificationError, match="not a folder"):
        verify(tmp_path / "absent", "org/absent", quick=True)


def test_download_command_bash_and_powershell() -> None:
    assert download_command("Linly-AI/Chinese-LLaMA-2-7B-hf", "hf", "models/linly") == (
        "hf download Linly-AI/Chinese-LLaMA-2-7B-hf --local-dir models/linly"
    )
    assert download_command(hub_id("linly-7b"), "hf-mirror", "models/linly") == (
        "HF_ENDPOINT=https://hf-mirror.com hf download Linly-AI/Chinese-LLaMA-2-7B-hf "
        "--local-dir models/linly"
    )
    assert download_command(hub_id("linly-7b"), "hf-mirror", r"D:\models\linly", shell="powershell") == (
        '$env:HF_ENDPOINT = "https://hf-mirror.com"\n'
        r"hf download Linly-AI/Chinese-LLaMA-2-7B-hf --local-dir D:\models\linly"
    )
    assert download_command(hub_id("qwen-1.8b-chat", "modelscope"), "modelscope", "qwen") == (
        "modelscope download qwen/Qwen-1_8B-Chat --local-dir qwen"
    )
    assert download_command("Linly-AI/Chinese-LLaMA-2-7B-hf", "git") == (
        "git lfs install\ngit clone https://huggingface.co/Linly-AI/Chinese-LLaMA-2-7B-hf "
        "Chinese-LLaMA-2-7B-hf"
    )
    assert download_command("org/x", "hf", "my models", include="*.json") == (
        "hf download org/x --local-dir 'my models' --include '*.json'"
    )
    assert "--local-dir 'my models'" in download_command(
        "org/x", "hf", "my models", shell="powershell"
    )
    # The commands name options the installed CLIs really have.
    hf_help = subprocess.run(
        [str(Path(sys.executable).with_name("hf")), "download", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    ).stdout
    assert "--local-dir" in hf_help and "--include" in hf_help


def make_bare_repo_with_pointer(tmp_path: Path) -> Path:
    work = tmp_path / "work"
    work.mkdir()
    env = dict(
        os.environ,
        GIT_AUTHOR_NAME="t",
        GIT_AUTHOR_EMAIL="t@t",
        GIT_COMMITTER_NAME="t",
        GIT_COMMITTER_EMAIL="t@t",
    )
    (work / "config.json").write_text("{}")
    (work / WEIGHTS).write_text(POINTER)  # committed as a pointer, no LFS object anywhere
    (work / ".gitattributes").write_text("*.safetensors filter=lfs diff=lfs merge=lfs -text\n")
    for cmd in (["init", "-q"], ["add", "-A"], ["commit", "-q", "-m", "model"]):
        subprocess.run(
            ["git", "-c", "init.defaultBranch=main", *cmd],
            cwd=work,
            env=env,
            check=True,
            capture_output=True,
        )
    bare = tmp_path / "org" / "model.git"
    subprocess.run(
        ["git", "clone", "-q", "--bare", str(work), str(bare)], check=True, capture_output=True
    )
    return bare


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_source_without_git_lfs_refuses(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bare = make_bare_repo_with_pointer(tmp_path)
    # A PATH with git but without git-lfs, whether or not this machine has git-lfs.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "git").symlink_to(shutil.which("git"))
    monkeypatch.setenv("PATH", str(bin_dir))
    assert not git_lfs_available()
    target = tmp_path / "clone"
    with pytest.raises(DownloadError) as err:
        download(str(bare), "git", target)
    assert str(err.value) == GIT_LFS_MISSING
    assert "apt-get install git-lfs" in GIT_LFS_MISSING
    assert not (target / WEIGHTS).exists()  # nothing cloned, so no pointer left behind


@pytest.mark.skipif(not git_lfs_available(), reason="git-lfs is not installed here")
def test_git_source_with_git_lfs_never_leaves_pointers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # download() runs `git lfs install`: let it write a throw-away config, not ~/.gitconfig.
    monkeypatch.setenv("GIT_CONFIG_GLOBAL", str(tmp_path / "gitconfig"))
    bare = make_bare_repo_with_pointer(tmp_path)
    with pytest.raises((DownloadError, VerificationError), match="lfs|pointer"):
        download(str(bare), "git", tmp_path / "clone")

"""The local mirror over git: real ``git`` and ``git-lfs`` clone from it on 127.0.0.1."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import requests

from helpers.hub import VerificationError, download, git_lfs_available, is_lfs_pointer, verify
from helpers.hub.mirror import mirror_in_background
from tests import test_mirror
from tests.conftest import free_port
from tests.test_mirror import REPO, WEIGHTS, assert_same_files, sha256_of

# The mirror fixtures (module scope: this module gets its own mirror folder and server).
mirror_root = test_mirror.mirror_root
mirror = test_mirror.mirror

needs_git = pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
needs_lfs = pytest.mark.skipif(
    not git_lfs_available(),
    reason="git-lfs is not installed here (CI installs it; Debian: apt-get install git-lfs)",
)


@pytest.fixture(scope="module")
def git_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A git environment with its own HOME (``git lfs install`` writes there, not to ~)."""
    home = tmp_path_factory.mktemp("git-home")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GIT_", "HF_", "MODELSCOPE_"))}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), GIT_CONFIG_NOSYSTEM="1",
               GIT_TERMINAL_PROMPT="0", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    if git_lfs_available():
        git(env, "lfs", "install")  # the chapter's first command
    return env


def git(env: dict[str, str], *args: str, cwd: Path | None = None,
        check: bool = True, **extra: str) -> subprocess.CompletedProcess:
    result = subprocess.run(["git", *args], cwd=cwd, env={**env, **extra}, capture_output=True,
                            text=True, timeout=120)
    if check:
        assert result.returncode == 0, f"git {' '.join(args)}: {result.stderr}"
    return result


def weight_bytes_served(mirror) -> int:
    return sum(n for p, n in mirror.stats.per_path.items() if p.endswith(f"/resolve/main/{WEIGHTS}"))


@needs_lfs
def test_git_clone_gives_byte_identical_weights_through_lfs(
    mirror, mirror_root: Path, git_env: dict[str, str], tmp_path: Path
) -> None:
    clone = tmp_path / "tiny"
    before = weight_bytes_served(mirror)
    git(git_env, "clone", f"{mirror.url}/{REPO}", str(clone))
    assert_same_files(mirror_root / REPO, clone)  # sha256 of every file, weights included
    # The weights came through the LFS batch API's links to the mirror's own file endpoint.
    size = (mirror_root / REPO / WEIGHTS).stat().st_size
    assert weight_bytes_served(mirror) - before == size
    assert git(git_env, "lfs", "ls-files", "--name-only", cwd=clone).stdout.split() == [WEIGHTS]
    assert "*.safetensors filter=lfs" in (clone / ".gitattributes").read_text()
    verify(clone, REPO, endpoint=mirror.url)  # sizes and sha256 against the HF listing
    # The same folder gives the same commit; a shallow clone (smart protocol only) works too.
    shallow = tmp_path / "shallow"
    git(git_env, "clone", "--depth", "1", f"{mirror.url}/{REPO}.git", str(shallow))
    head = git(git_env, "rev-parse", "HEAD", cwd=clone).stdout
    assert git(git_env, "rev-parse", "HEAD", cwd=shallow).stdout == head
    assert sha256_of(shallow / WEIGHTS) == sha256_of(mirror_root / REPO / WEIGHTS)


@needs_lfs
def test_skip_smudge_leaves_pointers_that_verify_flags_and_lfs_pull_fixes(
    mirror, mirror_root: Path, git_env: dict[str, str], tmp_path: Path
) -> None:
    clone = tmp_path / "pointers"
    git(git_env, "clone", f"{mirror.url}/{REPO}", str(clone), GIT_LFS_SKIP_SMUDGE="1")
    weights = clone / WEIGHTS
    assert is_lfs_pointer(weights)
    text = weights.read_text()
    assert f"oid sha256:{sha256_of(mirror_root / REPO / WEIGHTS)}" in text
    with pytest.raises(VerificationError, match="git-lfs pointer") as err:
        verify(clone, quick=True)
    assert "git lfs install && git lfs pull" in str(err.value)
    git(git_env, "lfs", "pull", cwd=clone)  # the fix the message names
    assert not is_lfs_pointer(weights)
    assert_same_files(mirror_root / REPO, clone)
    verify(clone, quick=True)


@needs_lfs
def test_download_with_source_git_clones_from_the_mirror(
    mirror, mirror_root: Path, git_env: dict[str, str], tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for key in ("HOME", "XDG_CONFIG_HOME", "GIT_CONFIG_NOSYSTEM"):
        monkeypatch.setenv(key, git_env[key])  # its `git lfs install` writes to the test's HOME
    path = download(REPO, "git", tmp_path / "via-download", endpoint=mirror.url, progress=False)
    assert_same_files(mirror_root / REPO, path)


@needs_git
def test_unknown_repo_is_a_clear_git_error(mirror, git_env: dict[str, str], tmp_path: Path) -> None:
    result = git(git_env, "clone", f"{mirror.url}/org/missing", str(tmp_path / "m"), check=False)
    assert result.returncode == 128
    assert "remote: Repository 'org/missing' not found" in result.stderr
    assert f"This mirror serves: {REPO}" in result.stderr  # says what to clone instead
    assert "repository" in result.stderr and "not found" in result.stderr
    refs = requests.get(f"{mirror.url}/org/missing/info/refs?service=git-upload-pack", timeout=10)
    assert refs.status_code == 404 and refs.headers["content-type"].startswith("text/plain")


def test_lfs_batch_api_answers_and_refuses_clearly(mirror, mirror_root: Path) -> None:
    url = f"{mirror.url}/{REPO}.git/info/lfs/objects/batch"
    headers = {"Accept": "application/vnd.git-lfs+json",
               "Content-Type": "application/vnd.git-lfs+json"}
    weights = mirror_root / REPO / WEIGHTS
    oid, size = sha256_of(weights), weights.stat().st_size
    body = {"operation": "download", "transfers": ["basic"],
            "objects": [{"oid": oid, "size": size}, {"oid": "0" * 64, "size": 1}]}
    answer = requests.post(url, json=body, headers=headers, timeout=10)
    assert answer.status_code == 200
    assert answer.headers["content-type"].startswith("application/vnd.git-lfs+json")
    found, missing = answer.json()["objects"]
    href = found["actions"]["download"]["href"]
    assert href == f"{mirror.url}/{REPO}/resolve/main/{WEIGHTS}"
    assert hashlib.sha256(requests.get(href, timeout=30).content).hexdigest() == oid
    assert missing["error"]["code"] == 404 and "not in" in missing["error"]["message"]
    upload = requests.post(url, json={**body, "operation": "upload"}, headers=headers, timeout=10)
    assert upload.status_code == 403 and "read-only" in upload.json()["message"]
    unknown = requests.post(f"{mirror.url}/org/missing.git/info/lfs/objects/batch", json=body,
                            headers=headers, timeout=10)
    assert unknown.status_code == 404 and "org/missing" in unknown.json()["message"]
    # A classroom: students reach the teacher's machine by its address; the links follow it.
    seen_as = requests.post(url, json=body, headers={**headers, "Host": "192.0.2.7:8090"},
                            timeout=10).json()["objects"][0]["actions"]["download"]["href"]
    assert seen_as == f"http://192.0.2.7:8090/{REPO}/resolve/main/{WEIGHTS}"
    bad = requests.post(url, json={"objects": "nope"}, headers=headers, timeout=10)
    assert bad.status_code == 422


@needs_git
def test_push_is_refused_and_a_changed_folder_gives_a_new_commit(
    git_env: dict[str, str], tmp_path: Path
) -> None:
    root = tmp_path / "root"
    repo = root / "org" / "small"
    repo.mkdir(parents=True)
    (repo / "config.json").write_text('{"a": 1}')
    (repo / "weights.bin").write_bytes(b"\x80" + os.urandom(2048))
    with mirror_in_background(root, port=free_port(), progress=False) as handle:
        url = f"{handle.url}/org/small"
        first = git(git_env, "ls-remote", url).stdout
        assert git(git_env, "ls-remote", url).stdout == first  # built once, stable
        (repo / "tokenizer.json").write_text("{}")
        second = git(git_env, "ls-remote", url).stdout
        assert second.split()[0] != first.split()[0] and "refs/heads/main" in second
        clone = tmp_path / "clone"
        git(git_env, "clone", url, str(clone), GIT_LFS_SKIP_SMUDGE="1")
        assert (clone / "tokenizer.json").read_text() == "{}"
        pushed = git(git_env, "push", "origin", "HEAD:main", cwd=clone, check=False)
        assert pushed.returncode != 0 and "read-only" in pushed.stderr


def test_a_mirror_machine_without_git_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "root"
    (root / "org" / "small").mkdir(parents=True)
    (root / "org" / "small" / "config.json").write_text("{}")
    with mirror_in_background(root, port=free_port(), progress=False) as handle:
        monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))  # no git on this "machine"
        refs = requests.get(f"{handle.url}/org/small/info/refs?service=git-upload-pack", timeout=10)
        monkeypatch.undo()
        assert refs.status_code == 503 and "git is not installed on the mirror" in refs.text
        # The hub APIs do not need git.
        assert requests.get(f"{handle.url}/api/models/org/small", timeout=10).status_code == 200

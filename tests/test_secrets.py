"""get_secret: environment first, then Colab's userdata, else a clear error; never a prompt."""

from __future__ import annotations

import builtins
import getpass
import sys
import types

import pytest

from helpers.chat import AuthenticationError, ChatModelError
from helpers.secrets import REDACTED, MissingSecretError, get_secret, has_secret, redact

NAME = "OPENAI_API_KEY"


@pytest.fixture(autouse=True)
def no_prompts(monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt would hang an unattended notebook run: make any attempt fail loudly."""

    def refuse(*args: object, **kwargs: object) -> str:
        raise AssertionError("get_secret must never prompt")

    monkeypatch.setattr(builtins, "input", refuse)
    monkeypatch.setattr(getpass, "getpass", refuse)
    monkeypatch.delenv(NAME, raising=False)


def fake_colab(monkeypatch: pytest.MonkeyPatch, secrets: dict[str, str],
               denied: tuple[str, ...] = ()) -> None:
    """Install a stand-in for Colab's ``google.colab.userdata`` (the platform, not our code)."""

    class SecretNotFoundError(Exception):
        pass

    class NotebookAccessError(Exception):
        pass

    def get(key: str) -> str:
        if key in denied:
            raise NotebookAccessError(key)
        if key not in secrets:
            raise SecretNotFoundError(key)
        return secrets[key]

    userdata = types.ModuleType("google.colab.userdata")
    userdata.get = get  # type: ignore[attr-defined]
    colab = types.ModuleType("google.colab")
    colab.userdata = userdata  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "google.colab", colab)
    monkeypatch.setitem(sys.modules, "google.colab.userdata", userdata)


def test_environment_first(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NAME, "  sk-from-env  ")
    fake_colab(monkeypatch, {NAME: "sk-from-colab"})
    assert get_secret(NAME) == "sk-from-env"
    assert has_secret(NAME)


def test_colab_secret_when_environment_lacks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_colab(monkeypatch, {NAME: "sk-from-colab"})
    assert get_secret(NAME) == "sk-from-colab"


def test_empty_variable_counts_as_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(NAME, "   ")
    assert not has_secret(NAME)
    with pytest.raises(MissingSecretError):
        get_secret(NAME)


def test_missing_names_variable_url_and_how_to_set() -> None:
    with pytest.raises(MissingSecretError) as info:
        get_secret(NAME)
    message = str(info.value)
    assert NAME in message
    assert "https://platform.openai.com/api-keys" in message
    assert f"export {NAME}=" in message and "Colab" in message
    assert info.value.name == NAME
    assert isinstance(info.value, AuthenticationError) and isinstance(info.value, ChatModelError)


def test_missing_on_colab_too(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_colab(monkeypatch, {})
    assert not has_secret(NAME)
    with pytest.raises(MissingSecretError, match=NAME):
        get_secret(NAME)


def test_colab_secret_without_notebook_access(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_colab(monkeypatch, {NAME: "sk-x"}, denied=(NAME,))
    with pytest.raises(MissingSecretError, match="notebook access"):
        get_secret(NAME)


def test_unknown_variable_uses_purpose() -> None:
    with pytest.raises(MissingSecretError, match=r"MY_KEY is not set \(needed for my proxy\)"):
        get_secret("MY_KEY", purpose="my proxy")


def test_redact_removes_keys_and_provider_masks() -> None:
    text = "Incorrect API key provided: sk-ab*******wxyz. Key sk-abcdefwxyz was sent."
    clean = redact(text, "sk-abcdefwxyz")
    assert "wxyz" not in clean and "sk-ab" not in clean
    assert clean.count(REDACTED) == 2
    assert redact("nothing secret here", None, "") == "nothing secret here"

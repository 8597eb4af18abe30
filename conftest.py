"""Root pytest hooks: before the first notebook cell runs under nbval, start the services the
notebooks need (cloud fakes) and export their addresses, so kernels inherit them."""

from __future__ import annotations

import os
from contextlib import ExitStack

import pytest

_services = ExitStack()
_started = False


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _started
    if _started or item.path.suffix != ".ipynb":
        return
    from tests.notebook_env import notebook_services

    os.environ.update(_services.enter_context(notebook_services()))
    _started = True


def pytest_sessionfinish(session: pytest.Session) -> None:
    _services.close()

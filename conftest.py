"""Root pytest hooks: the services the notebooks need under nbval (cloud fakes), and how
``make test`` shares the suite between two pytest-xdist workers."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import ExitStack
from unittest import mock

import pytest

_services = ExitStack()
_notebook_env: dict[str, str] = {}
_notebook_runs: dict[str, ExitStack] = {}


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Before a notebook's first cell (nbval starts its kernel then): take the notebook's lock
    (see NOTEBOOK_PORTS_UNIT) and point the environment at the cloud fakes, started once; the
    kernel inherits it. Tests after the notebook see the environment as it was."""
    if item.path.suffix != ".ipynb" or item.path.name in _notebook_runs:
        return
    from tests.notebook_env import notebook_lock, notebook_services

    if not _notebook_env:
        _notebook_env.update(_services.enter_context(notebook_services()))
    run = _notebook_runs[item.path.name] = ExitStack()
    run.enter_context(notebook_lock(item.path.name))
    run.enter_context(mock.patch.dict(os.environ, _notebook_env))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    """After a notebook's last cell (nbval stops its kernel in this teardown): undo the above."""
    result = yield
    if item.path.suffix == ".ipynb" and (nextitem is None or nextitem.path != item.path):
        run = _notebook_runs.get(item.path.name)
        if run is not None:
            run.close()
    return result


def pytest_sessionfinish(session: pytest.Session) -> None:
    for run in _notebook_runs.values():
        run.close()
    _services.close()


# `make test` runs two pytest-xdist workers (`-n 2`): the suite is mostly CPU work, and on these
# 2 cores one worker leaves part of the CPU idle (vLLM start-ups, subprocesses, the browser).
# The notebooks bind fixed ports (helpers.config.NOTEBOOK_PORTS, the mirror's 8090), and so do the
# tests that run them or their snippets: most of them form one unit of work, run in order on one
# worker. Notebook 05 (the longest, with its vLLM start-ups) is a unit of its own on the other
# worker, first; its ports are its own, and the browser test takes its lock before opening it.
NOTEBOOK_PORTS_UNIT = "notebook-ports"
OWN_UNIT = "notebooks/05_digital_human.ipynb"
NOTEBOOK_UNIT_ORDER = ("notebooks/", "tests/test_notebook_snippets.py", "tests/test_browser_e2e.py")
# The units that go out first, in this order, the longest first (pytest --durations=0), so that
# the last units handed out are short and both workers end together.
FIRST = (NOTEBOOK_PORTS_UNIT, OWN_UNIT, "tests/test_vllm_replicas.py", "tests/test_vllm.py",
         "tests/test_engine_prefix.py", "tests/test_embedded.py", "tests/test_colab_rehearsal.py",
         "tests/test_setup_commands.py", "tests/test_cli.py", "tests/test_bench.py",
         "tests/test_cli_serve.py")


def pytest_configure(config: pytest.Config) -> None:
    """Two workers with torch's default two threads each oversubscribe two cores: OpenMP threads
    spin for each other and everything runs ~2.5x slower. One thread per worker, set before the
    workers (and their kernels and subprocesses) start; a value set by the caller wins."""
    if getattr(config.option, "numprocesses", None):
        os.environ.setdefault("OMP_NUM_THREADS", "1")


def _notebook_unit_rank(nodeid: str) -> int:
    return next(i for i, prefix in enumerate(NOTEBOOK_UNIT_ORDER) if nodeid.startswith(prefix))


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: object) -> object:
    """Each test module is one unit of work (its module fixtures, a vLLM start-up among them, run
    once), the notebook-port users one more; the units in FIRST go out first, in that order.
    Written here because xdist's ``--dist loadgroup`` does not group under pytest 9."""
    from xdist.scheduler import LoadScopeScheduling

    class ModulesAndNotebookPorts(LoadScopeScheduling):
        ordered = False

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            if path != OWN_UNIT and (path.endswith(".ipynb") or path in NOTEBOOK_UNIT_ORDER):
                return NOTEBOOK_PORTS_UNIT
            return path

        def _assign_work_unit(self, node: object) -> None:
            if not self.ordered:  # the queue is complete before the first assignment
                for scope in reversed(FIRST):
                    if scope in self.workqueue:
                        self.workqueue.move_to_end(scope, last=False)
                unit = self.workqueue.get(NOTEBOOK_PORTS_UNIT, {})
                for nodeid in sorted(unit, key=_notebook_unit_rank):  # stable: cells in order
                    unit[nodeid] = unit.pop(nodeid)
                self.ordered = True
            super()._assign_work_unit(node)

        def _reschedule(self, node: object) -> None:
            # A worker runs an item once it knows the next one, so xdist queues a unit behind a
            # worker's last two items. Behind the browser test only the lightest unit left goes.
            unit = self.assigned_work.get(node, {}).get(NOTEBOOK_PORTS_UNIT)
            if (unit is not None and not all(unit.values()) and self.workqueue
                    and self._pending_of(self.assigned_work[node]) <= 2):
                self.workqueue.move_to_end(next(reversed(self.workqueue)), last=False)
            super()._reschedule(node)

    return ModulesAndNotebookPorts(config, log)

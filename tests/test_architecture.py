"""The package's layers point one way: read every import (function-level ones too) with ``ast``."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "helpers"
CONCRETE_BACKENDS = {"helpers.chat.local", "helpers.chat.openai_chat", "helpers.chat.gemini"}
CONCRETE_NAMES = {"TransformersChat", "OpenAIChat", "GeminiChat"}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> list[tuple[str, set[str]]]:
    """``(module, names)`` for every ``import``/``from ... import`` of the package in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [(a.name, set()) for a in node.names if a.name.startswith("helpers")]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("helpers"):
            names = {a.name for a in node.names}
            # ``from helpers.server import protocol`` imports the submodule.
            subs = {f"{node.module}.{n}" for n in names if (ROOT.parent / f"{node.module}.{n}"
                    .replace(".", "/")).with_suffix(".py").exists()}
            # An edge to the package only when something other than a submodule is imported.
            own = [(node.module, names)] if len(subs) < len(names) else []
            found += own + [(s, set()) for s in subs]
    return found


GRAPH = {module_name(p): imports_of(p) for p in sorted(ROOT.rglob("*.py"))}


def edges(module: str) -> set[str]:
    return {target for target, _ in GRAPH[module] if target in GRAPH and target != module}


def test_the_walk_sees_the_package() -> None:
    assert {"helpers.chat.base", "helpers.server.app", "helpers.hub.download"} <= set(GRAPH)
    assert "helpers.chat.base" in edges("helpers.server.context")


def test_no_import_circles() -> None:
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(edges(module)):
            if state.get(target) == 1:
                cycle = path[path.index(target):] + [module, target]
                pytest.fail("import circle: " + " -> ".join(dict.fromkeys(cycle)) + f" -> {target}")
            if target not in state:
                visit(target, path + [module])
        state[module] = 2

    for module in sorted(GRAPH):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("layer", ["helpers.chat", "helpers.models", "helpers.hub",
                                   "helpers.embedded", "helpers.errors", "helpers.secrets"])
def test_lower_layers_know_nothing_of_the_server(layer: str) -> None:
    for module, imports in GRAPH.items():
        if module == layer or module.startswith(layer + "."):
            bad = [t for t, _ in imports if t == "helpers.server" or t.startswith("helpers.server.")]
            assert not bad, f"{module} imports {bad}"


@pytest.mark.parametrize("module", ["helpers.config", "helpers.errors", "helpers.client",
                                    "helpers.speech"])
def test_leaf_modules_import_nothing_from_the_package(module: str) -> None:
    if module not in GRAPH:
        pytest.skip(f"{module} does not exist")
    # A leaf may be a package: its modules may import each other, nothing else.
    inside = [m for m in GRAPH if m == module or m.startswith(module + ".")]
    bad = {m: [t for t, _ in GRAPH[m] if not (t == module or t.startswith(module + "."))]
           for m in inside}
    assert not any(bad.values()), f"{module} imports {bad}"


def within(target: str, prefix: str) -> bool:
    return target == prefix or target.startswith(prefix + ".")


def package_imports(prefix: str) -> list[tuple[str, str]]:
    """``(module, target)`` for each package import made by ``prefix`` or a module under it."""
    return [(m, t) for m, imports in GRAPH.items() if within(m, prefix)
            for t, _ in imports if t != m]


# Who may not import whom, below the server: the registry is data, the choice does not load,
# getting files (hub) knows no model names or chat, and running uvicorn knows no app.
FORBIDDEN = [
    ("helpers.models.registry", ["helpers.models.choice", "helpers.models.load", "helpers.hub",
                                 "helpers.chat"]),
    ("helpers.models.choice", ["helpers.models.load", "helpers.chat"]),
    ("helpers.models", ["helpers.chat", "helpers.background_server"]),
    ("helpers.hub", ["helpers.models", "helpers.chat"]),
    ("helpers.hardware", ["helpers.models", "helpers.hub", "helpers.chat"]),
]


@pytest.mark.parametrize(("layer", "forbidden"), FORBIDDEN, ids=[f[0] for f in FORBIDDEN])
def test_layers_below_the_server_point_one_way(layer: str, forbidden: list[str]) -> None:
    bad = [(m, t) for m, t in package_imports(layer) if any(within(t, f) for f in forbidden)]
    assert not bad, f"{layer} must not import {forbidden}: {bad}"


# Modules that may import only these from the package.
ONLY = {
    "helpers.background_server": {"helpers.config"},
    "helpers.hardware": set(),
    "helpers.models.registry": {"helpers.config"},
}


@pytest.mark.parametrize("module", sorted(ONLY))
def test_small_modules_import_only_what_they_need(module: str) -> None:
    extra = {t for _, t in package_imports(module)} - ONLY[module]
    assert not extra, f"{module} may import only {ONLY[module] or 'nothing'}, not {extra}"


def environment_reads(path: Path) -> list[str]:
    """``os.environ.get(...)``, ``os.getenv(...)`` and ``os.environ[...]`` reads in ``path``."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        func = node.func if isinstance(node, ast.Call) else None
        if isinstance(func, ast.Attribute) and (
                func.attr == "getenv" or (func.attr == "get" and isinstance(func.value, ast.Attribute)
                                          and func.value.attr == "environ")):
            found.append(f"{path.name}:{node.lineno}")
        if (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Attribute) and node.value.attr == "environ"):
            found.append(f"{path.name}:{node.lineno}")
    return found


@pytest.mark.parametrize("layer", ["hub", "models"])
def test_hub_settings_are_read_through_settings(layer: str) -> None:
    # HF_ENDPOINT, HF_HUB_OFFLINE, DHLLM_OFFLINE: one reader (helpers.config.Settings).
    reads = [r for p in sorted((ROOT / layer).rglob("*.py")) for r in environment_reads(p)]
    assert not reads, f"helpers.{layer} reads the environment directly at {reads}; use Settings"


def test_the_server_sees_only_the_chat_model_interface() -> None:
    for module, imports in GRAPH.items():
        if not module.startswith("helpers.server"):
            continue
        for target, names in imports:
            assert target not in CONCRETE_BACKENDS, f"{module} imports {target}"
            assert not names & CONCRETE_NAMES, f"{module} imports {names & CONCRETE_NAMES}"


def test_the_clients_default_url_is_the_configs() -> None:
    # The client keeps a literal (it imports nothing from the package); config is its one home.
    from helpers import client, config

    assert client.DEFAULT_URL == config.DEFAULT_URL == f"http://127.0.0.1:{config.DEFAULT_PORT}"

"""The package's layers import only downward, and no module imports itself back through others.

Every ``import`` of every module is read from its source (inside functions and ``TYPE_CHECKING`` blocks too: a
function-local import hides a cycle, it does not remove it). Only the ``if __name__ == "__main__":`` entry block of
a module is left out: it runs the CLI, it is not a dependency.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "speechprompt"

# Lowest first; a module may import its own layer and the layers below. A module's layer is that of the longest
# name here that is it or one of its packages.
LAYERS: list[tuple[str, list[str]]] = [
    ("ground", ["speechprompt", "speechprompt.errors", "speechprompt.fileio", "speechprompt.config",
                "speechprompt.devices", "speechprompt.rng", "speechprompt.lock", "speechprompt.progress",
                "speechprompt.runlog", "speechprompt.plots", "speechprompt.dictionary", "speechprompt.fairseq_compat",
                "speechprompt.kmeans_pickle",
                "speechprompt.audio"]),
    ("models", ["speechprompt.models"]),
    ("data", ["speechprompt.data_prep", "speechprompt.lm_data", "speechprompt.hubert_data", "speechprompt.checkpoint",
              "speechprompt.verbalizers"]),
    ("tuning", ["speechprompt.tuning"]),
    ("tasks", ["speechprompt.tasks"]),
    ("training", ["speechprompt.training"]),
    ("trainers", ["speechprompt.train", "speechprompt.superb", "speechprompt.pretrain",
                  "speechprompt.pretrain_hubert", "speechprompt.pretrain_hubert_config"]),
    ("applications", ["speechprompt.evaluate", "speechprompt.infer", "speechprompt.compare", "speechprompt.serving",
                      "speechprompt.score", "speechprompt.mask_analysis", "speechprompt.prune"]),
    ("cli", ["speechprompt.cli"]),
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_main_block(node: ast.AST) -> bool:
    return (isinstance(node, ast.If) and isinstance(node.test, ast.Compare)
            and isinstance(node.test.left, ast.Name) and node.test.left.id == "__name__")


def _imports(name: str, path: Path) -> set[str]:
    """The package modules ``name`` imports, anywhere in its source but its ``__main__`` block."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _is_main_block(node):
            return
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            for alias in node.names:
                sub = f"{node.module}.{alias.name}"
                found.add(sub if sub in MODULES else node.module)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {m for m in found if m in MODULES and m != name}


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _layer(module: str) -> int:
    best, index = -1, None
    for i, (_, names) in enumerate(LAYERS):
        for n in names:
            if (module == n or module.startswith(n + ".")) and len(n) > best:
                best, index = len(n), i
    if index is None:
        raise AssertionError(f"{module} is in no layer of tests/test_layers.py: add it where it belongs")
    return index


def test_every_module_has_a_layer() -> None:
    for module in MODULES:
        _layer(module)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_go_down(module: str) -> None:
    mine = _layer(module)
    upward = sorted(m for m in GRAPH[module] if _layer(m) > mine)
    assert not upward, (f"{module} ({LAYERS[mine][0]}) imports the higher layer(s): "
                        + ", ".join(f"{m} ({LAYERS[_layer(m)][0]})" for m in upward))


def test_no_import_cycle() -> None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(GRAPH[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = dfs(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for module in sorted(GRAPH):
        if module not in state:
            cycle = dfs(module)
            assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_checker_sees_function_local_imports(tmp_path: Path) -> None:
    """The parser must not miss an import hidden in a function (that is how the old cycle hid)."""
    source = tmp_path / "m.py"
    source.write_text("def f():\n    from speechprompt.cli import main\n    return main\n"
                      "if __name__ == '__main__':\n    import speechprompt.train\n")
    assert _imports("speechprompt.fake", source) == {"speechprompt.cli"}

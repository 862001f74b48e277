"""The package's import graph: no cycle, even counting imports inside functions, and the layers
of the design (section 4) only import downwards.

An import inside a function is allowed for laziness (transformers, the CUDA module) but never to
dodge a cycle: the graph below includes those imports, so a cycle hidden that way fails here.
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path

import hardneg
import pytest

PACKAGE = Path(hardneg.__file__).parent

# Layer of each top-level piece: a module may import its own layer or lower ones only.
LAYERS = {
    "_constants": 0,
    "_build_config": 0,
    "_C": 0,
    "_C_cuda": 0,
    "_ops": 1,
    "_spec": 1,
    "_gemm": 1,
    "_finite": 1,
    "reference": 1,
    "_schedule": 2,
    "distributed": 3,
    "loss": 4,
    "__init__": 5,
    "models": 6,
    "data": 6,
    "eval": 7,
    "train": 8,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Every hardneg module `path` imports, at any depth of the file (functions included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("hardneg"))
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            if not base.startswith("hardneg"):
                continue
            for a in node.names:  # `from hardneg import loss` imports the module hardneg.loss
                out.add(f"{base}.{a.name}" if _is_module(f"{base}.{a.name}") else base)
    out.discard(name)
    return out


# Built by CMake, possibly absent (a build without CUDA has no _C_cuda): modules all the same.
COMPILED = {"hardneg._C", "hardneg._C_cuda", "hardneg._build_config"}


def _is_module(dotted: str) -> bool:
    """A module or package (compiled ones included), not a name defined in one."""
    if dotted in COMPILED:
        return True
    try:
        return importlib.util.find_spec(dotted) is not None
    except ModuleNotFoundError:
        return False


def _graph() -> dict[str, set[str]]:
    return {_module_name(p): _imports(p) for p in PACKAGE.rglob("*.py")}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def test_no_import_cycle_even_through_function_level_imports():
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_detection_can_fail():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_every_module_has_a_layer_and_imports_only_downwards():
    for module, deps in _graph().items():
        for dep in deps:
            assert _layer(dep) <= _layer(module), f"{module} (layer {_layer(module)}) imports {dep}"


@pytest.mark.parametrize("module", ["hardneg._spec", "hardneg._schedule"])
def test_the_bottom_layers_import_no_loss_or_distributed_code(module):
    deps = _graph()[module]
    assert not {d for d in deps if d.startswith(("hardneg.loss", "hardneg.distributed"))}

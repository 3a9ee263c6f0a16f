"""`lm.registry`: name -> class registries, and the import graph they let `lm` keep free of cycles."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import lm
from lm.registry import ATTENTION, FEEDFORWARD, NORMS, POSITIONS, Registry, RegistryError
from lm.tokenizers import TOKENIZERS

PACKAGE = Path(lm.__file__).resolve().parent


# ---- Registry ------------------------------------------------------------------------------------
def test_register_get_names_and_contains():
    colours = Registry("colour")

    @colours.register("red")
    class Red:
        pass

    @colours.register("blue")
    class Blue:
        pass

    assert colours.get("red") is Red and colours.get("blue") is Blue
    assert colours.names() == ["blue", "red"]  # sorted, whatever the order of registration
    assert "red" in colours and "green" not in colours
    assert repr(colours) == "Registry('colour': ['blue', 'red'])"


def test_one_class_under_two_names():
    registry = Registry("thing")

    @registry.register("a")
    @registry.register("b")
    class Thing:
        pass

    assert registry.get("a") is registry.get("b") is Thing


def test_unknown_name_lists_the_known_ones():
    registry = Registry("colour")
    registry.register("red")(object)
    with pytest.raises(RegistryError, match=r"unknown colour 'green'; known: red\."):
        registry.get("green")
    assert issubclass(RegistryError, ValueError)


def test_a_name_registered_twice_is_refused():
    registry = Registry("colour")
    registry.register("red")(int)
    with pytest.raises(RegistryError, match="'red' is registered twice"):
        registry.register("red")(str)
    assert registry.get("red") is int


def test_importing_lm_fills_every_registry():
    assert POSITIONS.names() == ["learned", "none", "rope", "sinusoidal"]
    assert NORMS.names() == ["layernorm", "rmsnorm", "scalenorm"]
    assert FEEDFORWARD.names() == ["gelu", "gelu_tanh", "moe", "swiglu"]
    assert ATTENTION.names() == ["block_sparse", "linear", "manual", "sdpa", "sliding_window"]
    assert lm.ATTENTION is ATTENTION and lm.Registry is Registry


def test_tokenizers_use_the_same_registry_class():
    assert isinstance(TOKENIZERS, Registry)
    assert TOKENIZERS.names() == ["bpe", "char", "sentencepiece", "tiktoken"]
    for name in TOKENIZERS.names():  # the name each kind stores in to_dict() finds it again
        assert TOKENIZERS.get(name).kind == name


def test_config_choices_are_the_registered_names():
    choices = lm.ModelConfig.component_choices()
    assert choices["pos"] == POSITIONS.names() and choices["norm"] == NORMS.names()
    assert choices["attention"] == ATTENTION.names() and choices["ffn"] == FEEDFORWARD.names()


# ---- no import cycles ----------------------------------------------------------------------------
def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_type_checking_block(node: ast.AST) -> bool:
    """`if TYPE_CHECKING:` (or `typing.TYPE_CHECKING`): imports that never run."""
    if not isinstance(node, ast.If):
        return False
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def import_nodes(tree: ast.AST):
    """Every import statement, at module level or inside functions, except type-checking ones."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif not is_type_checking_block(node):
            stack.extend(ast.iter_child_nodes(node))


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """The modules of `lm` that the file at `path` imports."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets = set()
    for node in import_nodes(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            targets.update(alias.name for alias in node.names if alias.name in modules)
            continue
        if node.level:  # relative: one dot is this package, each further dot goes one up
            base = package.split(".")
            base = ".".join(base[: len(base) - node.level + 1])
            source = f"{base}.{node.module}" if node.module else base
        else:
            source = node.module or ""
        for alias in node.names:
            submodule = f"{source}.{alias.name}"
            if submodule in modules:  # `from . import attention` imports the module itself
                targets.add(submodule)
            elif source in modules:
                targets.add(source)
    targets.discard(name)
    return targets


def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imports_of(p, modules) for p in paths}


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """One cycle (a list of modules, first == last) per strongly connected component that has one."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[list[str]] = []

    def connect(v: str) -> None:  # Tarjan's algorithm
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                connect(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                components.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            connect(v)

    return [shortest_cycle_through(c[0], graph, set(c)) for c in components]


def shortest_cycle_through(start: str, graph: dict[str, set[str]], members: set[str]) -> list[str]:
    """Breadth-first from `start` inside its component until an edge leads back to it."""
    parent = {start: None}
    frontier = [start]
    while frontier:
        following = []
        for v in frontier:
            if start in graph[v]:
                path = [v]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1] + [start]
            for w in sorted(graph[v] & members):
                if w not in parent:
                    parent[w] = v
                    following.append(w)
        frontier = following
    raise AssertionError(f"{start} is in no cycle")  # cannot happen inside a component


def test_find_cycles_on_small_graphs():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": set()}) == []
    assert find_cycles({"a": {"b"}, "b": {"a"}}) == [["a", "b", "a"]]
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set()}) == [["a", "b", "c", "a"]]


def test_the_import_graph_sees_relative_and_function_level_imports():
    graph = import_graph()
    assert graph["lm.config"] == {"lm.registry"}  # config is plain data
    assert "lm.config" in graph["lm.presets"] and "lm.registry" in graph["lm.presets"]
    assert {"lm.tokenizers.base", "lm.tokenizers.bpe"} <= graph["lm.tokenizers"]
    assert "lm.registry" in graph["lm.tokenizers.base"]  # `from ..registry import Registry`


def test_lm_has_no_import_cycle():
    cycles = find_cycles(import_graph())
    assert cycles == [], "import cycles in lm: " + "; ".join(" -> ".join(c) for c in cycles)

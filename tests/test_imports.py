"""The package's import structure (issue 19): `import llama` and `import llama.model` stay light, and the modules
form layers that import only downward, with no import circle, not even through imports inside functions."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest
from helpers import REPO

PACKAGE = REPO / "llama"

# The layers, bottom to top (README, "Where each concern lives"). A module imports only from its own layer or
# below. An entry names a module or a package; a package's entry covers its submodules, except the root `llama`.
LAYERS = {
    0: ["llama.checks", "llama.distributed", "llama.kernels", "llama.tokenizer", "llama.chat_format",
        "llama.demo"],  # llama.demo: the shipped demo model's paths; it imports nothing
    1: ["llama.model"],
    2: ["llama.quant"],
    3: ["llama.weights", "llama.families"],
    4: ["llama.engine", "llama.hf"],
    5: ["llama.generation", "llama.loader", "llama.interactive", "llama.cli", "llama.commandline",
        "llama.quantize", "llama.reshard", "llama.convert", "llama.serve", "llama.eval",
        "llama"],  # the package itself: its public names load their modules on first use
}  # fmt: skip

# What a bare `import llama` or `import llama.model` must not load: the tokenizers' libraries, the process-group
# code and the generation stack.
HEAVY = ["tiktoken", "sentencepiece", "llama.distributed", "llama.generation", "llama.tokenizer"]


# ---------------------------------------------------------------- a fresh interpreter


def modules_after(code: str) -> set[str]:
    """The names in sys.modules of a fresh interpreter that has run code."""
    script = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return set(json.loads(proc.stdout.splitlines()[-1]))


@pytest.mark.parametrize("code", ["import llama", "import llama.model", "import llama.model; llama.model.Transformer"])
def test_importing_the_package_or_the_model_loads_nothing_heavy(code):
    loaded = modules_after(code)
    heavy = sorted(m for m in loaded if any(m == h or m.startswith(h + ".") for h in HEAVY))
    assert not heavy, f"{code!r} loaded {heavy}"


# The command lines and the engine need no tokenizer library until a tokenizer is opened: `python -m
# llama.quantize --help` or a bad flag must not pay for loading tiktoken and sentencepiece.
TOKENIZER_LIBRARIES = ["tiktoken", "sentencepiece"]


@pytest.mark.parametrize("module", ["llama.quantize", "llama.reshard", "llama.engine.loop", "llama.weights.quantized"])
def test_tools_and_engine_load_no_tokenizer_library_until_one_is_opened(module):
    loaded = modules_after(f"import {module}")
    assert not [m for m in TOKENIZER_LIBRARIES if m in loaded], f"import {module} loaded a tokenizer library"


def test_the_public_names_still_load_from_the_package():
    code = (
        "import llama\n"
        "from llama import Llama\n"
        "assert callable(Llama.build) and llama.Llama is Llama\n"
        "for name in llama.__all__:\n"
        "    getattr(llama, name)\n"
    )
    assert "llama.generation" in modules_after(code)


# ---------------------------------------------------------------- the import graph, read from the sources


@dataclass(frozen=True)
class Import:
    """Module `source` imports module `target` at `line` of its file."""

    source: str
    target: str
    line: int

    def __str__(self) -> str:
        return f"{self.source} -> {self.target} (line {self.line})"


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_modules() -> dict[str, Path]:
    """Every module of the llama package, by dotted name, with its file."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py")) if "__pycache__" not in p.parts}


def is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def is_import_module_call(node: ast.AST) -> bool:
    """importlib.import_module("llama.x") with a literal name: an import all the same."""
    if not isinstance(node, ast.Call) or not node.args or not isinstance(node.args[0], ast.Constant):
        return False
    func = node.func
    return (func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)) == "import_module"


def import_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every import of tree, inside functions too, but not in the body of `if TYPE_CHECKING:` (never run)."""
    found, todo = [], [tree]
    while todo:
        node = todo.pop()
        if isinstance(node, ast.If) and is_type_checking(node.test):
            todo.extend(node.orelse)
            continue
        if isinstance(node, (ast.Import, ast.ImportFrom)) or is_import_module_call(node):
            found.append(node)
        todo.extend(ast.iter_child_nodes(node))
    return sorted(found, key=lambda n: (n.lineno, n.col_offset))


def lazy_exports(tree: ast.AST) -> tuple[dict[str, str], int]:
    """A package __init__'s `_EXPORTS = {name: module}` table (PEP 562 lazy names) and its line, or ({}, 0)."""
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "_EXPORTS" for t in node.targets):
            return ast.literal_eval(node.value), node.lineno
    return {}, 0


def imports_of(
    name: str, source: str, is_package: bool, modules: set[str], exports: dict[str, dict[str, str]]
) -> list[Import]:
    """The llama modules that module `name` (its source; a package's __init__ if is_package) imports, by line.

    `from P import X` imports module P.X where X is a submodule, the module that P's _EXPORTS table names where X
    is a lazily exported name, and P otherwise. A package imports the modules of its own _EXPORTS table.
    """
    tree = ast.parse(source)
    table, table_line = lazy_exports(tree)
    found = [Import(name, target, table_line) for target in sorted(set(table.values()))]
    for node in import_nodes(tree):
        if isinstance(node, ast.Call):
            targets = [node.args[0].value]
        elif isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:  # relative: counted from the package that holds this module
                package = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            targets = []
            for alias in node.names:
                if f"{base}.{alias.name}" in modules:
                    targets.append(f"{base}.{alias.name}")
                else:
                    targets.append(exports.get(base, {}).get(alias.name, base))
        found += [Import(name, t, node.lineno) for t in targets if t == "llama" or t.startswith("llama.")]
    return list(dict.fromkeys(found))  # `from P import a, b` is one import of P


def import_graph() -> tuple[set[str], list[Import]]:
    """The modules of the llama package and every import between them."""
    files = package_modules()
    sources = {name: path.read_text() for name, path in files.items()}
    exports = {name: lazy_exports(ast.parse(source))[0] for name, source in sources.items()}
    edges = []
    for name, source in sources.items():
        edges += imports_of(name, source, files[name].name == "__init__.py", set(files), exports)
    return set(files), edges


def layer_of(module: str) -> Optional[int]:
    """The layer of the longest LAYERS entry that names module or a package holding it; None if none does."""
    best = None
    for layer, entries in LAYERS.items():
        for entry in entries:
            holds = module == entry or (entry != "llama" and module.startswith(entry + "."))
            if holds and (best is None or len(entry) > len(best[1])):
                best = (layer, entry)
    return None if best is None else best[0]


def find_cycles(edges: list[Import]) -> list[tuple[list[str], list[Import]]]:
    """Each group of modules that import each other, through any chain (a strongly connected component, Tarjan's
    algorithm), with one shortest import circle in it."""
    graph: dict[str, list[Import]] = {}
    for e in edges:
        graph.setdefault(e.source, []).append(e)
    index, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for e in graph.get(v, []):
            if e.target not in index:
                visit(e.target)
                low[v] = min(low[v], low[e.target])
            elif e.target in on_stack:
                low[v] = min(low[v], index[e.target])
        if low[v] == index[v]:
            group = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.add(w)
                if w == v:
                    break
            if len(group) > 1 or any(e.target == v for e in graph.get(v, [])):
                groups.append(group)

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [(sorted(group), cycle_in(group, graph)) for group in groups]


def cycle_in(group: set[str], graph: dict[str, list[Import]]) -> list[Import]:
    """A shortest circle of imports through the first module of group, staying inside group."""
    start = min(group)
    paths = {start: []}
    frontier = [start]
    while frontier:
        nxt = []
        for v in frontier:
            for e in graph.get(v, []):
                if e.target == start:
                    return paths[v] + [e]
                if e.target in group and e.target not in paths:
                    paths[e.target] = paths[v] + [e]
                    nxt.append(e.target)
        frontier = nxt
    raise AssertionError(f"no circle through {start} in {sorted(group)}")


@pytest.fixture(scope="module")
def graph() -> tuple[set[str], list[Import]]:
    return import_graph()


def test_the_import_graph_is_read(graph):
    # A reader that finds nothing would pass the tests below: check what we know is there.
    modules, edges = graph
    assert {"llama", "llama.model", "llama.model.transformer", "llama.generation"} <= set(modules)
    assert any(e.source == "llama.model.transformer" and e.target == "llama.model.args" for e in edges)
    assert any(e.source == "llama" and e.target == "llama.generation" for e in edges)  # its lazy `Llama`


def test_the_reader_counts_imports_in_functions_and_lazy_names_but_not_type_checking_ones():
    source = (
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from llama.generation import Llama\n"
        "else:\n"
        "    import llama.model\n"
        "from llama import Llama, weights\n"
        "from . import layout\n"
        "def f():\n"
        "    from llama.weights.checkpoint import load_shard\n"
        "    return importlib.import_module('llama.quant')\n"
    )
    modules = {"llama", "llama.model", "llama.weights", "llama.weights.layout", "llama.weights.checkpoint"}
    exports = {"llama": {"Llama": "llama.generation"}}
    found = imports_of("llama.weights.x", source, False, modules, exports)
    assert [(i.target, i.line) for i in found] == [
        ("llama.model", 5), ("llama.generation", 6), ("llama.weights", 6), ("llama.weights.layout", 7),
        ("llama.weights.checkpoint", 9), ("llama.quant", 10),
    ]  # fmt: skip


def test_circles_and_climbs_are_found():
    edges = [Import("llama.a", "llama.b", 1), Import("llama.b", "llama.c", 2), Import("llama.c", "llama.a", 3),
             Import("llama.c", "llama.d", 4), Import("llama.d", "llama.d", 5)]  # fmt: skip
    cycles = sorted(find_cycles(edges), key=lambda found: len(found[0]))
    assert [(group, [str(e) for e in cycle]) for group, cycle in cycles] == [
        (["llama.d"], ["llama.d -> llama.d (line 5)"]),
        (["llama.a", "llama.b", "llama.c"],
         ["llama.a -> llama.b (line 1)", "llama.b -> llama.c (line 2)", "llama.c -> llama.a (line 3)"]),
    ]  # fmt: skip
    assert layer_of("llama.model.kv_cache") == 1 and layer_of("llama.quantize") == 5 and layer_of("llama.quant") == 2
    assert layer_of("llama.nowhere") is None


def test_every_module_has_a_layer(graph):
    modules, _ = graph
    unplaced = sorted(m for m in modules if layer_of(m) is None)
    assert not unplaced, (
        f"modules in no layer: {unplaced}. Place each in LAYERS in tests/test_imports.py (and in the README's "
        "'Where each concern lives'): the lowest layer whose modules are all it needs."
    )


def test_no_import_circles(graph):
    _, edges = graph
    cycles = find_cycles(edges)
    report = ""
    for group, cycle in cycles:  # the modules that import each other, one circle, then every import among them
        inside = [e for e in edges if e.source in group and e.target in group]
        report += f"  {', '.join(group)}: e.g. {'; '.join(str(e) for e in cycle)}\n"
        report += "".join(f"    {e}\n" for e in sorted(inside, key=lambda e: (e.source, e.line)))
    assert not cycles, f"import circles (imports inside functions count):\n{report}"


def test_modules_import_only_their_own_layer_or_below(graph):
    _, edges = graph
    upward = [
        e for e in edges
        if layer_of(e.source) is not None and layer_of(e.target) is not None and layer_of(e.target) > layer_of(e.source)
    ]  # fmt: skip
    report = "\n".join(
        f"  {e.source} (layer {layer_of(e.source)}) -> {e.target} (layer {layer_of(e.target)}), line {e.line}"
        for e in sorted(upward, key=lambda e: (e.source, e.line))
    )
    assert not upward, f"imports that climb a layer:\n{report}"


def test_imports_name_modules_that_exist(graph):
    modules, edges = graph
    missing = [e for e in edges if e.target not in modules]
    assert not missing, "imports of llama modules that do not exist:\n" + "\n".join(f"  {e}" for e in missing)


def test_test_modules_import_no_other_test_module():
    # Shared helpers live in tests/helpers.py and fixtures in tests/conftest.py; a test module imported by another
    # runs its module code (and collects its tests' fixtures) a second time, under a second name.
    offending = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in import_nodes(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [getattr(node, "module", "")]
            for name in names:
                if name and (name.split(".")[0] in ("conftest", "tests") or name.startswith("test_")):
                    offending.append(f"{path.name}:{node.lineno} imports {name}")
    assert not offending, "\n".join(offending)

"""The package's shape, read from the source with `ast` (no TensorFlow): no import cycle,
the layers point one way, no module too long to read, every compiled function traced
without AutoGraph.

Layers, lowest first: the top-level modules; `network`; `zoo` and `defenses`, which never
import each other; `experiment`. A module may import its own layer or any lower one.
Imports inside functions count: they are dependencies all the same.
"""

import ast
from pathlib import Path

PACKAGE = "badnet_repair"
SRC = Path(__file__).resolve().parents[1] / "src"
TOP_LEVEL = {
    "__init__",
    "console",
    "files",
    "plots",
    "ranges",
    "registry",
    "journal",
    "data",
    "augment",
}
RANK = {"top-level": 0, "network": 1, "zoo": 2, "defenses": 2, "experiment": 3}
MAX_LINES = 350


def module_name(path: Path) -> str:
    parts = list(path.relative_to(SRC).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name (a package by its own name)."""
    return {module_name(p): p for p in sorted((SRC / PACKAGE).rglob("*.py"))}


def imported(source: str, name: str, is_package: bool, known: set[str]) -> set[str]:
    """The package's modules that `source` (module `name`) imports: `import a.b`,
    `from a import b` (b a module, or a name in a), relative forms included."""
    package = name if is_package else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                origin = ".".join(base + ([node.module] if node.module else []))
            else:
                origin = node.module or ""
            targets = [
                f"{origin}.{alias.name}" if f"{origin}.{alias.name}" in known else origin
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in known:  # `import a.b.c` of a name in a.b
                target = target.rpartition(".")[0]
            if target:
                found.add(target)
    found.discard(name)
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: imported(path.read_text(), name, path.name == "__init__.py", set(known))
        for name, path in known.items()
    }


def layer(module: str) -> str:
    parts = module.split(".")
    if len(parts) == 1 or (len(parts) == 2 and parts[1] in TOP_LEVEL):
        return "top-level"
    if parts[1] not in RANK:
        raise AssertionError(f"{module}: in no layer; add it to TOP_LEVEL or RANK in this test")
    return parts[1]


def cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """An import cycle, as the modules along it, or None."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == "open":
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        state[node] = "done"
        path.pop()
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)):
            return found
    return None


def wrong_way(edges: dict[str, set[str]]) -> list[str]:
    """Every import that points up a layer or across between zoo and defenses."""
    bad = []
    for source, targets in sorted(edges.items()):
        for target in sorted(targets):
            a, b = layer(source), layer(target)
            if a != b and RANK[b] >= RANK[a]:
                bad.append(f"{source} ({a}) imports {target} ({b})")
    return bad


def test_the_import_reader_resolves_every_form():
    known = {
        "badnet_repair",
        "badnet_repair.data",
        "badnet_repair.network",
        "badnet_repair.network.models",
        "badnet_repair.defenses",
        "badnet_repair.defenses.goodnet",
        "badnet_repair.zoo",
        "badnet_repair.zoo.builds",
    }
    source = "\n".join(
        [
            "import os",
            "from badnet_repair import UserError",
            "from badnet_repair.network import models",
            "import badnet_repair.zoo.builds as demo",
            "from ..data import Dataset",
            "def late():",
            "    from . import goodnet",
        ]
    )
    found = imported(source, "badnet_repair.defenses.clean", False, known)
    assert found == {
        "badnet_repair",
        "badnet_repair.network.models",
        "badnet_repair.zoo.builds",
        "badnet_repair.data",
        "badnet_repair.defenses.goodnet",
    }
    from_package = imported("from .models import x", "badnet_repair.network", True, known)
    assert from_package == {"badnet_repair.network.models"}


def test_the_checks_find_a_cycle_and_an_upward_import():
    assert cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    edges = {
        "badnet_repair.network.models": {"badnet_repair.experiment.config"},
        "badnet_repair.zoo.builds": {"badnet_repair.defenses.goodnet"},
        "badnet_repair.experiment.pipeline": {"badnet_repair.zoo.builds", "badnet_repair.data"},
    }
    assert wrong_way(edges) == [
        "badnet_repair.network.models (network) imports badnet_repair.experiment.config "
        "(experiment)",
        "badnet_repair.zoo.builds (zoo) imports badnet_repair.defenses.goodnet (defenses)",
    ]


def test_the_package_is_read_whole():
    edges = graph()
    assert len(edges) >= 40
    assert "badnet_repair.defenses.repairs" in edges["badnet_repair.experiment.pipeline"]
    assert "badnet_repair.network.pruning" in edges["badnet_repair.defenses.repairs"]  # late


def test_no_import_cycle():
    found = cycle(graph())
    assert found is None, "import cycle: " + " -> ".join(found)


def test_imports_point_down_the_layers():
    edges = graph()
    assert {layer(m) for m in edges} == set(RANK)
    bad = wrong_way(edges)
    assert not bad, "imports against the layers:\n" + "\n".join(bad)


def test_no_module_is_longer_than_the_limit():
    lengths = {name: len(path.read_text().splitlines()) for name, path in modules().items()}
    assert max(lengths.values()) > MAX_LINES / 2  # the files were read
    long = [f"{name}: {n} lines" for name, n in sorted(lengths.items()) if n > MAX_LINES]
    assert not long, f"over {MAX_LINES} lines: " + ", ".join(long)


def compiled_functions(source: str) -> dict[int, bool]:
    """Every mention of `tf.function` in `source` by line: whether it is called with
    `autograph=False` (a bare decorator, an alias or a partial is not). An import of
    TensorFlow's `function` by another name counts as a mention without it."""
    tree = ast.parse(source)
    calls = {
        id(node.func): node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and ast.unparse(node.func) == "tf.function"
    }
    found = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and ast.unparse(node) == "tf.function":
            call = calls.get(id(node))
            keywords = {k.arg: ast.unparse(k.value) for k in call.keywords} if call else {}
            found[node.lineno] = keywords.get("autograph") == "False"
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("tensorflow"):
            if any(alias.name == "function" for alias in node.names):
                found[node.lineno] = False
    return found


def test_every_compiled_function_is_traced_without_autograph():
    """AutoGraph rewrites a function's source (and every Keras layer it calls) before
    tracing: about 3 s of a small demo run's 33 here (2026-12-05), for steps whose Python
    control flow is all over Python values; a loop over tensors is a `tf.while_loop`.
    Without AutoGraph such a loop fails loudly when traced."""
    found = {
        f"{name}:{line}": ok
        for name, path in modules().items()
        for line, ok in compiled_functions(path.read_text()).items()
    }
    assert len(found) >= 15  # the sources were read
    forms = (
        "@tf.function\ndef f(): pass\ng = tf.function\nh = partial(tf.function, autograph=False)"
    )
    assert compiled_functions(forms) == {1: False, 3: False, 4: False}
    assert compiled_functions("from tensorflow import function") == {1: False}
    assert compiled_functions("f = tf.function(g, autograph=False)") == {1: True}
    missing = [place for place, ok in found.items() if not ok]
    assert not missing, "tf.function without autograph=False: " + ", ".join(missing)

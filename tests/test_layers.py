"""The package's dependencies point one way, and no module imports itself back through others.

Layers, lowest first: modeling, losses -> data -> objective, eval, curate -> training -> hub -> cli. A module
may import its own package and lower layers only: not a higher layer, and not a sibling of its own layer
(objective, eval and curate stand side by side). The graph is built from the source with ``ast`` and counts
every import, including those inside functions, since a lazy import is a dependency all the same.
"""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "src" / "dinov2_hf"
LAYERS = [{"config_utils", "modeling", "losses"}, {"data"}, {"objective", "eval", "curate"}, {"training"}, {"hub"}, {"cli"}]
LAYER = {part: level for level, parts in enumerate(LAYERS) for part in parts}


def module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str], root: Path = PACKAGE) -> set[str]:
    """The package's modules that ``path`` imports (``from . import x`` resolved to ``pkg.x`` when it is a module)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # ``from pkg import module`` depends on that module; ``from module import name`` on the module
            targets = [f"{source}.{alias.name}" if f"{source}.{alias.name}" in modules else source for alias in node.names]
        else:
            continue
        for target in targets:
            if target.startswith("dinov2_hf"):
                while target not in modules and "." in target:
                    target = target.rsplit(".", 1)[0]
                if target in modules and target != name:
                    found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    """Module -> the package modules it imports, for every module under ``root``."""
    paths = list(root.rglob("*.py"))
    modules = {module_name(p, root) for p in paths}
    return {module_name(p, root): imported_modules(p, modules, root) for p in paths}


def part_of(module: str) -> str | None:
    """The top-level part of the package a module belongs to (None for the package root)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def wrong_way_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports from one part of the package into a higher layer or a sibling of the same layer."""
    wrong = []
    for module, imports in graph.items():
        here = part_of(module)
        for target in imports:
            there = part_of(target)
            if here is None or there is None or here == there:
                continue  # the package root (public API), or within one part
            if LAYER[there] >= LAYER[here]:
                wrong.append(f"{module} -> {target}")
    return sorted(wrong)


def import_cycles(graph: dict[str, set[str]]) -> list[str]:
    """One line per cycle found by a depth-first search (each back edge closes one)."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    cycles = []

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        path = path + [module]
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append(" -> ".join(path[path.index(target) :] + [target]))
            elif target not in state:
                visit(target, path)
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [])
    return cycles


def test_the_checks_catch_an_upward_import_and_a_cycle(tmp_path):
    root = tmp_path / "dinov2_hf"
    files = {
        "__init__.py": "",
        "data/__init__.py": "",
        "data/collate.py": "from ..objective.masking import mask\n",  # data -> objective: upward
        "objective/__init__.py": "",
        "objective/masking.py": "def mask():\n    from .heads import head\n",  # lazy, still a dependency
        "objective/heads.py": "from . import masking\n",
        "eval/knn.py": "from dinov2_hf.curate import dedup\n",  # sideways
        "curate/dedup.py": "",
    }
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    graph = import_graph(root)
    assert wrong_way_imports(graph) == [
        "dinov2_hf.data.collate -> dinov2_hf.objective.masking", "dinov2_hf.eval.knn -> dinov2_hf.curate.dedup"
    ]
    assert import_cycles(graph) == ["dinov2_hf.objective.masking -> dinov2_hf.objective.heads -> dinov2_hf.objective.masking"]


def test_every_part_of_the_package_has_a_layer():
    graph = import_graph()
    assert "dinov2_hf.objective.distill" in graph["dinov2_hf.training.build"]  # the graph is read
    assert sorted({part_of(m) for m in graph} - set(LAYER) - {None}) == []


def test_imports_point_down():
    wrong = wrong_way_imports(import_graph())
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_no_import_cycles():
    cycles = import_cycles(import_graph())
    assert not cycles, "import cycles:\n" + "\n".join(cycles)

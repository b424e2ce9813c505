"""The repository's shape: scripts and the core at the root, the machinery in `dinokit/`, imports
running one way (scripts -> root modules -> the package), never into a script, never in a cycle."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = "dinokit"

# The root's modules, written once: the commands, and the core they are built around.
SCRIPTS = {
    "train",
    "evaluate",
    "classify",
    "infer_image",
    "infer_video",
    "prepare_voc",
    "bench",
    "make_sample_data",
    "export",
    "app",
    "visualize_features",
    "retrieve",
}
CORE = {
    "config",
    "model_config",
    "datasets",
    "engine",
    "model",
    "metrics",
    "utils",
    "checkpoint",
    "inference",
    "evaluation",
    "cli",
}
PURE_DATA = {"config", "model_config"}  # the only root modules the package may read
HANDFUL = 5  # core modules beyond the design's named ones
FOUNDATION = (
    "errors.py",
    "writing.py",
)  # the package's two rules, under every folder: how a mistake is reported, how a file is written


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def source_files() -> list[Path]:
    return sorted(ROOT.glob("*.py")) + sorted((ROOT / PACKAGE).rglob("*.py"))


def imports() -> dict[str, set[str]]:
    """Module -> the repository modules it imports (anywhere in the file, function bodies included)."""
    modules = {module_name(path) for path in source_files()}
    graph = {}
    for path in source_files():
        name = module_name(path)
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module)
                imported |= {f"{node.module}.{alias.name}" for alias in node.names}  # from package import module
        graph[name] = {module for module in imported if module in modules} - {name, PACKAGE}
    return graph


def test_the_root_holds_the_scripts_and_the_core_and_nothing_else():
    assert {path.stem for path in ROOT.glob("*.py")} == SCRIPTS | CORE
    named = {"config", "model_config", "datasets", "engine", "model", "metrics", "utils"}
    assert len(CORE - named) <= HANDFUL


def test_the_package_imports_no_root_module_but_pure_data():
    offenders = {
        name: sorted(imported - PURE_DATA)
        for name, imported in imports().items()
        if name.startswith(PACKAGE) and imported - PURE_DATA - {m for m in imported if m.startswith(PACKAGE)}
    }
    assert offenders == {}


def test_no_module_imports_a_script():
    offenders = {name: sorted(imported & SCRIPTS) for name, imported in imports().items() if imported & SCRIPTS}
    assert offenders == {}


def test_the_package_is_grouped_in_folders():
    loose = [path.name for path in (ROOT / PACKAGE).glob("*.py") if path.name not in ("__init__.py", *FOUNDATION)]
    assert loose == []


def test_no_import_cycle_between_modules():
    assert_acyclic(imports())


def test_no_import_cycle_between_the_package_folders():
    """dinokit's folders are layers too: data below backbones, depth and prediction, below runs, training,
    classification."""
    folder = lambda name: ".".join(name.split(".")[:2])  # noqa: E731
    graph: dict[str, set[str]] = {}
    for name, imported in imports().items():
        if name.startswith(PACKAGE + "."):
            graph.setdefault(folder(name), set()).update(folder(m) for m in imported if m.startswith(PACKAGE + "."))
    assert_acyclic({name: children - {name} for name, children in graph.items()})


def assert_acyclic(graph: dict[str, set[str]]) -> None:
    state: dict[str, str] = {}

    def visit(name, path):
        state[name] = "open"
        for child in sorted(graph[name]):
            assert state.get(child) != "open", " -> ".join(path + [child])
            if child not in state:
                visit(child, path + [child])
        state[name] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])

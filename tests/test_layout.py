"""The repository's shape: scripts and the core at the root, the machinery in `dinokit/`, a task in
one folder of `dinokit/tasks/`, imports running one way down `LAYERS`, never into a script, never
in a cycle."""

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
    "pretrain",
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
PURE_DATA = {"config", "model_config"}  # the only root modules the package's machinery may read
TASKS = PACKAGE + ".tasks"
# Imports run one way: a module imports modules of its own layer or of the layers above it in this list.
LAYERS = (
    ("pure data", lambda name: name in PURE_DATA),
    ("the package's machinery", lambda name: name.startswith(PACKAGE) and not name.startswith(TASKS)),
    ("the core below the tasks", lambda name: name in {"utils", "metrics", "datasets", "model"}),
    ("the tasks", lambda name: name.startswith(TASKS)),
    ("the core that serves every task", lambda name: name in CORE),
    ("the scripts", lambda name: name in SCRIPTS),
)
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


def layer(name: str) -> int:
    return next(index for index, (_, holds) in enumerate(LAYERS) if holds(name))


def test_imports_run_one_way_down_the_layers():
    """The machinery reads no root module but pure data; the tasks build on the core below them
    (model, datasets, metrics) and are served by the core above (the loop, checkpoints, prediction,
    evaluation), which never reaches back down into them by name."""
    offenders = {
        name: sorted(module for module in imported if layer(module) > layer(name))
        for name, imported in imports().items()
        if any(layer(module) > layer(name) for module in imported)
    }
    assert offenders == {}


def test_every_module_has_a_layer():
    assert all(isinstance(layer(name), int) for name in imports())


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

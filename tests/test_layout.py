"""The repository's shape: modules import downwards only, never a script, never in a cycle."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = {"train", "evaluate", "classify", "infer_image", "infer_video", "prepare_voc", "bench", "make_sample_data", "export", "app", "visualize_features"}


def repo_imports() -> dict[str, set[str]]:
    """Top-level module -> the repository modules it imports (anywhere in the file)."""
    modules = {path.stem for path in ROOT.glob("*.py")}
    graph = {}
    for name in modules:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                imported.add(node.module.split(".")[0])
        graph[name] = imported & modules - {name}
    return graph


def test_no_module_imports_a_script():
    offenders = {name: sorted(imports & SCRIPTS) for name, imports in repo_imports().items() if imports & SCRIPTS}
    assert offenders == {}


def test_no_import_cycle():
    graph = repo_imports()
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

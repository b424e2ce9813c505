"""A newcomer's first hour: `make demo`, then every command of the README's "After `make demo`"
block as written, in order, and the visualize notebook with its own parameters, in a clean copy
of the repository (offline: the demo on a random-init backbone through DEMO_FLAGS, which the
README's commands read too)."""

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT

pytestmark = pytest.mark.slow

OFFLINE_DEMO = "--source timm --no-pretrained"


def readme_commands(heading: str = "## After `make demo`") -> list[str]:
    """The commands of the first bash block under `heading`, without their trailing comments."""
    text = (ROOT / "README.md").read_text()
    section = text[text.index(heading) :]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def clean_copy(target: Path) -> Path:
    """The repository's files as a clone has them (tracked and new, not ignored), modification
    times kept (make's stamps in the venv stay newer than the requirements files)."""
    listed = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in listed:
        if (ROOT / name).is_file():
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, target / name)
    return target


def test_the_commands_after_make_demo_run_as_written(tmp_path):
    commands = readme_commands()
    assert commands[0].startswith("python infer_image.py") and commands[-1].startswith("python app.py")
    repo = clean_copy(tmp_path / "repo")
    venv = Path(sys.executable).parents[1]
    env = {**os.environ, "DEMO_FLAGS": OFFLINE_DEMO, "PATH": f"{venv / 'bin'}{os.pathsep}{os.environ['PATH']}"}

    def run(command: str) -> subprocess.CompletedProcess:
        result = subprocess.run(["bash", "-c", command], cwd=repo, env=env, capture_output=True, text=True, timeout=900)
        assert result.returncode == 0, f"{command}\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
        return result

    run(f"make demo VENV={venv}")
    assert (repo / "outputs" / "demo" / "best_model_iou.pth").is_file()
    assert (repo / "input" / "sample_clip.mp4").is_file()
    for command in commands[:-1]:
        run(command)
    outputs = repo / "outputs"
    assert len(list((outputs / "inference_results_image").glob("*"))) >= 8
    assert (outputs / "inference_results_video" / "sample_clip.mp4").is_file()
    assert len(list((outputs / "demo").glob("eval_*.json"))) == 2  # the checkpoint and its ONNX export
    assert (outputs / "retrieval" / "demo_results" / "search.csv").is_file()

    server = subprocess.Popen(["bash", "-c", commands[-1]], cwd=repo, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        line = ""
        while "Running on local URL" not in line:
            assert server.poll() is None and time.monotonic() < deadline, "the demo page did not start"
            line = server.stdout.readline()
    finally:
        server.send_signal(signal.SIGINT)
        server.wait(timeout=60)

    nbformat = pytest.importorskip("nbformat")
    from nbclient import NotebookClient

    notebook = nbformat.read(repo / "notebooks" / "visualize.ipynb", as_version=4)  # its own parameters
    NotebookClient(
        notebook, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(repo / "notebooks")}}
    ).execute()
    outputs = [o for c in notebook.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    assert not [o for o in outputs if o.output_type == "error"]
    warnings = [o["text"][:300] for o in outputs if o.get("name") == "stderr"]
    assert not warnings, warnings  # no progress-bar or library warnings in the page
    assert sum("image/png" in o.get("data", {}) for o in outputs) == 4  # samples, curves, predictions, IoU bars
    assert any("mIoU" in o.get("text", "") for o in outputs)

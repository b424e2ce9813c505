"""Shared fixtures. Every test runs offline: sockets are refused, backbones are random-init timm ViTs."""

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

# Several test processes share the cores (make test: 2 on 2): one thread each, and in every script
# they start, instead of each process's threads fighting over the cores (the fast tier here: 157 s
# with torch's default threads, 119 s with one). Set before torch is imported anywhere.
if int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")) > 1:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
# The longest modules start first, so the test processes finish together (pytest-xdist hands out
# whole modules in collection order): each took over two minutes on the development machine.
LONGEST_FIRST = (
    "test_panoptic_scripts",
    "test_readme",
    "test_export",
    "test_dinov3_scripts",
    "test_output_files",
    "test_depth_training",
    "test_retrieval",
    "test_data_faults",
    "test_resume",
    "test_backbones",
)
sys.path.insert(0, str(ROOT))

from dinokit.data.synthetic import make_dataset, make_panoptic_dataset  # noqa: E402

# A suite started in the background of a non-interactive shell (`make test &`) has SIGINT ignored,
# and scripts started from it would inherit that: the Ctrl-C tests' scripts would never see theirs.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)

# Flags for an offline train.py run: random-init timm backbone, data loaded in-process.
OFFLINE = ("--source", "timm", "--no-pretrained", "--workers", "0")


def pytest_collection_modifyitems(items):
    """Run the modules of LONGEST_FIRST first, in that order; the others after them, as collected."""
    rank = {name: index for index, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.stem, len(rank)))


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Fail loudly if anything in-process tries to open a network connection."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in a test")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(autouse=True)
def isolated_torch_home(tmp_path_factory, monkeypatch):
    """Tests never see (or fill) the developer's real torch.hub cache; subprocesses inherit this."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory) -> Path:
    """12 training and 5 validation VOC-format pairs of 120x90 (not multiples of 14)."""
    return make_dataset(tmp_path_factory.mktemp("voc"), n_train=12, n_valid=5, size=(120, 90), seed=0)


def dead_pid() -> int:
    """The pid of a process that has exited (for files that killed processes left behind)."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def run_script(script: str, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run one of the repository's scripts as a user would, capturing its output."""
    return subprocess.run(
        [sys.executable, str(ROOT / script), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture(scope="session")
def trained_run(tiny_dataset, tmp_path_factory):
    """A real 3-epoch train.py run on the tiny dataset: (run folder, its stdout)."""
    out_dir = tmp_path_factory.mktemp("run") / "transfer_learning"
    result = run_script(
        "train.py",
        "--data-dir",
        tiny_dataset,
        "--epochs",
        "3",
        "--imgsz",
        "120",
        "90",
        "--batch",
        "4",
        "--lr",
        "1e-3",
        "--out-dir",
        out_dir,
        *OFFLINE,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out_dir, result.stdout


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    """A COCO-format shapes set (panoptic PNGs + JSON, instances JSON): 6 train / 3 valid, 112x84."""
    return make_panoptic_dataset(tmp_path_factory.mktemp("shapes") / "data", 6, 3, (112, 84), seed=3)


SMALL = ("--imgsz", "56", "42", "--batch", "4")  # a training run that takes seconds


@pytest.fixture
def dataset(tmp_path):
    """A fresh generated VOC-format dataset per test, free to break."""
    return make_dataset(tmp_path / "data", n_train=6, n_valid=3, size=(64, 48), seed=1)


@pytest.fixture(scope="session")
def checkpoint(trained_run):
    """The best checkpoint of `trained_run`."""
    return trained_run[0] / "best_model_iou.pth"


def train_cli(data, out, *flags, epochs="1"):
    """train.py on `data` into `out`: a small, offline, random-init run (`flags` come last and win)."""
    return run_script("train.py", "--data-dir", data, "--out-dir", out, "--epochs", epochs, *SMALL, *OFFLINE, *flags)


def one_line_error(result, *fragments, code=1):
    """The run failed with exit `code` and said why in its last stderr line (progress bars may stand
    above it), without a traceback; each fragment is in that line, which is returned."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == code, result.stderr[-2000:]
    assert lines and lines[-1].startswith("error"), result.stderr[-2000:]
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr, result.stderr[-2000:]
    for fragment in fragments:
        assert fragment in lines[-1], lines[-1]
    return lines[-1]


def assert_nothing_written(out):
    """No checkpoint, metrics file or temporary file in `out`."""
    assert not out.exists() or not [p for p in out.iterdir() if p.suffix in (".pth", ".csv", ".tmp")]


def files_of(folder):
    """Every file of `folder` by name, with its bytes (to show a folder unchanged)."""
    return {path.name: path.read_bytes() for path in folder.iterdir() if path.is_file()}

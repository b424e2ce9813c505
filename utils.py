"""Device choice, seeding, the checkpoint format, metric logs and plots: shared by train, infer and notebook."""
from __future__ import annotations

import contextlib
import csv
import json
import math
import os
import random
import re
import shutil
import signal
import socket
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import torch

CHECKPOINT_FORMAT = 1
_UMASK = os.umask(0)
os.umask(_UMASK)


def select_device(name: str = "auto") -> torch.device:
    """`auto` picks cuda > mps > cpu; an explicit device that is not available is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps: MPS is not available on this machine (use --device auto or cpu)")
    return torch.device(name)


AMP_CHOICES = ("auto", "bf16", "fp16", "off")


def select_precision(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for `--amp` on `device`, or None for fp32.

    auto: bf16 on CUDA GPUs that support it (no loss scaling needed), else fp16 on CUDA (with a
    GradScaler), and fp32 on CPU/MPS, where autocast is slower than fp32 on most machines.
    """
    if amp not in AMP_CHOICES:
        raise ValueError(f"--amp {amp}: choose one of {', '.join(AMP_CHOICES)}")
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "auto":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError("--amp bf16: this GPU has no bfloat16 support (use --amp fp16 or auto)")
        if device.type == "mps":
            raise ValueError("--amp bf16 is not supported on MPS (use --amp fp16 or off)")
        return torch.bfloat16
    if device.type == "cpu":
        raise ValueError("--amp fp16 needs a GPU; on CPU use --amp bf16 or off")
    return torch.float16


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


TEMP_MARK = ".tmp-"  # .<name>.tmp-<host>-<pid>-<random>[suffix]: whose it is, so leftovers can be told apart
_TEMP_NAME = re.compile(r"^\..+\.tmp-(?P<host>.+)-(?P<pid>\d+)-[A-Za-z0-9_]{8}(\.\w+)?$")


def temp_path(path: str | Path, suffix: str = "", directory: bool = False) -> Path:
    """A new hidden file (or folder) beside `path`, named after this host and process, so that
    `remove_stale_temp_files` can tell a killed process's leftovers from a live one's."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{path.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-"
    if directory:
        return Path(tempfile.mkdtemp(prefix=prefix, suffix=suffix, dir=path.parent))
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=path.parent)
    os.close(fd)
    return Path(tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete temporary files that processes of this host left behind when killed (kill -9, power
    loss) in `folder`: ours by name, and only those whose process is gone."""
    removed = []
    folder = Path(folder)
    if not folder.is_dir():
        return removed
    host = socket.gethostname()
    for path in folder.iterdir():
        match = _TEMP_NAME.match(path.name)
        if match and match["host"] == host and not _alive(int(match["pid"])):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def atomic_write(path: str | Path, write: Callable[[str], None]) -> None:
    """Call `write(tmp_path)` then rename onto `path`: a crash leaves the old file, never half a new one."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        write(str(tmp))
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file normal permissions
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def format_bytes(count: int) -> str:
    """1234567 -> '1.23 MB' (decimal units, as disks are sold and `df -H` prints)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= size:
            return f"{count / size:.2f} {unit}"
    return f"{count} B"


def json_ready(value: Any) -> Any:
    """`value` with every nan/inf float as None: JSON has no NaN (Python would write a bare `NaN`)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    return value


def write_json(path: str | Path, value: Any) -> None:
    """Atomically write `value` as strict JSON (nan -> null)."""
    text = json.dumps(json_ready(value), indent=1, allow_nan=False)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def save_checkpoint(checkpoint: dict[str, Any], path: str | Path) -> None:
    """Write atomically; a Ctrl-C during the write is held back until the file is complete."""
    try:
        with deferred_interrupt():
            atomic_write(path, lambda tmp: torch.save(checkpoint, tmp))
    except OSError as err:
        raise OSError(f"{path}: could not be written ({err.strerror or err}); the previous file is unchanged") from err


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold Ctrl-C (SIGINT) until the block ends, then raise it: files being written get finished."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if received:
            raise KeyboardInterrupt


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load one of our checkpoints safely (`weights_only=True`: no code runs from the file)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: checkpoint not found")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise ValueError(f"{path}: not a readable checkpoint (truncated or not a PyTorch file): {str(err).splitlines()[0]}") from err
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "model_info" not in checkpoint:
        raise ValueError(f"{path}: not a checkpoint written by train.py (no 'model'/'model_info' entries)")
    return checkpoint


def build_model_from_checkpoint(checkpoint: dict[str, Any], device: torch.device | str = "cpu") -> torch.nn.Module:
    """Rebuild the trained model from a checkpoint alone (architecture from `model_info`, weights from `model`).

    A model trained with Meta's hub code needs that code again; where it cannot be had (offline, no
    cache, the --hub-dir clone gone), the same architecture is built with timm and the keys converted.
    """
    from model import BackboneUnavailableError, Dinov2Segmentation, hub_state_to_timm

    info = checkpoint["model_info"]
    arch = info["arch"]
    common = dict(num_classes=arch["num_classes"], backbone=arch["backbone"], registers=arch["registers"], pretrained=False)
    state = checkpoint["model"]
    try:
        model = Dinov2Segmentation(source=arch["source"], hub_dir=info.get("hub_dir"), **common)
    except BackboneUnavailableError as err:
        if arch["source"] == "timm":
            raise
        print(f"note: {str(err).split(';')[0]}; rebuilding the same architecture with timm instead", file=sys.stderr)
        model = Dinov2Segmentation(source="timm", **common)
        state = hub_state_to_timm(state, model)
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        raise ValueError(f"checkpoint weights do not fit the model its model_info describes ({arch}): "
                         f"{str(err).splitlines()[0]}") from err
    return model.to(device).eval()


def write_metrics_csv(history: list[dict[str, float]], path: str | Path) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(history[0]))
            writer.writeheader()
            writer.writerows(history)

    atomic_write(path, write)


def save_plots(history: list[dict[str, float]], out_dir: str | Path) -> None:
    """loss.png, accuracy.png and miou.png: train and validation curves per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [row["epoch"] for row in history]
    for key, label, filename in (("loss", "Loss", "loss.png"), ("pixacc", "Pixel accuracy", "accuracy.png"), ("miou", "mIoU", "miou.png")):
        fig, ax = plt.subplots(figsize=(8, 5))
        ax.plot(epochs, [row[f"train_{key}"] for row in history], marker="o", label=f"Train {label.lower()}")
        ax.plot(epochs, [row[f"valid_{key}"] for row in history], marker="o", label=f"Validation {label.lower()}")
        ax.set_xlabel("Epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend()
        atomic_write(Path(out_dir) / filename, lambda tmp: fig.savefig(tmp, format="png", dpi=100))
        plt.close(fig)


# ---------------------------------------------------------------- distributed (torchrun + DDP)

def distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if distributed() else 0


def world_size() -> int:
    return torch.distributed.get_world_size() if distributed() else 1


def is_main_process() -> bool:
    return rank() == 0


def init_distributed(device_name: str = "auto", timeout_minutes: float = 30) -> torch.device:
    """Join the process group when started by torchrun (RANK/WORLD_SIZE set), else do nothing.

    Returns this process's device: with torchrun on GPUs, cuda:LOCAL_RANK. NCCL on CUDA, gloo
    otherwise. The timeout bounds how long a rank waits for a dead peer in a collective.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return select_device(device_name)
    from datetime import timedelta

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = select_device(device_name)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    backend = "nccl" if device.type == "cuda" else "gloo"
    torch.distributed.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes),
                                         device_id=device if device.type == "cuda" else None)
    if not is_main_process():  # only rank 0 talks (torchvision references' setup_for_distributed)
        import builtins

        builtins.print = lambda *args, **kwargs: None
    return device


def sync_buffers(model: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart with per-rank batches)."""
    if distributed():
        for buffer in model.buffers():
            torch.distributed.broadcast(buffer, 0)


def all_reduce_sum(*tensors: torch.Tensor) -> None:
    if distributed():
        for tensor in tensors:
            torch.distributed.all_reduce(tensor)


def broadcast_object(value: Any) -> Any:
    """Rank 0's `value` on every rank (a decision only rank 0 can make, e.g. about the run folder)."""
    if not distributed():
        return value
    holder = [value]
    torch.distributed.broadcast_object_list(holder, src=0)
    return holder[0]


def broadcast_state(model: torch.nn.Module) -> None:
    """Give every rank rank 0's parameters and buffers: after rank 0 alone has read a checkpoint,
    which on machines without a shared filesystem only rank 0 can."""
    if distributed():
        for tensor in model.state_dict().values():
            torch.distributed.broadcast(tensor, 0)

"""Where and how the code runs: the device, the mixed-precision decision, autocast, seeding, and
the torchrun helpers (process group, ranks, collectives).

One decision for training, evaluation, inference, export, classification and the notebooks:
`select_device` and `select_precision` turn `--device` / `--amp` into a device and an autocast
dtype (or None). Every torchrun helper is a no-op in a single process."""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from typing import Any, TypeVar

import numpy as np
import torch

from dinokit.errors import UserError


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


def select_throughput(device: torch.device, batch: int | None = None, workers: int | None = None) -> tuple[int, int]:
    """(images per forward, decoding/writing workers) of the inference scripts and the demo, where
    not given: batches of 8 everywhere (the results are the same; a batch is faster even on the CPU),
    4 workers on a GPU, whose time the CPU work around the network would otherwise halve, 1 on the
    CPU, whose cores the network already takes (docs/performance.md#end-to-end-inference)."""
    return batch or 8, workers if workers is not None else (4 if device.type == "cuda" else 1)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision for the model's forward when `amp_dtype` is set; a no-op otherwise."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)


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
    torch.distributed.init_process_group(
        backend, timeout=timedelta(minutes=timeout_minutes), device_id=device if device.type == "cuda" else None
    )
    if not is_main_process():  # only rank 0 talks (torchvision references' setup_for_distributed)
        import builtins

        builtins.print = lambda *args, **kwargs: None
    return device


def distribute(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """Under torchrun: the model wrapped in DistributedDataParallel (BatchNorm synchronised on GPUs)."""
    if world_size() == 1:
        return model
    if device.type == "cuda":  # SyncBatchNorm needs GPU tensors; on CPU the head normalises per process
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[device.index] if device.type == "cuda" else None
    )


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


T = TypeVar("T")


def on_main_process(work: Callable[[], T]) -> T | None:
    """Run `work` (a check only one process may make, e.g. of the output folder) on rank 0 only.
    A `UserError` it raises is raised on every rank, so no process of a torchrun job waits in a
    collective for a peer that stopped. Rank 0 gets the result."""
    result, refusal = None, None
    if is_main_process():
        try:
            result = work()
        except UserError as err:
            refusal = err
    refusal = broadcast_object(refusal)
    if refusal is not None:
        raise refusal
    return result

"""torchrun + DistributedDataParallel helpers; every function is a no-op in a single process."""
from __future__ import annotations

import os
from typing import Any

import torch

from runtime import select_device


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

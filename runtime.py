"""Where and how the code runs: the device, the mixed-precision decision, autocast, seeding.

One decision for training, evaluation, inference, export and the notebook: `select_device`
and `select_precision` turn `--device` / `--amp` into a device and an autocast dtype (or None)."""
from __future__ import annotations

import random

import numpy as np
import torch


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


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """Mixed precision for the model's forward when `amp_dtype` is set; a no-op otherwise."""
    return torch.autocast(device.type, dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None)

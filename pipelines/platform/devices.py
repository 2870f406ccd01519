"""Which device a process computes on, and in which precision."""

from __future__ import annotations

import contextlib

import torch

from ldm_core.config import ConfigError


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("sample.device=cuda: no CUDA device is visible")
    return torch.device(name)


def autocast(device: torch.device, mixed_precision: str):
    """bf16 autocast on CUDA when configured; a no-op on CPU (tests) or with mixed_precision='no'."""
    if device.type == "cuda" and mixed_precision == "bf16":
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()

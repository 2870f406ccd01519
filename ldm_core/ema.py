"""Exponential moving average of model weights (Polyak & Juditsky 1992; used for sampling in DDPM,
Ho et al. 2020, App. B, and LDM).

    shadow <- d * shadow + (1 - d) * theta,   d = min(decay, (1 + n) / (10 + n)) with warm-up,

n = number of updates so far (the warm-up of TensorFlow's ExponentialMovingAverage with num_updates),
so early averages are not dominated by the random initialisation. Shadows are kept in float32 on the
parameters' device. Models wrapped in DistributedDataParallel (`.module`) or torch.compile (`._orig_mod`)
are unwrapped, so names never carry a wrapper prefix.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

__all__ = ["EMA", "unwrap_model"]

NUM_UPDATES_KEY = "_ema.num_updates"
"""state_dict key of the update counter (a 0-d int64 tensor); every other key is a parameter name."""


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside DDP / DataParallel (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif isinstance(getattr(model, "_orig_mod", None), nn.Module):
            model = model._orig_mod
        else:
            return model


def _float_params(model: nn.Module, trainable_only: bool = False) -> dict[str, nn.Parameter]:
    return {name: p for name, p in unwrap_model(model).named_parameters()
            if p.is_floating_point() and (p.requires_grad or not trainable_only)}


class EMA:
    """EMA of a model's floating-point parameters (buffers are not averaged)."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True, trainable_only: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay: must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup
        self.num_updates = 0
        self.trainable_only = trainable_only
        """Average only the parameters that train (LoRA adapters: a frozen base needs no shadow)."""
        self.shadow: dict[str, torch.Tensor] = {
            name: p.detach().to(torch.float32, copy=True) for name, p in _float_params(model, trainable_only).items()
        }

    def current_decay(self) -> float:
        """The decay the next update will use."""
        n = self.num_updates
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One EMA step towards the model's current parameters."""
        d = self.current_decay()
        params = _float_params(model, self.trainable_only)
        if params.keys() != self.shadow.keys():
            missing, extra = self.shadow.keys() - params.keys(), params.keys() - self.shadow.keys()
            raise ValueError(f"model: parameters differ from the EMA's (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]})")
        shadows = [self.shadow[name] for name in params]
        # One multi-tensor kernel per dtype group instead of one lerp per parameter (~700 launches for an SD U-Net).
        torch._foreach_lerp_(shadows, [p.detach().to(torch.float32) for p in params.values()], 1.0 - d)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the model's parameters with the EMA weights (cast to each parameter's dtype)."""
        for name, p in _float_params(model, self.trainable_only).items():
            p.copy_(self.shadow[name])

    @contextlib.contextmanager
    def average_parameters(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the EMA weights into `model` (e.g. for validation samples), then restore."""
        params = _float_params(model, self.trainable_only)
        backup = {name: p.detach().clone() for name, p in params.items()}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for name, p in params.items():
                    p.copy_(backup[name])

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors only (safetensors-friendly): parameter name -> shadow, plus the update counter."""
        state = {name: t.detach().clone() for name, t in self.shadow.items()}
        state[NUM_UPDATES_KEY] = torch.tensor(self.num_updates, dtype=torch.int64)
        return state

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Inverse of state_dict; shadows keep their current device. Names must match exactly."""
        names = set(state) - {NUM_UPDATES_KEY}
        if NUM_UPDATES_KEY not in state or names != self.shadow.keys():
            missing, extra = self.shadow.keys() - names, names - self.shadow.keys()
            raise ValueError(f"EMA state_dict does not match the model (missing {sorted(missing)[:5]}, "
                             f"unexpected {sorted(extra)[:5]}, counter present: {NUM_UPDATES_KEY in state})")
        for name in names:
            if state[name].shape != self.shadow[name].shape:
                raise ValueError(f"EMA state_dict: {name} has shape {tuple(state[name].shape)}, "
                                 f"expected {tuple(self.shadow[name].shape)}")
            self.shadow[name].copy_(state[name])
        self.num_updates = int(state[NUM_UPDATES_KEY])

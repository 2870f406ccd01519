"""PatchGAN discriminator (Isola et al. 2017, "Image-to-Image Translation with Conditional Adversarial
Networks", Sec. 3.2.2 and App. 6.1.2), as used for the first stage of taming transformers (Esser et al.
2021) and latent diffusion (Rombach et al. 2022).

Layout for num_layers = 3 (C = base_channels; every conv is 4x4):

    conv(in -> C, stride 2) -> LeakyReLU(0.2)
    conv(C -> 2C, stride 2) -> norm -> LeakyReLU(0.2)
    conv(2C -> 4C, stride 2) -> norm -> LeakyReLU(0.2)
    conv(4C -> 8C, stride 1) -> norm -> LeakyReLU(0.2)
    conv(8C -> 1, stride 1)                               -> logits (B, 1, h, w), one per image patch

Widths are capped at 8C. Weights start from N(0, 0.02), norm scales from N(1, 0.02) (Radford et al. 2016,
DCGAN Sec. 4).

Normalisation default: "group". BatchNorm (the pix2pix/taming choice, still available as "batch") keeps
running-statistics buffers and normalises over the batch. Under DDP with broadcast_buffers=True every
forward overwrites those buffers in place with rank 0's copy, so calling the discriminator twice before one
backward (D(real), then D(fake)) fails with "modified by an inplace operation"; and even with
broadcast_buffers=False its outputs depend on how real and fake images are grouped into batches and ranks,
while the fake-only forward inside the generator loss drags the running statistics. GroupNorm has no
buffers and normalises each sample on its own: the discriminator behaves the same on any number of ranks,
with any batch split, and DDP has nothing to broadcast.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from ldm_core.model_configs import DiscriminatorConfig

__all__ = ["DiscriminatorConfig", "NLayerDiscriminator", "NORMS"]

INIT_STD = 0.02
LEAKY_SLOPE = 0.2
KERNEL = 4


def _group_norm(groups: int) -> Callable[[int], nn.Module]:
    return lambda channels: nn.GroupNorm(groups, channels)


NORMS: dict[str, Callable[[DiscriminatorConfig], Callable[[int], nn.Module]]] = {
    "group": lambda cfg: _group_norm(cfg.norm_groups),
    "batch": lambda cfg: nn.BatchNorm2d,
    "instance": lambda cfg: lambda channels: nn.InstanceNorm2d(channels, affine=True),
    "none": lambda cfg: lambda channels: nn.Identity(),
}
"""Registry: norm name -> (config -> constructor taking the channel count)."""


class NLayerDiscriminator(nn.Module):
    """x (B, in, H, W) -> patch logits (B, 1, h, w); real > 0 > fake after training."""

    def __init__(self, config: DiscriminatorConfig):
        super().__init__()
        self.config = config
        make_norm = NORMS[config.norm](config)
        use_bias = config.norm == "none"  # an affine norm right after the conv makes a bias redundant
        c = config.base_channels
        layers: list[nn.Module] = [
            nn.Conv2d(config.in_channels, c, KERNEL, stride=2, padding=1),
            nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
        ]
        width = c
        for n in range(1, config.num_layers + 1):
            out = c * min(2**n, 8)
            stride = 2 if n < config.num_layers else 1
            layers += [
                nn.Conv2d(width, out, KERNEL, stride=stride, padding=1, bias=use_bias),
                make_norm(out),
                nn.LeakyReLU(LEAKY_SLOPE, inplace=True),
            ]
            width = out
        layers.append(nn.Conv2d(width, 1, KERNEL, stride=1, padding=1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Conv2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm, nn.InstanceNorm2d)) and module.weight is not None:
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)

"""Each training stage's step, as plain functions of (models, batch, step): the stage workers run them inside the
shared loop (DDP, accumulation, the guard), and the benchmarks (`benchmarks/bench_gpu.py`,
`bench_photo_recipes.py`) time and train with the very same functions. The math is `ldm_core`'s; this is only
what one step feeds it.
"""

from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch
from torch import nn

from ldm_core.autoencoder import sample_latents
from ldm_core.diffusion import NoiseSchedule, drop_condition, training_loss
from ldm_core.losses import AutoencoderLossConfig, discriminator_loss, generator_loss

Autocast = Callable[[], ContextManager]
"""A factory of the precision context the forward runs in (the loop's bf16 autocast on GPUs)."""


def autoencoder_loss(
    model: nn.Module,
    discriminator: nn.Module,
    batch: dict,
    step: int,
    *,
    cfg: AutoencoderLossConfig,
    lpips: nn.Module | None,
    last_layer: torch.nn.Parameter,
    autocast: Autocast = contextlib.nullcontext,
) -> tuple[torch.Tensor, dict]:
    """Stage A's autoencoder update: reconstruct `batch["image"]` (float [-1, 1]) and return the generator loss
    (pixel + LPIPS + KL + adversarial with the adaptive weight, `ldm_core.losses.generator_loss`). The forward runs
    under `autocast`, the losses in fp32 (the KL's exp(logvar) and LPIPS are what overflow in low precision).
    Leaves the detached reconstruction in `batch["recon"]` for the discriminator's update and image grids."""
    x = batch["image"]
    with autocast():
        recon, posterior = model(x)
    batch["recon"] = recon.detach()
    return generator_loss(x, recon.float(), posterior, step=step, cfg=cfg, lpips=lpips, discriminator=discriminator,
                          last_layer=last_layer)


def discriminator_update_loss(discriminator: nn.Module, batch: dict, step: int, *,
                              cfg: AutoencoderLossConfig) -> tuple[torch.Tensor, dict]:
    """Stage A's discriminator update on the same images: real and fake in one forward (one DDP pass, one set of
    norm statistics). Needs `autoencoder_loss` to have run on `batch` first."""
    logits_real, logits_fake = discriminator(torch.cat([batch["image"], batch["recon"]]).float()).chunk(2)
    loss, metrics = discriminator_loss(logits_real, logits_fake, step=step, cfg=cfg)
    return loss, {k: v for k, v in metrics.items() if k != "disc_factor"}  # the generator's update reports it


def denoising_loss(
    model: nn.Module,
    batch: dict,
    schedule: NoiseSchedule,
    *,
    null_context: torch.Tensor,
    null_mask: torch.Tensor,
    cond_drop_prob: float,
    generator: torch.Generator | None,
    autocast: Autocast = contextlib.nullcontext,
    **loss_options,
) -> tuple[torch.Tensor, dict]:
    """Stage B's step on a batch of encoded rows: a fresh posterior sample of each latent (`latent_mean`,
    `latent_std`), each caption (`text_hidden`, `text_mask`) replaced by the null condition with probability
    `cond_drop_prob` (classifier-free guidance training), then the denoising loss at random t
    (`ldm_core.diffusion.training_loss`; `loss_options`: the prediction target and the recipe's options)."""
    x0 = sample_latents(batch["latent_mean"], batch["latent_std"], generator)  # (B, C, h, w)
    context, context_mask = drop_condition(batch["text_hidden"], batch["text_mask"], null_context, null_mask,
                                           cond_drop_prob, generator)
    with autocast():
        return training_loss(model, x0, context, context_mask, schedule, generator=generator, **loss_options)

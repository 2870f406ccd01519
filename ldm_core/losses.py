"""Autoencoder training losses: reconstruction + perceptual + KL + adversarial (Esser et al. 2021, "Taming
Transformers for High-Resolution Image Synthesis", eq. 4-7; Rombach et al. 2022, LDM Sec. 3.1 / App. G).

Generator (autoencoder) objective, per sample and averaged over the batch:

    L_rec   = sum_pixels( pixel_weight * |x - x_rec|^p  +  perceptual_weight * LPIPS(x, x_rec) )
    L       = L_rec + kl_weight * KL(q(z|x) || N(0, I)) + lambda * disc_factor * L_adv

The LPIPS value of a sample is added at every pixel before the sum, as in LDM, so that the default
kl_weight = 1e-6 keeps its published balance against a reconstruction term summed over C*H*W values.
lambda is taming's adaptive weight (eq. 7), disc_weight * ||grad_L L_rec|| / (||grad_L L_adv|| + eps) at the
decoder's last layer L, and disc_factor is 0 before `disc_start`, when the discriminator is not run at all.

Discriminator objective (computed separately; the training stage alternates the two updates):
hinge (Lim & Ye 2017) or vanilla / non-saturating (Goodfellow et al. 2014) on patch logits.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.autoencoder import DiagonalGaussian
from ldm_core.model_configs import AutoencoderLossConfig

__all__ = [
    "AutoencoderLossConfig",
    "adaptive_weight",
    "disc_factor_at",
    "gradient_norms",
    "generator_loss",
    "discriminator_loss",
    "PIXEL_LOSSES",
    "DISC_LOSSES",
    "GEN_ADV_LOSSES",
]


PIXEL_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "l1": lambda x, x_rec: (x - x_rec).abs(),
    "l2": lambda x, x_rec: (x - x_rec).pow(2),
}
"""Registry: pixel_loss name -> elementwise distance map (B, C, H, W)."""

DISC_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "hinge": lambda real, fake: 0.5 * (F.relu(1.0 - real).mean() + F.relu(1.0 + fake).mean()),
    "vanilla": lambda real, fake: 0.5 * (F.softplus(-real).mean() + F.softplus(fake).mean()),
}
"""Registry: disc_loss name -> discriminator loss from (real logits, fake logits)."""

GEN_ADV_LOSSES: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "hinge": lambda fake: -fake.mean(),
    "vanilla": lambda fake: F.softplus(-fake).mean(),
}
"""Registry: disc_loss name -> the generator's adversarial loss from fake logits."""


def disc_factor_at(step: int, cfg: AutoencoderLossConfig) -> float:
    """cfg.disc_factor from `disc_start` on, 0 before (taming's adopt_weight)."""
    return cfg.disc_factor if step >= cfg.disc_start else 0.0


def gradient_norms(rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(||grad_L rec_loss||, ||grad_L g_loss||), detached, at the decoder's last layer L: the two sides of
    taming's adaptive weight (Esser et al. 2021, eq. 7). Keeps the graph of both losses alive."""
    rec_grad = torch.autograd.grad(rec_loss, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    return torch.linalg.vector_norm(rec_grad).detach(), torch.linalg.vector_norm(g_grad).detach()


def _clamped_ratio(rec_norm: torch.Tensor, g_norm: torch.Tensor, max_weight: float, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(ratio, clamped ratio): rec_norm / (g_norm + eps) and the same clamped to [0, max_weight]."""
    ratio = rec_norm / (g_norm + eps)
    return ratio, torch.clamp(ratio, 0.0, max_weight)


def adaptive_weight(
    rec_loss: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor, max_weight: float, eps: float = 1e-4
) -> torch.Tensor:
    """||grad_L rec_loss|| / (||grad_L g_loss|| + eps), clamped to [0, max_weight] and detached (Esser et
    al. 2021, eq. 7), where L is the decoder's last layer. Keeps the graph of both losses alive."""
    return _clamped_ratio(*gradient_norms(rec_loss, g_loss, last_layer), max_weight, eps)[1]


def generator_loss(
    x: torch.Tensor,
    recon: torch.Tensor,
    posterior: DiagonalGaussian,
    *,
    step: int,
    cfg: AutoencoderLossConfig,
    lpips: nn.Module | None = None,
    discriminator: nn.Module | None = None,
    last_layer: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The autoencoder's loss for images x (B, C, H, W) in [-1, 1] and their reconstructions.

    Before disc_start (or with disc_factor or disc_weight 0) the discriminator is not called. After it,
    the adversarial term also puts gradients into the discriminator's parameters: the training stage must
    zero them before the discriminator update. The adaptive weight needs autograd; under torch.no_grad
    (evaluation) it is reported as 0 and the GAN term leaves the total.

    Returns (loss, metrics) with detached scalar metrics: rec (L_rec as in the loss), pixel (mean per-pixel
    distance), perceptual (mean LPIPS), kl (mean per-sample KL), g_adv, adaptive_weight (lambda),
    disc_factor, total; and on the steps where the adaptive weight is computed also rec_grad_norm and
    adv_grad_norm (the two gradient norms at the last layer) and adaptive_ratio (their unclamped ratio,
    before disc_weight): when adaptive_weight sits at disc_weight * adaptive_weight_max, adaptive_ratio says
    by how much the reconstruction gradient outweighs the adversarial one.
    """
    if cfg.perceptual_weight > 0 and lpips is None:
        raise ValueError("perceptual_weight > 0 needs an LPIPS module (pass lpips=..., see ldm_core.perceptual)")
    batch = x.shape[0]
    x, recon = x.float(), recon.float()

    pixel_map = PIXEL_LOSSES[cfg.pixel_loss](x, recon)  # (B, C, H, W)
    rec_map = cfg.pixel_weight * pixel_map
    perceptual = torch.zeros(batch, device=x.device)
    if cfg.perceptual_weight > 0:
        perceptual = lpips(x.contiguous(), recon.contiguous()).reshape(batch)  # (B,)
        rec_map = rec_map + cfg.perceptual_weight * perceptual.view(batch, 1, 1, 1)
    rec = rec_map.sum() / batch
    kl = posterior.kl().sum() / batch

    factor = disc_factor_at(step, cfg)
    g_adv = torch.zeros((), device=x.device)
    weight = torch.zeros((), device=x.device)
    grad_metrics: dict[str, torch.Tensor] = {}
    if factor > 0 and cfg.disc_weight > 0:
        if discriminator is None:
            raise ValueError(f"step {step} >= disc_start {cfg.disc_start}: generator_loss needs the discriminator")
        g_adv = GEN_ADV_LOSSES[cfg.disc_loss](discriminator(recon.contiguous()))
        if not cfg.use_adaptive_weight:
            weight = torch.tensor(cfg.disc_weight, device=x.device)
        elif torch.is_grad_enabled() and g_adv.requires_grad:
            if last_layer is None:
                raise ValueError("use_adaptive_weight needs last_layer (the decoder's final conv weight)")
            rec_norm, g_norm = gradient_norms(rec, g_adv, last_layer)
            ratio, clamped = _clamped_ratio(rec_norm, g_norm, cfg.adaptive_weight_max, cfg.adaptive_weight_eps)
            weight = cfg.disc_weight * clamped
            grad_metrics = {"rec_grad_norm": rec_norm, "adv_grad_norm": g_norm, "adaptive_ratio": ratio}

    loss = rec + cfg.kl_weight * kl + weight * factor * g_adv
    metrics = {
        "rec": rec.detach(),
        "pixel": pixel_map.detach().mean(),
        "perceptual": perceptual.detach().mean(),
        "kl": kl.detach(),
        "g_adv": g_adv.detach(),
        "adaptive_weight": weight.detach(),
        "disc_factor": torch.tensor(factor, device=x.device),  # on the device: no host-to-device copy per step
        "total": loss.detach(),
        **grad_metrics,
    }
    return loss, metrics


def discriminator_loss(
    logits_real: torch.Tensor, logits_fake: torch.Tensor, *, step: int, cfg: AutoencoderLossConfig
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """disc_factor * (hinge or vanilla loss) on the patch logits of real images and (detached)
    reconstructions. Before disc_start the factor is 0: the loss is 0, still attached to the graph, so a
    backward pass runs everywhere (DDP needs that) and leaves zero gradients."""
    factor = disc_factor_at(step, cfg)
    d_loss = DISC_LOSSES[cfg.disc_loss](logits_real.float(), logits_fake.float())
    loss = factor * d_loss
    metrics = {
        "disc_loss": loss.detach(),
        "logits_real": logits_real.detach().float().mean(),
        "logits_fake": logits_fake.detach().float().mean(),
        "disc_factor": torch.tensor(factor, device=logits_real.device),
    }
    return loss, metrics

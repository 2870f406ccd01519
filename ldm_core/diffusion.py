"""Gaussian diffusion: noise schedules, the forward process and the training objective.

Notation follows Ho et al. 2020 (DDPM): beta_t is the variance added at step t, alpha_t = 1 - beta_t,
alpha_bar_t = prod_{s<=t} alpha_s, and the forward process has the closed form (DDPM eq. 4)

    x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps,   eps ~ N(0, I).

Timesteps are 0-based: t in [0, T), alpha_bar[0] = 1 - beta[0]. The network predicts either eps
(DDPM eq. 14, "simple" loss) or the velocity v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0
(Salimans & Ho 2022, "Progressive Distillation", Sec. 4 / App. D).

Training-recipe options, all off by default and all carried by DiffusionConfig (so the schedule a model was
trained with is rebuilt exactly wherever its config goes: training, the in-training grids, the sampler):
  - zero-terminal-SNR rescaling of the schedule (Lin et al. 2024, Alg. 1), which needs v-prediction;
  - Min-SNR-gamma loss weighting (Hang et al. 2023);
  - offset noise (Guttenberg 2023) and input perturbation (Ning et al. 2023).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.model_configs import DiffusionConfig, Prediction

__all__ = [
    "BETA_SCHEDULES",
    "COSINE_MAX_BETA",
    "COSINE_OFFSET",
    "DiffusionConfig",
    "NoiseSchedule",
    "check_prediction",
    "cosine_betas",
    "drop_condition",
    "gather",
    "linear_betas",
    "min_snr_weight",
    "predict_eps_from_v",
    "predict_eps_from_x0",
    "predict_x0_from_eps",
    "predict_x0_from_v",
    "q_sample",
    "rescale_zero_terminal_snr",
    "scaled_linear_betas",
    "training_loss",
    "v_target",
]


COSINE_OFFSET = 0.008
"""s in the cosine schedule (Nichol & Dhariwal 2021, eq. 17): keeps beta_0 from being vanishingly small."""
COSINE_MAX_BETA = 0.999
"""Upper clip of the cosine schedule's betas (Nichol & Dhariwal 2021, Sec. 3.2): avoids a singular last step."""


# ----------------------------------------------------------------------------------------------- schedules
# Each schedule: (num_timesteps, beta_start, beta_end) -> betas, float64 array of shape (T,).

def linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas linear in t from beta_start to beta_end (Ho et al. 2020, Sec. 4)."""
    return np.linspace(beta_start, beta_end, num_timesteps, dtype=np.float64)


def scaled_linear_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Betas whose square root is linear in t (Rombach et al. 2022; Stable Diffusion's schedule)."""
    return np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_timesteps, dtype=np.float64) ** 2


def cosine_betas(num_timesteps: int, beta_start: float, beta_end: float) -> np.ndarray:
    """Cosine schedule (Nichol & Dhariwal 2021, eq. 17): alpha_bar(t) = f(t)/f(0),
    f(t) = cos^2((t/T + s)/(1 + s) * pi/2), beta_t = min(1 - alpha_bar(t+1)/alpha_bar(t), 0.999).
    beta_start and beta_end are unused (kept for the shared signature)."""
    steps = np.arange(num_timesteps + 1, dtype=np.float64) / num_timesteps
    f = np.cos((steps + COSINE_OFFSET) / (1 + COSINE_OFFSET) * math.pi / 2) ** 2
    return np.minimum(1 - f[1:] / f[:-1], COSINE_MAX_BETA)


BETA_SCHEDULES: dict[str, Callable[[int, float, float], np.ndarray]] = {
    "linear": linear_betas,
    "scaled_linear": scaled_linear_betas,
    "cosine": cosine_betas,
}


def rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """Betas whose alpha_bar ends at exactly 0 (Lin et al. 2024, Alg. 1): sqrt(alpha_bar) is shifted so its
    last value is 0 and scaled so its first value is unchanged, then betas are read back from the ratios
    alpha_t = alpha_bar_t / alpha_bar_{t-1}. Float64 in and out; the last beta is exactly 1."""
    sqrt_ab = np.sqrt(np.cumprod(1.0 - betas))
    first, last = sqrt_ab[0], sqrt_ab[-1]
    alpha_bar = ((sqrt_ab - last) * (first / (first - last))) ** 2
    alphas = np.concatenate([alpha_bar[:1], alpha_bar[1:] / alpha_bar[:-1]])
    return 1.0 - alphas


class NoiseSchedule:
    """betas, alphas and alpha_bar of a DiffusionConfig as float32 tensors (cumprod done in float64), rescaled to
    zero terminal SNR when the config asks for it.

    Cheap to rebuild, so it is never pickled as tensors: pickling stores only the config and unpickling
    rebuilds it (on CPU). Use `.to(device)` once per worker.
    """

    def __init__(self, config: DiffusionConfig, device: torch.device | str = "cpu"):
        self.config = config
        betas = BETA_SCHEDULES[config.beta_schedule](config.num_timesteps, config.beta_start, config.beta_end)
        if config.zero_terminal_snr:
            betas = rescale_zero_terminal_snr(betas)
        alphas = 1.0 - betas
        alpha_bar = np.cumprod(alphas)
        alpha_bar_prev = np.concatenate([[1.0], alpha_bar[:-1]])
        self.betas = self._tensor(betas, device)  # beta_t, (T,)
        self.alphas = self._tensor(alphas, device)  # alpha_t = 1 - beta_t, (T,)
        self.alpha_bar = self._tensor(alpha_bar, device)  # prod_{s<=t} alpha_s, (T,)
        self.alpha_bar_prev = self._tensor(alpha_bar_prev, device)  # alpha_bar_{t-1}, alpha_bar_{-1} = 1, (T,)

    @staticmethod
    def _tensor(a: np.ndarray, device: torch.device | str) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32, device=device)

    @property
    def num_timesteps(self) -> int:
        return self.config.num_timesteps

    @property
    def device(self) -> torch.device:
        return self.alpha_bar.device

    def to(self, device: torch.device | str) -> "NoiseSchedule":
        """Same schedule with its tensors on `device` (a new object)."""
        return NoiseSchedule(self.config, device)

    def snr(self) -> torch.Tensor:
        """Signal-to-noise ratio alpha_bar / (1 - alpha_bar) per timestep (Kingma et al. 2021), shape (T,)."""
        return self.alpha_bar / (1 - self.alpha_bar)

    def __reduce__(self):
        return (NoiseSchedule, (self.config,))


def gather(values: torch.Tensor, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """values[t] reshaped to (B, 1, ..., 1) to broadcast against x (B, ...), on x's device."""
    out = values[t.to(device=values.device, dtype=torch.long)].to(x.device)
    return out.reshape(t.shape[0], *([1] * (x.ndim - 1)))


# -------------------------------------------------------------------------------- forward process identities

def q_sample(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x_t = sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) eps (Ho et al. 2020, eq. 4)."""
    ab = gather(alpha_bar, t, x0)
    return ab.sqrt() * x0 + (1 - ab).sqrt() * eps


def v_target(x0: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """v = sqrt(alpha_bar_t) eps - sqrt(1 - alpha_bar_t) x0 (Salimans & Ho 2022, Sec. 4)."""
    ab = gather(alpha_bar, t, x0)
    return ab.sqrt() * eps - (1 - ab).sqrt() * x0


def predict_x0_from_eps(x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t) (inverting DDPM eq. 4)."""
    ab = gather(alpha_bar, t, x_t)
    return (x_t - (1 - ab).sqrt() * eps) / ab.sqrt()


def predict_eps_from_x0(x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = (x_t - sqrt(alpha_bar_t) x0) / sqrt(1 - alpha_bar_t) (inverting DDPM eq. 4)."""
    ab = gather(alpha_bar, t, x_t)
    return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()


def predict_x0_from_v(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """x0 = sqrt(alpha_bar_t) x_t - sqrt(1 - alpha_bar_t) v (Salimans & Ho 2022, App. D)."""
    ab = gather(alpha_bar, t, x_t)
    return ab.sqrt() * x_t - (1 - ab).sqrt() * v


def predict_eps_from_v(x_t: torch.Tensor, t: torch.Tensor, v: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v (Salimans & Ho 2022, App. D)."""
    ab = gather(alpha_bar, t, x_t)
    return (1 - ab).sqrt() * x_t + ab.sqrt() * v


# ------------------------------------------------------------------------------------------------ training

def check_prediction(prediction: str) -> None:
    if prediction not in ("eps", "v"):
        raise ValueError(f"prediction: must be 'eps' or 'v', got {prediction!r}")


def min_snr_weight(snr: torch.Tensor, gamma: float, prediction: Prediction) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) for per-sample SNRs `snr` (B,): min(SNR, gamma) / SNR for
    an eps target, min(SNR, gamma) / (SNR + 1) for a v target (the same weighting of the x0 error, expressed in
    each target's units). For eps it is computed as min(1, gamma / SNR), which stays finite at SNR 0."""
    check_prediction(prediction)
    if prediction == "eps":
        return torch.clamp(gamma / snr, max=1.0)
    return torch.clamp(snr, max=gamma) / (snr + 1)


def training_loss(
    model: nn.Module,
    x0: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    schedule: NoiseSchedule,
    *,
    prediction: Prediction,
    generator: torch.Generator | None = None,
    t: torch.Tensor | None = None,
    eps: torch.Tensor | None = None,
    snr_gamma: float | None = None,
    offset_noise: float = 0.0,
    input_perturbation: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Simplified diffusion loss (Ho et al. 2020, eq. 14): E_{t, eps} w_t || target - f(x_t, t, c) ||^2.

    t ~ U{0, ..., T-1} and eps ~ N(0, I) unless given; the target is eps or v (Salimans & Ho 2022). Random
    numbers are drawn on the generator's device (CPU by default) and moved to x0's device, so a seeded CPU
    generator gives the same draws on any accelerator. The MSE is averaged over each sample's elements,
    weighted per sample, then averaged over the batch. `DiffusionConfig.loss_options()` gives the keywords
    of a configured run; left out, this is the plain loss (the held-out loss uses that, so runs compare).

    Recipe options (Stable Diffusion fine-tuning practice, each off at its default):
      - snr_gamma: w_t = `min_snr_weight` (Hang et al. 2023); None: w_t = 1;
      - offset_noise: a drawn eps gets offset_noise * N(0, 1) per sample and channel added (Guttenberg 2023);
        a given eps is used as is;
      - input_perturbation: x_t is built from eps + input_perturbation * xi, xi ~ N(0, I), the target from eps
        alone (Ning et al. 2023).
    The draws come in this order from the generator: t, eps, offset, xi; options that are off draw nothing,
    so the default loss consumes the same random numbers as before the options existed.

    Returns (loss, metrics): loss is the batch mean (with grad); metrics are detached 0-d tensors:
    `loss`, `loss_std` (spread of the per-sample losses), `loss_min`, `loss_max`, `target_std`, `pred_std`,
    and with snr_gamma also `mse` (the unweighted loss) and `snr_weight_mean`.
    """
    check_prediction(prediction)
    b = x0.shape[0]
    rng_device = generator.device if generator is not None else x0.device
    if t is None:
        t = torch.randint(0, schedule.num_timesteps, (b,), generator=generator, device=rng_device)
    t = t.to(x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=rng_device, dtype=torch.float32)
        if offset_noise > 0:
            offset = torch.randn((*x0.shape[:2], *([1] * (x0.ndim - 2))), generator=generator, device=rng_device)
            eps = eps + offset_noise * offset  # (B, C, 1, 1) broadcast over the pixels
    eps = eps.to(device=x0.device, dtype=x0.dtype)
    noise = eps
    if input_perturbation > 0:
        xi = torch.randn(x0.shape, generator=generator, device=rng_device, dtype=torch.float32)
        noise = eps + input_perturbation * xi.to(device=x0.device, dtype=x0.dtype)
    alpha_bar = schedule.alpha_bar
    x_t = q_sample(x0, t, noise, alpha_bar)
    target = eps if prediction == "eps" else v_target(x0, t, eps, alpha_bar)
    pred = model(x_t, t, context, context_mask)
    mse = F.mse_loss(pred.float(), target.float(), reduction="none").flatten(1).mean(1)  # (B,)
    weight = None
    if snr_gamma is not None:
        weight = min_snr_weight(schedule.snr().to(x0.device)[t], snr_gamma, prediction)  # (B,)
    per_sample = mse if weight is None else weight * mse
    loss = per_sample.mean()
    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "loss_std": per_sample.std(unbiased=False),
            "loss_min": per_sample.min(),
            "loss_max": per_sample.max(),
            "target_std": target.float().std(),
            "pred_std": pred.detach().float().std(),
        }
        if weight is not None:
            metrics["mse"] = mse.mean()
            metrics["snr_weight_mean"] = weight.mean()
    return loss, metrics


def drop_condition(
    context: torch.Tensor,
    context_mask: torch.Tensor,
    null_context: torch.Tensor,
    null_mask: torch.Tensor,
    p: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Classifier-free guidance training (Ho & Salimans 2022, Alg. 1): replace each sample's condition
    by the null (empty-prompt) condition with probability p, independently per sample.

    context (B, L, D), context_mask (B, L); null_context (L, D) or (1, L, D), null_mask (L,) or (1, L),
    broadcast over the batch. Returns new (context, context_mask); the inputs are not modified.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p: must be in [0, 1], got {p}")
    b, seq_len, dim = context.shape
    null_context = null_context.reshape(-1, null_context.shape[-1])
    null_mask = null_mask.reshape(-1)
    if null_context.shape != (seq_len, dim) or null_mask.shape != (seq_len,):
        raise ValueError(f"null_context/null_mask: shapes {tuple(null_context.shape)}/{tuple(null_mask.shape)} "
                         f"do not match one sample of context {(seq_len, dim)} / mask {(seq_len,)}")
    rng_device = generator.device if generator is not None else context.device
    drop = (torch.rand(b, generator=generator, device=rng_device) < p).to(context.device)  # (B,)
    new_context = torch.where(drop[:, None, None], null_context.to(context)[None], context)
    new_mask = torch.where(drop[:, None], null_mask.to(device=context_mask.device, dtype=context_mask.dtype)[None],
                           context_mask)
    return new_context, new_mask

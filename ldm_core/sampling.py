"""Samplers for a trained eps- or v-prediction network, with classifier-free guidance.

In the k-diffusion style every sampler is a small pure function with one shared keyword signature

    sampler(model, shape, *, schedule, context, context_mask, null_context, null_mask, steps,
            guidance_scale, generator=None, prediction="eps", x_T=None, spacing="trailing",
            steps_offset=0, set_alpha_to_one=True) -> x0

(ddim_sample adds `eta`), registered in SAMPLERS. They run under torch.no_grad with the model in eval mode
(its previous mode is restored), draw every random number from `generator` on the generator's device (so
a seeded CPU generator gives the same samples on CPU and GPU up to float error), and return float32.

Timestep spacing for a sub-sequence of `steps` out of T (names as in Lin et al. 2024, "Common Diffusion
Noise Schedules and Sample Steps are Flawed", Table 2), always visited in decreasing order:
  - "trailing" (default): round(T - k * T/steps) - 1, k = 0..steps-1; starts at t = T-1 (computed from
    integers, so any steps in [1, T] gives exactly `steps` timesteps).
  - "leading": k * (T // steps), the DDIM paper's uniform spacing (Song et al. 2021, Sec. 4.2).
  - "linspace": round(linspace(0, T-1, steps)).
`steps_offset` is added to every timestep. After the last visited timestep the sampler steps to
alpha_bar = 1 (`set_alpha_to_one=True`, the clean sample) or to alpha_bar_0 (False). Stable Diffusion's
published DDIM setting is spacing="leading", steps_offset=1, set_alpha_to_one=False (diffusers'
DDIMScheduler names), e.g. 981, 961, ..., 1 for 50 steps at T = 1000.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.diffusion import NoiseSchedule, Prediction, check_prediction

__all__ = [
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "ddim_sample",
    "ddpm_sample",
    "guided_eps",
    "guided_prediction",
    "sample_timesteps",
]


# ------------------------------------------------------------------------------------------ timestep spacing

def _trailing(num_timesteps: int, steps: int) -> np.ndarray:
    # T * (steps - k) / steps from integers: a float `arange(T, 0, -T/steps)` can yield steps + 1 values.
    k = np.arange(steps, dtype=np.int64)
    return np.round(num_timesteps * (steps - k) / steps).astype(np.int64) - 1


def _leading(num_timesteps: int, steps: int) -> np.ndarray:
    return (np.arange(steps, dtype=np.int64) * (num_timesteps // steps))[::-1]


def _linspace(num_timesteps: int, steps: int) -> np.ndarray:
    return np.round(np.linspace(0, num_timesteps - 1, steps)).astype(np.int64)[::-1]


TIMESTEP_SPACINGS: dict[str, Callable[[int, int], np.ndarray]] = {
    "trailing": _trailing,
    "leading": _leading,
    "linspace": _linspace,
}


def sample_timesteps(num_timesteps: int, steps: int, spacing: str = "trailing", steps_offset: int = 0) -> list[int]:
    """The `steps` timesteps a sampler visits, in decreasing order, each plus `steps_offset` (see the module
    docstring)."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"spacing: unknown {spacing!r}; choose one of {sorted(TIMESTEP_SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: must be in [1, {num_timesteps}] (the schedule's T), got {steps}")
    ts = [int(t) + steps_offset for t in TIMESTEP_SPACINGS[spacing](num_timesteps, steps)]
    if len(set(ts)) != len(ts) or any(not 0 <= t < num_timesteps for t in ts):
        raise ValueError(f"steps: {steps} steps with {spacing!r} spacing and steps_offset={steps_offset} give "
                         f"timesteps outside [0, {num_timesteps}): {ts}")
    return ts


def _final_alpha_bar(alpha_bar: torch.Tensor, set_alpha_to_one: bool) -> torch.Tensor:
    """alpha_bar after the last visited timestep: 1 (the clean sample) or alpha_bar_0 (Stable Diffusion's)."""
    return torch.ones((), device=alpha_bar.device) if set_alpha_to_one else alpha_bar[0]


# ------------------------------------------------------------------------------------------------ guidance

def _pad_tokens(context: torch.Tensor, mask: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad (B, L, D) / (B, L) to `length` tokens with zero embeddings that are masked out."""
    extra = length - context.shape[1]
    if extra == 0:
        return context, mask
    return F.pad(context, (0, 0, 0, extra)), F.pad(mask, (0, extra), value=False)


def _batched_condition(
    context: torch.Tensor,
    mask: torch.Tensor | None,
    null_context: torch.Tensor,
    null_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """[null; cond] stacked along the batch: (2B, L, D) contexts and (2B, L) bool masks."""
    b = context.shape[0]
    if null_context.ndim == 2:
        null_context = null_context[None]
    null_context = null_context.to(context).expand(b, -1, -1)  # (B, L_null, D)
    mask = torch.ones(context.shape[:2], dtype=torch.bool, device=context.device) if mask is None else mask
    if null_mask is None:
        null_mask = torch.ones(null_context.shape[:2], dtype=torch.bool, device=context.device)
    null_mask = null_mask.reshape(-1, null_mask.shape[-1]).to(device=context.device).expand(b, -1)  # (B, L_null)
    length = max(context.shape[1], null_context.shape[1])
    null_context, null_mask = _pad_tokens(null_context, null_mask.to(torch.bool), length)
    context, mask = _pad_tokens(context, mask.to(torch.bool), length)
    return torch.cat([null_context, context]), torch.cat([null_mask, mask])


def guided_prediction(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    mask: torch.Tensor | None,
    null_context: torch.Tensor,
    null_mask: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) in the model's own output space:
    out_u + scale * (out_c - out_u), with both halves in one batched forward ([null; cond]).

    null_context may be (L', D), (1, L', D) or (B, L', D); a different token count L' is zero-padded
    and masked. Since eps and v are affine in the model output for fixed x_t, guiding v is the same as
    guiding eps. Returns float32 (B, ...) like x.
    """
    b = x.shape[0]
    ctx, ctx_mask = _batched_condition(context, mask, null_context, null_mask)
    t = t.expand(b) if t.ndim == 0 else t
    out = model(torch.cat([x, x]), torch.cat([t, t]), ctx, ctx_mask).float()
    out_u, out_c = out[:b], out[b:]
    return out_u + scale * (out_c - out_u)


def _eps_and_x0(x_t: torch.Tensor, out: torch.Tensor, alpha_bar_t: torch.Tensor,
                prediction: Prediction) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps, x0) from a model output; alpha_bar_t is a 0-d tensor (Salimans & Ho 2022, App. D for v)."""
    a, s = alpha_bar_t.sqrt(), (1 - alpha_bar_t).sqrt()
    if prediction == "eps":
        return out, (x_t - s * out) / a
    return s * x_t + a * out, a * x_t - s * out


def guided_eps(
    model: nn.Module,
    x: torch.Tensor,
    t: torch.Tensor,
    context: torch.Tensor,
    mask: torch.Tensor | None,
    null_context: torch.Tensor,
    null_mask: torch.Tensor | None,
    scale: float,
    *,
    prediction: Prediction = "eps",
    alpha_bar: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guided noise estimate eps_u + scale * (eps_c - eps_u) (Ho & Salimans 2022, eq. 6), one batched
    forward. For a v-prediction model pass `alpha_bar` (the schedule's, shape (T,)) to convert
    eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
    check_prediction(prediction)
    out = guided_prediction(model, x, t, context, mask, null_context, null_mask, scale)
    if prediction == "eps":
        return out
    if alpha_bar is None:
        raise ValueError("alpha_bar: required to convert a v-prediction into eps")
    ab = alpha_bar.to(x.device)[t.to(x.device, torch.long)].reshape(-1, *([1] * (x.ndim - 1)))  # (B, 1, 1, 1)
    return (1 - ab).sqrt() * x.float() + ab.sqrt() * out


# ------------------------------------------------------------------------------------------------ samplers

@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _randn(shape, generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    rng_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=rng_device, dtype=torch.float32).to(device)


def _start(shape, x_T, generator, device) -> torch.Tensor:
    if x_T is None:
        return _randn(shape, generator, device)
    if tuple(x_T.shape) != tuple(shape):
        raise ValueError(f"x_T: shape {tuple(x_T.shape)} does not match shape {tuple(shape)}")
    return x_T.to(device=device, dtype=torch.float32)


def ddim_sample(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    schedule: NoiseSchedule,
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    null_context: torch.Tensor,
    null_mask: torch.Tensor | None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    generator: torch.Generator | None = None,
    prediction: Prediction = "eps",
    x_T: torch.Tensor | None = None,
    spacing: str = "trailing",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) with classifier-free guidance.

    x_{t'} = sqrt(alpha_bar_{t'}) x0_hat + sqrt(1 - alpha_bar_{t'} - sigma^2) eps_hat + sigma z, with
    sigma = eta * sqrt((1 - alpha_bar_{t'}) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_{t'})
    (eq. 16), t' the next visited timestep and alpha_bar = 1 after the last one (alpha_bar_0 with
    set_alpha_to_one=False). With spacing="leading", steps_offset=1, set_alpha_to_one=False it takes Stable
    Diffusion's exact steps (those of diffusers' DDIMScheduler with SD's settings). eta = 0 is the
    deterministic DDIM ODE; eta = 1 is ancestral DDPM sampling on the sub-sequence. No x0 clipping
    (latents are unbounded). Returns x0 (float32, `shape`) on context's device.
    """
    check_prediction(prediction)
    if eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    device = context.device
    alpha_bar = schedule.alpha_bar.to(device)
    ts = sample_timesteps(schedule.num_timesteps, steps, spacing, steps_offset)
    x = _start(shape, x_T, generator, device)
    final = _final_alpha_bar(alpha_bar, set_alpha_to_one)
    with _eval_mode(model):
        for i, t in enumerate(ts):
            ab_t = alpha_bar[t]
            ab_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else final
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            out = guided_prediction(model, x, t_batch, context, context_mask, null_context, null_mask, guidance_scale)
            eps, x0 = _eps_and_x0(x, out, ab_t, prediction)
            sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
            if eta > 0 and i + 1 < len(ts):
                x = x + sigma * _randn(shape, generator, device)
    return x


def ddpm_sample(
    model: nn.Module,
    shape: tuple[int, ...],
    *,
    schedule: NoiseSchedule,
    context: torch.Tensor,
    context_mask: torch.Tensor | None,
    null_context: torch.Tensor,
    null_mask: torch.Tensor | None,
    steps: int | None = None,
    guidance_scale: float = 7.5,
    generator: torch.Generator | None = None,
    prediction: Prediction = "eps",
    x_T: torch.Tensor | None = None,
    spacing: str = "trailing",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) with classifier-free guidance.

    Each step draws from the posterior q(x_{t'} | x_t, x0_hat) (DDPM eqs. 6-7) with its variance
    beta_tilde = (1 - alpha_bar_{t'}) / (1 - alpha_bar_t) * beta_t' ("fixed small"), where for a
    sub-sequence beta_t' = 1 - alpha_bar_t / alpha_bar_{t'} (Nichol & Dhariwal 2021, Sec. 4). `steps=None`
    visits all T timesteps. The last step returns the mean x0_hat without noise.
    """
    check_prediction(prediction)
    device = context.device
    alpha_bar = schedule.alpha_bar.to(device)
    ts = sample_timesteps(schedule.num_timesteps, schedule.num_timesteps if steps is None else steps, spacing, steps_offset)
    x = _start(shape, x_T, generator, device)
    final = _final_alpha_bar(alpha_bar, set_alpha_to_one)
    with _eval_mode(model):
        for i, t in enumerate(ts):
            ab_t = alpha_bar[t]
            ab_prev = alpha_bar[ts[i + 1]] if i + 1 < len(ts) else final
            alpha = ab_t / ab_prev
            beta = 1 - alpha
            t_batch = torch.full((shape[0],), t, device=device, dtype=torch.long)
            out = guided_prediction(model, x, t_batch, context, context_mask, null_context, null_mask, guidance_scale)
            _, x0 = _eps_and_x0(x, out, ab_t, prediction)
            x = ab_prev.sqrt() * beta / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab_t) * x  # mu_tilde
            if i + 1 < len(ts):
                var = beta * (1 - ab_prev) / (1 - ab_t)
                x = x + var.sqrt() * _randn(shape, generator, device)
    return x


SAMPLERS: dict[str, Callable[..., torch.Tensor]] = {
    "ddim": ddim_sample,
    "ddpm": ddpm_sample,
}

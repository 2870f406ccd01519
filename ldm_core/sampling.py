"""Samplers for a trained eps- or v-prediction network, with classifier-free guidance.

In the k-diffusion style every sampler is a small pure function with one shared signature

    sampler(model, x_T, plan, cond, *, generator=None) -> x0

- `x_T` (B, C, h, w): the starting noise, drawn by the caller (so one x_T can be reused across prompts);
- `plan` (`SamplingPlan`, built by `sampling_plan`): the noise schedule, the visited timesteps, the alpha_bar
  each step goes to (the final one included), the prediction type and the sampler's stochasticity `eta`;
- `cond` (`Condition`): the contexts and masks, the null (empty-prompt) condition, the guidance scale and the
  guidance rescale;
- `generator`: where any fresh noise comes from (drawn on the generator's device, so a seeded CPU generator
  gives the same samples on CPU and GPU up to float error).
They are registered in SAMPLERS, run under torch.no_grad with the model in eval mode (its previous mode is
restored) and return float32 on x_T's device. A sampler's options live in the plan, and every sampler validates
them, so no caller branches on the sampler's name.

Timestep spacing for a sub-sequence of `steps` out of T (names as in Lin et al. 2024, "Common Diffusion
Noise Schedules and Sample Steps are Flawed", Table 2), always visited in decreasing order, each exactly as
diffusers' `DDIMScheduler.set_timesteps` computes it (tests/test_sampler_parity.py checks every step count):
  - "trailing" (default): round(T - k * T/steps) - 1, k = 0..steps-1, starts at t = T-1. The rounding follows
    diffusers' float `arange(T, 0, -T/steps)` (so at 48 steps 937.5 - 1e-13 rounds to 937: 936, not 937). For some
    step counts (61, 103, 497, ... at T = 1000: 62 of the 1000) that float arange yields steps + 1 values and
    diffusers visits a last timestep of -1, a bug of diffusers' (alpha_bar[-1] is the noisiest, not the cleanest);
    here exactly `steps` are kept, the same ones as diffusers' first `steps`.
  - "leading": k * (T // steps) + steps_offset, the DDIM paper's uniform spacing (Song et al. 2021, Sec. 4.2).
  - "linspace": round(linspace(0, T-1, steps)), starts at t = T-1.
`steps_offset` shifts "leading" only (diffusers ignores it for the other two, and so does this module).

Each step from t lands on t - T // steps, as in `DDIMScheduler.step`, and on `final_alpha_bar` when that is
negative: alpha_bar = 1 (`set_alpha_to_one=True`, the clean sample) or alpha_bar_0 (False). That is the next
visited timestep for "leading", and for "trailing" when steps divides T; otherwise the landing point and the next
visited timestep differ by up to T/steps - T // steps (trailing) or (T-1)/(steps-1) - T // steps (linspace)
timesteps, and the last step may land on t = 0 rather than past it. Stable Diffusion's published DDIM setting is
spacing="leading", steps_offset=1, set_alpha_to_one=False (diffusers' names), e.g. 981, 961, ..., 1 for 50 steps
at T = 1000.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Protocol

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm_core.diffusion import NoiseSchedule, Prediction, check_prediction

__all__ = [
    "SAMPLERS",
    "TIMESTEP_SPACINGS",
    "Condition",
    "Sampler",
    "SamplingPlan",
    "ddim_sample",
    "ddpm_sample",
    "guided_eps",
    "guided_prediction",
    "rescale_guidance",
    "sample_timesteps",
    "sampling_plan",
]


# ------------------------------------------------------------------------------------------ timestep spacing

def _trailing(num_timesteps: int, steps: int) -> np.ndarray:
    # diffusers' float arange, rounding included; it can yield steps + 1 values (a last timestep of -1): keep `steps`.
    return np.round(np.arange(num_timesteps, 0, -num_timesteps / steps))[:steps].astype(np.int64) - 1


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
    """The `steps` timesteps a sampler visits, in decreasing order; `steps_offset` is added with "leading" spacing
    only (see the module docstring)."""
    if spacing not in TIMESTEP_SPACINGS:
        raise ValueError(f"spacing: unknown {spacing!r}; choose one of {sorted(TIMESTEP_SPACINGS)}")
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps: must be in [1, {num_timesteps}] (the schedule's T), got {steps}")
    offset = steps_offset if spacing == "leading" else 0
    ts = [int(t) + offset for t in TIMESTEP_SPACINGS[spacing](num_timesteps, steps)]
    if len(set(ts)) != len(ts) or any(not 0 <= t < num_timesteps for t in ts):
        raise ValueError(f"steps: {steps} steps with {spacing!r} spacing and steps_offset={steps_offset} give "
                         f"timesteps outside [0, {num_timesteps}): {ts}")
    return ts


FINAL = -1
"""A step target past the last timestep: the plan's `final_alpha_bar`."""


@dataclass(frozen=True, eq=False)
class SamplingPlan:
    """Everything a sampler takes from the noise schedule and the step settings: which timesteps it visits, which
    alpha_bar each step lands on, what the network predicts and how much fresh noise each step adds. Built by
    `sampling_plan`; samplers only read it."""

    schedule: NoiseSchedule
    """The schedule the network was trained with (alpha_bar, zero-terminal-SNR rescaling included)."""
    timesteps: tuple[int, ...]
    """The visited timesteps, decreasing."""
    targets: tuple[int, ...]
    """The timestep step i lands on (`FINAL`: past t = 0, at `final_alpha_bar`)."""
    final_alpha_bar: float
    """alpha_bar after the last visited timestep: 1 (the clean sample) or alpha_bar_0 (Stable Diffusion's)."""
    eta: float | None = None
    """Fresh noise per step in DDIM's terms (Song et al. 2021, eq. 16): 0 the deterministic ODE, 1 the DDPM
    posterior variance. None: the sampler's own (DDIM 0; DDPM is ancestral, eta 1 by construction)."""

    @property
    def prediction(self) -> Prediction:
        """What the network predicts, "eps" or "v": the schedule's config says."""
        return self.schedule.config.prediction

    def alpha_bars(self, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
        """(alpha_bar_t at each visited timestep, alpha_bar of each step's target), float32 (steps,) each."""
        alpha_bar = self.schedule.alpha_bar.to(device)
        final = torch.tensor([self.final_alpha_bar], dtype=alpha_bar.dtype, device=device)
        padded = torch.cat([alpha_bar, final])  # index FINAL = -1 reads the final alpha_bar
        return (padded[torch.tensor(self.timesteps, device=device)],
                padded[torch.tensor(self.targets, device=device)])


def sampling_plan(
    schedule: NoiseSchedule,
    steps: int,
    *,
    spacing: str = "trailing",
    steps_offset: int = 0,
    set_alpha_to_one: bool = True,
    eta: float | None = None,
) -> SamplingPlan:
    """The plan of a `steps`-step sampler on `schedule` (the spacing and settings of the module docstring): each
    step from t lands on t - T // steps (diffusers' DDIMScheduler), past t = 0 on alpha_bar = 1 or alpha_bar_0."""
    if eta is not None and eta < 0:
        raise ValueError(f"eta: must be >= 0, got {eta}")
    ts = tuple(sample_timesteps(schedule.num_timesteps, steps, spacing, steps_offset))
    stride = schedule.num_timesteps // steps
    targets = tuple(t - stride if t >= stride else FINAL for t in ts)
    final = 1.0 if set_alpha_to_one else float(schedule.alpha_bar[0])
    return SamplingPlan(schedule, ts, targets, final, eta)


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


@dataclass(frozen=True, eq=False)
class Condition:
    """What a sampler is conditioned on: the prompts, the null (empty-prompt) condition and classifier-free
    guidance's scale. context (B, L, D) / context_mask (B, L) bool or None (all tokens); null_context (L', D),
    (1, L', D) or (B, L', D) / null_mask likewise or None; a different token count L' is zero-padded and masked."""

    context: torch.Tensor
    context_mask: torch.Tensor | None
    null_context: torch.Tensor
    null_mask: torch.Tensor | None
    guidance_scale: float
    """s in out_u + s * (out_c - out_u): 1 = the conditional model alone, 0 = the unconditional one."""
    guidance_rescale: float = 0.0
    """phi of Lin et al.'s guidance rescale (`rescale_guidance`), in [0, 1]: 0 = plain guidance, 0.7 the paper's."""

    def __post_init__(self):
        if not 0.0 <= self.guidance_rescale <= 1.0:
            raise ValueError(f"guidance_rescale: must be in [0, 1], got {self.guidance_rescale}")

    def rows(self, index: slice) -> "Condition":
        """The condition of the samples `index` (the null condition is shared)."""
        return replace(self, context=self.context[index],
                       context_mask=None if self.context_mask is None else self.context_mask[index])


def rescale_guidance(guided: torch.Tensor, out_c: torch.Tensor, phi: float) -> torch.Tensor:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Sec. 3.4):
    x_rescaled = x_cfg * std(x_pos) / std(x_cfg), returned as phi * x_rescaled + (1 - phi) * x_cfg, where x_cfg is
    the guided output and x_pos the conditional one. A large guidance scale inflates the prediction's std, which a
    zero-terminal-SNR model turns into over-exposed images; rescaling gives it back the conditional std, and phi < 1
    keeps some of the guided contrast. std is per sample over all its elements (unbiased), in the model's output
    space (eps or v), as diffusers' `rescale_noise_cfg` computes it."""
    dims = tuple(range(1, guided.ndim))
    rescaled = guided * (out_c.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
    return phi * rescaled + (1 - phi) * guided


def guided_prediction(model: nn.Module, x: torch.Tensor, t: torch.Tensor, cond: Condition) -> torch.Tensor:
    """Classifier-free guidance (Ho & Salimans 2022, eq. 6) in the model's own output space:
    out_u + scale * (out_c - out_u), with both halves in one batched forward ([null; cond]), then rescaled by
    `rescale_guidance` when `cond.guidance_rescale` > 0.

    Since eps and v are affine in the model output for fixed x_t, guiding v is the same as guiding eps (the
    rescale is not affine: it acts on the output the model was trained to predict, as in diffusers).
    Returns float32 (B, ...) like x.
    """
    b = x.shape[0]
    ctx, ctx_mask = _batched_condition(cond.context, cond.context_mask, cond.null_context, cond.null_mask)
    t = t.expand(b) if t.ndim == 0 else t
    out = model(torch.cat([x, x]), torch.cat([t, t]), ctx, ctx_mask).float()
    out_u, out_c = out[:b], out[b:]
    guided = out_u + cond.guidance_scale * (out_c - out_u)
    return rescale_guidance(guided, out_c, cond.guidance_rescale) if cond.guidance_rescale > 0 else guided


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
    cond: Condition,
    *,
    prediction: Prediction = "eps",
    alpha_bar: torch.Tensor | None = None,
) -> torch.Tensor:
    """Guided noise estimate eps_u + scale * (eps_c - eps_u) (Ho & Salimans 2022, eq. 6), one batched
    forward. For a v-prediction model pass `alpha_bar` (the schedule's, shape (T,)) to convert
    eps = sqrt(1 - alpha_bar_t) x_t + sqrt(alpha_bar_t) v."""
    check_prediction(prediction)
    out = guided_prediction(model, x, t, cond)
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


class Sampler(Protocol):
    """The shared signature (module docstring): x0 (float32, x_T's shape and device) from x_T."""

    def __call__(self, model: nn.Module, x_T: torch.Tensor, plan: SamplingPlan, cond: Condition, *,
                 generator: torch.Generator | None = None) -> torch.Tensor: ...


def ddim_sample(model: nn.Module, x_T: torch.Tensor, plan: SamplingPlan, cond: Condition, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """DDIM (Song et al. 2021, "Denoising Diffusion Implicit Models", eq. 12) with classifier-free guidance.

    x_{t'} = sqrt(alpha_bar_{t'}) x0_hat + sqrt(1 - alpha_bar_{t'} - sigma^2) eps_hat + sigma z, with
    sigma = eta * sqrt((1 - alpha_bar_{t'}) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_{t'})
    (eq. 16) and t' the step's target in the plan. With spacing="leading", steps_offset=1, set_alpha_to_one=False
    it takes Stable Diffusion's exact steps (those of diffusers' DDIMScheduler with SD's settings). eta = 0 (the
    plan's default) is the deterministic DDIM ODE; eta = 1 is ancestral DDPM sampling on the sub-sequence. No x0
    clipping (latents are unbounded).
    """
    check_prediction(plan.prediction)
    eta = 0.0 if plan.eta is None else plan.eta
    device = x_T.device
    x = x_T.to(torch.float32)
    ab_from, ab_to = plan.alpha_bars(device)
    last = len(plan.timesteps) - 1
    with _eval_mode(model):
        for i, t in enumerate(plan.timesteps):
            ab_t, ab_prev = ab_from[i], ab_to[i]
            t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            eps, x0 = _eps_and_x0(x, guided_prediction(model, x, t_batch, cond), ab_t, plan.prediction)
            sigma = eta * ((1 - ab_prev) / (1 - ab_t) * (1 - ab_t / ab_prev)).sqrt()
            x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
            if eta > 0 and i < last:
                x = x + sigma * _randn(x.shape, generator, device)
    return x


def ddpm_sample(model: nn.Module, x_T: torch.Tensor, plan: SamplingPlan, cond: Condition, *,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Ancestral sampling (Ho et al. 2020, Alg. 2) with classifier-free guidance.

    Each step draws from the posterior q(x_{t'} | x_t, x0_hat) (DDPM eqs. 6-7) with its variance
    beta_tilde = (1 - alpha_bar_{t'}) / (1 - alpha_bar_t) * beta_t' ("fixed small"), where for a
    sub-sequence beta_t' = 1 - alpha_bar_t / alpha_bar_{t'} (Nichol & Dhariwal 2021, Sec. 4): DDIM's eta = 1, so
    a plan with another eta is refused. The last step returns the mean without noise.
    """
    check_prediction(plan.prediction)
    if plan.eta not in (None, 1.0):
        raise ValueError(f"eta: ddpm's steps are ancestral (eta = 1 by construction), got {plan.eta}; "
                         f"use ddim for another eta")
    device = x_T.device
    x = x_T.to(torch.float32)
    ab_from, ab_to = plan.alpha_bars(device)
    last = len(plan.timesteps) - 1
    with _eval_mode(model):
        for i, t in enumerate(plan.timesteps):
            ab_t, ab_prev = ab_from[i], ab_to[i]
            alpha = ab_t / ab_prev
            beta = 1 - alpha
            t_batch = torch.full((x.shape[0],), t, device=device, dtype=torch.long)
            _, x0 = _eps_and_x0(x, guided_prediction(model, x, t_batch, cond), ab_t, plan.prediction)
            x = ab_prev.sqrt() * beta / (1 - ab_t) * x0 + alpha.sqrt() * (1 - ab_prev) / (1 - ab_t) * x  # mu_tilde
            if i < last:
                var = beta * (1 - ab_prev) / (1 - ab_t)
                x = x + var.sqrt() * _randn(x.shape, generator, device)
    return x


SAMPLERS: dict[str, Sampler] = {
    "ddim": ddim_sample,
    "ddpm": ddpm_sample,
}

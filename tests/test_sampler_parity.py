"""Our DDIM against diffusers' DDIMScheduler loop: Stable Diffusion's exact timestep schedule and update.

Both loops drive the same deterministic model (a fixed torch function of x, t and the condition) from the same
x_T, with classifier-free guidance done the way StableDiffusionPipeline does it; the final latents must agree.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ldm_core.diffusion import DiffusionConfig, NoiseSchedule
from ldm_core.sampling import Condition, ddim_sample, guided_prediction, sample_timesteps, sampling_plan

diffusers = pytest.importorskip("diffusers")
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg  # noqa: E402

from benchmarks.parity_cases import GUIDANCE, SD_DDIM, SPACING_SETTINGS, T, diffusers_loop, model, spacing_gap  # noqa: E402

MALFORMED_TRAILING = 62
"""Step counts in [1, 1000] for which diffusers 0.42's trailing spacing emits steps + 1 timesteps, the last -1."""


@pytest.mark.parametrize("steps", [50, 30, 7])
@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_ddim_matches_diffusers_with_stable_diffusion_settings(steps, prediction):
    scheduler = diffusers.DDIMScheduler(**SD_DDIM, prediction_type="epsilon" if prediction == "eps" else "v_prediction")
    scheduler.set_timesteps(steps)
    assert sample_timesteps(T, steps, "leading", steps_offset=1) == scheduler.timesteps.tolist()

    g = torch.Generator().manual_seed(0)
    x_T = torch.randn(3, 4, 8, 8, generator=g)
    context = torch.randn(3, 5, 16, generator=g)
    null_context = torch.zeros(5, 16)
    schedule, cond = NoiseSchedule(DiffusionConfig(prediction=prediction)), Condition(context, None, null_context, None, GUIDANCE)
    ours = ddim_sample(model, x_T, sampling_plan(schedule, steps, spacing="leading", steps_offset=1, set_alpha_to_one=False), cond)
    theirs = diffusers_loop(scheduler, x_T, context, null_context, steps, eta=0.0)
    diff = (ours - theirs).abs().max().item()
    print(f"DDIM {steps} steps, {prediction}: max |ours - diffusers| = {diff:.2e} (latent std {theirs.std().item():.3f})")
    assert diff <= 1e-4
    # The settings matter: SD's alpha_bar_0 as the last target differs from alpha_bar = 1.
    to_one = ddim_sample(model, x_T, sampling_plan(schedule, steps, spacing="leading", steps_offset=1), cond)
    assert (to_one - theirs).abs().max().item() > 1e-3


def test_zero_terminal_snr_schedule_matches_diffusers_rescaling():
    """diffusers' DDIMScheduler(rescale_betas_zero_snr=True) implements the same Alg. 1 of Lin et al. 2024."""
    scheduler = diffusers.DDIMScheduler(**{**SD_DDIM, "timestep_spacing": "trailing", "steps_offset": 0},
                                        prediction_type="v_prediction", rescale_betas_zero_snr=True)
    ours = NoiseSchedule(DiffusionConfig(prediction="v", zero_terminal_snr=True)).alpha_bar
    theirs = scheduler.alphas_cumprod
    assert ours[-1].item() == 0.0 == theirs[-1].item()
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("steps", [50, 25])
def test_zero_terminal_snr_trailing_ddim_matches_diffusers(steps):
    """Lin et al. 2024's recipe (zero terminal SNR, v-prediction, trailing steps from t = T-1) sampled by both."""
    scheduler = diffusers.DDIMScheduler(**{**SD_DDIM, "timestep_spacing": "trailing", "steps_offset": 0,
                                           "set_alpha_to_one": True},
                                        prediction_type="v_prediction", rescale_betas_zero_snr=True)
    g = torch.Generator().manual_seed(1)
    x_T = torch.randn(3, 4, 8, 8, generator=g)
    context = torch.randn(3, 5, 16, generator=g)
    null_context = torch.zeros(5, 16)
    schedule = NoiseSchedule(DiffusionConfig(prediction="v", zero_terminal_snr=True))
    ours = ddim_sample(model, x_T, sampling_plan(schedule, steps), Condition(context, None, null_context, None, GUIDANCE))
    theirs = diffusers_loop(scheduler, x_T, context, null_context, steps, eta=0.0)
    assert scheduler.timesteps.tolist() == sample_timesteps(T, steps, "trailing")
    diff = (ours - theirs).abs().max().item()
    print(f"zero-terminal-SNR DDIM {steps} steps, v: max |ours - diffusers| = {diff:.2e}")
    assert torch.isfinite(ours).all() and diff <= 1e-4


@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
def test_timesteps_match_diffusers_for_every_step_count(spacing):
    """Every step count in [1, T]: our timesteps are DDIMScheduler's (its steps_offset=1 ignored, as diffusers does
    outside "leading"); where diffusers' trailing spacing emits an extra t = -1, ours are its first `steps`."""
    scheduler = diffusers.DDIMScheduler(**{**SD_DDIM, "timestep_spacing": spacing})
    malformed = []
    for steps in range(1, T + 1):
        scheduler.set_timesteps(steps)
        theirs = scheduler.timesteps.tolist()
        ours = sample_timesteps(T, steps, spacing, steps_offset=1)
        if len(theirs) != steps:
            malformed.append(steps)
            assert (len(theirs), theirs[-1]) == (steps + 1, -1), steps
        assert ours == theirs[:steps], steps
    assert len(malformed) == (MALFORMED_TRAILING if spacing == "trailing" else 0)
    assert spacing == "linspace" or {61, 497} <= set(malformed)


@pytest.mark.parametrize("steps", [7, 30, 48, 61])
@pytest.mark.parametrize("spacing", ["trailing", "linspace"])
@pytest.mark.parametrize("setting", sorted(SPACING_SETTINGS))
def test_trailing_and_linspace_ddim_match_diffusers(steps, spacing, setting):
    """Final latents within 1e-4 of DDIMScheduler's, each step landing on t - T // steps as there. At 61 trailing steps
    diffusers visits an extra t = -1 (its bug): the comparison is with its first 61 steps, and its own result is off."""
    gap, theirs_count = spacing_gap(spacing, setting, steps)
    print(f"DDIM {spacing} {steps} steps, {setting}: max |ours - diffusers| = {gap:.2e}")
    assert gap <= 1e-4
    if theirs_count != steps:
        assert (spacing, steps) == ("trailing", 61)
        as_is, _ = spacing_gap(spacing, setting, steps, as_is=True)
        assert not as_is <= 1e-2  # diffusers' extra step at t = -1 (alpha_bar[-1], the noisiest) moves the result


@pytest.mark.parametrize("phi", [0.7, 1.0])
def test_guidance_rescale_matches_diffusers_rescale_noise_cfg(phi):
    """Lin et al.'s guidance rescale (Sec. 3.4) as diffusers' StableDiffusionPipeline applies it: one guided prediction,
    then a whole zero-terminal-SNR DDIM run (where it matters) with guidance_rescale on both sides."""
    g = torch.Generator().manual_seed(3)
    x, t = torch.randn(3, 4, 8, 8, generator=g), torch.tensor([999, 500, 20])
    context, null_context = torch.randn(3, 5, 16, generator=g), torch.zeros(5, 16)
    out_u, out_c = model(x, t, null_context.expand(3, -1, -1)), model(x, t, context)
    theirs = rescale_noise_cfg(out_u + GUIDANCE * (out_c - out_u), out_c, guidance_rescale=phi)
    ours = guided_prediction(model, x, t, Condition(context, None, null_context, None, GUIDANCE, guidance_rescale=phi))
    torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)

    scheduler = diffusers.DDIMScheduler(**{**SD_DDIM, "timestep_spacing": "trailing", "set_alpha_to_one": True},
                                        prediction_type="v_prediction", rescale_betas_zero_snr=True)
    schedule = NoiseSchedule(DiffusionConfig(prediction="v", zero_terminal_snr=True))
    cond = Condition(context, None, null_context, None, GUIDANCE, guidance_rescale=phi)
    ours = ddim_sample(model, x, sampling_plan(schedule, 25), cond)
    theirs = diffusers_loop(scheduler, x, context, null_context, 25, eta=0.0, guidance_rescale=phi)
    plain = ddim_sample(model, x, sampling_plan(schedule, 25), Condition(context, None, null_context, None, GUIDANCE))
    print(f"guidance rescale {phi}: max |ours - diffusers| = {(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max().item() <= 1e-4 and (ours - plain).abs().max().item() > 1e-3

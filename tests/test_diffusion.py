"""Noise schedules, forward-process identities, training loss, condition dropout, guidance and samplers."""

from __future__ import annotations

import math
import pickle

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from torch import nn

from ldm_core.diffusion import (
    DiffusionConfig,
    NoiseSchedule,
    drop_condition,
    min_snr_weight,
    predict_eps_from_v,
    predict_eps_from_x0,
    predict_x0_from_eps,
    predict_x0_from_v,
    q_sample,
    rescale_zero_terminal_snr,
    training_loss,
    v_target,
)
from ldm_core.sampling import (SAMPLERS, Condition, ddim_sample, ddpm_sample, guided_eps, guided_prediction,
                               rescale_guidance, sample_timesteps, sampling_plan)
from ldm_core.unet import UNet, UNetConfig

T = 1000
CTX_DIM = 8


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and on shared cores two threads per process thrash (40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_unet(seed: int = 0) -> UNet:
    """Tiny U-Net with its zero-initialised layers randomised, so predictions are non-trivial."""
    torch.manual_seed(seed)
    model = UNet(UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                            num_heads=2, context_dim=CTX_DIM, norm_groups=8))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model.eval()


def condition(batch: int = 2, tokens: int = 5, seed: int = 3):
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(batch, tokens, CTX_DIM, generator=g)
    mask = torch.ones(batch, tokens, dtype=torch.bool)
    mask[0, 3:] = False
    null_context = torch.randn(tokens, CTX_DIM, generator=g)
    null_mask = torch.zeros(tokens, dtype=torch.bool)
    null_mask[:2] = True
    return context, mask, null_context, null_mask


class GaussianOracle(nn.Module):
    """The exact minimiser of the diffusion loss for data x0 ~ N(mu, sigma^2 I): x_t is Gaussian too, so
    E[eps | x_t] = sqrt(1 - alpha_bar_t) (x_t - sqrt(alpha_bar_t) mu) / (alpha_bar_t sigma^2 + 1 - alpha_bar_t),
    returned as eps or as the matching v. Ignores the condition."""

    def __init__(self, mu: float, sigma: float, alpha_bar: torch.Tensor, prediction: str):
        super().__init__()
        self.mu, self.sigma, self.alpha_bar, self.prediction = mu, sigma, alpha_bar, prediction

    def forward(self, x, t, context, context_mask=None):
        ab = self.alpha_bar[t].reshape(-1, *([1] * (x.ndim - 1)))
        var = ab * self.sigma**2 + 1 - ab  # Var[x_t]
        eps = (1 - ab).sqrt() * (x - ab.sqrt() * self.mu) / var
        if self.prediction == "eps":
            return eps
        x0 = self.mu + ab.sqrt() * self.sigma**2 * (x - ab.sqrt() * self.mu) / var  # E[x0 | x_t], finite at alpha_bar 0
        return ab.sqrt() * eps - (1 - ab).sqrt() * x0


# ---------------------------------------------------------------------------------------------- schedules

def test_scaled_linear_alpha_bar_golden_values():
    schedule = NoiseSchedule(DiffusionConfig(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), T, dtype=np.float64) ** 2
    alpha_bar = np.cumprod(1.0 - betas)
    for t in (0, 1, 499, 999):
        assert schedule.alpha_bar[t].item() == pytest.approx(alpha_bar[t], rel=1e-6, abs=0)
    # Known values, to 6 digits.
    assert schedule.alpha_bar[0].item() == pytest.approx(1 - 0.00085, abs=1e-6)
    assert schedule.betas[-1].item() == pytest.approx(0.012, abs=1e-6)
    assert schedule.alpha_bar[1].item() == pytest.approx((1 - 0.00085) * (1 - betas[1]), abs=1e-6)
    assert schedule.alpha_bar_prev[0].item() == 1.0
    assert torch.allclose(schedule.alphas, 1 - schedule.betas)


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_schedules_are_monotone_and_inside_the_unit_interval(name):
    schedule = NoiseSchedule(DiffusionConfig(beta_schedule=name))
    ab = schedule.alpha_bar.double()
    assert torch.all(ab > 0) and torch.all(ab < 1)
    assert torch.all(ab[1:] < ab[:-1])
    assert torch.all(schedule.betas > 0) and torch.all(schedule.betas <= 0.999 + 1e-7)
    assert schedule.snr()[0] > 100 and schedule.snr()[-1] < 0.01


def test_linear_and_cosine_match_their_closed_forms():
    linear = NoiseSchedule(DiffusionConfig(beta_schedule="linear", beta_start=1e-4, beta_end=0.02))
    assert linear.betas[0].item() == pytest.approx(1e-4) and linear.betas[-1].item() == pytest.approx(0.02)
    assert linear.betas[500].item() == pytest.approx(1e-4 + 500 * (0.02 - 1e-4) / 999, rel=1e-6)

    cosine = NoiseSchedule(DiffusionConfig(beta_schedule="cosine"))
    s = 0.008
    f = lambda t: math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 250, 500, 900):  # before the 0.999 clip, alpha_bar_t = f(t + 1) / f(0)
        assert cosine.alpha_bar[t].item() == pytest.approx(f(t + 1) / f(0), rel=1e-5)
    assert cosine.betas[-1].item() == pytest.approx(0.999)  # the clip is active at the last step


def test_diffusion_config_rejects_bad_values():
    with pytest.raises(ValidationError, match="beta_start"):
        DiffusionConfig(beta_start=0.02, beta_end=0.01)
    with pytest.raises(ValidationError, match="beta_schedule"):
        DiffusionConfig(beta_schedule="quadratic")
    with pytest.raises(ValidationError, match="prediction"):
        DiffusionConfig(prediction="x0")


def test_zero_terminal_snr_rescaling_golden_values():
    """Lin et al. 2024, Alg. 1 on betas (0.1, 0.2, 0.3): sqrt(alpha_bar) = (0.94868, 0.84853, 0.70993) is shifted
    by its last value and scaled back to its first, giving alpha_bar = (0.9, 0.3032911, 0) (computed by hand)."""
    betas = rescale_zero_terminal_snr(np.array([0.1, 0.2, 0.3]))
    assert betas == pytest.approx([0.1, 1 - 0.3032910945 / 0.9, 1.0], abs=1e-9)
    assert np.cumprod(1 - betas)[-1] == 0.0


@pytest.mark.parametrize("name", ["linear", "scaled_linear", "cosine"])
def test_zero_terminal_snr_schedule_ends_at_pure_noise(name):
    plain = NoiseSchedule(DiffusionConfig(beta_schedule=name, prediction="v"))
    zero = NoiseSchedule(DiffusionConfig(beta_schedule=name, prediction="v", zero_terminal_snr=True))
    assert zero.alpha_bar[-1].item() == 0.0 and zero.snr()[-1].item() == 0.0 and zero.betas[-1].item() == 1.0
    assert zero.alpha_bar[0].item() == pytest.approx(plain.alpha_bar[0].item(), rel=1e-6)
    assert torch.all(zero.alpha_bar[1:] < zero.alpha_bar[:-1])
    # sqrt(alpha_bar) is an affine function of the original one (the whole point of the rescaling).
    a, b = plain.alpha_bar.double().sqrt(), zero.alpha_bar.double().sqrt()
    slope = (b[0] - b[-1]) / (a[0] - a[-1])
    assert torch.allclose(b, slope * (a - a[-1]), atol=1e-6)
    # The bundle's config rebuilds it: pickling (as Ray does) keeps the rescaling.
    assert pickle.loads(pickle.dumps(zero)).alpha_bar[-1].item() == 0.0


def test_recipe_options_are_validated():
    with pytest.raises(ValidationError, match="zero_terminal_snr needs prediction='v'"):
        DiffusionConfig(zero_terminal_snr=True)
    for bad in ({"snr_gamma": 0}, {"offset_noise": -0.1}, {"input_perturbation": -1}):
        with pytest.raises(ValidationError):
            DiffusionConfig(**bad)
    cfg = DiffusionConfig(prediction="v", snr_gamma=5, offset_noise=0.1, input_perturbation=0.1, zero_terminal_snr=True)
    assert cfg.loss_options() == {"prediction": "v", "snr_gamma": 5, "offset_noise": 0.1, "input_perturbation": 0.1}
    assert DiffusionConfig().loss_options() == {"prediction": "eps", "snr_gamma": None, "offset_noise": 0.0,
                                                "input_perturbation": 0.0}


def test_schedule_pickles_as_its_config():
    schedule = NoiseSchedule(DiffusionConfig(beta_schedule="cosine", num_timesteps=50))
    payload = pickle.dumps(schedule)
    restored = pickle.loads(payload)
    assert restored.config == schedule.config
    assert torch.equal(restored.alpha_bar, schedule.alpha_bar)
    assert len(payload) < 2000  # config only, not the (T,) tensors


# -------------------------------------------------------------------------------------- forward process

def test_q_sample_endpoints():
    schedule = NoiseSchedule(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(8, 4, 16, 16, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    corr = lambda a, b: torch.corrcoef(torch.stack([a.flatten(), b.flatten()]))[0, 1].item()  # noqa: E731

    first = q_sample(x0, torch.zeros(8, dtype=torch.long), eps, schedule.alpha_bar)
    assert corr(first, x0) > 0.999
    assert (first - x0).abs().mean() < 0.05

    last = q_sample(x0, torch.full((8,), T - 1), eps, schedule.alpha_bar)
    signal = schedule.alpha_bar[-1].sqrt().item()
    print(f"scaled_linear: sqrt(alpha_bar[T-1]) = {signal:.4f}, corr(x_T, x0) = {corr(last, x0):.4f}")
    assert signal == pytest.approx(0.0683, abs=5e-4)
    assert abs(corr(last, x0)) < 0.1
    assert corr(last, eps) > 0.99


def test_v_and_eps_parametrisations_invert_each_other():
    schedule = NoiseSchedule(DiffusionConfig())
    ab = schedule.alpha_bar
    g = torch.Generator().manual_seed(1)
    x0 = torch.randn(6, 4, 4, 4, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    t = torch.tensor([0, 1, 200, 500, 900, 999])
    x_t = q_sample(x0, t, eps, ab)
    v = v_target(x0, t, eps, ab)
    assert torch.allclose(predict_x0_from_v(x_t, t, v, ab), x0, atol=1e-5)
    assert torch.allclose(predict_eps_from_v(x_t, t, v, ab), eps, atol=1e-5)
    assert torch.allclose(predict_x0_from_eps(x_t, t, eps, ab), x0, atol=1e-3)
    assert torch.allclose(predict_eps_from_x0(x_t, t, x0, ab), eps, atol=1e-3)
    # v is not eps: the identities above would fail if v_target returned eps.
    assert (v - eps).abs().mean() > 0.1


# ---------------------------------------------------------------------------------------------- training

def fixed_loss_inputs():
    """SD's schedule, the tiny U-Net, a condition, and fixed x0, eps and t = (5, 700) for two samples."""
    context, mask, _, _ = condition()
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g)
    eps = torch.randn(x0.shape, generator=g)
    return NoiseSchedule(DiffusionConfig()), tiny_unet(), context, mask, x0, eps, torch.tensor([5, 700])


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_is_mse_to_the_right_target(prediction):
    schedule, model, context, mask, x0, eps, t = fixed_loss_inputs()
    loss, metrics = training_loss(model, x0, context, mask, schedule, prediction=prediction, t=t, eps=eps)

    betas = np.linspace(np.sqrt(0.00085), np.sqrt(0.012), T) ** 2
    ab = torch.tensor(np.cumprod(1 - betas)[t.numpy()], dtype=torch.float32)[:, None, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    target = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    with torch.no_grad():
        expected = (model(x_t, t, context, mask) - target).square().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-4)
    assert set(metrics) >= {"loss", "loss_std", "loss_min", "loss_max"}
    assert metrics["loss_min"] <= metrics["loss"] <= metrics["loss_max"]
    assert loss.requires_grad


def test_training_loss_draws_are_reproducible_from_the_generator():
    schedule = NoiseSchedule(DiffusionConfig())
    model = tiny_unet()
    context, mask, _, _ = condition()
    x0 = torch.randn(2, 4, 8, 8)
    run = lambda seed: training_loss(  # noqa: E731
        model, x0, context, mask, schedule, prediction="eps", generator=torch.Generator().manual_seed(seed))[0]
    assert run(7).item() == run(7).item()
    assert run(7).item() != run(8).item()
    with pytest.raises(ValueError, match="prediction"):
        training_loss(model, x0, context, mask, schedule, prediction="x0")


def test_min_snr_weight_golden_values():
    """Hang et al. 2023: min(SNR, gamma) / SNR for eps, min(SNR, gamma) / (SNR + 1) for v. SD's schedule has
    SNR_0 = 0.99915 / 0.00085 = 1175.47 and SNR_999 = 0.004682 (alpha_bar_999 = 0.0046600)."""
    schedule = NoiseSchedule(DiffusionConfig())
    snr = schedule.snr()[[0, 999]]
    assert snr[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)
    eps_w, v_w = min_snr_weight(snr, 5.0, "eps"), min_snr_weight(snr, 5.0, "v")
    assert eps_w.tolist() == pytest.approx([5.0 / 1175.47, 1.0], rel=1e-4)
    assert v_w.tolist() == pytest.approx([5.0 / 1176.47, 0.0046600 / 1.0], rel=1e-3)
    # Below gamma the v weight is SNR / (SNR + 1) = alpha_bar; at SNR 0 (zero terminal SNR) both stay finite.
    assert v_w[1].item() == pytest.approx(schedule.alpha_bar[999].item(), rel=1e-5)
    assert min_snr_weight(torch.tensor([0.0]), 5.0, "eps").item() == 1.0
    assert min_snr_weight(torch.tensor([0.0]), 5.0, "v").item() == 0.0


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_training_loss_min_snr_weights_each_sample(prediction):
    schedule, model, context, mask, x0, eps, t = fixed_loss_inputs()
    plain, _ = training_loss(model, x0, context, mask, schedule, prediction=prediction, t=t, eps=eps)
    weighted, metrics = training_loss(model, x0, context, mask, schedule, prediction=prediction, t=t, eps=eps, snr_gamma=5.0)

    x_t = q_sample(x0, t, eps, schedule.alpha_bar)
    target = eps if prediction == "eps" else v_target(x0, t, eps, schedule.alpha_bar)
    with torch.no_grad():
        mse = (model(x_t, t, context, mask) - target).square().flatten(1).mean(1)
    snr = schedule.snr()[t]
    weight = torch.minimum(snr, torch.tensor(5.0)) / (snr if prediction == "eps" else snr + 1)
    assert weighted.item() == pytest.approx((weight * mse).mean().item(), rel=1e-5)
    assert metrics["mse"].item() == pytest.approx(plain.item(), rel=1e-6)
    assert metrics["snr_weight_mean"].item() == pytest.approx(weight.mean().item(), rel=1e-6)
    assert weight[0] < 0.05  # t = 5 (SNR ~ 600) is down-weighted: the point of Min-SNR
    assert weighted.requires_grad


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_offset_noise_and_input_perturbation_build_the_documented_noise(prediction):
    """Re-draw the generator's numbers in the documented order (t, eps, offset, xi) and rebuild the loss by hand:
    offset noise changes the noise and the target, input perturbation only the network's input."""
    schedule = NoiseSchedule(DiffusionConfig())
    model = tiny_unet()
    context, mask, _, _ = condition()
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(9))
    loss, _ = training_loss(model, x0, context, mask, schedule, prediction=prediction, generator=torch.Generator().manual_seed(4),
                            offset_noise=0.1, input_perturbation=0.2)

    g = torch.Generator().manual_seed(4)
    t = torch.randint(0, T, (2,), generator=g)
    eps = torch.randn(x0.shape, generator=g) + 0.1 * torch.randn(2, 4, 1, 1, generator=g)
    xi = torch.randn(x0.shape, generator=g)
    ab = schedule.alpha_bar[t][:, None, None, None]
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * (eps + 0.2 * xi)
    target = eps if prediction == "eps" else ab.sqrt() * eps - (1 - ab).sqrt() * x0
    with torch.no_grad():
        expected = (model(x_t, t, context, mask) - target).square().mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)

    # Off, they draw nothing: the same seed gives the plain loss of the first two draws.
    plain = lambda **kw: training_loss(model, x0, context, mask, schedule, prediction=prediction,  # noqa: E731
                                       generator=torch.Generator().manual_seed(4), **kw)[0].item()
    assert plain() == plain(offset_noise=0.0, input_perturbation=0.0) != loss.item()
    # An explicit eps is used as is (no offset added); the perturbation still applies.
    g = torch.Generator().manual_seed(4)
    t, eps = torch.randint(0, T, (2,), generator=g), torch.randn(x0.shape, generator=g)
    given = training_loss(model, x0, context, mask, schedule, prediction=prediction, t=t, eps=eps, offset_noise=5.0)[0]
    assert given.item() == pytest.approx(plain(), rel=1e-6)


def test_offset_noise_shifts_whole_channels():
    """The offset part is constant over a sample's pixels: with a strong offset the per-channel means of the
    noise spread far beyond the 1/sqrt(h*w) of white noise."""
    schedule = NoiseSchedule(DiffusionConfig())
    x0 = torch.zeros(256, 4, 8, 8)
    seen = {}
    identity = lambda x, t, c, m: torch.zeros_like(x)  # noqa: E731  loss = mean(eps^2): reads the noise back
    for strength in (0.0, 1.0):
        _, m = training_loss(identity, x0, torch.zeros(256, 1, CTX_DIM), None, schedule, prediction="eps",
                             generator=torch.Generator().manual_seed(0), offset_noise=strength)
        seen[strength] = m["target_std"].item() ** 2
    assert seen[0.0] == pytest.approx(1.0, abs=0.02)
    assert seen[1.0] == pytest.approx(2.0, abs=0.2)  # Var = 1 + strength^2


def test_drop_condition_replaces_whole_samples_with_probability_p():
    b, tokens = 4000, 3
    context = torch.randn(b, tokens, 2)
    mask = torch.ones(b, tokens, dtype=torch.bool)
    null_context = torch.full((1, tokens, 2), 7.0)
    null_mask = torch.tensor([[True, False, False]])

    same_ctx, same_mask = drop_condition(context, mask, null_context, null_mask, 0.0)
    assert torch.equal(same_ctx, context) and torch.equal(same_mask, mask)
    all_ctx, all_mask = drop_condition(context, mask, null_context, null_mask, 1.0)
    assert torch.all(all_ctx == 7.0) and torch.equal(all_mask, null_mask.expand(b, -1))

    new_ctx, new_mask = drop_condition(context, mask, null_context, null_mask, 0.1, torch.Generator().manual_seed(0))
    dropped = (new_ctx == 7.0).all(dim=(1, 2))
    kept = (new_ctx == context).all(dim=(1, 2))
    assert torch.all(dropped ^ kept)  # each sample is either fully replaced or untouched
    assert torch.equal(new_mask[dropped], null_mask.expand(int(dropped.sum()), -1))
    assert torch.all(new_mask[kept])
    assert 0.08 < dropped.float().mean().item() < 0.12
    again, _ = drop_condition(context, mask, null_context, null_mask, 0.1, torch.Generator().manual_seed(0))
    assert torch.equal(again, new_ctx)
    assert torch.equal(context[:, 0, 0], context[:, 0, 0].clone())  # inputs untouched
    with pytest.raises(ValueError, match="null_context"):
        drop_condition(context, mask, null_context[:, :2], null_mask[:, :2], 0.5)


# ---------------------------------------------------------------------------------------------- guidance

def test_guidance_matches_separate_forwards():
    model = tiny_unet()
    context, mask, null_context, null_mask = condition()
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([100, 800])
    with torch.no_grad():
        cond = model(x, t, context, mask)
        uncond = model(x, t, null_context.expand(2, -1, -1), null_mask.expand(2, -1))
        guide = lambda scale: guided_prediction(model, x, t, Condition(context, mask, null_context, null_mask, scale))  # noqa: E731
        assert torch.allclose(guide(1.0), cond, atol=1e-5)
        assert torch.allclose(guide(0.0), uncond, atol=1e-5)
        guided = guided_eps(model, x, t, Condition(context, mask, null_context, null_mask, 3.0))
        assert torch.allclose(guided, uncond + 3.0 * (cond - uncond), atol=1e-4)
        assert (cond - uncond).abs().mean() > 1e-3

        # A shorter null prompt is padded with masked tokens: same result as the unpadded one.
        short = guided_prediction(model, x, t, Condition(context, mask, null_context[:2], null_mask[:2], 0.0))
        assert torch.allclose(short, uncond, atol=1e-5)

        # v-prediction: guided eps = sqrt(1 - alpha_bar) x + sqrt(alpha_bar) v_guided.
        ab = NoiseSchedule(DiffusionConfig()).alpha_bar
        unguided = Condition(context, mask, null_context, null_mask, 1.0)
        v_eps = guided_eps(model, x, t, unguided, prediction="v", alpha_bar=ab)
        assert torch.allclose(v_eps, predict_eps_from_v(x, t, cond, ab), atol=1e-5)
    with pytest.raises(ValueError, match="alpha_bar"):
        guided_eps(model, x, t, unguided, prediction="v")


def test_guidance_rescale_restores_the_conditional_std_per_sample():
    """Lin et al. 2024, Sec. 3.4: phi = 1 gives the guided output the conditional output's std, sample by sample;
    phi = 0 is plain guidance; in between, the linear mix of the two."""
    g = torch.Generator().manual_seed(4)
    guided, out_c = 3.0 * torch.randn(3, 4, 8, 8, generator=g) + 1.0, torch.randn(3, 4, 8, 8, generator=g)
    full = rescale_guidance(guided, out_c, 1.0)
    torch.testing.assert_close(full.flatten(1).std(1), out_c.flatten(1).std(1))
    torch.testing.assert_close(full / guided, (out_c.flatten(1).std(1) / guided.flatten(1).std(1)).reshape(3, 1, 1, 1)
                               .expand_as(guided))
    assert torch.equal(rescale_guidance(guided, out_c, 0.0), guided)
    torch.testing.assert_close(rescale_guidance(guided, out_c, 0.7), 0.7 * full + 0.3 * guided)
    model = tiny_unet()
    context, mask, null_context, null_mask = condition()
    x, t = torch.randn(2, 4, 8, 8, generator=g), torch.tensor([100, 800])
    with torch.no_grad():
        plain = guided_prediction(model, x, t, Condition(context, mask, null_context, null_mask, 5.0))
        cond = guided_prediction(model, x, t, Condition(context, mask, null_context, null_mask, 1.0))
        rescaled = guided_prediction(model, x, t, Condition(context, mask, null_context, null_mask, 5.0, guidance_rescale=0.7))
    torch.testing.assert_close(rescaled, rescale_guidance(plain, cond, 0.7))
    assert (rescaled - plain).abs().max() > 1e-3
    with pytest.raises(ValueError, match="guidance_rescale"):
        Condition(context, mask, null_context, null_mask, 5.0, guidance_rescale=1.5)


# ---------------------------------------------------------------------------------------------- samplers

def test_timestep_spacings():
    trailing = sample_timesteps(T, 50, "trailing")
    assert trailing[0] == T - 1 and trailing[-1] == 19 and len(trailing) == 50
    leading = sample_timesteps(T, 50, "leading")
    assert leading[0] == 980 and leading[-1] == 0
    linspace = sample_timesteps(T, 4, "linspace")
    assert linspace == [999, 666, 333, 0]
    assert sample_timesteps(T, T) == list(range(T - 1, -1, -1))
    for ts in (trailing, leading):
        assert all(a > b for a, b in zip(ts, ts[1:]))
    with pytest.raises(ValueError, match="steps"):
        sample_timesteps(T, T + 1)
    with pytest.raises(ValueError, match="spacing"):
        sample_timesteps(T, 10, "karras")


@pytest.mark.parametrize("steps", [61, 497, 3, 7, 48, 333, 999])
def test_trailing_spacing_gives_exactly_steps_timesteps(steps):
    """A float arange(T, 0, -T/steps) yields steps + 1 values for 61 or 497 steps at T = 1000 (diffusers' t = -1):
    exactly `steps` are kept, from T-1 down, each within one half of T (steps - k) / steps - 1."""
    ts = sample_timesteps(T, steps, "trailing")
    assert len(ts) == steps and ts[0] == T - 1 and all(a > b for a, b in zip(ts, ts[1:])) and ts[-1] >= 0
    assert all(abs(t - (T * (steps - k) / steps - 1)) <= 0.5 + 1e-9 for k, t in enumerate(ts))


def test_trailing_spacing_rounds_as_diffusers_and_lands_where_diffusers_steps():
    """Golden values of DDIMScheduler (diffusers 0.42): at 48 steps T - k T/48 = 937.5 for k = 3 comes out of the float
    arange a hair below, so it rounds to 937 - 1 = 936; each step lands on t - T // steps (here 20), not on the next
    visited timestep, and the last one on t = 0 when T // steps <= the last timestep (7 steps: 142 -> 0)."""
    ts = sample_timesteps(T, 48, "trailing")
    assert [ts[k] for k in (3, 15, 27, 39)] == [936, 686, 436, 186]
    plan = sampling_plan(NoiseSchedule(DiffusionConfig()), 48)
    assert plan.targets[:4] == (979, 958, 937, 916) and plan.timesteps[1:4] == (978, 957, 936)
    seven = sampling_plan(NoiseSchedule(DiffusionConfig()), 7)
    assert seven.timesteps == (999, 856, 713, 570, 428, 285, 142)
    assert seven.targets == (857, 714, 571, 428, 286, 143, 0)
    fifty = sampling_plan(NoiseSchedule(DiffusionConfig()), 50)  # steps divide T: the next visited timestep, then past 0
    assert fifty.targets == fifty.timesteps[1:] + (-1,)
    linspace = sampling_plan(NoiseSchedule(DiffusionConfig()), 4, spacing="linspace")
    assert linspace.timesteps == (999, 666, 333, 0) and linspace.targets == (749, 416, 83, -1)


def test_stable_diffusion_leading_spacing_with_offset():
    sd = sample_timesteps(T, 50, "leading", steps_offset=1)
    assert sd == list(range(981, 0, -20))  # 981, 961, ..., 1: Stable Diffusion's 50 DDIM steps
    assert sample_timesteps(T, 30, "leading", steps_offset=1)[:2] == [958, 925]
    # diffusers adds steps_offset for "leading" only; so does sample_timesteps.
    assert sample_timesteps(T, 50, "trailing", steps_offset=1) == sample_timesteps(T, 50, "trailing")
    assert sample_timesteps(T, 7, "linspace", steps_offset=1) == sample_timesteps(T, 7, "linspace")
    with pytest.raises(ValueError, match="steps_offset=20"):
        sample_timesteps(T, 50, "leading", steps_offset=20)  # 980 + 20 is past the schedule


@pytest.mark.parametrize("set_alpha_to_one", [True, False])
def test_ddim_last_step_goes_to_alpha_bar_one_or_alpha_bar_zero(set_alpha_to_one):
    """One DDIM step from t = 1 (leading spacing, offset 1) lands at alpha_bar = 1 (x0_hat) or, as in Stable
    Diffusion, at alpha_bar_0: sqrt(alpha_bar_0) x0_hat + sqrt(1 - alpha_bar_0) eps_hat."""
    schedule = NoiseSchedule(DiffusionConfig())
    model = tiny_unet()
    context, mask, null_context, null_mask = condition()
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    cond = Condition(context, mask, null_context, null_mask, 2.0)
    plan = sampling_plan(schedule, 1, spacing="leading", steps_offset=1, set_alpha_to_one=set_alpha_to_one)
    out = ddim_sample(model, x_T, plan, cond)
    t = torch.tensor([1, 1])
    with torch.no_grad():
        eps = guided_prediction(model, x_T, t, cond)
    x0 = predict_x0_from_eps(x_T, t, eps, schedule.alpha_bar)
    ab0 = schedule.alpha_bar[0]
    expected = x0 if set_alpha_to_one else ab0.sqrt() * x0 + (1 - ab0).sqrt() * eps
    assert torch.allclose(out, expected, atol=1e-5)


@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
def test_zero_terminal_snr_sampling_starts_from_pure_noise(sampler, eta):
    """With alpha_bar_{T-1} = 0 the true q(x_T) is N(0, I) whatever the data: sampling from plain noise with the
    optimal v-predictor (finite at SNR 0) must recover N(mu, sigma^2), and a short trailing run stays finite."""
    schedule = NoiseSchedule(DiffusionConfig(prediction="v", zero_terminal_snr=True))
    mu, sigma, n = 1.5, 0.5, 4096
    oracle = GaussianOracle(mu, sigma, schedule.alpha_bar, "v")
    context, mask, null_context, null_mask = condition(batch=n)
    x_T = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    cond = Condition(context, mask, null_context, null_mask, 1.0)
    out = SAMPLERS[sampler](oracle, x_T, sampling_plan(schedule, T, eta=eta), cond, generator=torch.Generator().manual_seed(0))
    print(f"zero terminal SNR, {sampler} eta={eta}: mean {out.mean().item():.4f} std {out.std().item():.4f}")
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(sigma, abs=0.02)
    short = SAMPLERS[sampler](oracle, x_T, sampling_plan(schedule, 25, eta=eta), cond, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(short).all() and short.mean().item() == pytest.approx(mu, abs=0.05)


@pytest.mark.parametrize("prediction", ["eps", "v"])
@pytest.mark.parametrize(("sampler", "eta"), [("ddim", 0.0), ("ddim", 1.0), ("ddpm", None)])
def test_samplers_reproduce_a_gaussian_data_distribution(sampler, eta, prediction):
    """With the exact optimal predictor for x0 ~ N(mu, sigma^2) and x_T from the true marginal q(x_T),
    all T steps must give samples with mean mu and std sigma (few steps underestimate the std: a
    discretisation error, e.g. 0.47 at 50 DDIM steps, 0.39 at 10)."""
    schedule = NoiseSchedule(DiffusionConfig(prediction=prediction))
    mu, sigma, n = 1.5, 0.5, 4096
    oracle = GaussianOracle(mu, sigma, schedule.alpha_bar, prediction)
    context, mask, null_context, null_mask = condition(batch=n)
    ab_T = schedule.alpha_bar[-1]
    z = torch.randn(n, 1, 1, 1, generator=torch.Generator().manual_seed(1))
    x_T = ab_T.sqrt() * mu + (ab_T * sigma**2 + 1 - ab_T).sqrt() * z
    out = SAMPLERS[sampler](oracle, x_T, sampling_plan(schedule, T, eta=eta),
                            Condition(context, mask, null_context, null_mask, 4.0), generator=torch.Generator().manual_seed(0))
    print(f"{sampler} eta={eta} {prediction}: mean {out.mean().item():.4f} std {out.std().item():.4f}")
    assert out.mean().item() == pytest.approx(mu, abs=0.02)
    assert out.std().item() == pytest.approx(sigma, abs=0.02)


def test_ddim_eta0_is_deterministic_and_eta1_depends_on_the_generator():
    schedule = NoiseSchedule(DiffusionConfig())
    model = tiny_unet()
    context, mask, null_context, null_mask = condition()
    shape = (2, 4, 8, 8)
    x_T = torch.randn(shape, generator=torch.Generator().manual_seed(1))

    def run(eta, seed, x_T=None):
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(shape, generator=g) if x_T is None else x_T
        return ddim_sample(model, x_T, sampling_plan(schedule, 5, eta=eta),
                           Condition(context, mask, null_context, null_mask, 2.0), generator=g)

    a, b = run(0.0, 0, x_T), run(0.0, 1, x_T)
    assert torch.equal(a, b)  # eta = 0: the generator is never used once x_T is given
    assert torch.isfinite(a).all() and (a - x_T).abs().mean() > 1e-2
    assert torch.equal(run(0.0, 3), run(0.0, 3))
    assert not torch.allclose(run(0.0, 3), run(0.0, 4))
    assert torch.equal(run(1.0, 3, x_T), run(1.0, 3, x_T))
    assert (run(1.0, 3, x_T) - run(1.0, 4, x_T)).abs().mean() > 1e-3
    assert not model.training


def test_ddpm_equals_ddim_with_eta_one():
    """DDIM with eta = 1 is ancestral sampling (Song et al. 2021, Sec. 4.1): two different formulas, same draws."""
    schedule = NoiseSchedule(DiffusionConfig(prediction="v"))
    model = tiny_unet()
    model.train()
    cond = Condition(*condition(), guidance_scale=3.0)
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    ddpm = ddpm_sample(model, x_T, sampling_plan(schedule, 8), cond, generator=torch.Generator().manual_seed(0))
    ddim = ddim_sample(model, x_T, sampling_plan(schedule, 8, eta=1.0), cond, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(ddpm, ddim, atol=1e-4)
    assert model.training  # the samplers restore the caller's mode
    with pytest.raises(ValueError, match="eta"):  # ddpm is ancestral: it refuses any other eta
        ddpm_sample(model, x_T, sampling_plan(schedule, 8, eta=0.0), cond)
    with pytest.raises(ValueError, match="eta"):
        sampling_plan(schedule, 8, eta=-0.1)

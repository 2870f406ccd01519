"""The first-stage autoencoder: posterior math, shapes at f=8, determinism, serialisation, config errors."""

from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError
from torch.distributions import Normal

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL, DiagonalGaussian, denormalize_latents, normalize_latents
from ldm_core.config import ConfigError


def tiny_config(**overrides) -> AutoencoderConfig:
    """f = 8 (four levels) with very few channels: fast on CPU."""
    fields = dict(base_channels=8, channel_mult=[1, 2, 2, 2], num_res_blocks=1, norm_groups=4)
    return AutoencoderConfig(**(fields | overrides))


# --- the posterior -----------------------------------------------------------------------------------


def test_kl_closed_form_matches_monte_carlo_estimate():
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(2, 4, 2, 2, generator=g)
    logvar = torch.randn(2, 4, 2, 2, generator=g) * 0.5
    q = DiagonalGaussian(mu, logvar)
    n = 200_000
    z = mu + torch.exp(0.5 * logvar) * torch.randn(n, *mu.shape, generator=g)  # (n, B, c, h, w)
    log_ratio = Normal(mu, torch.exp(0.5 * logvar)).log_prob(z) - Normal(0.0, 1.0).log_prob(z)
    kl_mc = log_ratio.sum(dim=(2, 3, 4)).mean(0)  # (B,)
    kl = q.kl()
    assert kl.shape == (2,)
    torch.testing.assert_close(kl, kl_mc, rtol=0.02, atol=0.05)


def test_nll_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mu, logvar, x = (torch.randn(3, 4, 2, 2, generator=g) for _ in range(3))
    expected = -Normal(mu, torch.exp(0.5 * logvar)).log_prob(x).sum(dim=(1, 2, 3))
    torch.testing.assert_close(DiagonalGaussian(mu, logvar).nll(x), expected)


def test_kl_of_standard_normal_is_zero_and_of_shifted_mean_is_half_squared_norm():
    zeros = torch.zeros(2, 4, 3, 3)
    assert torch.equal(DiagonalGaussian(zeros, zeros).kl(), torch.zeros(2))
    mu = torch.full((2, 4, 3, 3), 2.0)
    torch.testing.assert_close(DiagonalGaussian(mu, zeros).kl(), torch.full((2,), 0.5 * 4.0 * 36))


def test_sample_is_reparameterised_gradients_reach_mean_and_logvar():
    mu = torch.randn(2, 4, 2, 2, requires_grad=True)
    logvar = torch.randn(2, 4, 2, 2, requires_grad=True)
    z = DiagonalGaussian(mu, logvar).sample(torch.Generator().manual_seed(0))
    z.pow(2).sum().backward()
    assert mu.grad is not None and mu.grad.abs().sum() > 0
    assert logvar.grad is not None and logvar.grad.abs().sum() > 0


def test_sample_with_generator_is_reproducible_and_logvar_is_clamped():
    mu, logvar = torch.zeros(1, 4, 2, 2), torch.full((1, 4, 2, 2), 100.0)
    q = DiagonalGaussian(mu, logvar, logvar_min=-30.0, logvar_max=20.0)
    assert q.logvar.max().item() == 20.0
    a = q.sample(torch.Generator().manual_seed(7))
    b = q.sample(torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    assert not torch.equal(a, q.sample(torch.Generator().manual_seed(8)))


def test_deterministic_posterior_has_zero_std_and_zero_kl():
    mu = torch.randn(2, 4, 2, 2)
    q = DiagonalGaussian(mu, deterministic=True)
    assert torch.equal(q.sample(), mu) and torch.equal(q.mode(), mu)
    assert torch.equal(q.kl(), torch.zeros(2))
    with pytest.raises(ValueError, match="deterministic"):
        q.nll(mu)


# --- the model ---------------------------------------------------------------------------------------


def test_deterministic_kind_encodes_the_same_code_twice_while_the_vae_samples():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    det = AutoencoderKL(tiny_config(kind="deterministic")).eval()
    with torch.no_grad():
        a, b = det.encode(x).sample(), det.encode(x).sample()
        assert torch.equal(a, b)
        assert torch.equal(det.encode(x).kl(), torch.zeros(2))

    vae = AutoencoderKL(tiny_config(kind="kl")).eval()
    with torch.no_grad():
        q = vae.encode(x)
        assert not torch.equal(q.sample(), q.sample())
        assert (q.kl() > 0).all()
        assert torch.equal(vae.encode(x).mode(), q.mode())  # the mean itself is deterministic


def test_f8_shapes_64_and_256():
    model = AutoencoderKL(tiny_config()).eval()
    assert model.downsample_factor == 8
    with torch.no_grad():
        q = model.encode(torch.zeros(2, 3, 64, 64))
        assert q.mean.shape == (2, 4, 8, 8)
        assert model.decode(q.mode()).shape == (2, 3, 64, 64)

        small = AutoencoderKL(tiny_config(base_channels=4, channel_mult=[1, 1, 1, 1], norm_groups=2, mid_attention=False))
        q = small.encode(torch.zeros(1, 3, 256, 256))
        assert q.mean.shape == (1, 4, 32, 32)
        assert small.decode(q.sample()).shape == (1, 3, 256, 256)


def test_encode_rejects_sizes_not_divisible_by_f():
    model = AutoencoderKL(tiny_config())
    with pytest.raises(ValueError, match="divisible by the downsampling factor f=8"):
        model.encode(torch.zeros(1, 3, 60, 64))


def test_forward_trains_every_part_and_last_layer_is_decoder_output_conv():
    model = AutoencoderKL(tiny_config(channel_mult=[1, 2]))
    assert model.last_layer is model.decoder.conv_out.weight
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    recon, posterior = model(x)
    assert recon.shape == x.shape
    ((recon - x).abs().mean() + posterior.kl().mean()).backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert no_grad == []


def test_a_colour_head_trained_on_grey_images_tints_them_and_the_grey_head_cannot():
    """Issue 18's green MNIST grids: R = G = B in every training image does not make a 3-channel decoder output
    R = G = B; its channels drift apart (a tint). With grey_output the decoder predicts one intensity, repeated."""
    g = torch.Generator().manual_seed(0)
    x = (torch.rand(8, 1, 16, 16, generator=g) * 2 - 1).repeat(1, 3, 1, 1)  # grey images, (B, 3, H, W)
    spread = {}
    for grey in (False, True):
        torch.manual_seed(0)
        model = AutoencoderKL(tiny_config(channel_mult=[1, 2], grey_output=grey))
        opt = torch.optim.Adam(model.parameters(), lr=1e-3)
        for _ in range(20):
            recon, _ = model(x, sample_posterior=False)
            opt.zero_grad()
            (recon - x).abs().mean().backward()
            opt.step()
        with torch.no_grad():
            recon, _ = model(x, sample_posterior=False)
        assert recon.shape == x.shape
        spread[grey] = (recon[:, 1:] - recon[:, :1]).abs().max().item()
    assert spread[False] > 0.01  # the colour head's channels differ on grey input
    assert spread[True] == 0.0  # identical channels by construction
    assert AutoencoderKL(tiny_config(grey_output=True)).decoder.conv_out.out_channels == 1


def test_gradient_checkpointing_gives_the_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = AutoencoderKL(tiny_config(channel_mult=[1, 2]))
    ckpt = AutoencoderKL(tiny_config(channel_mult=[1, 2], gradient_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    losses = []
    for model in (plain, ckpt):
        recon, _ = model(x, sample_posterior=False)
        loss = (recon - x).pow(2).mean()
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[0], losses[1])
    torch.testing.assert_close(plain.last_layer.grad, ckpt.last_layer.grad)
    torch.testing.assert_close(plain.encoder.conv_in.weight.grad, ckpt.encoder.conv_in.weight.grad)


def test_scaled_encode_decode_use_the_scale_factor():
    model = AutoencoderKL(tiny_config(channel_mult=[1, 2])).eval()
    model.scale_factor.fill_(0.25)
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        mu = model.encode(x).mode()
        torch.testing.assert_close(model.encode_scaled(x), 0.25 * mu)
        sampled = model.encode_scaled(x, sample=True, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(sampled, 0.25 * mu)
        torch.testing.assert_close(model.decode_scaled(0.25 * mu), model.decode(mu))


def test_save_pretrained_round_trip_is_exact_and_keeps_scale_factor(tmp_path):
    torch.manual_seed(0)
    model = AutoencoderKL(tiny_config(channel_mult=[1, 2], kind="kl")).eval()
    model.scale_factor.fill_(0.371)
    model.save_pretrained(tmp_path / "ae")
    assert sorted(p.name for p in (tmp_path / "ae").iterdir()) == ["config.json", "model.safetensors"]
    assert json.loads((tmp_path / "ae" / "config.json").read_text())["scale_factor"] == pytest.approx(0.371)

    loaded = AutoencoderKL.from_pretrained(tmp_path / "ae").eval()
    assert loaded.config == model.config
    assert loaded.scale_factor.item() == pytest.approx(0.371)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(loaded.encode_scaled(x), model.encode_scaled(x))
        z = model.encode(x).mode()
        assert torch.equal(loaded.decode(z), model.decode(z))
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


def test_latent_normalisation_is_diffusers_and_inverts():
    """Scalar: scale_factor * z (SD). Per channel: scale_factor * (z - mean_c) / std_c, diffusers' use of
    AutoencoderKL's latents_mean / latents_std (its SDXL pipelines decode latents * std / scaling_factor + mean);
    z's own statistics give each channel mean 0 and std 1."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 4, 6, 6, generator=g) * torch.tensor([0.5, 0.4, 0.4, 0.01]).reshape(1, 4, 1, 1) + 0.3
    assert torch.equal(normalize_latents(z, 0.18215), z * 0.18215)
    mean, std = z.mean(dim=(0, 2, 3)).tolist(), z.std(dim=(0, 2, 3), unbiased=False).tolist()
    x = normalize_latents(z, 1.0, mean, std)
    torch.testing.assert_close(x.mean(dim=(0, 2, 3)), torch.zeros(4), atol=1e-5, rtol=0)
    torch.testing.assert_close(x.std(dim=(0, 2, 3), unbiased=False), torch.ones(4), atol=1e-4, rtol=0)
    diffusers_decode = x * torch.tensor(std).reshape(1, 4, 1, 1) / 1.0 + torch.tensor(mean).reshape(1, 4, 1, 1)
    torch.testing.assert_close(denormalize_latents(x, 1.0, mean, std), diffusers_decode)
    torch.testing.assert_close(denormalize_latents(normalize_latents(z, 0.7, mean, std), 0.7, mean, std), z, atol=1e-5, rtol=0)


def test_latent_statistics_travel_with_the_saved_model(tmp_path):
    model = AutoencoderKL(tiny_config())
    model.save_pretrained(tmp_path / "plain")
    assert AutoencoderKL.from_pretrained(tmp_path / "plain").latents_mean is None
    model.latents_mean, model.latents_std = [0.1, -0.2, 0.3, 0.0], [0.5, 0.4, 0.4, 0.01]
    model.save_pretrained(tmp_path / "stats")
    back = AutoencoderKL.from_pretrained(tmp_path / "stats")
    assert (back.latents_mean, back.latents_std) == (model.latents_mean, model.latents_std)
    meta = json.loads((tmp_path / "stats" / "config.json").read_text())
    meta["latents_std"] = [0.5, 0.4, 0.4]
    (tmp_path / "stats" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match="latents_mean / latents_std must be 4 finite numbers"):
        AutoencoderKL.from_pretrained(tmp_path / "stats")


def test_from_pretrained_errors_name_the_file_and_field(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        AutoencoderKL.from_pretrained(tmp_path / "missing")

    AutoencoderKL(tiny_config(channel_mult=[1, 2])).save_pretrained(tmp_path / "ae")
    config_path = tmp_path / "ae" / "config.json"
    meta = json.loads(config_path.read_text())
    meta["config"]["norm_groups"] = 3
    config_path.write_text(json.dumps(meta))
    with pytest.raises(ConfigError, match=r"config\.json[\s\S]*norm_groups"):
        AutoencoderKL.from_pretrained(tmp_path / "ae")

    meta["config"]["norm_groups"] = 4
    meta["config"]["latent_channels"] = 8  # weights no longer match the config
    config_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="model.safetensors does not match"):
        AutoencoderKL.from_pretrained(tmp_path / "ae")


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"base_channels": 10, "norm_groups": 4}, "norm_groups"),
        ({"channel_mult": []}, "channel_mult"),
        ({"logvar_min": 5.0, "logvar_max": 1.0}, "logvar_min"),
        ({"kind": "vq"}, "kind"),
        ({"latent_chanels": 4}, "latent_chanels"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_config_names_the_field(fields, named):
    with pytest.raises(ValidationError, match=named):
        AutoencoderConfig(**fields)


# --- the bicubic shortcut (issue 15) -----------------------------------------------------------------


def test_bicubic_shortcut_starts_as_the_bicubic_codec_and_learns_past_it():
    """At initialisation the model is bicubic down/up-sampling exactly (the learned paths add zero); after one
    optimiser step every parameter gets a gradient, and a few dozen steps on one batch beat bicubic on it."""
    from ldm_core.metrics import bicubic_baseline, psnr

    torch.manual_seed(0)
    model = AutoencoderKL(tiny_config(bicubic_shortcut=True))
    x = torch.rand(4, 3, 64, 64) * 2 - 1
    with torch.no_grad():
        z = model.encode(x).mode()
        assert torch.allclose(model.decode(z).clamp(-1, 1), bicubic_baseline(x, 8), atol=1e-5)
        assert torch.allclose(z[:, :3], torch.nn.functional.interpolate(x, size=(8, 8), mode="bicubic", antialias=True), atol=1e-6)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(40):
        recon, posterior = model(x)
        loss = (recon - x).pow(2).mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad()
        loss.backward()
        if step == 1:
            assert [n for n, p in model.named_parameters() if p.grad is None or p.grad.abs().sum() == 0] == []
        opt.step()
    with torch.no_grad():
        learned = psnr(model.decode(model.encode(x).mode()), x).mean()
    assert learned > psnr(bicubic_baseline(x, 8), x).mean() + 0.5


@pytest.mark.parametrize("fields", [{"grey_output": True}, {"latent_channels": 2}, {"out_channels": 1}])
def test_bicubic_shortcut_refuses_shapes_it_cannot_add(fields):
    with pytest.raises(ValidationError, match="bicubic_shortcut needs"):
        tiny_config(bicubic_shortcut=True, **fields)


def test_bicubic_shortcut_models_do_not_export_to_diffusers_or_sd():
    from ldm_core.convert import autoencoder_config_to_diffusers

    with pytest.raises(ConfigError, match="bicubic_shortcut=true"):
        autoencoder_config_to_diffusers(tiny_config(bicubic_shortcut=True), 1.0)

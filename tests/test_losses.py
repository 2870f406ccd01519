"""Autoencoder losses, the PatchGAN discriminator and the offline LPIPS builder."""

from __future__ import annotations

import itertools

import pytest
import torch
from pydantic import ValidationError
from torchvision import models as tv

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.discriminator import DiscriminatorConfig, NLayerDiscriminator
from ldm_core.losses import AutoencoderLossConfig, adaptive_weight, discriminator_loss, generator_loss, gradient_norms
from ldm_core.perceptual import LPIPSConfig, RandomBackboneWarning, backbone_weights_path, build_lpips

DISC_START = 10


@pytest.fixture(autouse=True)
def empty_torch_home(tmp_path, monkeypatch):
    """No torch hub cache: every test sees the offline situation unless it writes a checkpoint itself."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))


@pytest.fixture(scope="module")
def random_lpips():
    with pytest.warns(RandomBackboneWarning):
        module, used = build_lpips(LPIPSConfig(net="squeeze", backbone="auto", weights_path="/nonexistent/squeeze.pth"))
    assert used == "random"
    return module


def tiny_models(seed: int = 0) -> tuple[AutoencoderKL, NLayerDiscriminator]:
    torch.manual_seed(seed)
    ae = AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4))
    disc = NLayerDiscriminator(DiscriminatorConfig(base_channels=8, num_layers=2, norm_groups=4))
    return ae, disc


def images(seed: int = 0, n: int = 2, size: int = 32) -> torch.Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def grads_of(module: torch.nn.Module) -> list[bool]:
    return [p.grad is not None and p.grad.abs().sum().item() > 0 for p in module.parameters()]


# --- adaptive weight ----------------------------------------------------------------------------------


def test_adaptive_weight_matches_manual_gradient_norm_ratio_and_is_clamped_and_detached():
    torch.manual_seed(0)
    w = torch.randn(4, 3, requires_grad=True)
    a, b = torch.randn(5, 4), torch.randn(5, 4)
    rec = (a @ w).pow(2).sum()
    g = -(b @ w).mean()

    rec_grad = 2 * a.T @ (a @ w.detach())  # d/dw sum((a w)^2)
    g_grad = -b.T @ torch.ones(5, 3) / 15  # d/dw -mean(b w)
    expected = rec_grad.norm() / (g_grad.norm() + 1e-4)

    weight = adaptive_weight(rec, g, w, max_weight=1e4, eps=1e-4)
    torch.testing.assert_close(weight, expected)
    assert not weight.requires_grad
    assert adaptive_weight(rec, g, w, max_weight=0.5).item() == 0.5 < expected.item()
    (rec + g).backward()  # both graphs survived (retain_graph)
    assert w.grad is not None


# --- generator loss -----------------------------------------------------------------------------------


def test_generator_loss_before_disc_start_is_pixel_plus_kl_and_never_runs_the_discriminator():
    ae, disc = tiny_models()
    calls = []
    disc.register_forward_hook(lambda *_: calls.append(1))
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, kl_weight=1e-3, disc_start=DISC_START)
    x = images()
    recon, posterior = ae(x)
    loss, metrics = generator_loss(x, recon, posterior, step=DISC_START - 1, cfg=cfg, discriminator=disc, last_layer=ae.last_layer)

    expected = (x - recon).abs().sum(dim=(1, 2, 3)).mean() + 1e-3 * posterior.kl().mean()
    torch.testing.assert_close(loss, expected)
    assert calls == []
    assert metrics["g_adv"].item() == 0 and metrics["disc_factor"].item() == 0
    torch.testing.assert_close(metrics["pixel"], (x - recon).abs().mean().detach())
    loss.backward()
    assert all(grads_of(ae.encoder)) and all(grads_of(ae.decoder))
    assert not any(grads_of(disc))


@pytest.mark.parametrize(
    "pixel_loss, disc_loss, after_start, perceptual",
    list(itertools.product(["l1", "l2"], ["hinge", "vanilla"], [False, True], [False, True])),
)
def test_every_generator_loss_branch_is_finite_and_moves_the_right_parameters(
    pixel_loss, disc_loss, after_start, perceptual, random_lpips
):
    ae, disc = tiny_models()
    cfg = AutoencoderLossConfig(
        pixel_loss=pixel_loss, disc_loss=disc_loss, perceptual_weight=1.0 if perceptual else 0.0, disc_start=DISC_START
    )
    x = images()
    recon, posterior = ae(x)
    step = DISC_START if after_start else 0
    loss, metrics = generator_loss(
        x, recon, posterior, step=step, cfg=cfg, lpips=random_lpips if perceptual else None,
        discriminator=disc, last_layer=ae.last_layer,
    )
    assert torch.isfinite(loss)
    assert all(torch.isfinite(torch.as_tensor(v)) and not torch.as_tensor(v).requires_grad for v in metrics.values())
    grad_keys = {"rec_grad_norm", "adv_grad_norm", "adaptive_ratio"}  # only where the adaptive weight is computed
    assert set(metrics) == {"rec", "pixel", "perceptual", "kl", "g_adv", "adaptive_weight", "disc_factor", "total"} | (
        grad_keys if after_start else set())
    assert (metrics["perceptual"].item() > 0) == perceptual
    assert (metrics["adaptive_weight"].item() > 0) == after_start
    assert metrics["disc_factor"].item() == (1.0 if after_start else 0.0)

    loss.backward()
    assert all(grads_of(ae.decoder)) and any(grads_of(ae.encoder))
    # Before disc_start the discriminator is untouched; after it the adversarial term reaches it too
    # (the training stage zeroes those gradients before the discriminator's own update).
    assert any(grads_of(disc)) == after_start
    assert all(p.grad is None for p in random_lpips.parameters())


def test_generator_loss_total_composes_the_terms_after_disc_start(random_lpips):
    ae, disc = tiny_models()
    cfg = AutoencoderLossConfig(pixel_loss="l2", perceptual_weight=0.5, kl_weight=1e-2, disc_weight=0.5, disc_factor=2.0, disc_start=0)
    x = images()
    recon, posterior = ae(x)
    loss, m = generator_loss(x, recon, posterior, step=0, cfg=cfg, lpips=random_lpips, discriminator=disc, last_layer=ae.last_layer)

    lp = random_lpips(x, recon).reshape(-1)
    rec = ((x - recon).pow(2).sum(dim=(1, 2, 3)) + 0.5 * lp * x[0].numel()).mean()
    g_adv = -disc(recon).mean()
    lam = 0.5 * adaptive_weight(rec, g_adv, ae.last_layer, 1e4)
    expected = rec + 1e-2 * posterior.kl().mean() + lam * 2.0 * g_adv
    torch.testing.assert_close(m["rec"], rec.detach())
    torch.testing.assert_close(m["adaptive_weight"], lam)
    torch.testing.assert_close(loss, expected)
    rec_norm, adv_norm = gradient_norms(rec, g_adv, ae.last_layer)
    torch.testing.assert_close(m["rec_grad_norm"], rec_norm)
    torch.testing.assert_close(m["adv_grad_norm"], adv_norm)
    torch.testing.assert_close(m["adaptive_ratio"], rec_norm / (adv_norm + 1e-4))


def test_generator_loss_reports_the_unclamped_ratio_when_the_weight_sits_at_its_clamp():
    """The quickstart's symptom: lambda = disc_weight * adaptive_weight_max. The metrics say by how much the
    reconstruction gradient outweighs the adversarial one, unclamped."""
    ae, disc = tiny_models()
    x = images()
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=0, disc_weight=0.5, adaptive_weight_max=1e-3)
    recon, posterior = ae(x)
    _, m = generator_loss(x, recon, posterior, step=0, cfg=cfg, discriminator=disc, last_layer=ae.last_layer)
    assert m["adaptive_weight"].item() == pytest.approx(0.5 * 1e-3)  # at the clamp
    assert m["adaptive_ratio"].item() > 1e-3  # the unclamped ratio is above it
    assert m["adaptive_ratio"].item() == pytest.approx(m["rec_grad_norm"].item() / (m["adv_grad_norm"].item() + 1e-4), rel=1e-5)
    assert m["rec_grad_norm"].item() > 0 and m["adv_grad_norm"].item() > 0


def test_generator_loss_without_adaptive_weight_uses_disc_weight_and_no_grad_eval_works():
    ae, disc = tiny_models()
    x = images()
    cfg = AutoencoderLossConfig(perceptual_weight=0.0, disc_start=0, use_adaptive_weight=False, disc_weight=0.3)
    recon, posterior = ae(x)
    _, m = generator_loss(x, recon, posterior, step=5, cfg=cfg, discriminator=disc)
    assert m["adaptive_weight"].item() == pytest.approx(0.3)

    with torch.no_grad():  # evaluation: no autograd, the adaptive weight is reported as 0
        recon, posterior = ae(x)
        loss, m = generator_loss(
            x, recon, posterior, step=5, cfg=cfg.model_copy(update={"use_adaptive_weight": True}),
            discriminator=disc, last_layer=ae.last_layer,
        )
    assert torch.isfinite(loss) and m["adaptive_weight"].item() == 0


def test_generator_loss_missing_modules_are_clear_errors():
    ae, _ = tiny_models()
    x = images()
    recon, posterior = ae(x)
    with pytest.raises(ValueError, match="LPIPS"):
        generator_loss(x, recon, posterior, step=0, cfg=AutoencoderLossConfig(perceptual_weight=1.0))
    with pytest.raises(ValueError, match="needs the discriminator"):
        generator_loss(x, recon, posterior, step=3, cfg=AutoencoderLossConfig(perceptual_weight=0.0, disc_start=2))


# --- discriminator loss -------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["hinge", "vanilla"])
def test_discriminator_loss_values_and_it_moves_the_discriminator_only(kind):
    ae, disc = tiny_models()
    cfg = AutoencoderLossConfig(disc_loss=kind, disc_start=DISC_START, disc_factor=1.0)
    x = images()
    recon, _ = ae(x)
    logits_real, logits_fake = disc(torch.cat([x, recon.detach()])).chunk(2)
    loss, m = discriminator_loss(logits_real, logits_fake, step=DISC_START, cfg=cfg)

    if kind == "hinge":
        expected = 0.5 * ((1 - logits_real).clamp_min(0).mean() + (1 + logits_fake).clamp_min(0).mean())
    else:
        expected = 0.5 * (-torch.log(torch.sigmoid(logits_real)).mean() - torch.log(1 - torch.sigmoid(logits_fake)).mean())
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(m["logits_real"], logits_real.mean().detach())
    torch.testing.assert_close(m["logits_fake"], logits_fake.mean().detach())
    loss.backward()
    assert any(grads_of(disc))
    assert all(p.grad is None for p in ae.parameters())


def test_discriminator_loss_before_start_is_zero_but_attached_with_zero_grads():
    _, disc = tiny_models()
    cfg = AutoencoderLossConfig(disc_start=DISC_START)
    logits_real, logits_fake = disc(images(1)), disc(images(2))
    loss, m = discriminator_loss(logits_real, logits_fake, step=DISC_START - 1, cfg=cfg)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() == 0 for p in disc.parameters())
    assert m["disc_factor"].item() == 0


def test_bad_loss_config_names_the_field():
    with pytest.raises(ValidationError, match="disc_loss"):
        AutoencoderLossConfig(disc_loss="wasserstein")
    with pytest.raises(ValidationError, match="kl_weight"):
        AutoencoderLossConfig(kl_weight=-1.0)


# --- discriminator ------------------------------------------------------------------------------------


@pytest.mark.parametrize("norm", ["group", "batch", "instance", "none"])
def test_patchgan_shapes_init_and_gradients_for_every_norm(norm):
    torch.manual_seed(0)
    disc = NLayerDiscriminator(DiscriminatorConfig(base_channels=16, num_layers=3, norm=norm, norm_groups=4))
    logits = disc(images(size=64))
    # three stride-2 4x4 convs: 64 -> 32 -> 16 -> 8, then two stride-1 4x4 convs: 8 -> 7 -> 6
    assert logits.shape == (2, 1, 6, 6)
    first = disc.main[0].weight
    assert abs(first.std().item() - 0.02) < 0.005 and abs(first.mean().item()) < 0.005
    logits.mean().backward()
    assert all(p.grad is not None for p in disc.parameters())
    assert not list(disc.buffers()) or norm == "batch"


def test_discriminator_config_errors():
    with pytest.raises(ValidationError, match="norm_groups"):
        DiscriminatorConfig(base_channels=20, norm_groups=32)
    with pytest.raises(ValidationError, match="norm"):
        DiscriminatorConfig(norm="spectral")


# --- LPIPS --------------------------------------------------------------------------------------------


def test_build_lpips_auto_offline_falls_back_to_random_with_a_warning():
    with pytest.warns(RandomBackboneWarning, match="not true LPIPS"):
        module, used = build_lpips(LPIPSConfig(net="squeeze"))
    assert used == "random"
    assert not module.training and not any(p.requires_grad for p in module.parameters())
    x, y = images(1), images(2)
    assert module(x, x).abs().max().item() < 1e-6
    assert module(x, y).min().item() > 0
    # the calibrated linear heads from the lpips wheel are loaded, not random: they are non-negative
    assert all((lin.model[-1].weight >= 0).all() for lin in module.lins)


def test_build_lpips_pretrained_without_cache_names_where_to_put_the_file():
    cfg = LPIPSConfig(net="vgg", backbone="pretrained")
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"):
        build_lpips(cfg)
    assert str(backbone_weights_path(cfg)).startswith(str(torch.hub.get_dir()))


def test_build_lpips_loads_a_cached_torchvision_checkpoint_without_network(recwarn):
    torch.manual_seed(3)
    reference = tv.squeezenet1_1()
    path = backbone_weights_path(LPIPSConfig(net="squeeze"))
    path.parent.mkdir(parents=True)
    torch.save(reference.state_dict(), path)

    for backbone in ("pretrained", "auto"):
        module, used = build_lpips(LPIPSConfig(net="squeeze", backbone=backbone))
        assert used == "pretrained"
        torch.testing.assert_close(module.net.slice1[0].weight, reference.features[0].weight)
        torch.testing.assert_close(getattr(module.net.slice7, "12").expand3x3.weight, reference.features[12].expand3x3.weight)
    assert not [w for w in recwarn if issubclass(w.category, RandomBackboneWarning)]


def test_build_lpips_rejects_a_checkpoint_of_another_network(tmp_path):
    path = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, path)
    with pytest.raises(ValueError, match="wrong.pth"):
        build_lpips(LPIPSConfig(net="squeeze", backbone="pretrained", weights_path=str(path)))


def test_lpips_gradients_reach_the_input(random_lpips):
    x = images(1)
    y = images(2).requires_grad_(True)
    random_lpips(x, y).sum().backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


def test_random_backbone_is_seeded_silent_when_asked_for_and_leaves_the_global_rng_alone(recwarn):
    state = torch.get_rng_state()
    a, used = build_lpips(LPIPSConfig(net="squeeze", backbone="random"))
    assert used == "random"
    assert torch.equal(torch.get_rng_state(), state)
    b, _ = build_lpips(LPIPSConfig(net="squeeze", backbone="random"))
    c, _ = build_lpips(LPIPSConfig(net="squeeze", backbone="random", random_seed=1))
    assert torch.equal(a.net.slice1[0].weight, b.net.slice1[0].weight)
    assert not torch.equal(a.net.slice1[0].weight, c.net.slice1[0].weight)
    assert not [w for w in recwarn if issubclass(w.category, RandomBackboneWarning)]

"""Sampling: prompts -> images through the published U-Net, its autoencoder and its text encoder.

The first half exercises the pure generation and writing functions on tiny random models; the second half
publishes a tiny U-Net bundle to a real MLflow store (in a run tagged stage=stage_b, as Stage B does) and
drives `run_sample` and the CLI end to end.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.diffusion import DiffusionConfig, NoiseSchedule
from ldm_core.sampling import ddim_sample
from ldm_core.unet import UNet, UNetConfig
from pipelines import sample

CONTEXT_DIM = 8
TINY_AE = AutoencoderConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4, mid_attention=False)
TINY_UNET = UNetConfig(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2,
                       norm_groups=4, context_dim=CONTEXT_DIM)
TINY_DIFFUSION = DiffusionConfig(num_timesteps=100)


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A freshly built U-Net outputs exactly 0 (zero-initialised last layers): give every weight some noise so
    that conditions, guidance and steps make a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = _perturbed(UNet(TINY_UNET), 1)
    ae = AutoencoderKL(TINY_AE).eval()
    ae.scale_factor.fill_(0.7)
    g = torch.Generator().manual_seed(2)
    context = torch.randn(3, 5, CONTEXT_DIM, generator=g)  # three "prompts"
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    null = torch.randn(5, CONTEXT_DIM, generator=g)
    return {"unet": unet, "ae": ae, "schedule": NoiseSchedule(TINY_DIFFUSION), "context": context, "mask": mask, "null": null}


def _generate(tiny, **overrides):
    kwargs = dict(context=tiny["context"], context_mask=tiny["mask"], null_context=tiny["null"], null_mask=None,
                  latent_shape=(4, 4, 4), num_per_prompt=2, steps=4, guidance=3.0, seed=0)
    kwargs.update(overrides)
    return sample.generate(tiny["unet"], tiny["ae"], tiny["schedule"], **kwargs)


def test_generate_is_reproducible_and_seeded(tiny):
    a, b = _generate(tiny), _generate(tiny)
    assert a.shape == (6, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, _generate(tiny, seed=1))
    # The batch split does not change the images, nor does an ancestral sampler's noise.
    assert torch.allclose(a, _generate(tiny, batch_size=4), atol=1e-5)
    assert torch.equal(_generate(tiny, eta=1.0), _generate(tiny, eta=1.0))
    assert torch.equal(_generate(tiny, sampler="ddpm"), _generate(tiny, sampler="ddpm"))


def test_generate_matches_ddim_with_the_given_steps_and_guidance(tiny):
    """The images are DDIM(steps, guidance) from the seeded noise, decoded with the latent scale undone."""
    steps, guidance = 3, 2.5
    images = _generate(tiny, steps=steps, guidance=guidance, num_per_prompt=1)
    x_T = sample.initial_noise(0, 1, (4, 4, 4)).repeat(3, 1, 1, 1)
    z = ddim_sample(tiny["unet"], (3, 4, 4, 4), schedule=tiny["schedule"], context=tiny["context"],
                    context_mask=tiny["mask"], null_context=tiny["null"], null_mask=None, steps=steps,
                    guidance_scale=guidance, x_T=x_T)
    expected = tiny["ae"].decode(z / 0.7).clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-5)
    assert not torch.allclose(images, _generate(tiny, steps=steps + 2, guidance=guidance, num_per_prompt=1), atol=1e-3)
    assert not torch.allclose(images, _generate(tiny, steps=steps, guidance=0.0, num_per_prompt=1), atol=1e-3)


def test_prompt_images_do_not_depend_on_the_other_prompts(tiny):
    all_three = _generate(tiny)
    last_alone = _generate(tiny, context=tiny["context"][2:], context_mask=tiny["mask"][2:])
    assert torch.allclose(all_three[4:], last_alone, atol=1e-5)
    # Column j shares its noise across prompts, yet different prompts give different images.
    assert not torch.allclose(all_three[0], all_three[2], atol=1e-3)


def test_write_samples_pngs_grid_and_manifest(tmp_path, tiny):
    images = _generate(tiny)
    prompts = ["a handwritten digit zero", "A digit: 7!", "a handwritten digit zero"]
    paths, grid_uri, grid = sample.write_samples(images, prompts, 2, str(tmp_path / "out"), None, {"seed": 0})
    assert len(paths) == 6 and len(set(paths)) == 6
    assert paths[2].endswith("p01_a-digit-7_000.png")
    for path, image in zip(paths, images):
        png = Image.open(path)
        assert png.size == (8, 8) and png.mode == "RGB"
        # The PNG holds the image (up to 8-bit quantisation).
        arr = torch.from_numpy(np.array(png)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(arr, image, atol=1 / 127.5 + 1e-6)
    grid_png = Image.open(grid_uri)
    # make_grid: 2 columns, 3 rows of 8 px images with 2 px padding.
    assert grid_png.size == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2) == grid.shape[1::-1]
    manifest = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [e["prompt_index"] for e in manifest["images"]] == [0, 0, 1, 1, 2, 2]
    assert manifest["seed"] == 0 and manifest["grid"] == "grid.png"


def test_grayscale_png():
    png = Image.open(io.BytesIO(sample.to_png(torch.zeros(1, 4, 6))))
    assert png.mode == "L" and png.size == (6, 4)

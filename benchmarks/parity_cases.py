"""The parity cases against diffusers: the cases the parity tests assert and benchmarks/parity_diffusers.py tables.

One place for what tests/test_interop.py and tests/test_sampler_parity.py hold to a tolerance and what
benchmarks/parity_diffusers.py measures and prints (benchmarks/README.md "Parity with diffusers"):

- import / export: the tiny diffusers configs (`VAE_CONFIGS`, `UNET_CONFIGS`, one with SD 1.x's block layout at a
  reduced width), randomly initialised and perturbed reference models built from them, an SD v1-style single file,
  a tiny CLIP text model to export a U-Net bundle with, what an SD single-file reader assumes, and the gap measures
  (`vae_gaps`: the posterior mean / logvar and the decoder output; `unet_gap`: the U-Net output), float32;
- DDIM: Stable Diffusion's published `DDIMScheduler` settings (`SD_DDIM`), the trailing / linspace settings, a
  deterministic stand-in network (`model`), StableDiffusionPipeline's denoising loop reduced to its arithmetic
  (`diffusers_loop`) and `spacing_gap`.

diffusers is imported here as an ordinary dependency: the tests skip before importing this module when it is
missing (pytest.importorskip), the benchmark says so and exits. Run from the repository root (`benchmarks` is a
namespace package there).
"""

from __future__ import annotations

import json
from pathlib import Path

import diffusers
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from torch import nn

from ldm_core import convert
from ldm_core.autoencoder import AutoencoderKL
from ldm_core.diffusion import DiffusionConfig, NoiseSchedule
from ldm_core.sampling import Condition, ddim_sample, sampling_plan
from ldm_core.unet import UNet

# ----------------------------------------------------------------------------------------------------
# Import / export parity (tests/test_interop.py).
# ----------------------------------------------------------------------------------------------------

SD1_VAE = dict(block_out_channels=[32, 64, 128, 128], layers_per_block=2, norm_num_groups=32,
               down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4)
VAE_CONFIGS = {
    "sd1-layout": SD1_VAE,
    "no-mid-attention-no-quant-conv": dict(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4,
                                           latent_channels=3, down_block_types=["DownEncoderBlock2D"] * 2,
                                           up_block_types=["UpDecoderBlock2D"] * 2, mid_block_add_attention=False,
                                           use_quant_conv=False, use_post_quant_conv=False, scaling_factor=0.5),
    "grey-3-levels": dict(in_channels=1, out_channels=1, block_out_channels=[16, 32, 32], layers_per_block=2,
                          norm_num_groups=8, down_block_types=["DownEncoderBlock2D"] * 3,
                          up_block_types=["UpDecoderBlock2D"] * 3),
}
SD1_UNET = dict(block_out_channels=[32, 64, 128, 128], layers_per_block=2, norm_num_groups=32, cross_attention_dim=48,
                attention_head_dim=8)  # SD 1.x: CrossAttn x3 + Down, 8 heads, conv projections (diffusers defaults)
UNET_CONFIGS = {
    "sd1-layout": SD1_UNET,
    "sd2-style-linear-per-level-heads": dict(
        block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, cross_attention_dim=24,
        attention_head_dim=[2, 4], use_linear_projection=True, transformer_layers_per_block=2, upcast_attention=True,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], up_block_types=["CrossAttnUpBlock2D"] * 2),
    "attention-at-full-resolution-only": dict(
        block_out_channels=[16, 32, 32], layers_per_block=1, norm_num_groups=8, cross_attention_dim=16, attention_head_dim=4,
        in_channels=3, out_channels=3,
        down_block_types=["CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "UpBlock2D", "CrossAttnUpBlock2D"]),
}
VAE_IMAGE = 32
UNET_LATENT = 8


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights everywhere (also where a library initialises zeros or ones), eval mode."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def diffusers_vae(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return _perturbed(diffusers.AutoencoderKL(**VAE_CONFIGS[name]), seed)


def diffusers_unet(name: str, seed: int = 0):
    torch.manual_seed(seed)
    return _perturbed(diffusers.UNet2DConditionModel(sample_size=UNET_LATENT, **UNET_CONFIGS[name]), seed)


def save_diffusers(model, folder: Path) -> Path:
    model.save_pretrained(str(folder), safe_serialization=True)
    return folder


def vae_gaps(ref, ours: AutoencoderKL, seed: int = 1) -> dict[str, float]:
    """max-abs differences of the posterior mean / logvar and of the decoder output."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(2, ref.config.in_channels, VAE_IMAGE, VAE_IMAGE, generator=g) * 2 - 1
    f = 2 ** (len(ref.config.block_out_channels) - 1)
    z = torch.randn(2, ref.config.latent_channels, VAE_IMAGE // f, VAE_IMAGE // f, generator=g)
    with torch.no_grad():
        theirs, mine = ref.encode(x).latent_dist, ours.eval().encode(x)
        out_ref, out = ref.decode(z).sample, ours.decode(z)
    assert out_ref.abs().max() > 0.1 and theirs.mean.abs().max() > 0.1  # a real signal, not zeros on both sides
    return {"mean": (theirs.mean - mine.mean).abs().max().item(), "logvar": (theirs.logvar - mine.logvar).abs().max().item(),
            "decoder": (out_ref - out).abs().max().item()}


def unet_gap(ref, ours: UNet, seed: int = 2) -> float:
    g = torch.Generator().manual_seed(seed)
    c = ref.config
    x = torch.randn(2, c.in_channels, UNET_LATENT, UNET_LATENT, generator=g)
    t = torch.tensor([3, 517])
    ctx = torch.randn(2, 7, c.cross_attention_dim, generator=g)
    with torch.no_grad():
        out_ref = ref(x, t, encoder_hidden_states=ctx).sample
        out = ours.eval()(x, t, ctx)
    assert out_ref.abs().max() > 0.1
    return (out_ref - out).abs().max().item()


def sd_single_file(vae, unet) -> dict[str, torch.Tensor]:
    """An SD v1-style single-file state dict from diffusers models, through our own inverse mapping
    (diffusers -> ours -> original layout), plus a text-encoder tensor that must be ignored."""
    ours_vae = convert.autoencoder_from_state(vae.state_dict(), convert.autoencoder_config_from_diffusers(dict(vae.config))[0],
                                              "diffusers", 1.0)
    ucfg = convert.unet_config_from_diffusers(dict(unet.config))
    ours_unet = convert.unet_from_state(unet.state_dict(), ucfg, "diffusers")
    state = {"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": torch.zeros(10, 4)}
    for k, v in convert.export_state(ours_vae.state_dict(), convert.autoencoder_links(ours_vae.config, "ldm")).items():
        state[convert.LDM_VAE_PREFIX + k] = v
    for k, v in convert.export_state(ours_unet.state_dict(), convert.unet_links(ucfg, "ldm")).items():
        state[convert.LDM_UNET_PREFIX + k] = v
    return state


# What an SD single-file reader assumes (CompVis' v1 / v2 inference configs), written into the diffusers config it
# builds: 32 GroupNorm groups; 8 heads with conv projections (SD 1.x), 64-channel heads with linear ones (SD 2.x).
SD_READER_UNET = {
    "sd1": lambda chans: {"norm_num_groups": 32, "attention_head_dim": 8, "use_linear_projection": False},
    "sd2": lambda chans: {"norm_num_groups": 32, "attention_head_dim": [c // 64 for c in chans], "use_linear_projection": True},
}
SD_HEADS = {"sd1": dict(num_heads=8), "sd2": dict(head_dim=64)}


def _bundle_on_tiny_clip(unet: UNet, tmp_path: Path, scale_factor: float):
    from pipelines.models.registry import UNetBundle
    from pipelines.data.text_encoders import TextEncoderConfig

    diffusion = DiffusionConfig()
    return UNetBundle(
        unet=unet, unet_config=unet.config, diffusion=diffusion, schedule=NoiseSchedule(diffusion),
        text_encoder=TextEncoderConfig(name_or_path=str(tiny_clip(tmp_path / "clip")), max_length=16), hidden_size=32,
        null_context=torch.zeros(16, 32), null_mask=torch.zeros(16, dtype=torch.bool), latent_shape=(4, UNET_LATENT, UNET_LATENT),
        scale_factor=scale_factor, autoencoder_uri="", encode_run_id=None, stage_a_run_id=None, stage_b_run_id=None,
        use_ema=True)


def tiny_clip(folder: Path) -> Path:
    """A randomly initialised CLIP text model (hidden size 32) with a byte-level tokenizer of 514 tokens, saved
    as a local folder (no download): what SD conditions on, at a toy size."""
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    folder.mkdir(parents=True)
    # GPT-2 / CLIP byte-level alphabet: printable bytes stand for themselves, the others for 256 + n.
    printable = {*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)}
    extra = iter(range(256, 512))
    chars = [chr(b) if b in printable else chr(next(extra)) for b in range(256)]
    vocab = {c: i for i, c in enumerate(chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"])}
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16).save_pretrained(str(folder))
    torch.manual_seed(0)
    end = vocab["<|endoftext|>"]
    CLIPTextModel(CLIPTextConfig(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=2, max_position_embeddings=16, bos_token_id=vocab["<|startoftext|>"],
                                 eos_token_id=end, pad_token_id=end)).save_pretrained(str(folder))
    return folder


# ----------------------------------------------------------------------------------------------------
# DDIM parity (tests/test_sampler_parity.py): both loops drive the same deterministic model from the same x_T, with
# classifier-free guidance done the way StableDiffusionPipeline does it.
# ----------------------------------------------------------------------------------------------------

T = 1000
GUIDANCE = 4.0
SD_DDIM = dict(num_train_timesteps=T, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
               clip_sample=False, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading")
"""Stable Diffusion v1's published scheduler settings (its scheduler_config.json), with diffusers' names."""
SPACING_SETTINGS = {
    "eps, SD schedule": (DiffusionConfig(), dict(prediction_type="epsilon")),
    "v, zero terminal SNR": (DiffusionConfig(prediction="v", zero_terminal_snr=True),
                             dict(prediction_type="v_prediction", rescale_betas_zero_snr=True, set_alpha_to_one=True)),
}
"""The two settings the trailing / linspace parity runs under: SD's scheduler with only the spacing changed (its
steps_offset=1 stays, and both sides ignore it), and Lin et al.'s recipe (what `pipelines/export.py` writes)."""


class StandIn(nn.Module):
    """A deterministic stand-in for a U-Net: nonlinear in x, depends on t and on the condition."""

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, mask=None) -> torch.Tensor:
        t = t.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
        c = context.mean(dim=(1, 2)).reshape(-1, *([1] * (x.ndim - 1)))
        return torch.tanh(x * (0.5 + t / T)) + 0.3 * torch.sin(x + t / 100) * (1 + c)


model = StandIn()


def diffusers_loop(scheduler, x_T, context, null_context, steps: int, eta: float, as_is: bool = False,
                   guidance_rescale: float = 0.0) -> torch.Tensor:
    """StableDiffusionPipeline's denoising loop, reduced to its arithmetic, over the scheduler's first `steps` timesteps
    (all of them with `as_is`, diffusers' extra t = -1 included where its trailing spacing emits one), with its
    `rescale_noise_cfg` when `guidance_rescale` > 0."""
    scheduler.set_timesteps(steps)
    x = x_T.clone()
    for t in scheduler.timesteps if as_is else scheduler.timesteps[:steps]:
        t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)
        out_u = model(x, t_batch, null_context.expand(x.shape[0], -1, -1))
        out_c = model(x, t_batch, context)
        out = out_u + GUIDANCE * (out_c - out_u)
        if guidance_rescale > 0:
            out = rescale_noise_cfg(out, out_c, guidance_rescale)
        x = scheduler.step(out, t, x, eta=eta).prev_sample
    return x


def spacing_gap(spacing: str, setting: str, steps: int, as_is: bool = False) -> tuple[float, int]:
    """(max |ours - diffusers| of the final latents, diffusers' timestep count) for DDIM with `spacing`, steps_offset=1
    on both sides, under SPACING_SETTINGS[setting]."""
    diffusion, theirs_settings = SPACING_SETTINGS[setting]
    scheduler = diffusers.DDIMScheduler(**{**SD_DDIM, "timestep_spacing": spacing, **theirs_settings})
    g = torch.Generator().manual_seed(2)
    x_T = torch.randn(3, 4, 8, 8, generator=g)
    context, null_context = torch.randn(3, 5, 16, generator=g), torch.zeros(5, 16)
    plan = sampling_plan(NoiseSchedule(diffusion), steps, spacing=spacing, steps_offset=1,
                         set_alpha_to_one=scheduler.config.set_alpha_to_one)
    ours = ddim_sample(model, x_T, plan, Condition(context, None, null_context, None, GUIDANCE))
    theirs = diffusers_loop(scheduler, x_T, context, null_context, steps, eta=0.0, as_is=as_is)
    assert list(plan.timesteps) == scheduler.timesteps[:steps].tolist()
    return (ours - theirs).abs().max().item(), len(scheduler.timesteps)

"""Weights and configs of Stable Diffusion's networks in the layouts other tools use, and back.

Two foreign layouts hold the same tensors as our `AutoencoderKL` and `UNet` under other names:

- "diffusers": the `diffusers` library's `AutoencoderKL` / `UNet2DConditionModel` (a folder with
  `config.json` + `diffusion_pytorch_model.safetensors`);
- "ldm": the original CompVis/Stability single-file checkpoint (`first_stage_model.*` for the autoencoder,
  `model.diffusion_model.*` for the U-Net, as in `v1-5-pruned-emaonly.safetensors`; a standalone VAE file
  has the autoencoder keys without prefix).

The networks compute the same function (Rombach et al. 2022, LDM App. G; the ADM U-Net of Dhariwal &
Nichol 2021 with LDM's SpatialTransformer), so converting is renaming, plus three mechanical reshapes:
a 1x1 conv kernel (C_out, C_in, 1, 1) is a linear weight (C_out, C_in) (attention and projection layers
use either form), and our autoencoder's fused `qkv` conv is the concatenation of the separate q, k, v.

A conversion is a table `{our module name: ModuleLink}` built from the config; the tensors are driven by our
state dict, so every tensor is either mapped or reported, never silently dropped or invented. Configs are
mapped too, with a `ConfigError` naming every foreign field we cannot represent.

Pure PyTorch: nothing here imports `diffusers` (the tests compare against it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal, Mapping

import torch

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.unet import UNet, UNetConfig

__all__ = [
    "Layout",
    "ModuleLink",
    "SD1_SCALE_FACTOR",
    "SD_TRANSFORMER_NORM_EPS",
    "LDM_VAE_PREFIX",
    "LDM_UNET_PREFIX",
    "autoencoder_links",
    "unet_links",
    "import_state",
    "export_state",
    "autoencoder_config_from_diffusers",
    "autoencoder_config_to_diffusers",
    "unet_config_from_diffusers",
    "unet_config_to_diffusers",
    "autoencoder_config_from_ldm",
    "unet_config_from_ldm",
    "autoencoder_from_state",
    "autoencoder_to_state",
    "unet_from_state",
    "split_ldm_checkpoint",
]

Layout = Literal["diffusers", "ldm"]

SD1_SCALE_FACTOR = 0.18215
"""Latent scale of the Stable Diffusion 1.x / 2.x VAE (kl-f8) as published with it (1 / std of its latents
on its training set, LDM Sec. 4.3.2). A single-file checkpoint does not store it; diffusers' config does."""
SD_TRANSFORMER_NORM_EPS = 1e-6
"""The GroupNorm epsilon in front of every SpatialTransformer in SD and diffusers (both hard-code it)."""
LDM_VAE_PREFIX = "first_stage_model."
LDM_UNET_PREFIX = "model.diffusion_model."

# diffusers saved the VAE attention under older names before 0.14; its own loader renames them.
_DIFFUSERS_LEGACY_ATTENTION = {".query.": ".to_q.", ".key.": ".to_k.", ".value.": ".to_v.", ".proj_attn.": ".to_out.0."}


@dataclass(frozen=True)
class ModuleLink:
    """Where one of our modules' tensors live in a foreign layout.

    `theirs` is one module name, or several whose tensors are concatenated along dim 0 to make ours
    (q, k, v -> our fused qkv). `kind` is the foreign form of a weight: "same" as ours, "linear" (2-D) or
    "conv1x1" (4-D with a 1x1 kernel).
    """

    theirs: tuple[str, ...]
    kind: Literal["same", "linear", "conv1x1"] = "same"


def _link(*theirs: str, kind: Literal["same", "linear", "conv1x1"] = "same") -> ModuleLink:
    return ModuleLink(tuple(theirs), kind)


# ----------------------------------------------------------------------------------------------------
# State dicts.
# ----------------------------------------------------------------------------------------------------


def _core_shape(shape: torch.Size) -> tuple[int, ...]:
    """The shape without trailing singleton dims: (C, C, 1, 1) and (C, C) are the same weight."""
    dims = list(shape)
    while len(dims) > 1 and dims[-1] == 1:
        dims.pop()
    return tuple(dims)


def _normalise_diffusers_keys(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for key, tensor in state.items():
        for old, new in _DIFFUSERS_LEGACY_ATTENTION.items():
            key = key.replace(old, new)
        out[key] = tensor
    return out


def import_state(
    theirs: Mapping[str, torch.Tensor], links: Mapping[str, ModuleLink], template: Mapping[str, torch.Tensor], what: str
) -> dict[str, torch.Tensor]:
    """Our state dict (float32) from a foreign one. `template` is our model's state dict (names and shapes).

    Raises ValueError naming the missing, unexpected or mis-shaped tensors (a checkpoint of another shape
    or another architecture than the config says).
    """
    theirs = _normalise_diffusers_keys(theirs)
    out: dict[str, torch.Tensor] = {}
    used: set[str] = set()
    missing, misshaped = [], []
    for key, target in template.items():
        module, leaf = key.rsplit(".", 1)
        link = links[module]
        names = [f"{name}.{leaf}" for name in link.theirs]
        absent = [n for n in names if n not in theirs]
        if absent:
            missing += absent
            continue
        parts = [theirs[n] for n in names]
        used.update(names)
        tensor = torch.cat(parts, dim=0) if len(parts) > 1 else parts[0]
        if _core_shape(tensor.shape) != _core_shape(target.shape):
            misshaped.append(f"{' + '.join(names)} {tuple(tensor.shape)} (expected {tuple(target.shape)})")
            continue
        out[key] = tensor.detach().reshape(target.shape).to(torch.float32).contiguous()
    unexpected = sorted(set(theirs) - used)
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing tensors, e.g. {', '.join(missing[:4])}")
    if misshaped:
        problems.append(f"{len(misshaped)} tensors of another shape, e.g. {'; '.join(misshaped[:3])}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors, e.g. {', '.join(unexpected[:4])}")
    if problems:
        raise ValueError(f"{what}: the weights do not match the config: " + "; ".join(problems))
    return out


def export_state(ours: Mapping[str, torch.Tensor], links: Mapping[str, ModuleLink]) -> dict[str, torch.Tensor]:
    """A foreign state dict (contiguous CPU tensors, our dtype) from ours. Buffers without a link (our
    autoencoder's scale_factor) are left out: the foreign config carries them."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in ours.items():
        module, leaf = key.rsplit(".", 1) if "." in key else ("", key)
        link = links.get(module)
        if link is None:
            continue
        tensor = tensor.detach().cpu()
        for name, part in zip(link.theirs, tensor.chunk(len(link.theirs), dim=0)):
            if part.ndim == 4 and link.kind == "linear":
                part = part[:, :, 0, 0]
            elif part.ndim == 2 and link.kind == "conv1x1":
                part = part[:, :, None, None]
            out[f"{name}.{leaf}"] = part.contiguous()
    return out


# --- the autoencoder


def _vae_resnet(ours: str, theirs: str, layout: Layout) -> dict[str, ModuleLink]:
    skip = "conv_shortcut" if layout == "diffusers" else "nin_shortcut"
    names = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "skip": skip}
    return {f"{ours}.{a}": _link(f"{theirs}.{b}") for a, b in names.items()}


def _vae_attention(ours: str, theirs: str, layout: Layout) -> dict[str, ModuleLink]:
    if layout == "diffusers":
        return {
            f"{ours}.norm": _link(f"{theirs}.group_norm"),
            f"{ours}.qkv": _link(f"{theirs}.to_q", f"{theirs}.to_k", f"{theirs}.to_v", kind="linear"),
            f"{ours}.proj_out": _link(f"{theirs}.to_out.0", kind="linear"),
        }
    return {
        f"{ours}.norm": _link(f"{theirs}.norm"),
        f"{ours}.qkv": _link(f"{theirs}.q", f"{theirs}.k", f"{theirs}.v", kind="conv1x1"),
        f"{ours}.proj_out": _link(f"{theirs}.proj_out", kind="conv1x1"),
    }


def _vae_mid(ours: str, theirs: str, cfg: AutoencoderConfig, layout: Layout) -> dict[str, ModuleLink]:
    if layout == "diffusers":
        first, attn, second = f"{theirs}.mid_block.resnets.0", f"{theirs}.mid_block.attentions.0", f"{theirs}.mid_block.resnets.1"
    else:
        first, attn, second = f"{theirs}.mid.block_1", f"{theirs}.mid.attn_1", f"{theirs}.mid.block_2"
    links = _vae_resnet(f"{ours}.mid.0", first, layout)
    if cfg.mid_attention:
        links |= _vae_attention(f"{ours}.mid.1", attn, layout)
    links |= _vae_resnet(f"{ours}.mid.{2 if cfg.mid_attention else 1}", second, layout)
    return links


def autoencoder_links(cfg: AutoencoderConfig, layout: Layout) -> dict[str, ModuleLink]:
    """{our module: its place in `layout`} for an AutoencoderKL of shape `cfg` (no prefix on their side)."""
    d = layout == "diffusers"
    levels = len(cfg.channel_mult)
    links = {"encoder.conv_in": _link("encoder.conv_in"), "decoder.conv_in": _link("decoder.conv_in")}
    k = 0
    for level in range(levels):
        for j in range(cfg.num_res_blocks):
            theirs = f"encoder.down_blocks.{level}.resnets.{j}" if d else f"encoder.down.{level}.block.{j}"
            links |= _vae_resnet(f"encoder.down.{k}", theirs, layout)
            k += 1
        if level < levels - 1:
            theirs = f"encoder.down_blocks.{level}.downsamplers.0.conv" if d else f"encoder.down.{level}.downsample.conv"
            links[f"encoder.down.{k}.conv"] = _link(theirs)
            k += 1
    k = 0
    for i, level in enumerate(reversed(range(levels))):
        for j in range(cfg.num_res_blocks + 1):
            theirs = f"decoder.up_blocks.{i}.resnets.{j}" if d else f"decoder.up.{level}.block.{j}"
            links |= _vae_resnet(f"decoder.up.{k}", theirs, layout)
            k += 1
        if level > 0:
            theirs = f"decoder.up_blocks.{i}.upsamplers.0.conv" if d else f"decoder.up.{level}.upsample.conv"
            links[f"decoder.up.{k}.conv"] = _link(theirs)
            k += 1
    for part in ("encoder", "decoder"):
        links |= _vae_mid(part, part, cfg, layout)
        links[f"{part}.norm_out"] = _link(f"{part}.conv_norm_out" if d else f"{part}.norm_out")
        links[f"{part}.conv_out"] = _link(f"{part}.conv_out")
    links["quant_conv"] = _link("quant_conv")
    links["post_quant_conv"] = _link("post_quant_conv")
    return links


# --- the U-Net


def _unet_resblock(ours: str, theirs: str, layout: Layout) -> dict[str, ModuleLink]:
    if layout == "diffusers":
        names = {"norm1": "norm1", "conv1": "conv1", "emb_proj": "time_emb_proj", "norm2": "norm2", "conv2": "conv2",
                 "skip": "conv_shortcut"}
    else:
        names = {"norm1": "in_layers.0", "conv1": "in_layers.2", "emb_proj": "emb_layers.1", "norm2": "out_layers.0",
                 "conv2": "out_layers.3", "skip": "skip_connection"}
    return {f"{ours}.{a}": _link(f"{theirs}.{b}") for a, b in names.items()}


def _unet_transformer(ours: str, theirs: str, cfg: UNetConfig, projection: Literal["linear", "conv1x1"]) -> dict[str, ModuleLink]:
    links = {
        f"{ours}.norm": _link(f"{theirs}.norm"),
        f"{ours}.proj_in": _link(f"{theirs}.proj_in", kind=projection),
        f"{ours}.proj_out": _link(f"{theirs}.proj_out", kind=projection),
    }
    for d in range(cfg.transformer_depth):
        o, t = f"{ours}.blocks.{d}", f"{theirs}.transformer_blocks.{d}"
        for n in ("norm1", "norm2", "norm3"):
            links[f"{o}.{n}"] = _link(f"{t}.{n}")
        for a in ("attn1", "attn2"):
            for p in ("to_q", "to_k", "to_v"):
                links[f"{o}.{a}.{p}"] = _link(f"{t}.{a}.{p}")
            links[f"{o}.{a}.to_out"] = _link(f"{t}.{a}.to_out.0")
        links[f"{o}.ff.proj"] = _link(f"{t}.ff.net.0.proj")
        links[f"{o}.ff.out"] = _link(f"{t}.ff.net.2")
    return links


def unet_links(cfg: UNetConfig, layout: Layout, projection: Literal["linear", "conv1x1"] = "conv1x1") -> dict[str, ModuleLink]:
    """{our module: its place in `layout`} for a UNet of shape `cfg`. `projection` is the foreign form of the
    transformers' proj_in / proj_out (SD 1.x: 1x1 convs; SD 2.x and diffusers' use_linear_projection: linear)."""
    d = layout == "diffusers"
    levels, n = len(cfg.channel_mult), cfg.num_res_blocks

    def attn(ours: str, theirs: str) -> dict[str, ModuleLink]:
        return _unet_transformer(ours, theirs, cfg, projection)

    links = {
        "time_mlp.0": _link("time_embedding.linear_1" if d else "time_embed.0"),
        "time_mlp.2": _link("time_embedding.linear_2" if d else "time_embed.2"),
        "conv_in": _link("conv_in" if d else "input_blocks.0.0"),
        "norm_out": _link("conv_norm_out" if d else "out.0"),
        "conv_out": _link("conv_out" if d else "out.2"),
    }
    for level in range(levels):
        for j in range(n):
            k, idx = level * n + j, 1 + level * (n + 1) + j
            res, tr = (f"down_blocks.{level}.resnets.{j}", f"down_blocks.{level}.attentions.{j}") if d else \
                (f"input_blocks.{idx}.0", f"input_blocks.{idx}.1")
            links |= _unet_resblock(f"down_blocks.{k}", res, layout)
            if level in cfg.attention_levels:
                links |= attn(f"down_attn.{k}", tr)
        if level < levels - 1:
            theirs = f"down_blocks.{level}.downsamplers.0.conv" if d else f"input_blocks.{1 + level * (n + 1) + n}.0.op"
            links[f"downsamplers.{level}.conv"] = _link(theirs)
    mid = ("mid_block.resnets.0", "mid_block.attentions.0", "mid_block.resnets.1") if d else \
        ("middle_block.0", "middle_block.1", "middle_block.2")
    links |= _unet_resblock("mid_block1", mid[0], layout) | attn("mid_attn", mid[1]) | _unet_resblock("mid_block2", mid[2], layout)
    for i, level in enumerate(reversed(range(levels))):
        has_attn = level in cfg.attention_levels
        for j in range(n + 1):
            k = i * (n + 1) + j
            res, tr = (f"up_blocks.{i}.resnets.{j}", f"up_blocks.{i}.attentions.{j}") if d else \
                (f"output_blocks.{k}.0", f"output_blocks.{k}.1")
            links |= _unet_resblock(f"up_blocks.{k}", res, layout)
            if has_attn:
                links |= attn(f"up_attn.{k}", tr)
        if level > 0:
            last = i * (n + 1) + n
            theirs = f"up_blocks.{i}.upsamplers.0.conv" if d else f"output_blocks.{last}.{2 if has_attn else 1}.conv"
            links[f"upsamplers.{i}.conv"] = _link(theirs)
    return links


# ----------------------------------------------------------------------------------------------------
# Configs.
# ----------------------------------------------------------------------------------------------------

# The constructor defaults of diffusers' classes (fields a config.json may leave out). tests/test_interop.py
# checks them against the installed diffusers.
DIFFUSERS_VAE_DEFAULTS: dict[str, Any] = {
    "in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"],
    "up_block_types": ["UpDecoderBlock2D"], "block_out_channels": [64], "layers_per_block": 1, "act_fn": "silu",
    "latent_channels": 4, "norm_num_groups": 32, "sample_size": 32, "scaling_factor": SD1_SCALE_FACTOR,
    "shift_factor": None, "latents_mean": None, "latents_std": None, "force_upcast": True, "use_quant_conv": True,
    "use_post_quant_conv": True, "mid_block_add_attention": True,
}
DIFFUSERS_UNET_DEFAULTS: dict[str, Any] = {
    "sample_size": None, "in_channels": 4, "out_channels": 4, "center_input_sample": False, "flip_sin_to_cos": True,
    "freq_shift": 0, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "mid_block_type": "UNetMidBlock2DCrossAttn", "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "only_cross_attention": False, "block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2,
    "downsample_padding": 1, "mid_block_scale_factor": 1, "dropout": 0.0, "act_fn": "silu", "norm_num_groups": 32,
    "norm_eps": 1e-5, "cross_attention_dim": 1280, "transformer_layers_per_block": 1,
    "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "attention_head_dim": 8, "num_attention_heads": None, "dual_cross_attention": False, "use_linear_projection": False,
    "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
    "upcast_attention": False, "resnet_time_scale_shift": "default", "resnet_skip_time_act": False,
    "resnet_out_scale_factor": 1.0, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3,
    "conv_out_kernel": 3, "projection_class_embeddings_input_dim": None, "attention_type": "default",
    "class_embeddings_concat": False, "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    "addition_embed_type_num_heads": 64,
}
# Fields that change nothing about the function in float32 (sizes a pipeline uses, fp16 precautions).
_VAE_IGNORED = {"sample_size", "force_upcast", "scaling_factor"}
_UNET_IGNORED = {"sample_size", "upcast_attention", "addition_embed_type_num_heads"}


def _merged(config: Mapping[str, Any], defaults: Mapping[str, Any], class_name: str) -> dict[str, Any]:
    name = config.get("_class_name", class_name)
    if name != class_name:
        raise ConfigError(f"diffusers config: _class_name is {name!r}, expected {class_name!r}")
    merged = dict(defaults)
    unknown = []
    for key, value in config.items():
        if key.startswith("_"):
            continue
        if key not in defaults:
            if value not in (None, False):
                unknown.append(f"{key}={value!r}")
            continue
        merged[key] = list(value) if isinstance(value, tuple) else value
    if unknown:
        raise ConfigError(f"diffusers {class_name} config: fields this converter does not know: {', '.join(unknown)}")
    return merged


def _unsupported(class_name: str, problems: list[str]) -> None:
    if problems:
        raise ConfigError(f"diffusers {class_name} config cannot be represented by ldm_core: " + "; ".join(problems))


def _must_equal(cfg: Mapping[str, Any], expected: Mapping[str, Any], problems: list[str]) -> None:
    for key, value in expected.items():
        if cfg[key] != value:
            problems.append(f"{key}={cfg[key]!r} (only {value!r} is supported)")


def _base_and_mult(block_out_channels: list[int], problems: list[str]) -> tuple[int, list[int]]:
    base = block_out_channels[0]
    if any(c % base for c in block_out_channels):
        problems.append(f"block_out_channels={block_out_channels}: every entry must be a multiple of the first")
    return base, [c // base for c in block_out_channels]


def autoencoder_config_from_diffusers(config: Mapping[str, Any]) -> tuple[AutoencoderConfig, float]:
    """(our config, the latent scale factor) from a diffusers `AutoencoderKL` config.json dict."""
    c = _merged(config, DIFFUSERS_VAE_DEFAULTS, "AutoencoderKL")
    problems: list[str] = []
    n = len(c["block_out_channels"])
    _must_equal(c, {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None,
                    "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n}, problems)
    base, mult = _base_and_mult(c["block_out_channels"], problems)
    _unsupported("AutoencoderKL", problems)
    try:
        ours = AutoencoderConfig(
            in_channels=c["in_channels"], out_channels=c["out_channels"], latent_channels=c["latent_channels"],
            base_channels=base, channel_mult=mult, num_res_blocks=c["layers_per_block"], norm_groups=c["norm_num_groups"],
            mid_attention=c["mid_block_add_attention"], kind="kl",
        )
    except ValueError as e:
        raise ConfigError(f"diffusers AutoencoderKL config: {e}") from None
    return ours, float(c["scaling_factor"])


def autoencoder_config_to_diffusers(cfg: AutoencoderConfig, scale_factor: float, sample_size: int | list[int] | None = None) -> dict[str, Any]:
    """A diffusers `AutoencoderKL` config.json dict for our config (KL autoencoders only)."""
    if cfg.kind != "kl":
        raise ConfigError("autoencoder kind 'deterministic' has no diffusers AutoencoderKL equivalent (only kind 'kl')")
    if (cfg.logvar_min, cfg.logvar_max) != (-30.0, 20.0):
        raise ConfigError(f"logvar_min/logvar_max = {cfg.logvar_min}/{cfg.logvar_max}: diffusers clamps to -30/20")
    if cfg.grey_output:
        raise ConfigError("grey_output=true: diffusers' AutoencoderKL has no one-channel decoder head to export it to")
    if cfg.bicubic_shortcut:
        raise ConfigError("bicubic_shortcut=true: Stable Diffusion's and diffusers' AutoencoderKL have no bicubic "
                          "shortcut, so they would decode this model's latents wrongly (train without it to export)")
    n = len(cfg.channel_mult)
    return {
        "_class_name": "AutoencoderKL",
        "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["DownEncoderBlock2D"] * n, "up_block_types": ["UpDecoderBlock2D"] * n,
        "block_out_channels": [cfg.base_channels * m for m in cfg.channel_mult],
        "layers_per_block": cfg.num_res_blocks, "act_fn": "silu", "latent_channels": cfg.latent_channels,
        "norm_num_groups": cfg.norm_groups, "sample_size": sample_size or DIFFUSERS_VAE_DEFAULTS["sample_size"],
        "scaling_factor": float(scale_factor), "shift_factor": None, "latents_mean": None, "latents_std": None,
        "force_upcast": True, "use_quant_conv": True, "use_post_quant_conv": True,
        "mid_block_add_attention": cfg.mid_attention,
    }


def _per_block(value: Any, count: int, name: str, problems: list[str]) -> Any:
    """A diffusers per-block field (int or list) as one value; a list of different values is an error."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1 or len(value) != count:
            problems.append(f"{name}={list(value)} (different values per block are not supported)")
            return value[0] if value else None
        return value[0]
    return value


def unet_config_from_diffusers(config: Mapping[str, Any]) -> UNetConfig:
    """Our config from a diffusers `UNet2DConditionModel` config.json dict (SD 1.x / 2.x layouts)."""
    c = _merged(config, DIFFUSERS_UNET_DEFAULTS, "UNet2DConditionModel")
    problems: list[str] = []
    chans = list(c["block_out_channels"])
    n = len(chans)
    _must_equal(c, {
        "center_input_sample": False, "flip_sin_to_cos": True, "freq_shift": 0, "mid_block_type": "UNetMidBlock2DCrossAttn",
        "only_cross_attention": False, "downsample_padding": 1, "mid_block_scale_factor": 1, "act_fn": "silu",
        "norm_eps": 1e-5, "reverse_transformer_layers_per_block": None, "encoder_hid_dim": None,
        "encoder_hid_dim_type": None, "num_attention_heads": None, "dual_cross_attention": False,
        "class_embed_type": None, "addition_embed_type": None, "addition_time_embed_dim": None, "num_class_embeds": None,
        "resnet_time_scale_shift": "default", "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0,
        "time_embedding_type": "positional", "time_embedding_dim": None, "time_embedding_act_fn": None,
        "timestep_post_act": None, "time_cond_proj_dim": None, "conv_in_kernel": 3, "conv_out_kernel": 3,
        "projection_class_embeddings_input_dim": None, "attention_type": "default", "class_embeddings_concat": False,
        "mid_block_only_cross_attention": None, "cross_attention_norm": None,
    }, problems)
    down, up = list(c["down_block_types"]), list(c["up_block_types"])
    known_down, known_up = {"CrossAttnDownBlock2D", "DownBlock2D"}, {"CrossAttnUpBlock2D", "UpBlock2D"}
    bad = sorted({t for t in down if t not in known_down} | {t for t in up if t not in known_up})
    if bad:
        problems.append(f"block types {bad} (only {sorted(known_down | known_up)} exist here)")
    if len(down) != n or len(up) != n:
        problems.append(f"{len(down)} down / {len(up)} up block types for {n} block_out_channels")
    attention_levels = [i for i, t in enumerate(down) if t == "CrossAttnDownBlock2D"]
    mirrored = [n - 1 - i for i, t in enumerate(up) if t == "CrossAttnUpBlock2D"]
    if sorted(mirrored) != attention_levels:
        problems.append(f"up_block_types {up} do not mirror down_block_types {down}")
    base, mult = _base_and_mult(chans, problems)
    layers = _per_block(c["layers_per_block"], n, "layers_per_block", problems)
    depth = _per_block(c["transformer_layers_per_block"], n, "transformer_layers_per_block", problems)
    context_dim = _per_block(c["cross_attention_dim"], n, "cross_attention_dim", problems)
    # diffusers' attention_head_dim is, for these blocks, the number of heads (a naming slip it keeps for
    # compatibility): one value (SD 1.x, 8) or one per level (SD 2.x, channels / 64).
    heads = c["attention_head_dim"]
    num_heads, head_dim = 8, None
    if isinstance(heads, (list, tuple)):
        if len(heads) != n:
            problems.append(f"attention_head_dim={list(heads)} has not one entry per block")
        elif len(set(heads)) == 1:
            num_heads = heads[0]
        else:
            widths = {ch // h for ch, h in zip(chans, heads) if ch % h == 0}
            if len(widths) != 1 or any(ch % h for ch, h in zip(chans, heads)):
                problems.append(f"attention_head_dim={list(heads)}: heads per level must be one number or give "
                                f"one head width for every level")
            else:
                head_dim = widths.pop()
    else:
        num_heads = heads
    _unsupported("UNet2DConditionModel", problems)
    try:
        return UNetConfig(
            in_channels=c["in_channels"], out_channels=c["out_channels"], model_channels=base, channel_mult=mult,
            num_res_blocks=layers, attention_levels=attention_levels, num_heads=num_heads, head_dim=head_dim,
            transformer_depth=depth, context_dim=context_dim, dropout=c["dropout"], norm_groups=c["norm_num_groups"],
            ff_mult=4, transformer_norm_eps=SD_TRANSFORMER_NORM_EPS,
        )
    except ValueError as e:
        raise ConfigError(f"diffusers UNet2DConditionModel config: {e}") from None


def _check_exportable_unet(cfg: UNetConfig) -> None:
    problems = []
    if cfg.transformer_norm_eps != SD_TRANSFORMER_NORM_EPS:
        problems.append(f"transformer_norm_eps={cfg.transformer_norm_eps} (SD and diffusers fix it at "
                        f"{SD_TRANSFORMER_NORM_EPS}: train with stage_b.unet.transformer_norm_eps={SD_TRANSFORMER_NORM_EPS})")
    if cfg.ff_mult != 4:
        problems.append(f"ff_mult={cfg.ff_mult} (SD and diffusers fix the feed-forward width at 4x)")
    if problems:
        raise ConfigError("this U-Net has no exact Stable Diffusion / diffusers equivalent: " + "; ".join(problems))


def unet_config_to_diffusers(cfg: UNetConfig, sample_size: int | list[int] | None = None) -> dict[str, Any]:
    """A diffusers `UNet2DConditionModel` config.json dict for our config (linear transformer projections)."""
    _check_exportable_unet(cfg)
    n = len(cfg.channel_mult)
    chans = [cfg.model_channels * m for m in cfg.channel_mult]
    heads: int | list[int] = [cfg.heads(ch) for ch in chans] if cfg.head_dim else cfg.num_heads
    out = dict(DIFFUSERS_UNET_DEFAULTS)
    out.update({
        "sample_size": sample_size, "in_channels": cfg.in_channels, "out_channels": cfg.out_channels,
        "down_block_types": ["CrossAttnDownBlock2D" if i in cfg.attention_levels else "DownBlock2D" for i in range(n)],
        "up_block_types": ["CrossAttnUpBlock2D" if i in cfg.attention_levels else "UpBlock2D" for i in reversed(range(n))],
        "block_out_channels": chans, "layers_per_block": cfg.num_res_blocks, "dropout": cfg.dropout,
        "norm_num_groups": cfg.norm_groups, "cross_attention_dim": cfg.context_dim,
        "transformer_layers_per_block": cfg.transformer_depth, "attention_head_dim": heads,
        "use_linear_projection": True,
    })
    return {"_class_name": "UNet2DConditionModel", **out}


# --- single-file checkpoints carry no config: read the shapes


def _indices(state: Mapping[str, Any], prefix: str) -> list[int]:
    """Sorted distinct integers k of the keys `prefix{k}.*`."""
    found = {key[len(prefix):].split(".", 1)[0] for key in state if key.startswith(prefix)}
    return sorted(int(k) for k in found if k.isdigit())


def autoencoder_config_from_ldm(state: Mapping[str, torch.Tensor], norm_groups: int = 32) -> AutoencoderConfig:
    """Our config from the shapes of an LDM-layout autoencoder state dict (keys without prefix).

    GroupNorm's group count is not in the weights: SD's is 32."""
    try:
        base, in_channels = state["encoder.conv_in.weight"].shape[:2]
        levels = _indices(state, "encoder.down.")
        mult = [state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0] // base for i in levels]
        cfg = AutoencoderConfig(
            in_channels=in_channels, out_channels=state["decoder.conv_out.weight"].shape[0],
            latent_channels=state["post_quant_conv.weight"].shape[0], base_channels=base, channel_mult=mult,
            num_res_blocks=len(_indices(state, "encoder.down.0.block.")), norm_groups=norm_groups,
            mid_attention="encoder.mid.attn_1.q.weight" in state, kind="kl",
        )
    except KeyError as e:
        raise ConfigError(f"not an SD/LDM autoencoder checkpoint: no tensor {e.args[0]}") from None
    except ValueError as e:
        raise ConfigError(f"SD/LDM autoencoder checkpoint: {e}") from None
    if state["quant_conv.weight"].shape[0] != 2 * cfg.latent_channels:
        raise ConfigError("SD/LDM autoencoder checkpoint: quant_conv is not 2x the latent channels (not a KL autoencoder)")
    return cfg


def unet_config_from_ldm(
    state: Mapping[str, torch.Tensor], norm_groups: int = 32, num_heads: int | None = None, head_dim: int | None = None
) -> UNetConfig:
    """Our config from the shapes of an LDM-layout U-Net state dict (keys without prefix).

    Attention heads are not in the weights. Unless given, they follow the published checkpoints: 8 heads
    per transformer when proj_in is a 1x1 conv (SD 1.x), 64-channel heads when it is linear (SD 2.x)."""
    try:
        ch, in_channels = state["input_blocks.0.0.weight"].shape[:2]
        blocks = _indices(state, "input_blocks.")
        downs = [i for i in blocks if f"input_blocks.{i}.0.op.weight" in state]
        levels = len(downs) + 1
        n = (len(blocks) - levels) // levels
        if len(blocks) != levels * (n + 1):
            raise ConfigError(f"SD/LDM U-Net checkpoint: {len(blocks)} input blocks do not form {levels} levels")
        first = [1 + level * (n + 1) for level in range(levels)]
        mult = [state[f"input_blocks.{i}.0.out_layers.3.weight"].shape[0] // ch for i in first]
        attention_levels = [lvl for lvl, i in enumerate(first) if f"input_blocks.{i}.1.proj_in.weight" in state]
        proj_in = state["middle_block.1.proj_in.weight"]
        if num_heads is None and head_dim is None:
            num_heads, head_dim = (8, None) if proj_in.ndim == 4 else (8, 64)
        ff = state["middle_block.1.transformer_blocks.0.ff.net.0.proj.weight"].shape[0]
        cfg = UNetConfig(
            in_channels=in_channels, out_channels=state["out.2.weight"].shape[0], model_channels=ch, channel_mult=mult,
            num_res_blocks=n, attention_levels=attention_levels, num_heads=num_heads or 8, head_dim=head_dim,
            transformer_depth=len(_indices(state, "middle_block.1.transformer_blocks.")),
            context_dim=state["middle_block.1.transformer_blocks.0.attn2.to_k.weight"].shape[1],
            norm_groups=norm_groups, ff_mult=ff // (2 * proj_in.shape[0]), transformer_norm_eps=SD_TRANSFORMER_NORM_EPS,
        )
    except KeyError as e:
        raise ConfigError(f"not an SD/LDM U-Net checkpoint: no tensor {e.args[0]}") from None
    except ValueError as e:
        raise ConfigError(f"SD/LDM U-Net checkpoint: {e}") from None
    return cfg


def split_ldm_checkpoint(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(autoencoder, U-Net) state dicts, prefixes stripped, from a single-file SD checkpoint. The text encoder
    (`cond_stage_model.*`), EMA copies and schedule buffers are ignored. A standalone VAE file (keys
    `encoder.*`, `decoder.*`, no prefix) gives (its tensors, {})."""
    vae = {k[len(LDM_VAE_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_VAE_PREFIX)}
    unet = {k[len(LDM_UNET_PREFIX):]: v for k, v in state.items() if k.startswith(LDM_UNET_PREFIX)}
    if not vae and not unet and any(k.startswith("encoder.") for k in state):
        vae = {k: v for k, v in state.items() if k.startswith(("encoder.", "decoder.", "quant_conv.", "post_quant_conv."))}
    return vae, unet


# ----------------------------------------------------------------------------------------------------
# Whole models.
# ----------------------------------------------------------------------------------------------------


def autoencoder_to_state(model: AutoencoderKL, layout: Layout) -> tuple[dict[str, torch.Tensor], AutoencoderConfig]:
    """(`model`'s tensors in `layout`, the config they are a model of). A grey-output decoder (one conv_out
    channel, repeated) becomes the equivalent colour head, its conv_out row repeated `out_channels` times: the
    same images from an ordinary decoder, which is all other tools have."""
    state, cfg = dict(model.state_dict()), model.config
    if cfg.grey_output:
        for key in ("decoder.conv_out.weight", "decoder.conv_out.bias"):
            state[key] = state[key].repeat(cfg.out_channels, *[1] * (state[key].ndim - 1))
        cfg = cfg.model_copy(update={"grey_output": False})
    return export_state(state, autoencoder_links(cfg, layout)), cfg


def autoencoder_from_state(
    state: Mapping[str, torch.Tensor], cfg: AutoencoderConfig, layout: Layout, scale_factor: float,
    use_quant_conv: bool = True, use_post_quant_conv: bool = True,
) -> AutoencoderKL:
    """Our AutoencoderKL (float32, CPU) holding a foreign state dict. A diffusers model built without
    quant_conv / post_quant_conv gets identity 1x1 convs there (the same function)."""
    model = AutoencoderKL(cfg)
    state = dict(state)
    for present, name in ((use_quant_conv, "quant_conv"), (use_post_quant_conv, "post_quant_conv")):
        if not present:
            conv = getattr(model, name)
            state[f"{name}.weight"] = torch.eye(conv.out_channels)[:, :, None, None]
            state[f"{name}.bias"] = torch.zeros(conv.out_channels)
    template = {k: v for k, v in model.state_dict().items() if k != "scale_factor"}
    tensors = import_state(state, autoencoder_links(cfg, layout), template, f"{layout} autoencoder")
    tensors["scale_factor"] = torch.tensor(float(scale_factor))
    model.load_state_dict(tensors, strict=True)
    return model


def unet_from_state(state: Mapping[str, torch.Tensor], cfg: UNetConfig, layout: Layout) -> UNet:
    """Our UNet (float32, CPU) holding a foreign state dict (either proj_in / proj_out form)."""
    model = UNet(cfg)
    tensors = import_state(state, unet_links(cfg, layout), model.state_dict(), f"{layout} U-Net")
    model.load_state_dict(tensors, strict=True)
    return model

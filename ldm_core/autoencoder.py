"""The first-stage autoencoder of latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3.1 and App. G): a convolutional ResNet encoder E and decoder D with
a downsampling factor f = 2 ** (len(channel_mult) - 1), so a (3, H, W) image maps to a (c, H/f, W/f)
latent z (256x256x3 -> 32x32x4 for f = 8, c = 4).

Two regularisations of the latent space (LDM Sec. 3.1):

- kind="kl": E outputs the mean and log-variance of a diagonal Gaussian posterior q(z | x) and training
  adds a small KL(q || N(0, I)) penalty (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").
- kind="deterministic": E outputs z directly; the posterior is a point mass (std 0, KL 0), so encoding
  the same image twice gives the same code.

Layout for `channel_mult = [1, 2, 4, 4]` (C = base_channels, N = num_res_blocks):

    Encoder: conv_in -> [level i: ResnetBlock(C * mult[i]) x N, then Downsample except at the last level]
             -> mid: ResnetBlock -> (SelfAttention) -> ResnetBlock -> GroupNorm -> SiLU -> conv_out
    Decoder: conv_in -> mid -> [level i from last to 0: ResnetBlock(C * mult[i]) x (N + 1), then
             Upsample except at level 0] -> GroupNorm -> SiLU -> conv_out

The model carries the latent scale factor used by the diffusion stage (LDM Sec. 4.3.2 / App. G, "rescale
the latent by the component-wise std"): a buffer `scale_factor`, 1.0 until a pipeline measures
1 / std(z) on data and stores it; `encode_scaled` / `decode_scaled` apply it. Beside it, the per-channel mean
and std of z (`latents_mean`, `latents_std`, None until measured) allow a per-channel normalisation instead:
`normalize_latents` / `denormalize_latents`, with the meaning of diffusers' AutoencoderKL config fields of the same
names (SDXL-era VAEs). One scalar leaves a channel whose std is far below the others' nearly silent.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_core.config import ConfigError, format_validation_error
from ldm_core.model_configs import AutoencoderConfig
from ldm_core.metrics import bicubic_enlarge, bicubic_shrink

__all__ = ["AutoencoderConfig", "DiagonalGaussian", "Encoder", "Decoder", "AutoencoderKL", "denormalize_latents",
           "normalize_latents", "sample_latents"]

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT_NAME = "ldm_core.AutoencoderKL"
FORMAT_VERSION = 1
NORM_EPS = 1e-6
"""GroupNorm epsilon of every norm layer (the LDM autoencoder value)."""
SHORTCUT_INIT_LOGVAR = -10.0
"""The posterior log-variance a bicubic-shortcut autoencoder starts at (see AutoencoderConfig.bicubic_shortcut)."""


def latent_shape_for(size: tuple[int, int], latent_channels: int, f: int, field: str) -> tuple[int, int, int]:
    """The latent shape (c, H / f, W / f) of images of `size` (H, W) through an autoencoder of downsampling factor f.
    Raises ConfigError naming `field` (the setting that gave the size) when a side is not a multiple of f."""
    height, width = size
    if height % f or width % f:
        shown = height if height == width else [height, width]
        raise ConfigError(f"{field}={shown}: every side must be a multiple of the autoencoder's downsampling "
                          f"factor f={f} (e.g. {[max(f, round(s / f) * f) for s in size]})")
    return (latent_channels, height // f, width // f)


# ----------------------------------------------------------------------------------------------------
# The posterior q(z | x).
# ----------------------------------------------------------------------------------------------------


class DiagonalGaussian:
    """q(z | x) = N(mu, diag(sigma^2)) over latents of shape (B, c, h, w), or a point mass at mu.

    `logvar` is clamped to [logvar_min, logvar_max]. With `deterministic=True`, sigma = 0: `sample()`
    returns mu and `kl()` is 0.
    """

    def __init__(
        self,
        mean: torch.Tensor,
        logvar: torch.Tensor | None = None,
        *,
        deterministic: bool = False,
        logvar_min: float = -30.0,
        logvar_max: float = 20.0,
    ):
        self.mean = mean
        self.deterministic = deterministic
        if deterministic:
            self.logvar = None
            self.std = torch.zeros_like(mean)
            self.var = torch.zeros_like(mean)
        else:
            if logvar is None:
                raise ValueError("a non-deterministic DiagonalGaussian needs a logvar")
            if logvar.shape != mean.shape:
                raise ValueError(f"mean {tuple(mean.shape)} and logvar {tuple(logvar.shape)} differ in shape")
            self.logvar = torch.clamp(logvar, logvar_min, logvar_max)
            self.std = torch.exp(0.5 * self.logvar)
            self.var = torch.exp(self.logvar)

    @classmethod
    def from_moments(cls, moments: torch.Tensor, *, logvar_min: float = -30.0, logvar_max: float = 20.0) -> DiagonalGaussian:
        """Split encoder moments (B, 2c, h, w) into mu (B, c, h, w) and logvar (B, c, h, w)."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        return cls(mean, logvar, logvar_min=logvar_min, logvar_max=logvar_max)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mu + sigma * eps, eps ~ N(0, I): the reparameterisation trick (Kingma & Welling 2014,
        Sec. 2.4), differentiable with respect to mu and logvar."""
        if self.deterministic:
            return self.mean
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        """The most likely latent, mu."""
        return self.mean

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sample, shape (B,), summed over the latent dims, computed in fp32.

        Closed form (Kingma & Welling 2014, App. B / eq. 10):
            KL = 1/2 * sum(mu^2 + sigma^2 - 1 - log sigma^2).
        """
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=torch.float32)
        mu, logvar = self.mean.float(), self.logvar.float()
        return 0.5 * torch.sum(mu.pow(2) + logvar.exp() - 1.0 - logvar, dim=tuple(range(1, mu.ndim)))

    def nll(self, x: torch.Tensor) -> torch.Tensor:
        """-log q(x) per sample, shape (B,), summed over the latent dims, computed in fp32:
        1/2 * sum(log(2 pi) + logvar + (x - mu)^2 / sigma^2). Undefined for a point mass."""
        if self.deterministic:
            raise ValueError("nll is undefined for a deterministic (point-mass) posterior")
        mu, logvar = self.mean.float(), self.logvar.float()
        log_two_pi = math.log(2.0 * math.pi)
        return 0.5 * torch.sum(log_two_pi + logvar + (x.float() - mu).pow(2) / logvar.exp(), dim=tuple(range(1, mu.ndim)))


def sample_latents(mean: torch.Tensor, std: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """A fresh z ~ N(mean, std^2) (the reparameterised posterior sample, Kingma & Welling 2014, Sec. 2.4)."""
    eps = torch.randn(mean.shape, generator=generator, device=generator.device if generator is not None else mean.device)
    return mean + std * eps.to(mean.device)


# ----------------------------------------------------------------------------------------------------
# Building blocks.
# ----------------------------------------------------------------------------------------------------


def _per_channel(values, like: torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(values, dtype=like.dtype, device=like.device).reshape(1, -1, *([1] * (like.ndim - 2)))


def normalize_latents(z: torch.Tensor, scale_factor: float, latents_mean=None, latents_std=None) -> torch.Tensor:
    """The latent the diffusion model sees: scale_factor * (z - mean_c) / std_c per channel c (z is (B, C, ...)).
    Without statistics, scale_factor * z (LDM Sec. 4.3.2, Stable Diffusion's scalar); without a mean, no shift (for
    a posterior's std). diffusers' SDXL pipelines apply AutoencoderKL's `latents_mean` / `latents_std` so."""
    if latents_mean is not None:
        z = z - _per_channel(latents_mean, z)
    if latents_std is not None:
        z = z / _per_channel(latents_std, z)
    return z * scale_factor


def denormalize_latents(x: torch.Tensor, scale_factor: float, latents_mean=None, latents_std=None) -> torch.Tensor:
    """The inverse of `normalize_latents`: x * std_c / scale_factor + mean_c, the latent the decoder takes."""
    z = x / scale_factor
    if latents_std is not None:
        z = z * _per_channel(latents_std, x)
    if latents_mean is not None:
        z = z + _per_channel(latents_mean, x)
    return z


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(groups, channels, eps=NORM_EPS, affine=True)


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv3x3 -> GroupNorm -> SiLU -> dropout -> conv3x3, plus a (1x1) skip
    (He et al. 2016, pre-activation form)."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Single-head self-attention over the h*w positions, with a residual connection."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = _norm(channels, groups)
        self.qkv = nn.Conv2d(channels, 3 * channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        # The 1x1 convs applied as linear maps over the hw tokens: the same function, with the rounding of
        # the diffusers / SD implementation, so imported weights reproduce their outputs to float precision.
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, hw, C)
        q, k, v = (F.linear(tokens, wt.flatten(1), bias)[:, None]  # 3 x (B, 1, hw, C)
                   for wt, bias in zip(self.qkv.weight.chunk(3), self.qkv.bias.chunk(3)))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, hw, C)
        out = F.linear(out, self.proj_out.weight.flatten(1), self.proj_out.bias)
        # out + x, not x + out: the sum keeps out's token-major strides, the layout the next conv also gets in
        # diffusers / SD (convs round differently on another memory layout).
        return out.transpose(1, 2).reshape(b, c, h, w) + x


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 conv3x3 (padded right/bottom so H/2 is exact)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the resolution: nearest-neighbour upsampling, then conv3x3."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Checkpointed(nn.Module):
    """Runs a sequence of blocks, recomputing their activations in backward when enabled."""

    gradient_checkpointing: bool = False

    def _run(self, block: nn.Module, h: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, h, use_reentrant=False)
        return block(h)


class Encoder(_Checkpointed):
    """x (B, in, H, W) -> (B, out, H/f, W/f), out = 2c moments (kl) or c (deterministic)."""

    def __init__(self, cfg: AutoencoderConfig, out_channels: int):
        super().__init__()
        self.gradient_checkpointing = cfg.gradient_checkpointing
        ch, g = cfg.base_channels, cfg.norm_groups
        self.conv_in = nn.Conv2d(cfg.in_channels, ch, 3, padding=1)
        blocks: list[nn.Module] = []
        width = ch
        for level, mult in enumerate(cfg.channel_mult):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResnetBlock(width, ch * mult, cfg.dropout, g))
                width = ch * mult
            if level < len(cfg.channel_mult) - 1:
                blocks.append(Downsample(width))
        self.down = nn.ModuleList(blocks)
        self.mid = nn.ModuleList(
            [ResnetBlock(width, width, cfg.dropout, g)]
            + ([SelfAttention(width, g)] if cfg.mid_attention else [])
            + [ResnetBlock(width, width, cfg.dropout, g)]
        )
        self.norm_out = _norm(width, g)
        self.conv_out = nn.Conv2d(width, out_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for block in (*self.down, *self.mid):
            h = self._run(block, h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(_Checkpointed):
    """z (B, c, h, w) -> image (B, out, h*f, w*f)."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.gradient_checkpointing = cfg.gradient_checkpointing
        ch, g = cfg.base_channels, cfg.norm_groups
        width = ch * cfg.channel_mult[-1]
        self.conv_in = nn.Conv2d(cfg.latent_channels, width, 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(width, width, cfg.dropout, g)]
            + ([SelfAttention(width, g)] if cfg.mid_attention else [])
            + [ResnetBlock(width, width, cfg.dropout, g)]
        )
        blocks: list[nn.Module] = []
        for level in reversed(range(len(cfg.channel_mult))):
            for _ in range(cfg.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, ch * cfg.channel_mult[level], cfg.dropout, g))
                width = ch * cfg.channel_mult[level]
            if level > 0:
                blocks.append(Upsample(width))
        self.up = nn.ModuleList(blocks)
        self.norm_out = _norm(width, g)
        self.out_channels = cfg.out_channels
        self.grey_output = cfg.grey_output
        self.conv_out = nn.Conv2d(width, 1 if cfg.grey_output else cfg.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        for block in (*self.mid, *self.up):
            h = self._run(block, h)
        x = self.conv_out(F.silu(self.norm_out(h)))
        return x.repeat(1, self.out_channels, 1, 1) if self.grey_output else x  # (B, 1, H, W) -> (B, C, H, W)


# ----------------------------------------------------------------------------------------------------
# The autoencoder.
# ----------------------------------------------------------------------------------------------------


class AutoencoderKL(nn.Module):
    """E, D and the 1x1 convs around the latent (LDM's quant_conv / post_quant_conv), for either kind."""

    def __init__(self, config: AutoencoderConfig):
        super().__init__()
        self.config = config
        moments = 2 * config.latent_channels if config.kind == "kl" else config.latent_channels
        self.encoder = Encoder(config, moments)
        self.quant_conv = nn.Conv2d(moments, moments, 1)
        self.post_quant_conv = nn.Conv2d(config.latent_channels, config.latent_channels, 1)
        self.decoder = Decoder(config)
        self.register_buffer("scale_factor", torch.tensor(1.0))
        self.latents_mean: list[float] | None = None
        """Per-channel mean of z on data (Stage A measures it beside `scale_factor`); None: not measured."""
        self.latents_std: list[float] | None = None
        """Per-channel std of z on data; None: not measured."""
        if config.bicubic_shortcut:  # start as the bicubic codec: the learned paths add nothing until trained
            for conv in (self.encoder.conv_out, self.decoder.conv_out):
                nn.init.zeros_(conv.weight)
                nn.init.zeros_(conv.bias)
            # quant_conv's weight stays random (the encoder's gradient flows through it); its bias starts the mean
            # at the thumbnail and, for the KL kind, the posterior nearly deterministic (log-variance -10, std e^-5):
            # with std 1 the decoder first learns from thumbnails drowned in noise, and Adam moves a log-variance
            # bias only about the learning rate per step.
            nn.init.zeros_(self.quant_conv.bias)
            if config.kind == "kl":
                nn.init.constant_(self.quant_conv.bias[config.latent_channels:], SHORTCUT_INIT_LOGVAR)

    @property
    def downsample_factor(self) -> int:
        return self.config.downsample_factor

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's final conv weight: where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """q(z | x) for images x (B, in, H, W) in [-1, 1], H and W divisible by f."""
        f = self.downsample_factor
        if x.ndim != 4 or x.shape[1] != self.config.in_channels:
            raise ValueError(f"expected images (B, {self.config.in_channels}, H, W), got {tuple(x.shape)}")
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image size {tuple(x.shape[-2:])} is not divisible by the downsampling factor f={f}")
        moments = self.quant_conv(self.encoder(x))
        if self.config.bicubic_shortcut:  # the mean's first in_channels channels = learned + bicubic thumbnail
            k = self.config.in_channels
            moments = torch.cat([moments[:, :k] + bicubic_shrink(x, f).to(moments.dtype), moments[:, k:]], dim=1)
        if self.config.kind == "deterministic":
            return DiagonalGaussian(moments, deterministic=True)
        return DiagonalGaussian.from_moments(moments, logvar_min=self.config.logvar_min, logvar_max=self.config.logvar_max)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Image (B, out, h*f, w*f) from an unscaled latent z (B, c, h, w)."""
        x = self.decoder(self.post_quant_conv(z))
        if self.config.bicubic_shortcut:
            k = self.config.in_channels
            x = x + bicubic_enlarge(z[:, :k], tuple(x.shape[-2:])).to(x.dtype)
        return x

    def forward(self, x: torch.Tensor, sample_posterior: bool = True) -> tuple[torch.Tensor, DiagonalGaussian]:
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_scaled(self, x: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        """scale_factor * z: the latent the diffusion model sees (z sampled, or mu when sample=False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample else posterior.mode()
        return z * self.scale_factor.to(z.dtype)

    def decode_scaled(self, z_scaled: torch.Tensor) -> torch.Tensor:
        """Decode a latent produced by the diffusion model: divide by scale_factor, then decode."""
        return self.decode(z_scaled / self.scale_factor.to(z_scaled.dtype))

    # --- serialisation: config.json (config + scale_factor) and model.safetensors (every other tensor)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` and `model.safetensors` into a local directory (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if k != "scale_factor"}
        save_file(tensors, str(directory / WEIGHTS_FILE), metadata={"format": FORMAT_NAME})
        mask = os.umask(0o022)  # safetensors writes owner-only (0600): give the file the mode any new file gets
        os.umask(mask)
        os.chmod(directory / WEIGHTS_FILE, 0o666 & ~mask)
        meta = {
            "format": FORMAT_NAME,
            "format_version": FORMAT_VERSION,
            "config": self.config.model_dump(mode="json"),
            "scale_factor": float(self.scale_factor),
            **({"latents_mean": self.latents_mean, "latents_std": self.latents_std} if self.latents_mean is not None else {}),
        }
        (directory / CONFIG_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> AutoencoderKL:
        """Rebuild a model written by `save_pretrained` (on CPU, float32). Nothing is unpickled."""
        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_FILE, directory / WEIGHTS_FILE
        for path in (config_path, weights_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path} does not exist (not a save_pretrained directory?)")
        try:
            meta = json.loads(config_path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{config_path}: not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
            raise ConfigError(f"{config_path}: format is not {FORMAT_NAME!r}")
        if meta.get("format_version") != FORMAT_VERSION:
            raise ConfigError(f"{config_path}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
        try:
            config = AutoencoderConfig.model_validate(meta.get("config"))
        except ValidationError as e:
            raise ConfigError(f"{config_path}:\n{format_validation_error(e, 'config')}") from None
        scale_factor = meta.get("scale_factor")
        if not isinstance(scale_factor, (int, float)) or not math.isfinite(scale_factor) or scale_factor <= 0:
            raise ConfigError(f"{config_path}: scale_factor must be a positive finite number, got {scale_factor!r}")

        model = cls(config)
        stats = [meta.get("latents_mean"), meta.get("latents_std")]
        if stats != [None, None]:
            if not all(isinstance(v, list) and len(v) == config.latent_channels and all(
                    isinstance(x, (int, float)) and math.isfinite(x) for x in v) for v in stats) or min(stats[1]) <= 0:
                raise ConfigError(f"{config_path}: latents_mean / latents_std must be {config.latent_channels} finite "
                                  f"numbers each (the std positive), got {stats}")
            model.latents_mean, model.latents_std = [float(x) for x in stats[0]], [float(x) for x in stats[1]]
        tensors = load_file(str(weights_path))
        tensors["scale_factor"] = torch.tensor(float(scale_factor))
        try:
            model.load_state_dict(tensors, strict=True)
        except RuntimeError as e:
            raise ValueError(f"{weights_path} does not match {config_path}: {e}") from None
        return model

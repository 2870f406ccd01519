"""Text-conditioned U-Net for latent diffusion (Rombach et al. 2022, "High-Resolution Image Synthesis
with Latent Diffusion Models", Sec. 3.3 and App. E), built on the ADM U-Net of Dhariwal & Nichol 2021
and the original U-Net of Ronneberger et al. 2015.

Layout for `channel_mult = [1, 2, 4]` (C = model_channels):

    x (B, in, H, W) -> conv_in -> [level 0: ResBlock(C) x N (+ transformer)] -> down
                                -> [level 1: ResBlock(2C) x N (+ transformer)] -> down
                                -> [level 2: ResBlock(4C) x N (+ transformer)]
    mid: ResBlock -> SpatialTransformer -> ResBlock
    up path mirrors the down path with N + 1 ResBlocks per level, each taking one skip connection,
    then GroupNorm -> SiLU -> conv_out (zero-initialised) -> (B, out, H, W).

The timestep enters every ResBlock as an additive per-channel bias after a sinusoidal embedding
(Vaswani et al. 2017) and a two-layer MLP. The text condition enters through cross-attention inside
each SpatialTransformer: queries from the image tokens, keys/values from `context` (B, L, context_dim),
with padding tokens removed by `context_mask` (B, L).

Every residual branch ends in a zero-initialised projection (ResBlock's last conv, the transformer's
proj_out, conv_out), so a fresh network outputs exactly 0 and each block starts as the identity.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ldm_core.model_configs import UNetConfig

__all__ = ["UNetConfig", "UNet", "timestep_embedding"]


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al. 2017, Sec. 3.5).

    emb[:, i] = cos(t * f_i), emb[:, half + i] = sin(t * f_i), f_i = max_period^(-i / half); an odd `dim`
    gets one zero column. Returns (B, dim) float32.
    """
    if t.ndim != 1:
        raise ValueError(f"t: expected shape (B,), got {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


def _zero(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GroupNorm -> SiLU -> conv, + timestep bias, GroupNorm -> SiLU -> dropout -> conv (zero-init), + skip."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Linear(emb_dim, out_ch)
        self.norm2 = nn.GroupNorm(groups, out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = _zero(nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Identity() if in_ch == out_ch else nn.Conv2d(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.emb_proj(F.silu(emb))[:, :, None, None]  # (B, out_ch, 1, 1)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int,
            key_mask: torch.Tensor | None) -> torch.Tensor:
    """Multi-head softmax(q k^T / sqrt(d)) v with scaled_dot_product_attention; key_mask (B, L) True = keep."""
    b, n, inner = q.shape
    d = inner // heads
    q, k, v = (x.reshape(b, x.shape[1], heads, d).transpose(1, 2) for x in (q, k, v))  # (B, heads, len, d)
    attn_mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, L)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(b, n, inner)


class Attention(nn.Module):
    """Multi-head attention; self-attention when `context` is None, cross-attention otherwise."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None):
        super().__init__()
        kv_dim = dim if context_dim is None else context_dim
        self.heads = heads
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(kv_dim, dim, bias=False)
        self.to_v = nn.Linear(kv_dim, dim, bias=False)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        kv = x if context is None else context
        if context_mask is None:
            return self.to_out(_attend(self.to_q(x), self.to_k(kv), self.to_v(kv), self.heads, None))
        # A row with no visible token would make softmax 0/0 = NaN: let it attend to everything, then
        # zero its output, so a fully masked condition contributes nothing (and no NaN gradient).
        has_token = context_mask.any(dim=1)  # (B,)
        key_mask = context_mask | ~has_token[:, None]
        out = self.to_out(_attend(self.to_q(x), self.to_k(kv), self.to_v(kv), self.heads, key_mask))
        return out * has_token[:, None, None].to(out.dtype)


class GEGLU(nn.Module):
    """Gated GELU feed-forward (Shazeer 2020): (x W + b) * GELU(x V + c), then a linear map back."""

    def __init__(self, dim: int, mult: int):
        super().__init__()
        self.proj = nn.Linear(dim, 2 * dim * mult)
        self.out = nn.Linear(dim * mult, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, gate = self.proj(x).chunk(2, dim=-1)
        return self.out(h * F.gelu(gate))


class TransformerBlock(nn.Module):
    """Pre-LN block: x + SelfAttn(LN x); x + CrossAttn(LN x, context); x + GEGLU(LN x)."""

    def __init__(self, dim: int, heads: int, context_dim: int, ff_mult: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = GEGLU(dim, ff_mult)

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context, context_mask)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """LDM's SpatialTransformer: GroupNorm -> linear proj_in -> transformer blocks over the H*W tokens ->
    proj_out (zero-init) -> + input."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, groups: int, ff_mult: int,
                 norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.GroupNorm(groups, ch, eps=norm_eps)
        self.proj_in = nn.Linear(ch, ch)
        self.blocks = nn.ModuleList(TransformerBlock(ch, heads, context_dim, ff_mult) for _ in range(depth))
        self.proj_out = _zero(nn.Linear(ch, ch))

    def forward(self, x: torch.Tensor, context: torch.Tensor, context_mask: torch.Tensor | None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).reshape(b, c, h * w).transpose(1, 2)  # (B, H*W, C)
        tokens = self.proj_in(tokens)
        for block in self.blocks:
            tokens = block(tokens, context, context_mask)
        tokens = self.proj_out(tokens)
        return x + tokens.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Strided 3x3 conv halving H and W (rounding up)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour resize to the skip connection's size, then a 3x3 conv (handles odd sizes)."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


class UNet(nn.Module):
    """eps/v-prediction network f(x_t, t, context) -> same shape as x_t. See the module docstring."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = config
        c = config
        ch = c.model_channels
        emb_dim = 4 * ch
        self.time_mlp = nn.Sequential(nn.Linear(ch, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.conv_in = nn.Conv2d(c.in_channels, ch, 3, padding=1)

        def transformer(width: int) -> SpatialTransformer:
            return SpatialTransformer(width, c.heads(width), c.transformer_depth, c.context_dim, c.norm_groups, c.ff_mult,
                                      c.transformer_norm_eps)

        # Down path: every ResBlock(+transformer) output and every downsample output is a skip.
        self.down_blocks = nn.ModuleList()
        self.down_attn = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        skip_channels = [ch]
        for level, mult in enumerate(c.channel_mult):
            out = c.model_channels * mult
            for _ in range(c.num_res_blocks):
                self.down_blocks.append(ResBlock(ch, out, emb_dim, c.dropout, c.norm_groups))
                self.down_attn.append(transformer(out) if level in c.attention_levels else nn.Identity())
                ch = out
                skip_channels.append(ch)
            if level < len(c.channel_mult) - 1:
                self.downsamplers.append(Downsample(ch))
                skip_channels.append(ch)

        self.mid_block1 = ResBlock(ch, ch, emb_dim, c.dropout, c.norm_groups)
        self.mid_attn = transformer(ch)
        self.mid_block2 = ResBlock(ch, ch, emb_dim, c.dropout, c.norm_groups)

        # Up path: num_res_blocks + 1 ResBlocks per level, each concatenating one skip.
        self.up_blocks = nn.ModuleList()
        self.up_attn = nn.ModuleList()
        self.upsamplers = nn.ModuleList()
        for level in reversed(range(len(c.channel_mult))):
            out = c.model_channels * c.channel_mult[level]
            for _ in range(c.num_res_blocks + 1):
                self.up_blocks.append(ResBlock(ch + skip_channels.pop(), out, emb_dim, c.dropout, c.norm_groups))
                self.up_attn.append(transformer(out) if level in c.attention_levels else nn.Identity())
                ch = out
            if level > 0:
                self.upsamplers.append(Upsample(ch))

        self.norm_out = nn.GroupNorm(c.norm_groups, ch)
        self.conv_out = _zero(nn.Conv2d(ch, c.out_channels, 3, padding=1))

    def _run(self, fn, *args):
        if self.config.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False)
        return fn(*args)

    def _block(self, res: ResBlock, attn: nn.Module, h, emb, context, context_mask):
        h = self._run(res, h, emb)
        if isinstance(attn, SpatialTransformer):
            h = self._run(attn, h, context, context_mask)
        return h

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, in_channels, H, W); t: (B,) integer or float timesteps; context: (B, L, context_dim);
        context_mask: (B, L) bool or 0/1, True/1 = real token (None = all tokens visible)."""
        c = self.config
        if x.ndim != 4 or x.shape[1] != c.in_channels:
            raise ValueError(f"x: expected (B, {c.in_channels}, H, W), got {tuple(x.shape)}")
        if context.ndim != 3 or context.shape[0] != x.shape[0] or context.shape[2] != c.context_dim:
            raise ValueError(f"context: expected ({x.shape[0]}, L, {c.context_dim}), got {tuple(context.shape)}")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ValueError(f"t: expected shape ({x.shape[0]},), got {tuple(t.shape)}")
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ValueError(f"context_mask: expected {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}")
            context_mask = context_mask.to(torch.bool)

        emb = self.time_mlp(timestep_embedding(t, c.model_channels).to(x.dtype))
        h = self.conv_in(x)
        skips = [h]
        blocks = iter(zip(self.down_blocks, self.down_attn))
        for level in range(len(c.channel_mult)):
            for _ in range(c.num_res_blocks):
                res, attn = next(blocks)
                h = self._block(res, attn, h, emb, context, context_mask)
                skips.append(h)
            if level < len(c.channel_mult) - 1:
                h = self.downsamplers[level](h)
                skips.append(h)

        h = self._run(self.mid_block1, h, emb)
        h = self._run(self.mid_attn, h, context, context_mask)
        h = self._run(self.mid_block2, h, emb)

        blocks = iter(zip(self.up_blocks, self.up_attn))
        upsamplers = iter(self.upsamplers)
        for level in reversed(range(len(c.channel_mult))):
            for _ in range(c.num_res_blocks + 1):
                res, attn = next(blocks)
                h = self._block(res, attn, torch.cat([h, skips.pop()], dim=1), emb, context, context_mask)
            if level > 0:
                h = next(upsamplers)(h, skips[-1].shape[-2:])
        return self.conv_out(F.silu(self.norm_out(h)))

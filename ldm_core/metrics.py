"""Image-quality metrics for autoencoder evaluation, per sample, on images in [-1, 1].

PSNR and SSIM (Wang et al. 2004, Gaussian window 11, sigma 1.5, K1=0.01, K2=0.03, computed on the
[0, 1] range and averaged over channels), plus the bicubic baseline the autoencoder has to beat: shrink by
the same factor f, then enlarge back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x.float().clamp(-1, 1) + 1) / 2)


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per sample, for images in [-1, 1] (peak 1 on the [0, 1] scale)."""
    mse = (_to_unit(x) - _to_unit(y)).pow(2).flatten(1).mean(1)
    return 10 * torch.log10(1.0 / mse.clamp_min(1e-12))


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    window = g[:, None] * g[None, :]  # (size, size)
    return window.expand(channels, 1, size, size).contiguous()


def ssim(x: torch.Tensor, y: torch.Tensor, window_size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, eq. 13), per sample, for images in [-1, 1].

    Images smaller than the window use a window as large as the image allows (odd size).
    """
    x, y = _to_unit(x), _to_unit(y)
    c = x.shape[1]
    size = min(window_size, x.shape[-1], x.shape[-2])
    size = size if size % 2 == 1 else size - 1
    w = _gaussian_window(size, sigma, c, x.device, x.dtype)
    c1, c2 = 0.01**2, 0.03**2
    mu_x = F.conv2d(x, w, groups=c)
    mu_y = F.conv2d(y, w, groups=c)
    sigma_x = F.conv2d(x * x, w, groups=c) - mu_x**2
    sigma_y = F.conv2d(y * y, w, groups=c) - mu_y**2
    sigma_xy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
    return ssim_map.flatten(1).mean(1)


def bicubic_shrink(x: torch.Tensor, factor: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H/factor, W/factor), antialiased bicubic."""
    h, w = x.shape[-2:]
    return F.interpolate(x, size=(h // factor, w // factor), mode="bicubic", antialias=True, align_corners=False)


def bicubic_enlarge(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, C, h, w) -> (B, C, *size), bicubic."""
    return F.interpolate(x, size=size, mode="bicubic", align_corners=False)


def bicubic_baseline(x: torch.Tensor, factor: int) -> torch.Tensor:
    """Downsample by `factor` (antialiased bicubic), upsample back (bicubic): the no-learning baseline (and what
    an autoencoder with `bicubic_shortcut` starts as: it uses the same two resamplings)."""
    return bicubic_enlarge(bicubic_shrink(x.float(), factor), tuple(x.shape[-2:])).clamp(-1, 1)

import math

import torch

from ldm_core.metrics import bicubic_baseline, psnr, ssim


def test_psnr_known_value():
    x = torch.zeros(2, 3, 8, 8)
    y = x + 0.2  # 0.1 on the [0, 1] scale -> mse 0.01 -> 20 dB
    assert torch.allclose(psnr(y, x), torch.full((2,), 20.0), atol=1e-4)


def test_ssim_identity_and_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    assert torch.allclose(ssim(x, x), torch.ones(2), atol=1e-5)
    noise = torch.randn(x.shape, generator=g)
    slightly, very = ssim((x + 0.1 * noise).clamp(-1, 1), x), ssim((x + 0.8 * noise).clamp(-1, 1), x)
    assert (very < slightly).all() and (slightly < 1).all() and (very > -1).all()


def test_ssim_matches_scikit_image():
    from skimage.metrics import structural_similarity

    g = torch.Generator().manual_seed(1)
    x = torch.rand(1, 1, 48, 48, generator=g)
    y = (x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    ours = ssim(y * 2 - 1, x * 2 - 1).item()
    ref = structural_similarity(
        x[0, 0].numpy(), y[0, 0].numpy(), data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False
    )
    assert math.isclose(ours, ref, abs_tol=2e-3)


def test_bicubic_baseline_shape_and_smooth_image_is_kept():
    h = torch.linspace(-1, 1, 64)
    smooth = (h[None, :] * h[:, None]).expand(1, 3, 64, 64)
    out = bicubic_baseline(smooth, 8)
    assert out.shape == smooth.shape
    assert psnr(out, smooth).item() > 30

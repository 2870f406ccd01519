"""CPU training-step time of our networks next to diffusers' at the same configs, side by side in one process.

    .venv/bin/python benchmarks/bench_cpu_parity.py [--steps 20] [--threads 2] [--json results.jsonl] [--profile]

For each pair (ours, diffusers' built from the same config through ldm_core.convert, same weights' shapes and
parameter count), one training step is: float32 forward, a plain loss (L1 of the reconstruction for the
autoencoders, the eps MSE for the U-Nets), backward, AdamW (ours in the implementation our training loop picks on
the CPU, foreach; diffusers' as torch builds it by default, the per-parameter loop on the CPU; `--plain-adamw`:
torch's default for both). The two networks' steps alternate (ours, theirs,
ours, ...) so that other load on the machine hits both alike; the first `--warmup` steps of each are not
timed; the reported time is the median step. Ratio = our step time / diffusers' (below 1.0: ours is faster).
The issue's target is <= 1.0 on CPU. `--profile`: instead of timing, the milliseconds per step by kind of
kernel (convolutions, matrix products, attention, norms and activations, the rest), ours and diffusers'.
Needs diffusers (an optional dependency: `pip install -e .[interop]`);
without it the script says so and exits with status 0. Not a test: nothing is asserted.

Pairs: configs/photos.yaml's f=8 autoencoder at 64 px (batch 8), configs/quickstart.yaml's U-Net on its
4x8x8 latents with 16 MiniLM tokens (batch 64, one worker's), and a 23M-parameter U-Net at 32x32x4 with 77x768 context
(batch 4), where the attention and convolutions dominate rather than Python overhead. The U-Nets use diffusers'
(and SD's) transformer LayerNorm eps of 1e-6, which diffusers cannot change (ours defaults to 1e-5; same cost).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm_core.unet import UNet, UNetConfig  # noqa: E402

PHOTOS_AE = AutoencoderConfig(base_channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=1, norm_groups=8,
                              mid_attention=True, latent_channels=4, kind="kl")
QUICKSTART_UNET = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1],
                             num_heads=4, norm_groups=8, context_dim=384, transformer_norm_eps=1e-6)
MID_UNET = UNetConfig(model_channels=64, channel_mult=[1, 2, 4], num_res_blocks=2, attention_levels=[1, 2],
                      head_dim=32, context_dim=768, norm_groups=32, transformer_norm_eps=1e-6)


def their_vae(cfg: AutoencoderConfig, size: int) -> torch.nn.Module:
    from diffusers import AutoencoderKL as TheirVAE

    from ldm_core.convert import autoencoder_config_to_diffusers

    config = autoencoder_config_to_diffusers(cfg, scale_factor=1.0, sample_size=size)
    return TheirVAE(**{k: v for k, v in config.items() if not k.startswith("_")})


def their_unet(cfg: UNetConfig, size: int) -> torch.nn.Module:
    from diffusers import UNet2DConditionModel

    from ldm_core.convert import unet_config_to_diffusers

    config = unet_config_to_diffusers(cfg, sample_size=size)
    return UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})


def optimizer(model: torch.nn.Module, ours: bool) -> torch.optim.AdamW:
    """Ours: the AdamW implementation the training loop uses on this device (`adamw_impl`); diffusers': torch's
    default, as its training scripts build it. `--plain-adamw`: torch's default for both (the old comparison)."""
    from pipelines.train.loop import adamw_impl

    return torch.optim.AdamW(model.parameters(), lr=1e-4, **(adamw_impl("cpu") if ours and not PLAIN_ADAMW else {}))


PLAIN_ADAMW = False


def ae_step(model: torch.nn.Module, ours: bool, batch: int, size: int) -> Callable[[], None]:
    opt = optimizer(model, ours)
    x = torch.rand(batch, 3, size, size) * 2 - 1

    def step() -> None:
        if ours:
            recon, posterior = model(x)
        else:
            posterior = model.encode(x).latent_dist
            recon = model.decode(posterior.sample()).sample
        loss = (recon - x).abs().mean() + 1e-6 * posterior.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def unet_step(model: torch.nn.Module, ours: bool, batch: int, size: int, tokens: int, context_dim: int) -> Callable[[], None]:
    opt = optimizer(model, ours)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=generator)
    context = torch.randn(batch, tokens, context_dim, generator=generator)
    t = torch.randint(0, 1000, (batch,), generator=generator)
    noise = torch.randn_like(x)

    def step() -> None:
        pred = model(x, t, context) if ours else model(x, t, encoder_hidden_states=context).sample
        loss = torch.nn.functional.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def params_m(model: torch.nn.Module) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def alternate(steps: dict[str, Callable[[], None]], warmup: int, timed: int) -> dict[str, float]:
    """Median seconds per step of each, the steps interleaved."""
    times: dict[str, list[float]] = {k: [] for k in steps}
    for i in range(warmup + timed):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}


# Where a CPU training step's time goes, by kind of kernel (`--profile`): the convolutions and matrix products are
# the same oneDNN / BLAS calls in both networks (same shapes, same count); only the rest can differ.
KERNEL_KINDS = {
    "conv": ("aten::convolution_backward", "aten::mkldnn_convolution", "aten::_slow_conv2d_forward",
             "aten::_slow_conv2d_backward", "aten::thnn_conv2d"),
    "gemm": ("aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm"),
    "attention": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                  "aten::_scaled_dot_product_flash_attention_for_cpu_backward"),
    "norm+act": ("aten::native_group_norm", "aten::native_group_norm_backward", "aten::native_layer_norm",
                 "aten::native_layer_norm_backward", "aten::silu", "aten::silu_backward", "aten::gelu",
                 "aten::gelu_backward"),
}


def profile_kinds(steps: dict[str, Callable[[], None]], warmup: int, timed: int) -> dict[str, dict[str, float]]:
    """Self-CPU milliseconds per step of each kind of kernel (KERNEL_KINDS, "other": everything else: copies,
    elementwise ops, the optimizer, dispatch), by torch.profiler over `timed` interleaved steps of each."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(warmup):
        for step in steps.values():
            step()
    kind_of = {op: kind for kind, ops in KERNEL_KINDS.items() for op in ops}
    out = {name: dict.fromkeys([*KERNEL_KINDS, "other"], 0.0) for name in steps}
    for _ in range(timed):
        for name, step in steps.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                step()
            for event in prof.key_averages():
                out[name][kind_of.get(event.key, "other")] += event.self_cpu_time_total / 1e3 / timed
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per network (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads (default: all CPUs)")
    parser.add_argument("--json", type=Path, help="append each row as a JSON line to this file")
    parser.add_argument("--profile", action="store_true",
                        help="instead of timing, profile the steps: milliseconds per step by kind of kernel, "
                             "ours and diffusers' (torch.profiler; its own overhead is in every column)")
    parser.add_argument("--plain-adamw", action="store_true",
                        help="torch's default AdamW for ours too (the training loop picks foreach on the CPU)")
    args = parser.parse_args(argv)
    global PLAIN_ADAMW
    PLAIN_ADAMW = args.plain_adamw
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed (pip install -e .[interop]): nothing to compare against")
        return 0
    torch.set_num_threads(args.threads)
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; torch "
          f"{torch.__version__} ({args.threads} threads), diffusers {diffusers.__version__}; {time.strftime('%Y-%m-%d')}")
    pairs = [
        ("photos autoencoder f=8, 64 px", 8, lambda: AutoencoderKL(PHOTOS_AE), lambda: their_vae(PHOTOS_AE, 64),
         lambda m, ours: ae_step(m, ours, 8, 64)),
        ("quickstart U-Net, 4x8x8, 16x384 context", 64, lambda: UNet(QUICKSTART_UNET), lambda: their_unet(QUICKSTART_UNET, 8),
         lambda m, ours: unet_step(m, ours, 64, 8, 16, 384)),
        ("U-Net 64ch, 4x32x32, 77x768 context", 4, lambda: UNet(MID_UNET), lambda: their_unet(MID_UNET, 32),
         lambda m, ours: unet_step(m, ours, 4, 32, 77, 768)),
    ]
    if not args.profile:
        print(f"{'network':42s} {'batch':>5s} {'params M':>9s} {'ours s/step':>12s} {'diffusers':>10s} {'ratio':>6s}")
    for name, batch, make_ours, make_theirs, make_step in pairs:
        torch.manual_seed(0)
        ours, theirs = make_ours(), make_theirs()
        assert abs(params_m(ours) - params_m(theirs)) < 1e-3, (name, params_m(ours), params_m(theirs))
        if args.profile:
            kinds = profile_kinds({"ours": make_step(ours, True), "diffusers": make_step(theirs, False)},
                                  args.warmup, args.steps)
            print(f"{name} (batch {batch}): ms per step by kind of kernel, ours / diffusers'")
            for kind in kinds["ours"]:
                print(f"  {kind:10s} {kinds['ours'][kind]:9.1f} {kinds['diffusers'][kind]:9.1f}")
            total = {k: sum(v.values()) for k, v in kinds.items()}
            same = sum(kinds["ours"][k] for k in ("conv", "gemm", "attention"))
            left = 0.85 * total["diffusers"] - same
            print(f"  {'total':10s} {total['ours']:9.1f} {total['diffusers']:9.1f}   conv+gemm+attention: "
                  f"{same / total['ours']:.0%} of ours; 0.85x would leave {left:.1f} ms for the rest of our step "
                  f"(now {total['ours'] - same:.1f})")
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({"network": name, "batch": batch, "profile_ms": kinds,
                                        "threads": args.threads, "steps": args.steps,
                                        "date": time.strftime("%Y-%m-%d"), "load": os.getloadavg()[0]}) + "\n")
            continue
        times = alternate({"ours": make_step(ours, True), "diffusers": make_step(theirs, False)}, args.warmup, args.steps)
        ratio = times["ours"] / times["diffusers"]
        print(f"{name:42s} {batch:5d} {params_m(ours):9.2f} {times['ours']:12.4f} {times['diffusers']:10.4f} {ratio:6.2f}")
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({"network": name, "batch": batch, "params_m": round(params_m(ours), 3),
                                    "ours_s": times["ours"], "diffusers_s": times["diffusers"], "ratio": ratio,
                                    "threads": args.threads, "plain_adamw": args.plain_adamw, "date": time.strftime("%Y-%m-%d"),
                                    "load": os.getloadavg()[0]}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Stage B training throughput: pre-encoded latents vs encoding images and captions on the fly.

    .venv/bin/python benchmarks/bench_stage_b_latents.py [--setups small-unet,unet-heavy] [--steps 8] [--warmup 2]
                                                         [--batch 32] [--threads 1] [--json results.json]
                                                         [--set encode.text_encoder.max_length=16]

Both modes run the same U-Net training step (ldm_core.diffusion.training_loss, backward, AdamW step) on
the same batches of real MNIST digits and captions; they differ only in where the U-Net inputs come from:

  pre-encoded  the latents z = scale_factor * E(x) (posterior sample) and the caption hidden states were
               computed once beforehand and sit in memory as tensors (what `pipelines/encode_latents.py`
               writes to Parquet);
  on the fly   every step decodes the batch's PNGs, runs the autoencoder encoder and the text encoder
               (both frozen, no grad), then the same U-Net step.

Both read from memory (PNG bytes vs tensors), so the ratio isolates compute: it leaves out storage I/O
and Parquet/WebDataset parsing, which is similar in both modes and hidden by Ray Data's prefetching.
The two modes alternate step by step, each with its own identically initialised U-Net, so other load on
the machine hits both alike. Also reported: FLOPs per sample of each component (torch.utils.flop_counter),
and the per-step time of each on-the-fly component.

Setups (both with the config's Stage A autoencoder, text encoder and diffusion settings):
`small-unet` is the config's own U-Net (`stage_b.unet`) on the config's resolution (the quickstart: 1.2M
parameters, 32 px -> 8x8x4 latents), where the encoders cost more than the U-Net; `unet-heavy` is a 23M-parameter U-Net on 64 px images
(16x16x4 latents) whose training step dominates, as at SD2 scale where MosaicML measured ~1.4x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm_core.diffusion import NoiseSchedule, training_loss  # noqa: E402
from ldm_core.unet import UNet, UNetConfig  # noqa: E402
from pipelines.config import PipelineConfig  # noqa: E402
from pipelines.platform.cli import config_from_args  # noqa: E402
from pipelines.platform.cli import add_config_args
from pipelines.models.judge import DIGIT_WORDS, load_mnist  # noqa: E402
from pipelines.data.text_encoders import load_text_encoder  # noqa: E402


@dataclass
class Setup:
    name: str
    resolution: int
    autoencoder: AutoencoderConfig
    unet: UNetConfig


def setups(cfg: PipelineConfig, context_dim: int) -> dict[str, Setup]:
    """The autoencoder is the config's Stage A model in both; only the U-Net and the image size change."""
    small = cfg.stage_b.unet.model_copy(update={"context_dim": context_dim})
    heavy = UNetConfig(model_channels=96, channel_mult=[1, 2, 2], num_res_blocks=2, attention_levels=[1, 2], num_heads=4,
                       norm_groups=32, context_dim=context_dim)
    return {
        "small-unet": Setup("small-unet", cfg.data.resolution, cfg.stage_a.model, small),
        "unet-heavy": Setup("unet-heavy", 64, cfg.stage_a.model, heavy),
    }


# ------------------------------------------------------------------------------------------------ data

def make_batches(resolution: int, batch: int, count: int) -> list[tuple[list[bytes], list[str]]]:
    """`count` batches of (PNG bytes of RGB digits at `resolution`, captions), from the real MNIST digits."""
    images, labels = load_mnist()
    out, k = [], 0
    for _ in range(count):
        pngs, captions = [], []
        for _ in range(batch):
            img = Image.fromarray(images[k % len(images)].numpy()).convert("RGB").resize((resolution, resolution), Image.BICUBIC)
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            pngs.append(buf.getvalue())
            captions.append(f"a handwritten digit {DIGIT_WORDS[int(labels[k % len(labels)])]}")
            k += 1
        out.append((pngs, captions))
    return out


def decode_pngs(pngs: list[bytes]) -> torch.Tensor:
    """PNG bytes -> (B, 3, H, W) float32 in [-1, 1]."""
    arr = np.stack([np.asarray(Image.open(io.BytesIO(b)).convert("RGB")) for b in pngs])  # (B, H, W, 3) uint8
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div(127.5).sub(1)


@torch.no_grad()
def encode(autoencoder, text_encoder, pngs: list[bytes], captions: list[str], timings: dict | None = None):
    """What the encode step computes: (scaled latents, caption hidden states, mask)."""
    t0 = time.perf_counter()
    x = decode_pngs(pngs)
    t1 = time.perf_counter()
    z = autoencoder.encode(x).sample() * autoencoder.scale_factor
    t2 = time.perf_counter()
    hidden, mask = text_encoder.encode(captions)
    t3 = time.perf_counter()
    if timings is not None:
        for key, dt in (("decode_png", t1 - t0), ("autoencoder_encode", t2 - t1), ("text_encode", t3 - t2)):
            timings[key] = timings.get(key, 0.0) + dt
    return z, hidden, mask


# ------------------------------------------------------------------------------------------- measuring

def unet_step(unet, opt, schedule, prediction, z, hidden, mask, generator) -> float:
    loss, _ = training_loss(unet, z, hidden, mask, schedule, prediction=prediction, generator=generator)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return float(loss)


def flops_per_sample(fn, batch: int) -> float:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops() / batch


def run_setup(setup: Setup, text_encoder, cfg: PipelineConfig, *, batch: int, steps: int, warmup: int) -> dict:
    torch.manual_seed(0)
    autoencoder = AutoencoderKL(setup.autoencoder).eval().requires_grad_(False)
    unet = UNet(setup.unet).train()
    schedule = NoiseSchedule(cfg.stage_b.diffusion)
    prediction = cfg.stage_b.diffusion.prediction
    batches = make_batches(setup.resolution, batch, warmup + steps)
    pre = [encode(autoencoder, text_encoder, p, c) for p, c in batches]  # the pre-encoded dataset, in memory

    def fresh():
        torch.manual_seed(0)
        model = UNet(setup.unet).train()
        return model, torch.optim.AdamW(model.parameters(), lr=1e-4), torch.Generator().manual_seed(0)

    # The two modes alternate step by step (each with its own identically initialised U-Net and optimiser),
    # so load from other processes on the machine slows both alike instead of skewing the ratio.
    modes = ("pre-encoded", "on-the-fly")
    state = {mode: fresh() for mode in modes}
    step_s = {mode: [] for mode in modes}
    timings = {mode: {} for mode in modes}
    for i in range(warmup + steps):
        for mode in modes:
            model, opt, g = state[mode]
            parts: dict[str, float] = {}
            t_start = time.perf_counter()
            if mode == "pre-encoded":
                z, hidden, mask = pre[i]
            else:
                z, hidden, mask = encode(autoencoder, text_encoder, *batches[i], timings=parts)
            t0 = time.perf_counter()
            unet_step(model, opt, schedule, prediction, z, hidden, mask, g)
            parts["unet_step"] = time.perf_counter() - t0
            if i >= warmup:
                step_s[mode].append(time.perf_counter() - t_start)
                for k, v in parts.items():
                    timings[mode][k] = timings[mode].get(k, 0.0) + v
    results = {
        mode: {
            "steps_per_s": steps / sum(step_s[mode]),
            "samples_per_s": steps * batch / sum(step_s[mode]),
            "median_step_ms": 1000 * float(np.median(step_s[mode])),
            "ms_per_step": {k: 1000 * v / steps for k, v in timings[mode].items()},
        }
        for mode in modes
    }

    z, hidden, mask = pre[0]
    x = decode_pngs(batches[0][0])
    model, opt, g = fresh()
    flops = {
        "autoencoder_encode": flops_per_sample(lambda: autoencoder.encode(x), batch),
        "text_encode": flops_per_sample(lambda: text_encoder.encode(batches[0][1]), batch),
        "unet_train_step": flops_per_sample(lambda: unet_step(model, opt, schedule, prediction, z, hidden, mask, g), batch),
    }
    return {
        "setup": setup.name,
        "image": f"{setup.resolution}x{setup.resolution}x3",
        "latent": "x".join(map(str, z.shape[1:])),
        "text_tokens": text_encoder.max_length,
        "batch": batch,
        "steps": steps,
        "params_M": {
            "unet": sum(p.numel() for p in unet.parameters()) / 1e6,
            "autoencoder_encoder": sum(p.numel() for n, p in autoencoder.named_parameters() if not n.startswith(("decoder", "post_quant"))) / 1e6,
            "text_encoder": sum(p.numel() for p in text_encoder.model.parameters()) / 1e6,
        },
        "gflops_per_sample": {k: v / 1e9 for k, v in flops.items()},
        **results,
        "speedup": results["pre-encoded"]["steps_per_s"] / results["on-the-fly"]["steps_per_s"],
        "speedup_median": results["on-the-fly"]["median_step_ms"] / results["pre-encoded"]["median_step_ms"],
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| setup | image -> latent; caption tokens | U-Net / AE enc / text params (M) | GFLOPs per sample: U-Net step / AE enc / text | "
        "pre-encoded steps/s | on-the-fly steps/s | speedup (mean / median step) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, f = r["params_M"], r["gflops_per_sample"]
        lines.append(
            f"| {r['setup']} (batch {r['batch']}) | {r['image']} -> {r['latent']}; {r['text_tokens']} | "
            f"{p['unet']:.1f} / {p['autoencoder_encoder']:.2f} / {p['text_encoder']:.1f} | "
            f"{f['unet_train_step']:.3f} / {f['autoencoder_encode']:.3f} / {f['text_encode']:.3f} | "
            f"{r['pre-encoded']['steps_per_s']:.2f} | {r['on-the-fly']['steps_per_s']:.2f} | {r['speedup']:.2f}x / {r['speedup_median']:.2f}x |"
        )
    lines.append("")
    lines.append("On-the-fly time per step (ms): " + "; ".join(
        f"{r['setup']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["on-the-fly"]["ms_per_step"].items()) for r in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.set_defaults(config=str(REPO / "configs/quickstart.yaml"))
    parser.add_argument("--setups", default="small-unet,unet-heavy")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = config_from_args(args)
    load_before = os.getloadavg()
    text_encoder = load_text_encoder(cfg.encode.text_encoder)
    known = setups(cfg, text_encoder.hidden_size)
    names = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: --setups: unknown {unknown}; choose from {sorted(known)}")
    rows = []
    for name in names:
        rows.append(run_setup(known[name], text_encoder, cfg, batch=args.batch, steps=args.steps, warmup=args.warmup))
        print(json.dumps(rows[-1], indent=1), flush=True)
    machine = (f"{platform.machine()}, {os.cpu_count()} CPUs, {torch.get_num_threads()} torch threads, "
               f"CUDA: {torch.cuda.is_available()}, 1-min load average {load_before[0]:.1f} before / {os.getloadavg()[0]:.1f} after")
    print(f"\n{date.today()} | torch {torch.__version__} | {machine}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "machine": machine, "results": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

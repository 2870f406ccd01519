"""Stage B training throughput: pre-encoded latents vs encoding images and captions on the fly.

    .venv/bin/python benchmarks/bench_stage_b_latents.py [--setups quickstart,unet-heavy] [--steps 8] [--warmup 2]
                                                         [--batch 32] [--threads 2] [--json results.json]

Both modes run the same U-Net training step (ldm_core.diffusion.training_loss, backward, AdamW step) on
the same batches of real MNIST digits and captions; they differ only in where the U-Net inputs come from:

  pre-encoded  the latents z = scale_factor * E(x) (posterior sample) and the caption hidden states were
               computed once beforehand and sit in memory as tensors (what `pipelines/encode_latents.py`
               writes to Parquet);
  on the fly   every step decodes the batch's PNGs, runs the autoencoder encoder and the text encoder
               (both frozen, no grad), then the same U-Net step.

Both read from memory (PNG bytes vs tensors), so the ratio isolates compute: it leaves out storage I/O
and Parquet/WebDataset parsing, which is similar in both modes and hidden by Ray Data's prefetching.
Also reported: FLOPs per sample of each component (torch.utils.flop_counter), and the per-step time of
each on-the-fly component.

Setups: `quickstart` uses the models of configs/quickstart.yaml as they are; `unet-heavy` keeps the same
autoencoder and text encoder and makes the U-Net dominate the step (as at SD2 scale, where MosaicML
measured ~1.4x from pre-encoding), on 64 px images (16x16x4 latents).
"""

from __future__ import annotations

import argparse
import io
import json
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
from pipelines.config import PipelineConfig, load_config  # noqa: E402
from pipelines.digits import DIGIT_WORDS, load_mnist  # noqa: E402
from pipelines.text_encoders import load_text_encoder  # noqa: E402


@dataclass
class Setup:
    name: str
    resolution: int
    autoencoder: AutoencoderConfig
    unet: UNetConfig


def setups(cfg: PipelineConfig) -> dict[str, Setup]:
    heavy_unet = cfg.stage_b.unet.model_copy(update={
        "model_channels": 96, "channel_mult": [1, 2, 2], "num_res_blocks": 2, "attention_levels": [1, 2],
        "num_heads": 4, "norm_groups": 32,
    })
    return {
        "quickstart": Setup("quickstart", cfg.data.resolution, cfg.stage_a.model, cfg.stage_b.unet),
        "unet-heavy": Setup("unet-heavy", 64, cfg.stage_a.model, heavy_unet),
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

    results = {}
    for mode in ("pre-encoded", "on-the-fly"):
        model, opt, g = fresh()
        timings: dict[str, float] = {}
        for i in range(warmup + steps):
            if i == warmup:
                timings.clear()
                start = time.perf_counter()
            if mode == "pre-encoded":
                z, hidden, mask = pre[i]
            else:
                z, hidden, mask = encode(autoencoder, text_encoder, *batches[i], timings=timings)
            t0 = time.perf_counter()
            unet_step(model, opt, schedule, prediction, z, hidden, mask, g)
            timings["unet_step"] = timings.get("unet_step", 0.0) + time.perf_counter() - t0
        elapsed = time.perf_counter() - start
        results[mode] = {
            "steps_per_s": steps / elapsed,
            "samples_per_s": steps * batch / elapsed,
            "ms_per_step": {k: 1000 * v / steps for k, v in timings.items()},
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
        "batch": batch,
        "steps": steps,
        "params_M": {
            "unet": sum(p.numel() for p in unet.parameters()) / 1e6,
            "autoencoder_encoder": sum(p.numel() for n, p in autoencoder.named_parameters() if not n.startswith(("decoder", "post_quant"))) / 1e6,
            "text_encoder": text_encoder_params(text_encoder) / 1e6,
        },
        "gflops_per_sample": {k: v / 1e9 for k, v in flops.items()},
        **results,
        "speedup": results["pre-encoded"]["steps_per_s"] / results["on-the-fly"]["steps_per_s"],
    }


def text_encoder_params(text_encoder) -> int:
    modules = [m for m in vars(text_encoder).values() if isinstance(m, torch.nn.Module)]
    return sum(p.numel() for m in modules for p in m.parameters())


def table(rows: list[dict]) -> str:
    lines = [
        "| setup | image -> latent | U-Net / AE enc / text params (M) | GFLOPs per sample: U-Net step / AE enc / text | "
        "pre-encoded steps/s | on-the-fly steps/s | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        p, f = r["params_M"], r["gflops_per_sample"]
        lines.append(
            f"| {r['setup']} (batch {r['batch']}) | {r['image']} -> {r['latent']} | "
            f"{p['unet']:.1f} / {p['autoencoder_encoder']:.2f} / {p['text_encoder']:.1f} | "
            f"{f['unet_train_step']:.3f} / {f['autoencoder_encode']:.3f} / {f['text_encode']:.3f} | "
            f"{r['pre-encoded']['steps_per_s']:.2f} | {r['on-the-fly']['steps_per_s']:.2f} | {r['speedup']:.2f}x |"
        )
    lines.append("")
    lines.append("On-the-fly time per step (ms): " + "; ".join(
        f"{r['setup']}: " + ", ".join(f"{k} {v:.0f}" for k, v in r["on-the-fly"]["ms_per_step"].items()) for r in rows))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default=str(REPO / "configs/quickstart.yaml"))
    parser.add_argument("--setups", default="quickstart,unet-heavy")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    known = setups(cfg)
    names = [s.strip() for s in args.setups.split(",") if s.strip()]
    unknown = [n for n in names if n not in known]
    if unknown:
        raise SystemExit(f"error: --setups: unknown {unknown}; choose from {sorted(known)}")
    text_encoder = load_text_encoder(cfg.encode.text_encoder)
    rows = []
    for name in names:
        rows.append(run_setup(known[name], text_encoder, cfg, batch=args.batch, steps=args.steps, warmup=args.warmup))
        print(json.dumps(rows[-1], indent=1), flush=True)
    machine = f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, CUDA: {torch.cuda.is_available()}"
    print(f"\n{date.today()} | torch {torch.__version__} | {machine}\n")
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"date": str(date.today()), "machine": machine, "results": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()

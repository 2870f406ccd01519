"""LoRA vs full fine-tune of an SD-sized U-Net: step time, peak memory (estimate vs measured), checkpoint size.

    .venv/bin/python benchmarks/bench_lora.py [--model-channels 320] [--latent 32] [--batch 1] [--steps 3]
                                              [--rank 8] [--threads 2] [--json results.jsonl]

The U-Net is configs/sd_f8.yaml's (SD 1.x's layout: channels 320 x [1, 2, 4, 4], attention on the first three
levels, 768-wide text states; 861M parameters at --model-channels 320, no gradient checkpointing). Each mode runs
in its own process, on the CPU in fp32 (a GPU keeps the LoRA base in bf16; `pipelines/train/memory.py` counts
that), with the step Stage B runs (`pipelines.train.steps.denoising_loss`, backward, clipping, AdamW over what
trains) and no EMA:

  full   every weight trains (gradients and Adam moments for all of them);
  lora   `pipelines.models.lora.attach` with `stage_b.lora` rank --rank on q, k, v, out: only the adapters train.

Per mode: the median seconds per step after one warm-up step; the peak resident memory of the process above what
it held before the model was built (VmHWM, large allocations mmapped so freed tensors leave at once) against the
memory budget's CPU estimate (`estimate_stage_b(cfg, device="cpu")`, its peak); and the bytes of a training
checkpoint as Stage B writes it (`save_checkpoint`: the U-Net, or only its adapters, plus the optimiser state).
The full-size checkpoint figures (--model-channels 320) are also computed from parameter counts, which needs no
memory, so they are printed whatever width ran.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def overrides(args) -> list[str]:
    return [
        "stage_b.scaling.use_gpu=false", "stage_b.scaling.num_workers=1", "stage_b.train.ema_decay=null",
        "stage_b.optim.fused=false", "stage_b.unet.gradient_checkpointing=false", f"stage_b.batch_size={args.batch}",
        f"stage_b.unet.model_channels={args.model_channels}", f"data.resolution={args.latent * 8}",
    ]


def status(key: str) -> int:
    for line in open("/proc/self/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def run_mode(mode: str, args) -> dict:
    """One mode, in this process (the parent runs each in a fresh one)."""
    import torch

    from ldm_core.diffusion import NoiseSchedule
    from ldm_core.unet import UNet
    from pipelines.config import load_config
    from pipelines.models import lora
    from pipelines.models.checkpoints import save_checkpoint
    from pipelines.train.memory import TEXT_TOKENS
    from pipelines.train.steps import denoising_loss

    torch.set_num_threads(args.threads)
    sets = overrides(args) + ([f"stage_b.init_from={REPO}", f"stage_b.lora.rank={args.rank}"] if mode == "lora" else [])
    cfg = load_config(REPO / "configs/sd_f8.yaml", sets)
    sb = cfg.stage_b
    before = status("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    torch.manual_seed(0)
    model = UNet(sb.unet)
    if mode == "lora":
        model = lora.attach(model, sb.lora)
    params = lora.trainable_parameters(model)
    opt = torch.optim.AdamW(params, lr=1e-4)
    schedule = NoiseSchedule(sb.diffusion)
    b, side = sb.batch_size, args.latent
    batch = {"latent_mean": torch.randn(b, 4, side, side), "latent_std": torch.full((b, 4, side, side), 0.1),
             "text_hidden": torch.randn(b, TEXT_TOKENS, sb.unet.context_dim), "text_mask": torch.ones(b, TEXT_TOKENS, dtype=torch.bool)}
    null_context, null_mask = torch.zeros(TEXT_TOKENS, sb.unet.context_dim), torch.ones(TEXT_TOKENS, dtype=torch.bool)
    generator = torch.Generator().manual_seed(0)
    model.train()
    times = []
    for _ in range(1 + args.steps):
        start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, _ = denoising_loss(model, batch, schedule, null_context=null_context, null_mask=null_mask,
                                 cond_drop_prob=0.1, generator=generator, **sb.diffusion.loss_options())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        times.append(time.perf_counter() - start)
    peak = status("VmHWM") - before
    with tempfile.TemporaryDirectory() as tmp:
        saved = {"unet_lora": lora.AdapterWeights(model)} if mode == "lora" else {"unet": model}
        save_checkpoint(tmp, modules=saved, optimizers={"opt": opt}, meta={"step": 1})
        checkpoint = sum(p.stat().st_size for p in Path(tmp).iterdir())
    return {"mode": mode, "step_s": statistics.median(times[1:]), "steps": args.steps, "peak_measured_bytes": peak,
            "trained_params": sum(p.numel() for p in params), "total_params": sum(p.numel() for p in model.parameters()),
            "checkpoint_bytes": checkpoint}


def estimates(mode: str, args) -> dict:
    """The memory budget's CPU estimate of the same step, and the checkpoint bytes of the full SD size (320)."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ldm_core.unet import UNet
    from pipelines.config import load_config
    from pipelines.models import lora
    from pipelines.stage_b import STAGE
    from pipelines.train.memory import _adapters_made_in_place, estimate

    sets = overrides(args) + ([f"stage_b.init_from={REPO}", f"stage_b.lora.rank={args.rank}"] if mode == "lora" else [])
    cfg = load_config(REPO / "configs/sd_f8.yaml", sets)
    budget = estimate(cfg, STAGE, device="cpu")
    sd = load_config(REPO / "configs/sd_f8.yaml", [*sets, "stage_b.unet.model_channels=320"]).stage_b
    with FakeTensorMode(), torch.device("cpu"), _adapters_made_in_place():
        model = UNet(sd.unet)
        if mode == "lora":
            model = lora.attach(model, sd.lora)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"peak_estimated_bytes": budget.peak_bytes, "sd_trained_params": trained,
            "sd_checkpoint_bytes": 12 * trained}  # fp32 weights (the adapters, or the U-Net) + Adam's two moments


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-channels", type=int, default=320)
    parser.add_argument("--latent", type=int, default=32, help="latent side (32: 256 px images)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="append one JSON line per mode here")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # internal: run one mode in this process
    args = parser.parse_args()
    if args.mode:
        print(json.dumps({**run_mode(args.mode, args), **estimates(args.mode, args)}))
        return
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args.threads)}
    machine = {"machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} CPUs", "date": datetime.now(timezone.utc).isoformat(timespec="minutes"),
               "load_1m": os.getloadavg()[0], "model_channels": args.model_channels, "latent": args.latent, "batch": args.batch,
               "threads": args.threads, "rank": args.rank}
    rows = []
    for mode in ("lora", "full"):
        out = subprocess.run([sys.executable, __file__, "--mode", mode, *sys.argv[1:]], env=env, cwd=REPO,
                             capture_output=True, text=True)
        if out.returncode != 0:
            sys.exit(f"error: {mode}: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
        row = {**machine, **json.loads(out.stdout.strip().splitlines()[-1]), "load_1m_after": os.getloadavg()[0]}
        rows.append(row)
        print(f"{mode:5s} {row['trained_params'] / 1e6:8.2f}M of {row['total_params'] / 1e6:.1f}M trained  "
              f"step {row['step_s']:.2f} s  peak {row['peak_measured_bytes'] / 2**30:.2f} GiB "
              f"(estimate {row['peak_estimated_bytes'] / 2**30:.2f})  checkpoint {row['checkpoint_bytes'] / 2**20:.1f} MiB  "
              f"(SD size: {row['sd_checkpoint_bytes'] / 2**20:.1f} MiB)")
    if args.json:
        with open(args.json, "a") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()

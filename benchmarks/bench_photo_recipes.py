"""Which Stage A recipe makes the photos' f=8 autoencoder beat bicubic soonest: held-out PSNR/SSIM curves per step.

    .venv/bin/python benchmarks/bench_photo_recipes.py --save-photos photos.npz      # once, here (the photos)
    python benchmarks/bench_photo_recipes.py --photos photos.npz --steps 3000 --json curves.jsonl [--device cuda]
    .venv/bin/python benchmarks/bench_photo_recipes.py --photos photos.npz --cpu-seconds --json cpu.jsonl
    .venv/bin/python benchmarks/bench_photo_recipes.py --plot curves.jsonl --cpu cpu.jsonl --out curves.png
    .venv/bin/python benchmarks/bench_photo_recipes.py --run-curve TRACKING_URI RUN_ID LABEL --json runs.jsonl
    .venv/bin/python benchmarks/bench_photo_recipes.py --plot-runs runs.jsonl --out runs.png [--mlflow URI]

The Stage A step of pipelines/stage_a.py, in one process without Ray (ldm_core only, so it runs wherever torch
does): configs/photos.yaml's autoencoder, PatchGAN, LPIPS-squeeze (random backbone unless the torchvision weights
are cached), the generator loss with the adaptive weight, AdamW with warm-up and optional clipping, EMA off.
Training crops come from the 11 scikit-image photographs that configs/photos.yaml trains on; the 4 it holds out
(`HELD_OUT`, the pipeline's `holdout_by: source` split) give the held-out crops, and three photographs the project
never trains on (scikit-learn's china and flower, matplotlib's grace_hopper) give an independent check, cut into
non-overlapping 64 px tiles at their own resolution. Every `--eval-every` steps each recipe's PSNR / SSIM on both
sets is written next to bicubic down/up-sampling at the same factor (ldm_core.metrics.bicubic_baseline).

Steps are what the curves are measured in: the same recipe gives the same curve on any device (up to float
noise). `--cpu-seconds` times a few steps of each recipe on this machine (one process, all cores, the global
batch of the pipeline's 2 workers) to turn steps into CPU-minutes; the pipeline adds Ray and DDP on top, so the
real Stage A runs the chosen recipe to check. Not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm_core.discriminator import DiscriminatorConfig, NLayerDiscriminator  # noqa: E402
from ldm_core.losses import AutoencoderLossConfig  # noqa: E402
from ldm_core.metrics import bicubic_baseline, psnr, ssim  # noqa: E402
from ldm_core.perceptual import LPIPSConfig, build_lpips  # noqa: E402
from pipelines.train.steps import autoencoder_loss, discriminator_update_loss  # noqa: E402

SIZE, FACTOR = 64, 8
HELD_OUT = ("coins", "chelsea", "gravel", "coffee")  # configs/photos.yaml: hash("skimage-<photo>") < 0.2
MODEL = dict(base_channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=1, norm_groups=8, mid_attention=True,
             latent_channels=4, kind="kl")
DISC = dict(base_channels=32, num_layers=3, norm_groups=8)
# The recipe configs/photos.yaml shipped before this benchmark; every other recipe changes a few fields of it.
BASE = dict(batch=16, lr=5e-4, warmup=50, clip=1.0, pixel_loss="l1", perceptual_weight=1.0, kl_weight=1e-6,
            disc_start=600, disc_weight=0.5, width=32, fresh_crops=False, shortcut=False)
RECIPES: dict[str, dict] = {
    "shipped": {},
    "no_lpips": dict(perceptual_weight=0.0),
    "no_lpips_l2": dict(perceptual_weight=0.0, pixel_loss="l2"),
    "no_lpips_lr2e-3": dict(perceptual_weight=0.0, lr=2e-3),
    "no_lpips_noclip": dict(perceptual_weight=0.0, clip=None),
    "no_lpips_noclip_lr1e-3": dict(perceptual_weight=0.0, clip=None, lr=1e-3),
    "no_lpips_fresh": dict(perceptual_weight=0.0, fresh_crops=True),
    "no_lpips_late_gan": dict(perceptual_weight=0.0, disc_start=10**9),
    "lpips0.1": dict(perceptual_weight=0.1),
    "no_lpips_wide64": dict(perceptual_weight=0.0, width=64),
    "no_lpips_batch32": dict(perceptual_weight=0.0, batch=32),
    # Second round: the first round's better directions combined.
    "l2_fresh": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True),
    "l2_fresh_nogan": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True, disc_start=10**9),
    "l2_lr1e-3": dict(perceptual_weight=0.0, pixel_loss="l2", lr=1e-3),
    "l2_fresh_batch32": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True, batch=32),
    "l2_fresh_wide48": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True, width=48),
    "l2_fresh_lr1e-3_nogan": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True, lr=1e-3, disc_start=10**9),
    "l2_fresh_noclip_lr2e-4": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True, clip=None, lr=2e-4),
    # Third round (CPU): the chosen recipe learning the residual over bicubic (AutoencoderConfig.bicubic_shortcut).
    "l2_fresh_nogan_shortcut": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True, disc_start=10**9,
                                    shortcut=True),
    "l2_fresh_nogan_shortcut_lr2e-4": dict(perceptual_weight=0.0, pixel_loss="l2", fresh_crops=True, disc_start=10**9,
                                           shortcut=True, lr=2e-4),
}


# --- photographs -------------------------------------------------------------------------------------------------


def save_photos(path: Path) -> None:
    """The photographs as uint8 arrays in one .npz, for machines without scikit-image / scikit-learn / matplotlib."""
    import matplotlib
    import skimage.data
    from PIL import Image
    from sklearn.datasets import load_sample_images

    from pipelines.data.sources import SKIMAGE_PHOTOS

    arrays = {f"skimage_{n}": np.asarray(Image.fromarray(getattr(skimage.data, n)()).convert("RGB")) for n in SKIMAGE_PHOTOS}
    for name, image in zip(("china", "flower"), load_sample_images().images):
        arrays[f"check_{name}"] = image
    hopper = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    arrays["check_grace_hopper"] = np.asarray(Image.open(hopper).convert("RGB"))
    np.savez_compressed(path, **arrays)
    print(f"{len(arrays)} photographs -> {path} ({path.stat().st_size / 2**20:.1f} MiB)")


def to_tensor(image: np.ndarray, device) -> torch.Tensor:
    return torch.from_numpy(image).permute(2, 0, 1).float().div(127.5).sub(1).to(device)  # (3, H, W) in [-1, 1]


def random_crops(photos: list[torch.Tensor], n: int, generator: torch.Generator) -> torch.Tensor:
    """The photos source's crops: a random square of side in [short/4, short] of a random photograph, resized to
    128 (what prepare stores), then a random 64 px crop of its 64 px resize with a random flip (what the reader does)."""
    out = []
    for _ in range(n):
        photo = photos[int(torch.randint(len(photos), (1,), generator=generator))]
        _, h, w = photo.shape
        short = min(h, w)
        side = int(torch.randint(max(short // 4, 16), short + 1, (1,), generator=generator))
        y0 = int(torch.randint(0, h - side + 1, (1,), generator=generator))
        x0 = int(torch.randint(0, w - side + 1, (1,), generator=generator))
        crop = photo[:, y0:y0 + side, x0:x0 + side][None]
        crop = F.interpolate(crop, size=(SIZE, SIZE), mode="bicubic", antialias=True, align_corners=False)
        if torch.rand((), generator=generator) < 0.5:
            crop = crop.flip(-1)
        out.append(crop.clamp(-1, 1))
    return torch.cat(out)


def tiles(photo: torch.Tensor) -> torch.Tensor:
    """Non-overlapping SIZE x SIZE tiles of a photograph at its own resolution."""
    _, h, w = photo.shape
    return torch.stack([photo[:, y:y + SIZE, x:x + SIZE] for y in range(0, h - SIZE + 1, SIZE)
                        for x in range(0, w - SIZE + 1, SIZE)])


def load_sets(path: Path, device) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    """(training photographs, held-out crops, independent tiles)."""
    data = np.load(path)
    train = [to_tensor(data[k], device) for k in data.files if k.startswith("skimage_") and k[8:] not in HELD_OUT]
    held = [to_tensor(data[f"skimage_{n}"], device) for n in HELD_OUT]
    held_crops = random_crops(held, 256, torch.Generator().manual_seed(1234))
    check = torch.cat([tiles(to_tensor(data[k], device)) for k in data.files if k.startswith("check_")])
    return train, held_crops, check


# --- one recipe --------------------------------------------------------------------------------------------------


def build(recipe: dict, device):
    torch.manual_seed(0)
    model = AutoencoderKL(AutoencoderConfig(**{**MODEL, "base_channels": recipe["width"],
                                                        "bicubic_shortcut": recipe["shortcut"]})).to(device)
    disc = NLayerDiscriminator(DiscriminatorConfig(**DISC)).to(device)
    loss_cfg = AutoencoderLossConfig(pixel_loss=recipe["pixel_loss"], perceptual_weight=recipe["perceptual_weight"],
                                     kl_weight=recipe["kl_weight"], disc_start=recipe["disc_start"],
                                     disc_weight=recipe["disc_weight"])
    lpips, backbone = (None, "none")
    if recipe["perceptual_weight"] > 0:
        lpips, backbone = build_lpips(LPIPSConfig(net="squeeze", backbone="auto"))
        lpips = lpips.to(device)
    opt_g = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=(0.5, 0.9), weight_decay=0.0)
    opt_d = torch.optim.AdamW(disc.parameters(), lr=recipe["lr"], betas=(0.5, 0.9), weight_decay=0.0)
    return model, disc, loss_cfg, lpips, backbone, opt_g, opt_d


def train_step(step: int, x: torch.Tensor, recipe: dict, model, disc, loss_cfg, lpips, opt_g, opt_d) -> None:
    factor = min(1.0, (step + 1) / recipe["warmup"]) if recipe["warmup"] else 1.0
    for opt in (opt_g, opt_d):
        for group in opt.param_groups:
            group["lr"] = recipe["lr"] * factor
    batch = {"image": x}
    loss, _ = autoencoder_loss(model, disc, batch, step, cfg=loss_cfg, lpips=lpips, last_layer=model.last_layer)
    opt_g.zero_grad(set_to_none=True)
    loss.backward()
    if recipe["clip"]:
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe["clip"])
    opt_g.step()
    if step >= loss_cfg.disc_start:
        d_loss, _ = discriminator_update_loss(disc, batch, step, cfg=loss_cfg)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        if recipe["clip"]:
            torch.nn.utils.clip_grad_norm_(disc.parameters(), recipe["clip"])
        opt_d.step()


@torch.no_grad()
def evaluate(model, images: torch.Tensor) -> dict[str, float]:
    model.eval()
    out = {"psnr": 0.0, "ssim": 0.0, "bicubic_psnr": 0.0, "bicubic_ssim": 0.0}
    for x in images.split(64):
        recon = model.decode(model.encode(x).mode()).clamp(-1, 1)
        bic = bicubic_baseline(x, FACTOR)
        out["psnr"] += psnr(recon, x).sum().item()
        out["ssim"] += ssim(recon, x).sum().item()
        out["bicubic_psnr"] += psnr(bic, x).sum().item()
        out["bicubic_ssim"] += ssim(bic, x).sum().item()
    model.train()
    return {k: v / images.shape[0] for k, v in out.items()}


def run_recipe(name: str, recipe: dict, sets, args, device) -> None:
    train, held, check = sets
    model, disc, loss_cfg, lpips, backbone, opt_g, opt_d = build(recipe, device)
    generator = torch.Generator().manual_seed(0)
    fixed = None if recipe["fresh_crops"] else random_crops(train, 11 * 64, generator)  # the dataset's 704 crops
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.eval_every == 0:
            if device.type == "cuda":
                torch.cuda.synchronize()
            row = {"recipe": name, "step": step, "images": step * recipe["batch"], "seconds": time.perf_counter() - start,
                   "lpips_backbone": backbone, "device": str(device), **{f"holdout_{k}": v for k, v in evaluate(model, held).items()},
                   **{f"check_{k}": v for k, v in evaluate(model, check).items()}}
            print(f"{name:24s} step {step:6d}  held-out {row['holdout_psnr']:6.2f} dB (bicubic {row['holdout_bicubic_psnr']:.2f})"
                  f"  check {row['check_psnr']:6.2f} dB (bicubic {row['check_bicubic_psnr']:.2f})", flush=True)
            if args.json:
                with args.json.open("a") as f:
                    f.write(json.dumps({**row, "recipe_fields": recipe}) + "\n")
            if time.perf_counter() - start > args.max_seconds_per_recipe:
                break
        if step == args.steps:
            break
        if fixed is not None:
            idx = torch.randint(fixed.shape[0], (recipe["batch"],), generator=generator)
            x = fixed[idx]
            flip = torch.rand(recipe["batch"], generator=generator) < 0.5
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
        else:
            x = random_crops(train, recipe["batch"], generator)
        train_step(step, x, recipe, model, disc, loss_cfg, lpips, opt_g, opt_d)


def cpu_seconds(sets, args) -> None:
    """Seconds per training step of each recipe on this machine's CPUs (after 2 untimed steps)."""
    torch.set_num_threads(os.cpu_count())
    train = sets[0]
    for name in args.recipes:
        recipe = {**BASE, **RECIPES[name]}
        model, disc, loss_cfg, lpips, _, opt_g, opt_d = build(recipe, torch.device("cpu"))
        generator = torch.Generator().manual_seed(0)
        times = {}
        for phase, first in (("ae", 0), ("gan", max(recipe["disc_start"], 0))):
            if phase == "gan" and recipe["disc_start"] >= 10**8:
                times[phase] = times["ae"]
                continue
            elapsed = []
            for i in range(2 + args.cpu_steps):
                x = random_crops(train, recipe["batch"], generator)
                t = time.perf_counter()
                train_step(first + i, x, recipe, model, disc, loss_cfg, lpips, opt_g, opt_d)
                elapsed.append(time.perf_counter() - t)
            times[phase] = float(np.median(elapsed[2:]))
        row = {"recipe": name, "cpu_s_per_step_ae": times["ae"], "cpu_s_per_step_gan": times["gan"],
               "threads": os.cpu_count(), "load": os.getloadavg()[0], "date": time.strftime("%Y-%m-%d"),
               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"}
        print(f"{name:24s} {times['ae']:.3f} s/step before the GAN, {times['gan']:.3f} s/step with it", flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps(row) + "\n")


def cpu_minutes(step: int, recipe: dict, cpu: dict, factor: float) -> float:
    """Minutes of Stage A for `step` steps: the measured one-process seconds per step (with and without the GAN)
    times `factor`, the pipeline's measured step time over the one-process one (Ray Train, 2 DDP workers)."""
    ae, gan = cpu["cpu_s_per_step_ae"], cpu["cpu_s_per_step_gan"]
    before = min(step, recipe["disc_start"])
    return (before * ae + (step - before) * gan) * factor / 60


CHOSEN = "l2_fresh_nogan"  # what configs/photos.yaml ships (with 256 crops per photograph for "fresh")
LABELS = {"shipped": "previous photos.yaml (L1 + random LPIPS + GAN from 600)", CHOSEN: "chosen: L2, no LPIPS, no GAN, fresh crops"}


def plot(curves: Path, cpu_file: Path | None, out: Path, factor: float) -> None:
    """PSNR and SSIM against steps (or, with `cpu_file` and the pipeline `factor`, minutes of Stage A) for every
    recipe, on the held-out photographs and on the independent ones, with bicubic as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in curves.read_text().splitlines() if line.strip()]
    cpu = {r["recipe"]: r for r in (json.loads(line) for line in cpu_file.read_text().splitlines() if line.strip())} \
        if cpu_file else {}
    fig, axes = plt.subplots(2, 2, figsize=(17, 9), sharex=True)
    for col, (which, title) in enumerate((("holdout", "4 held-out skimage photographs (random crops)"),
                                          ("check", "independent photographs (china, flower, grace_hopper; 64 px tiles)"))):
        for row, metric in enumerate(("psnr", "ssim")):
            ax = axes[row, col]
            for name in dict.fromkeys(r["recipe"] for r in rows):
                pts = sorted((r for r in rows if r["recipe"] == name and r["step"] > 0), key=lambda r: r["step"])
                if not pts or (cpu and name not in cpu):
                    continue
                x = [cpu_minutes(r["step"], r["recipe_fields"], cpu[name], factor) if cpu else r["step"] for r in pts]
                ax.plot(x, [r[f"{which}_{metric}"] for r in pts], label=LABELS.get(name, name),
                        lw=3 if name == CHOSEN else (2 if name == "shipped" else 0.8),
                        color="C3" if name == CHOSEN else ("k" if name == "shipped" else None))
            bic = rows[0][f"{which}_bicubic_{metric}"]
            ax.axhline(bic, color="k", ls="--", lw=1.5, label=f"bicubic x{FACTOR} ({bic:.2f})")
            if cpu:
                for minutes in (5, 10, 20, 40, 60):
                    ax.axvline(minutes, color="0.85", lw=0.8)
            ax.set_ylabel(f"{metric.upper()}" + (" (dB)" if metric == "psnr" else ""))
            if row == 0:
                ax.set_title(title, fontsize=10)
            if row == 1:
                ax.set_xlabel(f"minutes of Stage A (steps x one-process s/step x {factor:.2f})" if cpu
                              else "steps (global batch 16)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("f=8 photo autoencoder (configs/photos.yaml's network) vs bicubic: recipes, float32 on one H200 "
                 "(curves per step carry over to CPUs)", fontsize=11)
    fig.tight_layout(rect=(0, 0, 0.78, 0.96))
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def evaluate_model(uri: str, tracking_uri: str | None, sets) -> None:
    """A trained autoencoder (any source pipelines.models.interop reads: models:/, runs:/, a folder) on this script's
    held-out crops and on the independent photographs, next to bicubic."""
    if tracking_uri:
        import mlflow

        mlflow.set_tracking_uri(tracking_uri)
    from pipelines.models.interop import import_autoencoder

    model = import_autoencoder(uri)
    _, held, check = sets
    for name, images in (("held-out crops (4 skimage photographs)", held), ("independent tiles (china, flower, grace_hopper)", check)):
        r = evaluate(model, images)
        print(f"{uri}: {name}: PSNR {r['psnr']:.2f} dB / SSIM {r['ssim']:.3f}; "
              f"bicubic {r['bicubic_psnr']:.2f} dB / {r['bicubic_ssim']:.3f}")


RUN_METRICS = ("eval/psnr", "eval/ssim", "eval/lpips", "eval/bicubic_psnr", "eval/bicubic_ssim")


def run_curve(tracking_uri: str, run_id: str, label: str, out: Path) -> None:
    """A Stage A run's held-out curve from its MLflow metrics, one row per evaluation, with the minutes since the
    run started (MLflow's own timestamps: start-up, evaluations and checkpoints included)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri)
    run = client.get_run(run_id)
    start_ms = run.info.start_time
    rows: dict[int, dict] = {}
    for key in RUN_METRICS:
        for m in client.get_metric_history(run_id, key):
            row = rows.setdefault(m.step, {"step": m.step})
            row[key] = m.value
            row["minutes"] = max(row.get("minutes", 0.0), (m.timestamp - start_ms) / 60000)
    with out.open("a") as f:
        for step in sorted(rows):
            f.write(json.dumps({**rows[step], "run": label, "mlflow_run_id": run_id}) + "\n")
    print(f"{len(rows)} evaluations of run {run_id} -> {out}")


def plot_runs(files: list[Path], out: Path) -> None:
    """Held-out PSNR and SSIM of whole Stage A runs (rows from `run_curve`) against steps and, where the rows
    carry them, minutes; bicubic on the same crops as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    for ax, metric in zip(axes, ("psnr", "ssim")):
        for i, label in enumerate(dict.fromkeys(r["run"] for r in rows)):
            pts = sorted((r for r in rows if r["run"] == label), key=lambda r: r["step"])
            ax.plot([r["step"] for r in pts], [r[f"eval/{metric}"] for r in pts], color=f"C{i}", lw=2, label=label)
            ax.axhline(pts[0][f"eval/bicubic_{metric}"], color=f"C{i}", ls="--", lw=1,
                       label=f"bicubic x{FACTOR} on the same crops ({pts[0][f'eval/bicubic_{metric}']:.2f})")
            for r in pts:
                if "minutes" in r and r["step"] % 500 == 0:
                    ax.annotate(f"{r['minutes']:.0f} min", (r["step"], r[f"eval/{metric}"]), fontsize=7,
                                textcoords="offset points", xytext=(0, 6), ha="center", color=f"C{i}")
        ax.set_xlabel("Stage A step (2 DDP workers x batch 8)")
        ax.set_ylabel(f"held-out {metric.upper()}" + (" (dB)" if metric == "psnr" else ""))
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    fig.suptitle("configs/photos.yaml's Stage A as run by the pipeline (2-core box): held-out photographs vs bicubic",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


def log_to_mlflow(tracking_uri: str, files: list[Path]) -> None:
    import mlflow

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment("ldm-benchmarks")
    with mlflow.start_run(run_name="photo-recipes", tags={"stage": "benchmark", "benchmark": "bench_photo_recipes.py"}) as run:
        for f in files:
            mlflow.log_artifact(str(f))
    print(f"logged {', '.join(f.name for f in files)} to MLflow run {run.info.run_id} ({tracking_uri})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--save-photos", type=Path, help="write the photographs to this .npz and stop")
    parser.add_argument("--photos", type=Path, help="the .npz written by --save-photos")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--recipes", nargs="*", default=list(RECIPES), help="which (default: all)")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--eval-every", type=int, default=250)
    parser.add_argument("--max-seconds-per-recipe", type=float, default=float("inf"))
    parser.add_argument("--cpu-seconds", action="store_true", help="time each recipe's step on this machine's CPUs")
    parser.add_argument("--cpu-steps", type=int, default=5)
    parser.add_argument("--plot", type=Path, help="curves .jsonl to plot (with --cpu and --out)")
    parser.add_argument("--cpu", type=Path)
    parser.add_argument("--out", type=Path)
    parser.add_argument("--mlflow", metavar="TRACKING_URI",
                        help="with --plot: also log the plot and the curves as artifacts of an MLflow run (experiment ldm-benchmarks)")
    parser.add_argument("--pipeline-factor", type=float, default=1.0,
                        help="the pipeline's seconds per step over this script's one-process seconds per step")
    parser.add_argument("--json", type=Path, help="append rows to this .jsonl")
    parser.add_argument("--run-curve", nargs=3, metavar=("TRACKING_URI", "RUN_ID", "LABEL"),
                        help="append a pipeline Stage A run's held-out curve (MLflow metrics) to --json, and stop")
    parser.add_argument("--evaluate", metavar="MODEL_URI",
                        help="a trained autoencoder (models:/NAME/VERSION with --mlflow URI, or a folder) on the held-out "
                             "crops and the independent photographs (with --photos)")
    parser.add_argument("--plot-runs", type=Path, nargs="+", help="plot pipeline run curves (from --run-curve) to --out")
    args = parser.parse_args(argv)
    if args.evaluate:
        evaluate_model(args.evaluate, args.mlflow, load_sets(args.photos, torch.device("cpu")))
        return 0
    if args.run_curve:
        run_curve(*args.run_curve, args.json)
        return 0
    if args.plot_runs:
        plot_runs(args.plot_runs, args.out)
        if args.mlflow:
            log_to_mlflow(args.mlflow, [args.out, *args.plot_runs])
        return 0
    if args.save_photos:
        save_photos(args.save_photos)
        return 0
    if args.plot:
        plot(args.plot, args.cpu, args.out, args.pipeline_factor)  # without --cpu: against steps
        if args.mlflow:
            log_to_mlflow(args.mlflow, [args.out, args.plot] + ([args.cpu] if args.cpu else []))
        return 0
    device = torch.device(args.device)
    sets = load_sets(args.photos, device)
    print(f"{len(sets[0])} training photographs, {sets[1].shape[0]} held-out crops, {sets[2].shape[0]} independent tiles; "
          f"{device}; torch {torch.__version__}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    if args.cpu_seconds:
        cpu_seconds(sets, args)
        return 0
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # float32 as on the CPU: the curves must carry over
        torch.backends.cudnn.allow_tf32 = False
    for name in args.recipes:
        run_recipe(name, {**BASE, **RECIPES[name]}, sets, args, device)
    return 0


if __name__ == "__main__":
    sys.exit(main())

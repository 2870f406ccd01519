"""Stage A: train the autoencoder (perceptual compression) with Ray Train, tracked in MLflow.

    python pipelines/stage_a.py --config configs/quickstart.yaml [--set stage_a.train.max_steps=50]
    ray job submit --working-dir . -- python pipelines/stage_a.py --config configs/photos.yaml

Reads top to bottom: the worker loop (models, optimisers, resume, the alternating autoencoder /
discriminator updates, logging, checkpoints, and after the last step the latent-scale measurement and
held-out evaluation), then the driver (dataset, MLflow run, TorchTrainer, model publication).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import logging
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient
from torchvision.utils import make_grid

from ldm_core.autoencoder import AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.discriminator import NLayerDiscriminator
from ldm_core.ema import EMA
from ldm_core.losses import discriminator_loss, generator_loss
from ldm_core.metrics import bicubic_baseline, psnr, ssim
from ldm_core.perceptual import build_lpips
from pipelines import storage, tracking
from pipelines.checkpoints import load_meta, load_module, load_optimizer, load_tensors, save_checkpoint, unwrap
from pipelines.config import PipelineConfig, parse_cli
from pipelines.data import DatasetError, build_dataset, check_cpu_budget, open_skip_counter, read_manifest
from pipelines.models import publish_autoencoder
from pipelines.runtime import exit_on, init_ray, setup_logging
from pipelines.training import (
    NonFiniteGuard,
    StepTimer,
    all_reduce_sum,
    autocast,
    batches_forever,
    fault_marker,
    maybe_inject_fault,
    node_ids,
    report,
    seed_everything,
    warmup_schedule,
    world,
)

log = logging.getLogger("stage_a")
STAGE = "stage_a"


# ----------------------------------------------------------------------------------------------------
# Worker side: one copy of this runs per Ray Train worker (DDP rank).
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = PipelineConfig.model_validate(loop_config["config"])
    sa = cfg.stage_a
    rank, world_size = world()
    device = ray.train.torch.get_device()
    seed_everything(cfg.run.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    client = MlflowClient(loop_config["tracking_uri"]) if rank == 0 else None
    run_id = loop_config["mlflow_run_id"]
    skips = open_skip_counter(loop_config["skip_counter"])

    # --- models, losses, optimisers
    model = AutoencoderKL(sa.model).to(device)
    disc = NLayerDiscriminator(sa.discriminator).to(device)
    lpips_module, lpips_backbone = (None, "none")
    if sa.loss.perceptual_weight > 0:
        lpips_module, lpips_backbone = build_lpips(sa.lpips)
        lpips_module = lpips_module.to(device)
    opt_g = torch.optim.AdamW(model.parameters(), lr=sa.optim.lr, betas=sa.optim.betas, weight_decay=sa.optim.weight_decay)
    opt_d = torch.optim.AdamW(
        disc.parameters(), lr=sa.optim.disc_lr or sa.optim.lr, betas=sa.optim.betas, weight_decay=sa.optim.weight_decay
    )
    ema = EMA(model, decay=sa.train.ema_decay) if sa.train.ema_decay else None
    lr_factor = warmup_schedule(sa.optim)

    # --- resume from the latest checkpoint of this run name, if any
    step, nonfinite_total = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = load_meta(d)
            load_module(d, "autoencoder_state", model)
            load_module(d, "discriminator", disc)
            load_optimizer(d, "opt_g", opt_g)
            load_optimizer(d, "opt_d", opt_d)
            if ema is not None:
                ema.load_state_dict(load_tensors(d, "ema"))
        step, nonfinite_total = meta["step"], meta.get("nonfinite_total", 0)
        if meta.get("final"):
            # Finished already (a re-run of a completed run): report the same result again, train nothing.
            ray.train.report({"step": step, "resumed_finished": 1, **meta["final"]}, checkpoint=None)
            return
        log.info("rank %d resumed from step %d", rank, step)
        if client:
            tracking.log_metrics(client, run_id, {"train/resumed_from_step": step}, step)

    model = ray.train.torch.prepare_model(model)
    # The discriminator runs twice per step (inside the generator loss, then on its own update): keep its
    # buffers out of DDP's per-forward broadcast, which would modify them in place between the two passes.
    disc = ray.train.torch.prepare_model(disc, parallel_strategy_kwargs={"forward_sync_buffers": False})
    last_layer = unwrap(model).last_layer
    nodes = node_ids()
    if client:
        client.set_tag(run_id, "train_nodes", ",".join(sorted(set(nodes))))

    guard = NonFiniteGuard(sa.train.max_consecutive_nonfinite, device)
    guard.total = nonfinite_total
    timer = StepTimer()
    batches = batches_forever(
        ray.train.get_dataset_shard("train"),
        batch_size=cfg.data.batch_size,
        shuffle_buffer=cfg.data.shuffle_buffer,
        seed=cfg.run.seed + 1000 * rank + step,
        device=device,
    )
    accum = sa.optim.grad_accum_steps
    marker = fault_marker(cfg.run.checkpoint_root, loop_config["trainer_name"])

    def write_checkpoint(directory: Path, final: dict | None = None) -> None:
        modules = {"autoencoder_state": model, "discriminator": disc}
        if ema is not None:
            modules["ema"] = ema.state_dict()
        meta = {"step": step, "nonfinite_total": guard.total, "config": cfg.model_dump(mode="json")}
        if final is not None:
            meta["final"] = final
            export = AutoencoderKL(sa.model)
            export.load_state_dict(unwrap(model).state_dict())
            if ema is not None:
                ema.copy_to(export)  # publish the EMA weights when they exist
            export.scale_factor.fill_(final["scale_factor"])
            export.save_pretrained(directory / "autoencoder")
        save_checkpoint(directory, modules=modules, optimizers={"opt_g": opt_g, "opt_d": opt_d}, meta=meta)

    # --- the loop: one autoencoder update, then (from disc_start on) one discriminator update
    metrics: dict[str, float] = {}
    while step < sa.train.max_steps:
        maybe_inject_fault(sa.train, step, rank, world_size, marker)
        for opt, base_lr in ((opt_g, sa.optim.lr), (opt_d, sa.optim.disc_lr or sa.optim.lr)):
            for group in opt.param_groups:
                group["lr"] = base_lr * lr_factor(step)

        opt_g.zero_grad(set_to_none=True)
        pairs, sums, skipped = [], {}, False
        for micro in range(accum):
            x = next(batches)["image"]
            timer.data_ready()
            # DDP all-reduces gradients on the last micro-batch only.
            sync = model.no_sync() if (micro < accum - 1 and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with autocast(device, sa.train.mixed_precision):
                    recon, posterior = model(x)
                # Losses in fp32: the KL's exp(logvar) and LPIPS are what overflow in low precision.
                g_loss, g_metrics = generator_loss(
                    x, recon.float(), posterior, step=step, cfg=sa.loss,
                    lpips=lpips_module, discriminator=disc, last_layer=last_layer,
                )
                skipped = guard.should_skip(g_loss)
                # On a skipped step every rank still runs a (zero-weighted) backward so DDP's gradient
                # reduction completes; the gradients are thrown away below.
                (g_loss * (0.0 if skipped else 1.0 / accum)).backward()
                if skipped:
                    break
            pairs.append((x, recon.detach()))
            _accumulate(sums, g_metrics, accum)
        if skipped:
            opt_g.zero_grad(set_to_none=True)
            log.warning("rank %d: non-finite autoencoder loss at step %d, step skipped", rank, step)
            continue
        if sa.optim.grad_clip:
            sums["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), sa.optim.grad_clip))
        opt_g.step()

        if step >= sa.loss.disc_start:
            opt_d.zero_grad(set_to_none=True)  # drop what the generator loss left in the discriminator
            for micro, (x, recon) in enumerate(pairs):
                sync = disc.no_sync() if (micro < len(pairs) - 1 and hasattr(disc, "no_sync")) else contextlib.nullcontext()
                with sync:
                    # Real and fake in one forward: one DDP pass, one set of norm statistics.
                    logits = disc(torch.cat([x, recon]).float())
                    logits_real, logits_fake = logits.chunk(2)
                    d_loss, d_metrics = discriminator_loss(logits_real, logits_fake, step=step, cfg=sa.loss)
                    d_skipped = guard.should_skip(d_loss)
                    (d_loss * (0.0 if d_skipped else 1.0 / len(pairs))).backward()
                    if d_skipped:
                        opt_d.zero_grad(set_to_none=True)
                        break
                # disc_factor is already reported by the generator loss.
                _accumulate(sums, {k: v for k, v in d_metrics.items() if k != "disc_factor"}, len(pairs))
            else:
                if sa.optim.grad_clip:
                    torch.nn.utils.clip_grad_norm_(disc.parameters(), sa.optim.grad_clip)
                opt_d.step()

        step += 1
        timer.step_done(cfg.data.batch_size * accum)
        if ema is not None:
            ema.update(model)
        metrics.update(sums)

        if step % sa.train.log_every == 0 or step == sa.train.max_steps:
            perf = timer.pop()
            metrics.update(perf)
            metrics["perf/images_per_s"] = perf["perf/samples_per_s_per_worker"] * world_size
            metrics["train/lr"] = opt_g.param_groups[0]["lr"]
            metrics["train/nonfinite_skipped"] = guard.total
            if client:
                skipped_counts = {f"data/skipped_{k}": v for k, v in skips.snapshot().items()}
                tracking.log_metrics(client, run_id, {**metrics, **skipped_counts}, step)
        if client and (step % sa.train.image_every == 0):
            x, recon = pairs[-1]
            n = min(sa.eval.grid_images, x.shape[0])
            grid = make_grid(torch.cat([x[:n], recon[:n].clamp(-1, 1)]).float().cpu(), nrow=n, padding=1)
            tracking.log_image(client, run_id, tracking.tensor_grid_to_uint8(grid), f"reconstructions/step_{step:07d}.png")
        if step % sa.train.checkpoint_every == 0 and step < sa.train.max_steps:
            report({"step": step, **metrics}, write_checkpoint, rank)

    # --- after training: measure the latent scale and evaluate on the held-out split
    final = finalize(cfg, model, lpips_module, lpips_backbone, batches, device, rank, client, run_id)
    report({"step": step, **metrics, **final}, lambda d: write_checkpoint(d, final), rank)


def _accumulate(sums: dict, metrics: dict, n: int) -> None:
    for k, v in metrics.items():
        sums[f"train/{k}"] = sums.get(f"train/{k}", 0.0) + float(v) / n


@torch.no_grad()
def finalize(cfg: PipelineConfig, model, lpips_module, lpips_backbone: str, batches, device, rank, client, run_id) -> dict:
    """Latent scale factor (LDM's scale_by_std: 1 / std of sampled latents, over all ranks) and held-out
    PSNR / SSIM / LPIPS of the reconstructions next to the bicubic baseline at the same factor f."""
    sa = cfg.stage_a
    ae = unwrap(model).eval()

    moments = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum, sum of squares
    for _ in range(sa.eval.scale_batches):
        z = ae.encode(next(batches)["image"]).sample().double()
        moments += torch.stack([torch.tensor(z.numel(), dtype=torch.float64, device=device), z.sum(), z.pow(2).sum()])
    n, s, ss = all_reduce_sum(moments).tolist()
    std = max((ss / n - (s / n) ** 2), 1e-12) ** 0.5
    scale_factor = 1.0 / std

    f = sa.model.downsample_factor
    totals = torch.zeros(7, dtype=torch.float64, device=device)  # n, psnr, ssim, lpips, bicubic psnr/ssim/lpips
    grid = None

    def scores(y: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        lp = lpips_module(y, x).sum() if lpips_module is not None else torch.zeros((), device=device)
        return [psnr(y, x).sum(), ssim(y, x).sum(), lp]

    holdout = ray.train.get_dataset_shard("holdout")
    for i, batch in enumerate(holdout.iter_torch_batches(batch_size=cfg.data.batch_size, device=device)):
        if i >= sa.eval.max_batches:
            break
        x = batch["image"]
        recon = ae.decode(ae.encode(x).mode()).clamp(-1, 1).float()
        count = torch.tensor(float(x.shape[0]), device=device)
        totals += torch.stack([count, *scores(recon, x), *scores(bicubic_baseline(x, f), x)]).double()
        if grid is None:
            k = min(sa.eval.grid_images, x.shape[0])
            grid = make_grid(torch.cat([x[:k], recon[:k]]).cpu(), nrow=k, padding=1)
    totals = all_reduce_sum(totals).tolist()
    count = max(totals[0], 1.0)
    final = {
        "scale_factor": scale_factor,
        "latent_std": std,
        "eval/holdout_images": totals[0],
        "eval/psnr": totals[1] / count,
        "eval/ssim": totals[2] / count,
        "eval/lpips": totals[3] / count,
        "eval/bicubic_psnr": totals[4] / count,
        "eval/bicubic_ssim": totals[5] / count,
        "eval/bicubic_lpips": totals[6] / count,
    }
    if totals[0] == 0:
        log.warning("the held-out split is empty: no evaluation metrics (raise data.holdout_fraction)")
    if client:
        tracking.log_metrics(client, run_id, final, sa.train.max_steps)
        client.set_tag(run_id, "lpips_backbone", lpips_backbone)
        if grid is not None:
            tracking.log_image(client, run_id, tracking.tensor_grid_to_uint8(grid), "reconstructions/holdout_final.png")
    return final


# ----------------------------------------------------------------------------------------------------
# Driver side.
# ----------------------------------------------------------------------------------------------------


@dataclass
class StageAResult:
    run_id: str
    model_uri: str
    model_version: int | None
    metrics: dict = field(default_factory=dict)
    resumed: bool = False


def run_stage_a(
    cfg: PipelineConfig, *, parent_run_id: str | None = None, upstream_run_ids: tuple[str, ...] = (), extra_tags: dict | None = None
) -> StageAResult:
    init_ray(cfg.ray)
    sa = cfg.stage_a
    manifest = read_manifest(cfg.data.uri, cfg.storage)  # fails clearly on a missing/empty dataset
    check_cpu_budget(ray.cluster_resources().get("CPU", 0), sa.scaling, cfg.data)

    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    trainer_name = f"{cfg.run.name}-{STAGE}"
    resume_id = tracking.unfinished_training_run(experiment_id, trainer_name)
    tags = {"ray_train_name": trainer_name, "dataset_uri": cfg.data.uri, "dataset_digest": manifest["digest"], **(extra_tags or {})}

    with tracking.stage_run(
        experiment_id=experiment_id, stage=STAGE, run_name=trainer_name, upstream_run_ids=upstream_run_ids,
        parent_run_id=parent_run_id, resume_run_id=resume_id, tags=tags,
    ) as run:
        run_id = run.info.run_id
        if resume_id is None:
            tracking.log_params(MlflowClient(), run_id, tracking.flatten(cfg.model_dump(mode="json")))
            tracking.log_dataset_input(cfg.data.uri, manifest.get("name", "images"), manifest["digest"], "training")
        else:
            log.info("resuming MLflow run %s of %s", run_id, trainer_name)

        train_ds, skip_counter = build_dataset(cfg.data, split="train", storage=cfg.storage, shuffle=True, seed=cfg.run.seed,
                                            columns=["image"])
        holdout_ds, _ = build_dataset(cfg.data, split="holdout", storage=cfg.storage, shuffle=False, seed=cfg.run.seed, skip_counter=skip_counter,
                                   columns=["image"])
        ckpt_loc = storage.resolve(cfg.run.checkpoint_root, cfg.storage)
        trainer = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "tracking_uri": tracking.tracking_uri(cfg.mlflow),
                "mlflow_run_id": run_id,
                "trainer_name": trainer_name,
                "skip_counter": skip_counter.name,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=sa.scaling.num_workers,
                use_gpu=sa.scaling.use_gpu,
                resources_per_worker=sa.scaling.resources_per_worker(),
                placement_strategy=sa.scaling.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=trainer_name,
                storage_path=ckpt_loc.path,
                storage_filesystem=ckpt_loc.filesystem if ckpt_loc.scheme == "s3" else None,
                failure_config=ray.train.FailureConfig(max_failures=sa.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=sa.train.keep_checkpoints),
            ),
            # Stage A needs pixels only; captions and keys are for the encode step.
            datasets={"train": train_ds, "holdout": holdout_ds},
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as d:
            meta = load_meta(d)
            final = meta["final"]
            with tempfile.TemporaryDirectory() as tmp:
                model = AutoencoderKL.from_pretrained(Path(d) / "autoencoder")
                model_uri, version = publish_autoencoder(model, tmp, cfg.mlflow.autoencoder_model_name)
        skipped = skip_counter.snapshot()
        mlflow.log_metrics({f"data/skipped_{k}": v for k, v in skipped.items()} | {"final/scale_factor": final["scale_factor"]})
        mlflow.set_tags({"model_uri": model_uri, "checkpoint": result.checkpoint.path})
        log.info("stage_a done: %s (scale_factor %.4f, PSNR %.2f dB vs bicubic %.2f dB)", model_uri,
                 final["scale_factor"], final["eval/psnr"], final["eval/bicubic_psnr"])
        return StageAResult(run_id=run_id, model_uri=model_uri, model_version=version, metrics=final, resumed=resume_id is not None)


def main(argv: list[str] | None = None) -> StageAResult:
    setup_logging()
    cfg, _ = parse_cli(argv, argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    with exit_on(ConfigError, DatasetError):
        result = run_stage_a(cfg)
    print(f"stage_a finished: run {result.run_id}, model {result.model_uri}")
    for key in ("scale_factor", "eval/psnr", "eval/ssim", "eval/lpips", "eval/bicubic_psnr", "eval/bicubic_ssim"):
        print(f"  {key:20s} {result.metrics[key]:.4f}")
    return result


if __name__ == "__main__":
    main()

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
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient

from ldm_core.autoencoder import AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.discriminator import NLayerDiscriminator
from ldm_core.ema import EMA
from ldm_core.metrics import bicubic_baseline, psnr, ssim
from ldm_core.perceptual import RandomBackboneWarning, build_lpips
from pipelines.dag.stage import Stage
from pipelines.platform import tracking
from pipelines.config import PipelineConfig
from pipelines.platform.cli import parse_cli
from pipelines.platform.cluster import ClusterError, connect, ensure_resources
from pipelines.data import DatasetError, build_dataset, open_skip_counter, read_manifest, to_model_range
from pipelines.data.buckets import check_shapes, iter_shape_batches
from pipelines.platform.lease import LeaseHeld, LeaseLost, stage_lease
from pipelines.train.memory import check_memory_budget, estimate_stage_a
from pipelines.models.interop import (adopt_init_architectures, freeze_encoder, init_from_run_ids, keeps_published_scale,
                               load_init_autoencoder)
from pipelines.models.registry import publish_autoencoder, registered_model_lost
from pipelines.data.prepare import prepare_if_missing
from pipelines.platform.runtime import exit_on, setup_logging
from pipelines.train.run_logger import RunLogger
from pipelines.train.loop import TrainLoop, TrainResult, Update, build_trainer, fingerprint_fields, fit_and_publish, training_run
from pipelines.train.rank import all_reduce_sum
from pipelines.train.steps import autoencoder_loss, discriminator_update_loss

log = logging.getLogger("stage_a")
STAGE_NAME = "stage_a"
TRAINED_DATA_FIELDS = {"resolution", "crop", "random_flip", "batch_size", "holdout_fraction", "holdout_by"}
"""The `data` fields that shape what Stage A trains on (part of its checkpoints' config fingerprint, with the dataset's
content digest: not its path, so a moved project resumes its checkpoints)."""


# ----------------------------------------------------------------------------------------------------
# Worker side: one copy of this runs per Ray Train worker (DDP rank).
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = PipelineConfig.model_validate(loop_config["config"])
    sa = cfg.stage_a
    loop = TrainLoop(loop_config, sa.train, sa.optim, stage=STAGE_NAME, seed=cfg.run.seed, scaling=sa.scaling)
    skips = open_skip_counter(loop_config["skip_counter"])

    # --- models, losses, optimisers
    model = (load_init_autoencoder(sa, cfg.storage) if sa.init_from else AutoencoderKL(sa.model)).to(loop.device)
    if sa.train_decoder_only:
        freeze_encoder(model)  # SD's ft-MSE recipe: existing latents stay valid
    disc = NLayerDiscriminator(sa.discriminator).to(loop.device)
    lpips_module, lpips_backbone = perceptual_network(sa, loop.device, loop.rank)
    loss_cfg = effective_loss(sa, lpips_backbone, loop.logger)
    disc_lr = sa.optim.disc_lr or sa.optim.lr
    opt_g = loop.adamw([p for p in model.parameters() if p.requires_grad], sa.optim.lr)
    opt_d = loop.adamw(disc.parameters(), disc_lr)
    ema = EMA(model, decay=sa.train.ema_decay) if sa.train.ema_decay else None
    if loop.resume(modules={"autoencoder_state": model, "discriminator": disc},
                   optimizers={"opt_g": opt_g, "opt_d": opt_d}, ema=ema):
        return  # this run name had finished: its result was reported again
    # The reader starts now (a background thread), so Ray Data's start-up overlaps DDP's.
    batches = model_range(loop.batches(ray.train.get_dataset_shard("train"), batch_size=cfg.data.batch_size,
                                       shuffle_buffer=cfg.data.shuffle_buffer, seed=cfg.run.seed,
                                       by_shape=cfg.data.buckets is not None))
    ddp_model = loop.prepare(model)
    # The discriminator runs twice per step (inside the generator loss, then on its own update): keep its
    # buffers out of DDP's per-forward broadcast, which would modify them in place between the two passes.
    ddp_disc = loop.prepare(disc, forward_sync_buffers=False)
    loop.record_nodes()

    # --- one step: an autoencoder update, then (from disc_start on) a discriminator update on the same images
    def autoencoder_update(batch: dict, step: int):
        return autoencoder_loss(ddp_model, ddp_disc, batch, step, cfg=loss_cfg, lpips=lpips_module,
                                last_layer=model.last_layer, autocast=loop.autocast)

    def discriminator_update(batch: dict, step: int):
        return discriminator_update_loss(ddp_disc, batch, step, cfg=loss_cfg)

    updates = [
        Update(ddp_model, opt_g, sa.optim.lr, autoencoder_update),
        Update(ddp_disc, opt_d, disc_lr, discriminator_update, starts_at=sa.loss.disc_start, name="disc"),
    ]
    skip_counts = lambda: {f"data/skipped_{k}": v for k, v in skips.snapshot().items()}  # noqa: E731
    for step in loop.run(updates, batches, samples_per_batch=cfg.data.batch_size, ema_model=model,
                         extra_metrics=skip_counts):
        if loop.logger and step % sa.train.image_every == 0:
            log_reconstructions(loop.logger, loop.last_batch, sa.eval.grid_images, f"reconstructions/step_{step:07d}.png")
        if sa.eval.every and step % sa.eval.every == 0 and step < sa.train.max_steps:
            log_holdout_point(cfg, model, ema, lpips_module, loop, step)  # every rank: it all-reduces

    # --- after training: measure the latent scale and evaluate, both on the weights that are published
    with published_weights(model, ema):
        final, channel_stats = finalize(cfg, model, lpips_module, lpips_backbone, batches, loop)
    final["eval/ema_weights"] = float(ema is not None)
    loop.finish({**final, **loop.session_metrics()},
                export=lambda directory: export_autoencoder(directory, sa, model, ema, final["scale_factor"], channel_stats))


def perceptual_network(sa, device: torch.device, rank: int = 0) -> tuple[torch.nn.Module | None, str]:
    """The LPIPS network of the loss and the metrics, and which backbone it has (pretrained, random); (None,
    "none") when the loss has no perceptual term. A random backbone is said once per run: by rank 0, as one log
    line (not a warning with its source line from every worker)."""
    if sa.loss.perceptual_weight <= 0:
        return None, "none"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", RandomBackboneWarning)
        module, backbone = build_lpips(sa.lpips)
    for w in caught:
        if not issubclass(w.category, RandomBackboneWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif rank == 0:
            log.warning("%s", w.message)
    return module.to(device), backbone


def effective_loss(sa, lpips_backbone: str, logger: RunLogger | None):
    """Stage A's loss settings for the LPIPS backbone actually built: `perceptual_weight_if_random` replaces the
    perceptual weight when the backbone is random (no pretrained weights here). Rank 0 tags the weight used."""
    cfg = sa.loss
    if lpips_backbone == "random" and sa.perceptual_weight_if_random is not None:
        cfg = cfg.model_copy(update={"perceptual_weight": sa.perceptual_weight_if_random})
        log.warning("LPIPS backbone is random: perceptual weight %g instead of %g (stage_a.perceptual_weight_if_random)",
                    cfg.perceptual_weight, sa.loss.perceptual_weight)
    if logger:
        logger.set_tag("perceptual_weight_used", f"{cfg.perceptual_weight:g}")
    return cfg


def published_weights(model: AutoencoderKL, ema: EMA | None):
    """Within it, `model` holds the weights that get published: the EMA average when there is one."""
    return ema.average_parameters(model) if ema is not None else contextlib.nullcontext()


def log_holdout_point(cfg: PipelineConfig, model: AutoencoderKL, ema: EMA | None, lpips_module, loop: TrainLoop,
                      step: int) -> None:
    """One point of the held-out curve during training (`stage_a.eval.every`): the published weights' metrics,
    logged at `step` by rank 0; the model goes back to training mode."""
    with published_weights(model, ema):
        scores, _ = evaluate_holdout(cfg, model, lpips_module, loop.device)
    model.train()
    if loop.logger:
        loop.logger.log_metrics(scores, step)


def export_autoencoder(directory: Path, sa, model: AutoencoderKL, ema: EMA | None, scale_factor: float,
                       channel_stats: tuple[list[float], list[float]]) -> None:
    """The publishable autoencoder, written into the final checkpoint: the EMA weights when there are some,
    with the measured latent scale and per-channel (mean, std)."""
    published_model = AutoencoderKL(sa.model)
    published_model.load_state_dict(model.state_dict())
    if ema is not None:
        ema.copy_to(published_model)
    published_model.scale_factor.fill_(scale_factor)
    published_model.latents_mean, published_model.latents_std = channel_stats
    published_model.save_pretrained(directory / "autoencoder")


def model_range(batches: Iterator[dict]) -> Iterator[dict]:
    """The reader's uint8 batches (already on the device) with `image` in the model's float32 [-1, 1]."""
    for batch in batches:
        batch["image"] = to_model_range(batch["image"])
        yield batch


def log_reconstructions(logger: RunLogger, batch: dict, n: int, artifact_file: str) -> None:
    """A grid of `n` images (top row) over their reconstructions (bottom row)."""
    x, recon = batch["image"], batch["recon"]
    n = min(n, x.shape[0])
    grid = tracking.make_grid(torch.cat([x[:n], recon[:n].clamp(-1, 1)]).float().cpu(), nrow=n, padding=1)
    logger.log_image(tracking.tensor_grid_to_uint8(grid), artifact_file)


@torch.no_grad()
def evaluate_holdout(cfg: PipelineConfig, model: AutoencoderKL, lpips_module, device: torch.device) -> tuple[dict, dict | None]:
    """Held-out PSNR / SSIM (/ LPIPS) of the reconstructions (posterior mode) over all ranks, next to the bicubic
    baseline at the same factor f, for the weights `model` holds now (sets it to eval mode). LPIPS is left out
    when there is no LPIPS network (perceptual_weight = 0): absent, not a perfect 0. Returns the metrics and
    this rank's first held-out batch with its reconstruction (for a grid; None when it had none)."""
    sa = cfg.stage_a
    ae = model.eval()
    f = sa.model.downsample_factor
    totals = torch.zeros(7, dtype=torch.float64, device=device)  # n, psnr, ssim, lpips, bicubic psnr/ssim/lpips
    first_batch = None

    def scores(y: torch.Tensor, x: torch.Tensor) -> list[torch.Tensor]:
        lp = lpips_module(y, x).sum() if lpips_module is not None else torch.zeros((), device=device)
        return [psnr(y, x).sum(), ssim(y, x).sum(), lp]

    holdout = ray.train.get_dataset_shard("holdout")
    for i, batch in enumerate(iter_shape_batches(holdout, batch_size=cfg.data.batch_size, device=device)):
        if i >= sa.eval.max_batches:
            break
        x = to_model_range(batch["image"])
        recon = ae.decode(ae.encode(x).mode()).clamp(-1, 1).float()
        count = torch.tensor(float(x.shape[0]), device=device)
        totals += torch.stack([count, *scores(recon, x), *scores(bicubic_baseline(x, f), x)]).double()
        if first_batch is None:
            first_batch = {"image": x, "recon": recon}
    totals = all_reduce_sum(totals).tolist()
    count = max(totals[0], 1.0)
    metrics = {
        "eval/holdout_images": totals[0],
        "eval/psnr": totals[1] / count,
        "eval/ssim": totals[2] / count,
        "eval/bicubic_psnr": totals[4] / count,
        "eval/bicubic_ssim": totals[5] / count,
    }
    if lpips_module is not None:
        metrics["eval/lpips"] = totals[3] / count
        metrics["eval/bicubic_lpips"] = totals[6] / count
    if totals[0] == 0:
        log.warning("the held-out split is empty: no evaluation metrics (raise data.holdout_fraction)")
    return metrics, first_batch


@torch.no_grad()
def finalize(cfg: PipelineConfig, model: AutoencoderKL, lpips_module, lpips_backbone: str, batches,
             loop: TrainLoop) -> dict:
    """Latent scale factor (LDM's scale_by_std: 1 / std of sampled latents, over all ranks), the per-channel mean and
    std of the same latents, and the held-out evaluation (`evaluate_holdout`), for the weights `model` holds now (the
    caller loads the EMA weights first when those are what gets published). Returns (final metrics, (per-channel
    means, per-channel stds)); the metrics include each channel's as `latent_channel_{mean,std}_<c>`."""
    sa = cfg.stage_a
    device = loop.device
    ae = model.eval()

    moments = torch.zeros(3, dtype=torch.float64, device=device)  # count, sum, sum of squares
    channel_moments = torch.zeros(2, sa.model.latent_channels, dtype=torch.float64, device=device)  # per channel: sum, sum sq
    for _ in range(sa.eval.scale_batches):
        z = ae.encode(next(batches)["image"]).sample().double()
        moments += torch.stack([torch.tensor(z.numel(), dtype=torch.float64, device=device), z.sum(), z.pow(2).sum()])
        per_channel = z.transpose(0, 1).flatten(1)  # (C, B * h * w)
        channel_moments += torch.stack([per_channel.sum(1), per_channel.pow(2).sum(1)])
    n, s, ss = all_reduce_sum(moments).tolist()
    std = max((ss / n - (s / n) ** 2), 1e-12) ** 0.5
    n_c = n / sa.model.latent_channels  # every channel has the same number of elements
    sums, squares = (all_reduce_sum(channel_moments) / n_c).tolist()
    latents_mean = sums
    latents_std = [max(sq - m * m, 1e-12) ** 0.5 for m, sq in zip(sums, squares)]
    # An imported SD VAE keeps its published scale (0.18215 for SD 1.x) unless asked to re-measure.
    scale_factor = float(model.scale_factor) if keeps_published_scale(sa) else 1.0 / std

    metrics, first_batch = evaluate_holdout(cfg, model, lpips_module, device)
    final = {"scale_factor": scale_factor, "latent_std": std, **metrics,
             **{f"latent_channel_mean_{c}": m for c, m in enumerate(latents_mean)},
             **{f"latent_channel_std_{c}": v for c, v in enumerate(latents_std)}}
    if loop.logger:
        loop.logger.set_tag("lpips_backbone", lpips_backbone)
        loop.logger.set_tag("eval_weights", "ema" if sa.train.ema_decay else "raw")
        if first_batch is not None:
            log_reconstructions(loop.logger, first_batch, sa.eval.grid_images, "reconstructions/holdout_final.png")
    return final, (latents_mean, latents_std)


# ----------------------------------------------------------------------------------------------------
# Driver side.
# ----------------------------------------------------------------------------------------------------


@dataclass
class StageAResult(TrainResult):
    lpips_backbone: str = "none"
    """Which LPIPS network the LPIPS metrics used: pretrained, random (an untrained backbone) or none."""


def check_stage_a(cfg: PipelineConfig) -> PipelineConfig:
    """Before any cluster work: stage_a.init_from's architecture replaces stage_a.model, data.resolution (and every
    one of data.buckets) must be a multiple of its downsampling factor, and on GPUs the estimated peak per GPU must
    fit scaling.gpu_type."""
    cfg = adopt_init_architectures(cfg, ("stage_a",))
    model = cfg.stage_a.model
    check_shapes(cfg.data, model.latent_channels, model.downsample_factor)
    check_memory_budget(cfg, STAGE)
    return cfg


@stage_lease(STAGE_NAME)  # one live driver per checkpoint folder (pipelines/platform/lease.py)
def run_stage_a(
    cfg: PipelineConfig, *, parent_run_id: str | None = None, upstream_run_ids: tuple[str, ...] = (),
    extra_tags: dict | None = None, checked: bool = False,
) -> StageAResult:
    """Train, evaluate and publish the autoencoder. `checked`: `check_stage_a` and `connect` already ran on `cfg`
    (the DAG runs every stage's checks first)."""
    if not checked:
        cfg = check_stage_a(cfg)
        connect(cfg)
    sa = cfg.stage_a
    manifest = read_manifest(cfg.data.uri, cfg.storage)  # fails clearly on a missing/empty dataset
    # Waits for an autoscaler to add them; unset data.cpus_per_task / reserved_cpus are chosen for the cluster.
    cfg = cfg.model_copy(update={"data": ensure_resources(sa.scaling, cfg.data, cfg.ray, section=STAGE_NAME)})

    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    trainer_name = f"{cfg.run.name}-{STAGE_NAME}"
    trained_data = cfg.data.model_dump(mode="json", include=TRAINED_DATA_FIELDS)
    if cfg.data.buckets is not None:  # (only when set: the fingerprints of checkpoints without buckets stay as they were)
        trained_data["buckets"] = [list(s) for s in cfg.data.shapes]
    fields = fingerprint_fields({STAGE_NAME: sa.model_dump(mode="json"), "data": trained_data,
                                 "dataset": {"digest": manifest["digest"]}, "run": {"seed": cfg.run.seed}}, STAGE_NAME)
    tags = {"dataset_uri": cfg.data.uri, "dataset_digest": manifest["digest"], **(extra_tags or {})}
    with training_run(
        cfg, stage=STAGE_NAME, experiment_id=experiment_id, trainer_name=trainer_name, fields=fields,
        upstream_run_ids=tuple(dict.fromkeys((*upstream_run_ids, *init_from_run_ids(cfg, STAGE_NAME)))),  # + the init_from run
        parent_run_id=parent_run_id, tags=tags, params=tracking.flatten(cfg.model_dump(mode="json")), dataset=(cfg.data.uri, manifest.get("name", "images"), manifest["digest"]),
    ) as (run_id, resumed):
        train_ds, skip_counter = build_dataset(cfg.data, split="train", storage=cfg.storage, shuffle=True, seed=cfg.run.seed,
                                            columns=["image"])
        holdout_ds, _ = build_dataset(cfg.data, split="holdout", storage=cfg.storage, shuffle=False, seed=cfg.run.seed, skip_counter=skip_counter,
                                   columns=["image"])
        trainer = build_trainer(
            train_loop_per_worker, cfg, sa, trainer_name=trainer_name, run_id=run_id, fingerprint=fields,
            # Stage A needs pixels only; captions and keys are for the encode step.
            datasets={"train": train_ds, "holdout": holdout_ds}, skip_counter=skip_counter.name,
        )
        name = cfg.mlflow.autoencoder_model_name

        def publish(checkpoint_dir: Path) -> tuple[str, int | None]:
            with tempfile.TemporaryDirectory() as tmp:
                return publish_autoencoder(AutoencoderKL.from_pretrained(checkpoint_dir / "autoencoder"), tmp, name)

        final, model_uri, version, checkpoint = fit_and_publish(trainer, name, publish)
        skipped = skip_counter.snapshot()
        mlflow.log_metrics({f"data/skipped_{k}": v for k, v in skipped.items()} | {"final/scale_factor": final["scale_factor"]})
        mlflow.set_tags({"model_uri": model_uri, "checkpoint": checkpoint})
        log.info("stage_a done: %s (scale_factor %.4f, PSNR %.2f dB vs bicubic %.2f dB)", model_uri,
                 final["scale_factor"], final["eval/psnr"], final["eval/bicubic_psnr"])
        backbone = MlflowClient().get_run(run_id).data.tags.get("lpips_backbone", "none")
        return StageAResult(run_id=run_id, model_uri=model_uri, model_version=version, metrics=final,
                            resumed=resumed, lpips_backbone=backbone)


STAGE = Stage(
    name=STAGE_NAME,
    run=run_stage_a,
    inputs=("prepare",),
    # The data section matters to Stage A (resolution, crops, batch size); later stages see the data only
    # through what they consume. run.seed matters to every stage that draws random numbers.
    sections=("stage_a", "data", "run.seed"),
    consumes=("dataset_uri",),
    produces=("model_uri",),
    key_metrics=("eval/psnr", "eval/ssim", "eval/lpips", "eval/bicubic_psnr", "eval/bicubic_ssim", "perf/images_per_s"),
    summary_artifact="reconstructions/holdout_final.png",
    check=check_stage_a,
    lost_outputs=registered_model_lost,
    memory=estimate_stage_a,
    trains=True,
    lineage_checked=False,  # its input, the dataset, is in every key as its digest; its prepare run may be recreated
)


def main(argv: list[str] | None = None) -> StageAResult:
    setup_logging()
    cfg, _ = parse_cli(argv, argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    with exit_on(ConfigError, DatasetError, ClusterError, LeaseHeld, LeaseLost):
        # Alone (not in the DAG), Stage A builds a dataset that data.source names and data.uri lacks.
        result = run_stage_a(cfg, upstream_run_ids=prepare_if_missing(cfg))
    print(f"stage_a finished: run {result.run_id}, model {result.model_uri}")
    for key in ("scale_factor", "eval/psnr", "eval/ssim", "eval/lpips", "eval/bicubic_psnr", "eval/bicubic_ssim"):
        if key in result.metrics:  # no LPIPS without an LPIPS network (perceptual_weight = 0)
            label = f"{key} ({result.lpips_backbone} backbone)" if "lpips" in key else key
            print(f"  {label:20s} {result.metrics[key]:.4f}")
    return result


if __name__ == "__main__":
    main()

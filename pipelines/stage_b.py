"""Stage B: train the text-conditioned U-Net on the Parquet latents with Ray Train, tracked in MLflow.

    python pipelines/stage_b.py --config configs/quickstart.yaml [--set stage_b.train.max_steps=50]
    ray job submit --working-dir . -- python pipelines/stage_b.py --config configs/photos.yaml

Latent diffusion (Rombach et al. 2022) on the latents written by `encode_latents.py`: every time a row is seen
a fresh latent is drawn from its posterior (mean, std), t ~ U{0, ..., T-1}, and the U-Net regresses eps (or v)
(Ho et al. 2020, eq. 14). With probability `cond_drop_prob` a caption is replaced by the empty prompt, so one
network learns both the conditional and the unconditional model (classifier-free guidance, Ho & Salimans 2022).

Reads top to bottom: the worker loop (model, optimiser, EMA, resume, the denoising steps, logging, sample grids,
checkpoints, the final held-out loss), then the driver (latents, checks, MLflow run, TorchTrainer, publication).
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient
from torchvision.utils import make_grid

from ldm_core.config import ConfigError
from ldm_core.diffusion import NoiseSchedule, drop_condition, training_loss
from ldm_core.ema import EMA
from ldm_core.unet import UNet
from pipelines import latents, storage, tracking
from pipelines.checkpoints import load_meta, load_module, load_optimizer, load_tensors, save_checkpoint, unwrap
from pipelines.config import PipelineConfig, parse_cli
from pipelines.data import check_cpu_budget
from pipelines.encode_latents import STAGE as ENCODE_STAGE
from pipelines.encode_latents import TAG_LATENTS_URI
from pipelines.models import load_autoencoder, publish_unet, save_unet_bundle
from pipelines.runtime import exit_on, init_ray, setup_logging
from pipelines.sample import generate
from pipelines.text_encoders import TextEncoderConfig, encode_prompts_remote
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

log = logging.getLogger("stage_b")
STAGE = "stage_b"
BUNDLE_DIR = "unet"
GRID_SEED_OFFSET = 7919
"""Added to run.seed for the in-training grids' initial noise (fixed across the run, so grids are comparable)."""
EVAL_SEED_OFFSET = 104729
"""Added to run.seed for the held-out loss's timesteps and noise (the same draws for every evaluation)."""


# ----------------------------------------------------------------------------------------------------
# Worker side: one copy of this runs per Ray Train worker (DDP rank).
# ----------------------------------------------------------------------------------------------------


def train_loop_per_worker(loop_config: dict) -> None:
    cfg = PipelineConfig.model_validate(loop_config["config"])
    sb = cfg.stage_b
    rank, world_size = world()
    device = ray.train.torch.get_device()
    seed_everything(cfg.run.seed)  # same init on every rank (DDP also broadcasts rank 0's weights)
    client = MlflowClient(loop_config["tracking_uri"]) if rank == 0 else None
    run_id = loop_config["mlflow_run_id"]
    cond = loop_config["condition"]
    null_context = torch.tensor(cond["null_context"], device=device)  # (L, D)
    null_mask = torch.tensor(cond["null_mask"], device=device)  # (L,)

    # --- model, optimiser, EMA, schedule
    model = UNet(sb.unet).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=sb.optim.lr, betas=sb.optim.betas, weight_decay=sb.optim.weight_decay)
    ema = EMA(model, decay=sb.train.ema_decay) if sb.train.ema_decay else None
    schedule = NoiseSchedule(sb.diffusion, device)
    lr_factor = warmup_schedule(sb.optim)

    # --- resume from the latest checkpoint of this run name, if any
    step, nonfinite_total = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            meta = load_meta(d)
            load_module(d, "unet", model)
            load_optimizer(d, "opt", opt)
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
    nodes = node_ids()  # a collective: every rank takes part
    if client:
        client.set_tag(run_id, "train_nodes", ",".join(sorted(set(nodes))))
    grids = GridSampler(cfg, loop_config, device) if client and len(cond["prompt_context"]) else None

    guard = NonFiniteGuard(sb.train.max_consecutive_nonfinite, device)
    guard.total = nonfinite_total
    timer = StepTimer()
    batches = batches_forever(
        ray.train.get_dataset_shard("train"),
        batch_size=sb.batch_size,
        shuffle_buffer=sb.shuffle_buffer,
        seed=cfg.run.seed + 1000 * rank + step,
        device=device,
    )
    # Latent samples, timesteps, noise and condition dropout: a different stream per rank and per resume point.
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed + 1000 * rank + step)
    accum = sb.optim.grad_accum_steps
    marker = fault_marker(cfg.run.checkpoint_root, loop_config["trainer_name"])

    def write_checkpoint(directory: Path, final: dict | None = None) -> None:
        modules = {"unet": model}
        if ema is not None:
            modules["ema"] = ema.state_dict()
        meta = {"step": step, "nonfinite_total": guard.total, "config": cfg.model_dump(mode="json")}
        if final is not None:
            meta["final"] = final
            export_bundle(directory / BUNDLE_DIR, cfg, loop_config, unwrap(model), ema, step)
        save_checkpoint(directory, modules=modules, optimizers={"opt": opt}, meta=meta)

    # --- the loop
    metrics: dict[str, float] = {}
    first_step, loop_started = step, time.perf_counter()
    while step < sb.train.max_steps:
        maybe_inject_fault(sb.train, step, rank, world_size, marker)
        for group in opt.param_groups:
            group["lr"] = sb.optim.lr * lr_factor(step)

        opt.zero_grad(set_to_none=True)
        sums, skipped = {}, False
        for micro in range(accum):
            batch = next(batches)
            timer.data_ready()
            x0 = latents.sample_latents(batch["latent_mean"], batch["latent_std"], generator)  # (B, C, h, w)
            context, context_mask = drop_condition(
                batch["text_hidden"], batch["text_mask"], null_context, null_mask, sb.cond_drop_prob, generator
            )
            # DDP all-reduces gradients on the last micro-batch only.
            sync = model.no_sync() if (micro < accum - 1 and hasattr(model, "no_sync")) else contextlib.nullcontext()
            with sync:
                with autocast(device, sb.train.mixed_precision):
                    loss, loss_metrics = training_loss(
                        model, x0, context, context_mask, schedule, prediction=sb.diffusion.prediction, generator=generator
                    )
                skipped = guard.should_skip(loss)
                # A skipped step still runs a zero-weighted backward on every rank so DDP's reduction completes.
                (loss * (0.0 if skipped else 1.0 / accum)).backward()
            if skipped:
                break
            for k, v in loss_metrics.items():
                sums[f"train/{k}"] = sums.get(f"train/{k}", 0.0) + float(v) / accum
        if skipped:
            opt.zero_grad(set_to_none=True)
            log.warning("rank %d: non-finite loss at step %d, step skipped", rank, step)
            continue
        if sb.optim.grad_clip:
            sums["train/grad_norm"] = float(torch.nn.utils.clip_grad_norm_(model.parameters(), sb.optim.grad_clip))
        opt.step()
        step += 1
        timer.step_done(sb.batch_size * accum)
        if ema is not None:
            ema.update(model)
        metrics.update(sums)

        if step % sb.train.log_every == 0 or step == sb.train.max_steps:
            perf = timer.pop()
            metrics.update(perf)
            metrics["perf/images_per_s"] = perf["perf/samples_per_s_per_worker"] * world_size
            metrics["train/lr"] = opt.param_groups[0]["lr"]
            metrics["train/nonfinite_skipped"] = guard.total
            if client:
                tracking.log_metrics(client, run_id, metrics, step)
        if grids is not None and (step % sb.train.image_every == 0 or step == sb.train.max_steps):
            grids.log(client, run_id, unwrap(model), ema, step)
        if step % sb.train.checkpoint_every == 0 and step < sb.train.max_steps:
            report({"step": step, **metrics}, write_checkpoint, rank)

    loop_seconds = time.perf_counter() - loop_started
    final = {**heldout_loss(cfg, unwrap(model), ema, schedule, device, loop_config["has_holdout"]), "steps": step}
    if step > first_step and loop_seconds > 0:  # this session's steps only (a resumed run counts from its resume)
        final["perf/images_per_s"] = (step - first_step) * sb.batch_size * accum * world_size / loop_seconds
    if "train/loss" in metrics:
        final["train/loss"] = metrics["train/loss"]
    if client:
        tracking.log_metrics(client, run_id, final, step)
    report({"step": step, **metrics, **final}, lambda d: write_checkpoint(d, final), rank)


class GridSampler:
    """Rank 0's periodic sample grids: `sample.prompts` x `stage_b.sample_columns`, DDIM with guidance, EMA weights,
    decoded by the Stage A autoencoder (`pipelines.sample.generate`, as `sample.py` renders them). The seed of the
    initial noise is fixed for the whole run, so the grids are comparable."""

    def __init__(self, cfg: PipelineConfig, loop_config: dict, device: torch.device):
        sb = cfg.stage_b
        cond, bundle = loop_config["condition"], loop_config["bundle"]
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        self.autoencoder = load_autoencoder(bundle["autoencoder_uri"]).to(device)
        self.schedule = NoiseSchedule(sb.diffusion, device)
        self.condition = {
            "context": torch.tensor(cond["prompt_context"], device=device),  # (P, L, D)
            "context_mask": torch.tensor(cond["prompt_mask"], device=device),  # (P, L)
            "null_context": torch.tensor(cond["null_context"], device=device),
            "null_mask": torch.tensor(cond["null_mask"], device=device),
        }
        self.settings = {
            "latent_shape": tuple(bundle["latent_shape"]), "scale_factor": bundle["scale_factor"],
            "num_per_prompt": sb.sample_columns, "steps": min(sb.sample_steps, sb.diffusion.num_timesteps),
            "guidance": cfg.sample.guidance, "seed": cfg.run.seed + GRID_SEED_OFFSET,
            "prediction": sb.diffusion.prediction, "mixed_precision": sb.train.mixed_precision,
        }

    @torch.no_grad()
    def log(self, client: MlflowClient, run_id: str, model: torch.nn.Module, ema: EMA | None, step: int) -> None:
        averaged = ema.average_parameters(model) if ema is not None else contextlib.nullcontext()
        with averaged:
            images = generate(model, self.autoencoder, self.schedule, **self.condition, **self.settings)
        grid = make_grid(images, nrow=self.settings["num_per_prompt"], padding=1)
        tracking.log_image(client, run_id, tracking.tensor_grid_to_uint8(grid), f"samples/step_{step:07d}.png")


@torch.no_grad()
def heldout_loss(cfg: PipelineConfig, model: torch.nn.Module, ema: EMA | None, schedule: NoiseSchedule,
                 device: torch.device, has_holdout: bool) -> dict[str, float]:
    """Denoising loss on the held-out rows (captions kept, posterior means, fixed timesteps and noise), with the
    raw and the EMA weights: the same number from run to run, comparable across checkpoints and runs."""
    sb = cfg.stage_b
    if not has_holdout or sb.eval_batches == 0:
        return {}
    shard = ray.train.get_dataset_shard("holdout")
    rank, _ = world()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # rows, raw loss sum, EMA loss sum
    model.eval()
    for i, batch in enumerate(shard.iter_torch_batches(batch_size=sb.batch_size, device=device)):
        if i >= sb.eval_batches:
            break
        g = torch.Generator(device=device).manual_seed(cfg.run.seed + EVAL_SEED_OFFSET + 1000 * rank + i)
        x0, context, mask = batch["latent_mean"], batch["text_hidden"], batch["text_mask"]
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=g, device=device)
        eps = torch.randn(x0.shape, generator=g, device=device)
        raw, _ = training_loss(model, x0, context, mask, schedule, prediction=sb.diffusion.prediction, t=t, eps=eps)
        averaged = ema.average_parameters(model) if ema is not None else contextlib.nullcontext()
        with averaged:
            smooth, _ = training_loss(model, x0, context, mask, schedule, prediction=sb.diffusion.prediction, t=t, eps=eps)
        n = x0.shape[0]
        totals += torch.tensor([n, float(raw) * n, float(smooth) * n], dtype=torch.float64, device=device)
    model.train()
    rows, raw_sum, ema_sum = all_reduce_sum(totals).tolist()
    if rows == 0:
        return {}
    return {"eval/holdout_rows": rows, "eval/holdout_loss": raw_sum / rows, "eval/holdout_loss_ema": ema_sum / rows}


def export_bundle(directory: Path, cfg: PipelineConfig, loop_config: dict, model: torch.nn.Module, ema: EMA | None, step: int) -> None:
    """The publishable U-Net bundle: raw weights, EMA weights (a full state dict), configs and lineage."""
    sb = cfg.stage_b
    info, cond = loop_config["bundle"], loop_config["condition"]
    ema_state = None
    if ema is not None:
        export = UNet(sb.unet)
        export.load_state_dict(model.state_dict())
        ema.copy_to(export)
        ema_state = export.state_dict()
    save_unet_bundle(
        directory, unet_state=model.state_dict(), ema_state=ema_state, unet_config=sb.unet, diffusion=sb.diffusion,
        text_encoder=TextEncoderConfig.model_validate(info["text_encoder"]), hidden_size=info["hidden_size"],
        null_context=torch.tensor(cond["null_context"]), null_mask=torch.tensor(cond["null_mask"]),
        latent_shape=info["latent_shape"], scale_factor=info["scale_factor"], autoencoder_uri=info["autoencoder_uri"],
        encode_run_id=info["encode_run_id"], stage_a_run_id=info["stage_a_run_id"], stage_b_run_id=loop_config["mlflow_run_id"],
        extra={"step": step, "latents_uri": info["latents_uri"], "latents_digest": info["latents_digest"]},
    )


# ----------------------------------------------------------------------------------------------------
# Driver side.
# ----------------------------------------------------------------------------------------------------


@dataclass
class StageBResult:
    run_id: str
    model_uri: str
    model_version: int | None
    metrics: dict = field(default_factory=dict)
    resumed: bool = False
    latents_uri: str = ""


def latest_latents_uri(cfg: PipelineConfig, experiment_id: str) -> str:
    """The latents of the latest finished encode run of the experiment."""
    uri = tracking.latest_output(experiment_id, ENCODE_STAGE, TAG_LATENTS_URI)
    if uri:
        return uri
    raise ConfigError(f"stage_b.latents_uri is not set and experiment {cfg.mlflow.experiment!r} has no finished "
                      f"encode run: run pipelines/encode_latents.py first")


def check_compatible(cfg: PipelineConfig, manifest: dict, latents_uri: str) -> None:
    """The U-Net must fit the latents: channels, context width, and enough rows for one global batch."""
    sb = cfg.stage_b
    hidden = manifest["text_encoder"]["hidden_size"]
    channels = manifest["latent_shape"][0]
    where = f"latents {latents_uri} (text encoder {manifest['text_encoder']['name_or_path']!r})"
    if sb.unet.context_dim != hidden:
        raise ConfigError(f"stage_b.unet.context_dim={sb.unet.context_dim} does not match the text encoder's hidden size "
                          f"{hidden} in {where}: set stage_b.unet.context_dim={hidden}")
    if sb.unet.in_channels != channels:
        raise ConfigError(f"stage_b.unet.in_channels={sb.unet.in_channels} does not match the latent channels {channels} "
                          f"in {where}: set stage_b.unet.in_channels={channels}")
    if sb.unet.out_channels != channels:
        raise ConfigError(f"stage_b.unet.out_channels={sb.unet.out_channels}: the prediction (eps or v) has the latent's "
                          f"{channels} channels; set stage_b.unet.out_channels={channels}")
    train_rows = manifest["num_rows"] - manifest.get("num_holdout", 0)
    global_batch = sb.scaling.num_workers * sb.batch_size
    if train_rows < global_batch:
        raise ConfigError(f"stage_b.batch_size={sb.batch_size} x stage_b.scaling.num_workers={sb.scaling.num_workers} = "
                          f"{global_batch} exceeds the {train_rows} training rows of {where}")


def run_stage_b(
    cfg: PipelineConfig, *, parent_run_id: str | None = None, upstream_run_ids: tuple[str, ...] = (), extra_tags: dict | None = None
) -> StageBResult:
    init_ray(cfg.ray)
    sb = cfg.stage_b
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    latents_uri = sb.latents_uri or latest_latents_uri(cfg, experiment_id)
    manifest = latents.read_latents_manifest(latents_uri, cfg.storage)  # fails clearly on missing/incomplete latents
    check_compatible(cfg, manifest, latents_uri)
    check_cpu_budget(ray.cluster_resources().get("CPU", 0), sb.scaling, cfg.data, section=STAGE)
    null_context, null_mask = latents.read_null_condition(latents_uri, manifest, cfg.storage)

    text = manifest["text_encoder"]
    text_cfg = TextEncoderConfig(name_or_path=text["name_or_path"], max_length=text["max_length"])
    num_gpus = sb.scaling.gpus_per_worker if sb.scaling.use_gpu else 0
    prompts = encode_prompts_remote(text_cfg, cfg.sample.prompts, num_cpus=cfg.data.cpus_per_task, num_gpus=num_gpus) \
        if cfg.sample.prompts else None

    trainer_name = f"{cfg.run.name}-{STAGE}"
    resume_id = tracking.unfinished_training_run(experiment_id, trainer_name)
    upstream = tuple(upstream_run_ids) or tuple(r for r in (manifest.get("encode_run_id"), manifest.get("stage_a_run_id")) if r)
    tags = {
        "ray_train_name": trainer_name, TAG_LATENTS_URI: latents_uri, "latents_digest": manifest["digest"],
        "encode_run_id": manifest.get("encode_run_id", ""), "autoencoder_uri": manifest["autoencoder_uri"],
        "text_encoder": text["name_or_path"], **(extra_tags or {}),
    }

    with tracking.stage_run(
        experiment_id=experiment_id, stage=STAGE, run_name=trainer_name, upstream_run_ids=upstream,
        parent_run_id=parent_run_id, resume_run_id=resume_id, tags=tags,
    ) as run:
        run_id = run.info.run_id
        if resume_id is None:
            tracking.log_params(MlflowClient(), run_id, tracking.flatten(
                {"stage_b": sb.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json"),
                 "sample": {"prompts": cfg.sample.prompts, "guidance": cfg.sample.guidance}}))
            tracking.log_dataset_input(latents_uri, "latents", manifest["digest"], "training")
        else:
            log.info("resuming MLflow run %s of %s", run_id, trainer_name)

        encoded = ray.get(prompts) if prompts is not None else None
        condition = {
            "null_context": null_context.numpy(), "null_mask": null_mask.numpy(),
            "prompt_context": encoded["hidden"] if encoded else np.zeros((0, *null_context.shape), np.float32),
            "prompt_mask": encoded["mask"] if encoded else np.zeros((0, null_mask.shape[0]), bool),
        }
        bundle_info = {
            "text_encoder": text_cfg.model_dump(mode="json"), "hidden_size": text["hidden_size"],
            "latent_shape": manifest["latent_shape"], "scale_factor": manifest["scale_factor"],
            "autoencoder_uri": manifest["autoencoder_uri"], "encode_run_id": manifest.get("encode_run_id"),
            "stage_a_run_id": manifest.get("stage_a_run_id"), "latents_uri": latents_uri, "latents_digest": manifest["digest"],
        }
        datasets = {"train": latents.build_latent_dataset(latents_uri, cfg.storage, split="train", shuffle=True,
                                                          num_cpus=cfg.data.cpus_per_task)[0]}
        if manifest.get("num_holdout", 0) > 0 and sb.eval_batches > 0:
            datasets["holdout"] = latents.build_latent_dataset(latents_uri, cfg.storage, split="holdout", shuffle=False,
                                                               num_cpus=cfg.data.cpus_per_task)[0]
        ckpt_loc = storage.resolve(cfg.run.checkpoint_root, cfg.storage)
        trainer = ray.train.torch.TorchTrainer(
            train_loop_per_worker,
            train_loop_config={
                "config": cfg.model_dump(mode="json"),
                "tracking_uri": tracking.tracking_uri(cfg.mlflow),
                "mlflow_run_id": run_id,
                "trainer_name": trainer_name,
                "condition": condition,
                "bundle": bundle_info,
                "has_holdout": "holdout" in datasets,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=sb.scaling.num_workers,
                use_gpu=sb.scaling.use_gpu,
                resources_per_worker=sb.scaling.resources_per_worker(),
                placement_strategy=sb.scaling.placement_strategy,
            ),
            run_config=ray.train.RunConfig(
                name=trainer_name,
                storage_path=ckpt_loc.path,
                storage_filesystem=ckpt_loc.filesystem if ckpt_loc.scheme == "s3" else None,
                failure_config=ray.train.FailureConfig(max_failures=sb.train.max_failures),
                checkpoint_config=ray.train.CheckpointConfig(num_to_keep=sb.train.keep_checkpoints),
            ),
            datasets=datasets,
        )
        result = trainer.fit()
        if result.error is not None:
            raise result.error
        with result.checkpoint.as_directory() as d:
            final = load_meta(d)["final"]
            model_uri, version = publish_unet(Path(d) / BUNDLE_DIR, cfg.mlflow.unet_model_name)
        mlflow.set_tags({"model_uri": model_uri, "checkpoint": result.checkpoint.path})
        log.info("stage_b done: %s (held-out loss %s)", model_uri, final.get("eval/holdout_loss_ema", "n/a"))
        return StageBResult(run_id=run_id, model_uri=model_uri, model_version=version, metrics=final,
                            resumed=resume_id is not None, latents_uri=latents_uri)


def main(argv: list[str] | None = None) -> StageBResult:
    setup_logging()
    cfg, _ = parse_cli(argv, argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    with exit_on(ConfigError, latents.LatentsError):
        result = run_stage_b(cfg)
    print(f"stage_b finished: run {result.run_id}, model {result.model_uri}")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key:24s} {value:.4f}")
    return result


if __name__ == "__main__":
    main()

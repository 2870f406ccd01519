"""Stage B: train the text-conditioned U-Net on the Parquet latents with Ray Train, tracked in MLflow.

    python pipelines/stage_b.py --config configs/quickstart.yaml [--set stage_b.train.max_steps=50]
    ray job submit --working-dir . -- python pipelines/stage_b.py --config configs/photos.yaml

Latent diffusion (Rombach et al. 2022) on the latents written by `encode_latents.py`: every time a row is seen
a fresh latent is drawn from its posterior (mean, std), t ~ U{0, ..., T-1}, and the U-Net regresses eps (or v)
(Ho et al. 2020, eq. 14). With probability `cond_drop_prob` a caption is replaced by the empty prompt, so one
network learns both the conditional and the unconditional model (classifier-free guidance, Ho & Salimans 2022).
With `stage_b.lora` only LoRA adapters on `init_from`'s frozen U-Net train (Hu et al. 2021; `pipelines/models/lora.py`):
checkpoints and the published model (`mlflow.lora_model_name`) hold the adapters and a reference to the base.

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
from dataclasses import dataclass
from pathlib import Path

import mlflow
import ray
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from ldm_core.diffusion import NoiseSchedule, training_loss
from ldm_core.ema import EMA
from ldm_core.sampling import sampling_plan
from ldm_core.unet import UNet
from pipelines.data import latents
from pipelines.platform import tracking
from pipelines.config import PipelineConfig
from pipelines.dag.stage import Stage
from pipelines.platform.cli import parse_cli
from pipelines.platform.cluster import ClusterError, connect, ensure_resources
from pipelines.data import new_skip_counter
from pipelines.data.buckets import iter_shape_batches
from pipelines.platform.lease import LeaseHeld, LeaseLost, stage_lease
from pipelines.train.memory import check_memory_budget, estimate_stage_b
from pipelines.models import lora
from pipelines.models.interop import adopt_init_architectures, import_unet, init_from_run_ids, load_init_unet
from pipelines.models.registry import load_autoencoder, publish_unet, registered_model_lost, save_unet_bundle
from pipelines.platform.runtime import exit_on, setup_logging
from pipelines.models.inference import condition_for, digit_prompt_accuracy, generate
from pipelines.data.text_encoders import TextEncoderConfig, encode_prompts_remote
from pipelines.train.run_logger import RunLogger
from pipelines.train.loop import (TrainLoop, TrainResult, Update, build_trainer, fingerprint_fields, fit_and_publish,
                                  latest_checkpoint_meta, training_run)
from pipelines.train.rank import all_reduce_sum, world
from pipelines.train.steps import denoising_loss

log = logging.getLogger("stage_b")
STAGE_NAME = "stage_b"
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
    loop = TrainLoop(loop_config, sb.train, sb.optim, stage=STAGE_NAME, seed=cfg.run.seed, scaling=sb.scaling)
    device = loop.device
    cond = loop_config["condition"]
    null_context = torch.tensor(cond["null_context"], device=device)  # (L, D)
    null_mask = torch.tensor(cond["null_mask"], device=device)  # (L,)

    # --- model (with LoRA: the frozen base + adapters, of which only the adapters train), optimiser, EMA, schedule
    mlflow.set_tracking_uri(loop_config["tracking_uri"])  # init_from may be a models:/ or runs:/ URI
    model = (load_init_unet(sb, cfg.storage) if sb.init_from else UNet(sb.unet)).to(device)
    if sb.lora:
        lora.check_base(loop_config["lora_base"], lora.base_digest(model), f"stage_b.init_from={sb.init_from}",
                        "the base changed while the run started")
        model = lora.attach(model, sb.lora)
        if device.type == "cuda" and sb.lora.base_precision == "bf16":
            lora.cast_base(model, torch.bfloat16)
    opt = loop.adamw(lora.trainable_parameters(model), sb.optim.lr)
    ema = EMA(model, decay=sb.train.ema_decay, trainable_only=bool(sb.lora)) if sb.train.ema_decay else None
    schedule = NoiseSchedule(sb.diffusion, device)
    saved = {"unet_lora": lora.AdapterWeights(model)} if sb.lora else {"unet": model}  # LoRA: the adapters only
    if loop.resume(modules=saved, optimizers={"opt": opt}, ema=ema):
        return  # this run name had finished: its result was reported again
    # The reader starts now (a background thread), so Ray Data's start-up overlaps DDP's and the grid sampler's.
    batches = loop.batches(ray.train.get_dataset_shard("train"), batch_size=sb.batch_size,
                           shuffle_buffer=sb.shuffle_buffer, seed=cfg.run.seed,
                           by_shape=len(loop_config["bundle"]["latent_shapes"]) > 1)
    ddp_model = loop.prepare(model)
    loop.record_nodes()
    grids = GridSampler(cfg, loop_config, device) if loop.logger and cond["prompts"] else None

    # --- one step: a fresh posterior sample, condition dropout, t and eps, the denoising loss
    # A different random stream per rank and per resume point.
    generator = torch.Generator(device=device).manual_seed(cfg.run.seed + 1000 * loop.rank + loop.step)

    def denoising_update(batch: dict, step: int):
        return denoising_loss(ddp_model, batch, schedule, null_context=null_context, null_mask=null_mask,
                              cond_drop_prob=sb.cond_drop_prob, generator=generator, autocast=loop.autocast,
                              **sb.diffusion.loss_options())

    for step in loop.run([Update(ddp_model, opt, sb.optim.lr, denoising_update)], batches,
                         samples_per_batch=sb.batch_size, ema_model=model):
        if grids is not None and (step % sb.train.image_every == 0 or step == sb.train.max_steps):
            grids.log(loop.logger, model, ema, step)

    # --- after training: the held-out denoising loss (raw and EMA weights), then the publishable bundle
    final = {**heldout_loss(cfg, model, ema, schedule, device, loop_config["has_holdout"], loop.autocast),
             **loop.session_metrics()}
    if "train/loss" in loop.metrics:
        final["train/loss"] = loop.metrics["train/loss"]
    loop.finish(final, export=lambda d: export_bundle(d / BUNDLE_DIR, cfg, loop_config, model, ema, loop.step))


class GridSampler:
    """Rank 0's periodic sample grids: `sample.prompts` x `stage_b.sample_columns`, DDIM with guidance, EMA weights,
    decoded by the Stage A autoencoder (`pipelines.sample.generate`, as `sample.py` renders them). The seed of the
    initial noise is fixed for the whole run, so the grids are comparable."""

    def __init__(self, cfg: PipelineConfig, loop_config: dict, device: torch.device):
        sb = cfg.stage_b
        bundle = loop_config["bundle"]
        self.cfg, self.device, self.cond = cfg, device, loop_config["condition"]
        mlflow.set_tracking_uri(loop_config["tracking_uri"])
        self.autoencoder = load_autoencoder(bundle["autoencoder_uri"]).to(device)
        self.plan = sampling_plan(NoiseSchedule(sb.diffusion, device), min(sb.sample_steps, sb.diffusion.num_timesteps))
        self.condition = None  # the prompts' encoding, taken at the first grid (the driver's task may still run)
        self.settings = {
            "latent_shape": tuple(bundle["latent_shape"]), "scale_factor": bundle["scale_factor"],
            "latents_mean": bundle["latents_mean"], "latents_std": bundle["latents_std"],
            "num_per_prompt": sb.sample_columns, "seed": cfg.run.seed + GRID_SEED_OFFSET,
            "mixed_precision": sb.train.mixed_precision,
        }

    @torch.no_grad()
    def log(self, logger: RunLogger, model: torch.nn.Module, ema: EMA | None, step: int) -> None:
        if self.condition is None:
            encoded, device = ray.get(self.cond["prompts"][0]), self.device
            self.condition = condition_for(
                self.cfg.sample,
                torch.tensor(encoded["hidden"], device=device),  # (P, L, D)
                torch.tensor(encoded["mask"], device=device),  # (P, L)
                torch.tensor(self.cond["null_context"], device=device),
                torch.tensor(self.cond["null_mask"], device=device),
            )
        averaged = ema.average_parameters(model) if ema is not None else contextlib.nullcontext()
        with averaged:
            images = generate(model, self.autoencoder, self.plan, self.condition, **self.settings)
        grid = tracking.make_grid(images, nrow=self.settings["num_per_prompt"], padding=1)
        logger.log_image(tracking.tensor_grid_to_uint8(grid), f"samples/step_{step:07d}.png")


@torch.no_grad()
def heldout_loss(cfg: PipelineConfig, model: torch.nn.Module, ema: EMA | None, schedule: NoiseSchedule,
                 device: torch.device, has_holdout: bool, autocast=contextlib.nullcontext) -> dict[str, float]:
    """Denoising loss on the held-out rows (captions kept, posterior means, fixed timesteps and noise), with the
    raw and the EMA weights: the same number from run to run, comparable across checkpoints and runs. The forward
    runs under the training's `autocast` (a LoRA base kept in bf16 needs it)."""
    sb = cfg.stage_b
    if not has_holdout or sb.eval_batches == 0:
        return {}
    shard = ray.train.get_dataset_shard("holdout")
    rank, _ = world()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # rows, raw loss sum, EMA loss sum
    model.eval()
    for i, batch in enumerate(iter_shape_batches(shard, batch_size=sb.batch_size, device=device)):
        if i >= sb.eval_batches:
            break
        g = torch.Generator(device=device).manual_seed(cfg.run.seed + EVAL_SEED_OFFSET + 1000 * rank + i)
        x0, context, mask = batch["latent_mean"], batch["text_hidden"], batch["text_mask"]
        t = torch.randint(0, schedule.num_timesteps, (x0.shape[0],), generator=g, device=device)
        eps = torch.randn(x0.shape, generator=g, device=device)
        with autocast():
            raw, _ = training_loss(model, x0, context, mask, schedule, prediction=sb.diffusion.prediction, t=t, eps=eps)
        averaged = ema.average_parameters(model) if ema is not None else contextlib.nullcontext()
        with averaged, autocast():
            smooth, _ = training_loss(model, x0, context, mask, schedule, prediction=sb.diffusion.prediction, t=t, eps=eps)
        n = x0.shape[0]
        totals += torch.tensor([n, float(raw) * n, float(smooth) * n], dtype=torch.float64, device=device)
    model.train()
    rows, raw_sum, ema_sum = all_reduce_sum(totals).tolist()
    if rows == 0:
        return {}
    return {"eval/holdout_rows": rows, "eval/holdout_loss": raw_sum / rows, "eval/holdout_loss_ema": ema_sum / rows}


def export_bundle(directory: Path, cfg: PipelineConfig, loop_config: dict, model: torch.nn.Module, ema: EMA | None, step: int) -> None:
    """The publishable U-Net bundle: raw weights, EMA weights (a full state dict), configs and lineage. With LoRA
    the adapters (raw and EMA) and a reference to the base instead of the weights."""
    sb = cfg.stage_b
    info, cond = loop_config["bundle"], loop_config["condition"]
    state = lora.adapter_state(model) if sb.lora else model.state_dict()
    ema_state = None
    if ema is not None and sb.lora:
        with ema.average_parameters(model):
            ema_state = lora.adapter_state(model)
    elif ema is not None:
        export = UNet(sb.unet)
        export.load_state_dict(model.state_dict())
        ema.copy_to(export)
        ema_state = export.state_dict()
    adapter = {"config": sb.lora.model_dump(mode="json"), "base": loop_config["lora_base"]} if sb.lora else None
    save_unet_bundle(
        directory, unet_state=state, ema_state=ema_state, unet_config=sb.unet, diffusion=sb.diffusion, lora=adapter,
        text_encoder=TextEncoderConfig.model_validate(info["text_encoder"]), hidden_size=info["hidden_size"],
        null_context=torch.tensor(cond["null_context"]), null_mask=torch.tensor(cond["null_mask"]),
        latent_shape=info["latent_shape"], scale_factor=info["scale_factor"], autoencoder_uri=info["autoencoder_uri"],
        encode_run_id=info["encode_run_id"], stage_a_run_id=info["stage_a_run_id"], stage_b_run_id=loop_config["mlflow_run_id"],
        extra={"step": step, "latents_uri": info["latents_uri"], "latents_digest": info["latents_digest"],
               "latent_shapes": info["latent_shapes"]},
        latents_mean=info["latents_mean"], latents_std=info["latents_std"],
    )


# ----------------------------------------------------------------------------------------------------
# Driver side.
# ----------------------------------------------------------------------------------------------------


@dataclass
class StageBResult(TrainResult):
    latents_uri: str = ""


def latest_latents_uri(cfg: PipelineConfig, experiment_id: str) -> str:
    """The latents of the latest finished encode run of the experiment."""
    uri = tracking.latest_output(experiment_id, latents.ENCODE_STAGE, latents.TAG_LATENTS_URI)
    if uri:
        return uri
    raise ConfigError(f"stage_b.latents_uri is not set and experiment {cfg.mlflow.experiment!r} has no finished "
                      f"encode run: run pipelines/encode_latents.py first")


def trained_shapes(manifest: dict) -> list[list[int]]:
    """The latent shapes of a latents folder, default first (several with aspect-ratio buckets; older folders record
    only the default)."""
    shapes = [list(manifest["latent_shape"])]
    shapes += [e["shape"] for e in manifest.get("latent_shapes", []) if e["shape"] and e["shape"] != shapes[0]]
    return shapes


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


def check_stage_b(cfg: PipelineConfig) -> PipelineConfig:
    """Before any cluster work: stage_b.init_from's architecture replaces stage_b.unet, and on GPUs the estimated
    peak per GPU must fit scaling.gpu_type."""
    cfg = adopt_init_architectures(cfg, ("stage_b",))
    check_memory_budget(cfg, STAGE)
    return cfg


def lora_base(cfg: PipelineConfig, trainer_name: str) -> dict[str, str]:
    """The base that `stage_b.lora` adapters train on, as checkpoints and the published adapter record it (URI and
    weights digest). A checkpoint of this run name holding adapters of another base is refused in one line: no
    `run.resume_changed_config` makes adapters fit other weights."""
    base = lora.base_reference(cfg.stage_b.init_from, import_unet(cfg.stage_b.init_from, cfg.storage))
    found = latest_checkpoint_meta(cfg.run.checkpoint_root, trainer_name, cfg.storage)
    if found and found[1].get("lora_base"):
        lora.check_base(found[1]["lora_base"], base["digest"], f"checkpoint {found[0]} of run {trainer_name!r}",
                        f"stage_b.init_from={cfg.stage_b.init_from}; set a new run.name to train adapters for this base")
    return base


@stage_lease(STAGE_NAME)  # one live driver per checkpoint folder (pipelines/platform/lease.py)
def run_stage_b(
    cfg: PipelineConfig, *, parent_run_id: str | None = None, upstream_run_ids: tuple[str, ...] = (),
    extra_tags: dict | None = None, checked: bool = False,
) -> StageBResult:
    """Train the U-Net on the latents, evaluate and publish it. `checked`: `check_stage_b` and `connect` already
    ran on `cfg` (the DAG runs every stage's checks first)."""
    if not checked:
        cfg = check_stage_b(cfg)
        connect(cfg)
    sb = cfg.stage_b
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    latents_uri = sb.latents_uri or latest_latents_uri(cfg, experiment_id)
    manifest = latents.read_latents_manifest(latents_uri, cfg.storage)  # fails clearly on missing/incomplete latents
    check_compatible(cfg, manifest, latents_uri)
    # Waits for an autoscaler to add them; unset data.cpus_per_task / reserved_cpus are chosen for the cluster.
    cfg = cfg.model_copy(update={"data": ensure_resources(sb.scaling, cfg.data, cfg.ray, section=STAGE_NAME)})
    null_context, null_mask = latents.read_null_condition(latents_uri, manifest, cfg.storage)

    text = manifest["text_encoder"]
    text_cfg = TextEncoderConfig(name_or_path=text["name_or_path"], max_length=text["max_length"],
                                 split_digits=text.get("split_digits", False))
    num_gpus = sb.scaling.gpus_per_worker if sb.scaling.use_gpu else 0
    prompts = encode_prompts_remote(text_cfg, cfg.sample.prompts, num_cpus=cfg.data.cpus_per_task, num_gpus=num_gpus) \
        if cfg.sample.prompts else None

    trainer_name = f"{cfg.run.name}-{STAGE_NAME}"
    base = lora_base(cfg, trainer_name) if sb.lora else None
    fields = fingerprint_fields({STAGE_NAME: sb.model_dump(mode="json", exclude={"latents_uri"}),
                                 "latents": {"uri": latents_uri, "digest": manifest["digest"]}, "run": {"seed": cfg.run.seed},
                                 **({"lora_base": base} if base else {})}, STAGE_NAME)
    upstream = tuple(upstream_run_ids) or tuple(r for r in (manifest.get("encode_run_id"), manifest.get("stage_a_run_id")) if r)
    upstream = tuple(dict.fromkeys((*upstream, *init_from_run_ids(cfg, STAGE_NAME))))  # + the run stage_b.init_from came from
    tags = {
        latents.TAG_LATENTS_URI: latents_uri, "latents_digest": manifest["digest"],
        "encode_run_id": manifest.get("encode_run_id", ""), "autoencoder_uri": manifest["autoencoder_uri"],
        "text_encoder": text["name_or_path"], **(extra_tags or {}),
        **({"lora_base_uri": base["uri"], "lora_base_digest": base["digest"]} if base else {}),
    }
    params = tracking.flatten({"stage_b": sb.model_dump(mode="json"), "run": cfg.run.model_dump(mode="json"),
                               "sample": {"prompts": cfg.sample.prompts, "guidance": cfg.sample.guidance,
                                          "guidance_rescale": cfg.sample.guidance_rescale}})
    with training_run(
        cfg, stage=STAGE_NAME, experiment_id=experiment_id, trainer_name=trainer_name, fields=fields,
        upstream_run_ids=upstream, parent_run_id=parent_run_id, tags=tags, params=params,
        dataset=(latents_uri, "latents", manifest["digest"]),
    ) as (run_id, resumed):
        # The prompts' encoding (a task of its own) is not waited for: rank 0 takes it at its first sample grid, so
        # loading the text encoder overlaps the Train workers' start (it held the fit back ~13 s on 2 CPUs).
        condition = {"null_context": null_context.numpy(), "null_mask": null_mask.numpy(),
                     "prompts": [prompts] if prompts is not None else []}  # (in a list: Ray passes the ref, unresolved)
        bundle_info = {
            "text_encoder": text_cfg.model_dump(mode="json"), "hidden_size": text["hidden_size"],
            "latent_shape": manifest["latent_shape"], "scale_factor": manifest["scale_factor"],
            "latent_shapes": trained_shapes(manifest),
            "latents_mean": manifest.get("latents_mean"), "latents_std": manifest.get("latents_std"),
            "autoencoder_uri": manifest["autoencoder_uri"], "encode_run_id": manifest.get("encode_run_id"),
            "stage_a_run_id": manifest.get("stage_a_run_id"), "latents_uri": latents_uri, "latents_digest": manifest["digest"],
        }
        skips = new_skip_counter()  # Parquet parts that fail their sha256 or vanish: counted, never used
        datasets = {"train": latents.build_latent_dataset(latents_uri, cfg.storage, split="train", shuffle=True,
                                                          num_cpus=cfg.data.cpus_per_task, skip_counter=skips)[0]}
        if manifest.get("num_holdout", 0) > 0 and sb.eval_batches > 0:
            datasets["holdout"] = latents.build_latent_dataset(latents_uri, cfg.storage, split="holdout", shuffle=False,
                                                               num_cpus=cfg.data.cpus_per_task, skip_counter=skips)[0]
        trainer = build_trainer(
            train_loop_per_worker, cfg, sb, trainer_name=trainer_name, run_id=run_id, fingerprint=fields,
            datasets=datasets, condition=condition, bundle=bundle_info, has_holdout="holdout" in datasets,
            lora_base=base, checkpoint_meta={"lora_base": base} if base else {},
        )
        name = cfg.mlflow.lora_model_name if sb.lora else cfg.mlflow.unet_model_name

        def publish(folder: Path) -> tuple[str, int | None]:
            uri, version = publish_unet(folder / BUNDLE_DIR, name)
            if base and version is not None:  # the registered adapter's lineage: its base and its data
                lineage = {"base_model_uri": base["uri"], "base_digest": base["digest"], "latents_uri": latents_uri,
                           "latents_digest": manifest["digest"]}
                for key, value in lineage.items():
                    MlflowClient().set_model_version_tag(name, str(version), key, value)
            return uri, version

        final, model_uri, version, checkpoint = fit_and_publish(trainer, name, publish)
        mlflow.log_metrics({f"data/skipped_{k}": v for k, v in skips.snapshot().items()})
        mlflow.set_tags({"model_uri": model_uri, "checkpoint": checkpoint})
        if sb.prompt_eval.active(cfg.sample.prompts):  # the MNIST judge on the published model, at a fixed budget
            accuracy = digit_prompt_accuracy(cfg, model_uri)
            mlflow.log_metrics(accuracy, step=sb.train.max_steps)
            final = {**final, **accuracy}
        log.info("stage_b done: %s (held-out loss %s)", model_uri, final.get("eval/holdout_loss_ema", "n/a"))
        return StageBResult(run_id=run_id, model_uri=model_uri, model_version=version, metrics=final,
                            resumed=resumed, latents_uri=latents_uri)


STAGE = Stage(
    name=STAGE_NAME,
    run=run_stage_b,
    inputs=("encode", "stage_a"),
    sections=("stage_b", "sample.prompts", "sample.digit_classifier", "run.seed"),
    wiring={"stage_b.latents_uri": ("encode", "latents_uri")},
    consumes=("latents_uri", "autoencoder_uri"),
    produces=("model_uri",),
    key_metrics=("perf/images_per_s", "train/loss", "eval/holdout_loss", "eval/holdout_loss_ema"),
    check=check_stage_b,
    lost_outputs=registered_model_lost,
    memory=estimate_stage_b,
    trains=True,
)


def main(argv: list[str] | None = None) -> StageBResult:
    setup_logging()
    cfg, _ = parse_cli(argv, argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    with exit_on(ConfigError, latents.LatentsError, ClusterError, LeaseHeld, LeaseLost):
        result = run_stage_b(cfg)
    print(f"stage_b finished: run {result.run_id}, model {result.model_uri}")
    for key, value in sorted(result.metrics.items()):
        print(f"  {key:24s} {value:.4f}")
    return result


if __name__ == "__main__":
    main()

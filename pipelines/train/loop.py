"""The one training loop both stages run inside each Ray Train worker (DDP rank).

A stage builds its models and optimisers, describes each optimiser's loss as an `Update`, and hands them to
`TrainLoop`, which owns everything else, once:

    loop = TrainLoop(loop_config, sb.train, sb.optim, stage="stage_b", seed=cfg.run.seed)
    model = UNet(sb.unet).to(loop.device)
    opt = loop.adamw(model.parameters(), sb.optim.lr)
    if loop.resume(modules={"unet": model}, optimizers={"opt": opt}, ema=ema):
        return                                          # this run name had finished: nothing to train
    ddp = loop.prepare(model)
    for step in loop.run([Update(ddp, opt, sb.optim.lr, denoising_loss)], batches, ema_model=ddp):
        ...                                             # the stage's extras at this step (image grids)
    loop.finish(final_metrics, export=write_bundle)     # last checkpoint (+ the publishable export)

Per optimiser step: the warm-up learning rate, `grad_accum_steps` micro-batches for each update in order (DDP
all-reduces on the last one only; micro-batches are dicts an update may add to, e.g. Stage A's generator
leaves the reconstruction for the discriminator), one non-finite check per update, clipping, the optimiser
step, EMA, timing. Every `log_every` steps rank 0 logs the interval's mean metrics through a buffered
`RunLogger` (an MLflow outage never stalls training) and prints a progress line; every `checkpoint_every`
steps a checkpoint (safetensors + meta carrying the config fingerprint) goes to Ray Train.

Non-finite steps: a micro-batch whose loss is NaN/inf backpropagates NaN (`poison_nonfinite`), so after
DDP's all-reduce every rank holds the same non-finite gradient norm and all ranks skip that update together,
with no collective of their own. The same check catches a finite loss with non-finite gradients. A skipped
first update skips the whole step (it is not counted); a skipped later update skips only its optimiser.

Host syncs: nothing in a micro-step reads a device value back. Metrics accumulate on the device, the one
sync per update is the skip decision, and logging steps read the interval's sums once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import pyarrow.fs as pafs
import ray.train
import ray.train.torch
import torch
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from ldm_core.ema import EMA
from pipelines.train import ddp
from pipelines.platform import lease, storage, tracking
from pipelines.models.checkpoints import damage, load_meta, load_module, load_optimizer, load_tensors, save_checkpoint
from pipelines.models.registry import mark_published, published_from
from pipelines.platform.progress import Progress
from pipelines.train.run_logger import RunLogger
from pipelines.platform.runtime import train_logging_config
from pipelines.config.sections import OptimSection, ScalingSection, TrainLoopSection
from pipelines.train.rank import (
    NonFiniteGuard,
    StepTimer,
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

log = logging.getLogger(__name__)

LossFn = Callable[[dict, int], "tuple[torch.Tensor, Mapping[str, torch.Tensor]]"]

RESUMABLE_FIELDS = frozenset({
    "train.max_steps", "train.log_every", "train.image_every", "train.checkpoint_every", "train.keep_checkpoints",
    "train.max_failures", "train.fail_at_step", "train.max_consecutive_nonfinite", "train.mlflow_flush_timeout_s",
    "prompt_eval",
})
"""Fields (or whole sub-sections) of a stage's section that may change between a checkpoint and its resume (how
long, how often to log, save or evaluate): everything else in the fingerprint must match, or the resume is
refused."""


@dataclass
class Update:
    """One optimiser's share of a training step: `loss(micro_batch, step) -> (loss, metrics)` over each
    micro-batch, gradients accumulated, then one guarded, clipped step of `optimizer`."""

    model: torch.nn.Module
    """The (DDP-prepared) module whose parameters this loss trains; its `no_sync` skips all-reduces."""
    optimizer: torch.optim.Optimizer
    lr: float
    """Peak learning rate (the warm-up factor multiplies it)."""
    loss: LossFn
    starts_at: int = 0
    """First step at which this update runs (Stage A's discriminator: `loss.disc_start`)."""
    name: str = ""
    """Suffix of its grad-norm metric (`train/grad_norm`, `train/grad_norm_disc`)."""


@dataclass
class Worker:
    """Where this copy of the loop runs."""

    rank: int
    world_size: int
    device: torch.device

    @classmethod
    def from_ray(cls) -> "Worker":
        return cls(*world(), ray.train.torch.get_device())


@dataclass
class TrainResult:
    """What a training stage's driver returns."""

    run_id: str
    model_uri: str
    model_version: int | None
    metrics: dict = field(default_factory=dict)
    resumed: bool = False
    """Whether it continued an interrupted MLflow run (and its checkpoint)."""

    @property
    def status(self) -> str:
        return "resumed" if self.resumed else "ran"

    @property
    def outputs(self) -> dict[str, str]:
        return {"model_uri": self.model_uri}


# ----------------------------------------------------------------------------------------------------
# Config fingerprints: a checkpoint resumes only into the config it was trained with.
# ----------------------------------------------------------------------------------------------------


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, Mapping):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(_flat(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}


def adamw_impl(device_type: str, fused: bool = False) -> dict[str, bool]:
    """AdamW's implementation for a device: the fused kernel on CUDA when `optim.fused` asks (one launch for all
    parameters, no full-size temporaries); torch's own choice (foreach) otherwise on CUDA; and foreach on the CPU,
    where torch would take its per-parameter loop (benchmarks/README.md, "CPU step time": the loop's many small
    kernels cost the CPU step more than the temporaries foreach allocates)."""
    if device_type == "cuda":
        return {"fused": True} if fused else {}
    return {"foreach": True}


def fingerprint_fields(sections: Mapping[str, Any], stage: str) -> dict[str, Any]:
    """The dotted fields that define what a stage trains (`sections`: name -> JSON config), less the fields a
    resume may change (`RESUMABLE_FIELDS`, relative to the stage's own section)."""
    flat = _flat(json.loads(json.dumps(sections, default=str)))

    def resumable(key: str) -> bool:
        if not key.startswith(f"{stage}."):
            return False
        path = key[len(stage) + 1:]
        return any(path == f or path.startswith(f + ".") for f in RESUMABLE_FIELDS)

    return {k: v for k, v in flat.items() if not resumable(k)}


def fingerprint(fields: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_diff(old: Mapping[str, Any], new: Mapping[str, Any], limit: int = 6) -> str:
    """`stage_b.optim.lr: 0.0005 -> 0.001, ...` for the fields that differ."""
    keys = sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))
    parts = [f"{k}: {old.get(k, '<unset>')} -> {new.get(k, '<unset>')}" for k in keys[:limit]]
    return ", ".join(parts) + (f" (+{len(keys) - limit} more)" if len(keys) > limit else "")


# ----------------------------------------------------------------------------------------------------
# Pieces of a step.
# ----------------------------------------------------------------------------------------------------


def poison_nonfinite(loss: torch.Tensor) -> torch.Tensor:
    """`loss` unchanged when finite; otherwise a NaN whose gradient is NaN in every parameter it reaches, so
    that after DDP's all-reduce the global gradient norm is NaN on every rank. No host sync."""
    scale = torch.where(torch.isfinite(loss.detach()), 1.0, float("nan")).to(loss.dtype)
    return loss * scale


def grad_norm(parameters: Iterable[torch.nn.Parameter]) -> torch.Tensor:
    """The global L2 norm of the gradients (identical on every rank after DDP's all-reduce)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return torch.zeros(())
    return torch.nn.utils.get_total_norm(grads)


def _no_sync(model: torch.nn.Module, last: bool):
    """DDP all-reduces gradients on the last micro-batch only."""
    return model.no_sync() if (not last and hasattr(model, "no_sync")) else contextlib.nullcontext()


class TrainLoop:
    """Resume, DDP preparation, the guarded step loop, logging and checkpoints for one Train worker."""

    def __init__(self, loop_config: dict, train: TrainLoopSection, optim: OptimSection, *, stage: str, seed: int,
                 scaling: ScalingSection | None = None, worker: Worker | None = None, logger: RunLogger | None = None):
        self.worker = worker or Worker.from_ray()
        self.rank, self.world_size, self.device = self.worker.rank, self.worker.world_size, self.worker.device
        self.train, self.optim, self.scaling, self.stage = train, optim, scaling, stage
        self.loop_config = loop_config
        seed_everything(seed)  # the same init on every rank (DDP also broadcasts rank 0's weights)
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = train.tf32
            torch.backends.cudnn.allow_tf32 = train.tf32
        if logger is None and self.rank == 0 and loop_config.get("tracking_uri"):
            logger = RunLogger(loop_config["tracking_uri"], loop_config["mlflow_run_id"])
        self.logger = logger
        """Rank 0's buffered MLflow logger (None on other ranks)."""
        self.step = 0
        self.start_step = 0
        self.guard = NonFiniteGuard(train.max_consecutive_nonfinite, self.device)
        self.timer = StepTimer()
        self._progress: Progress | None = None
        self.last_batch: dict = {}  # the step's last micro-batch as the updates left it (the stage's image grids)
        self.metrics: dict[str, float] = {}
        """The last logged values (what checkpoints' reports carry)."""
        self._modules: dict[str, Any] = {}
        self._optimizers: dict[str, torch.optim.Optimizer] = {}
        self._ema: EMA | None = None
        self._created = self._loop_started = time.perf_counter()
        self._first_step = 0
        self._samples_per_step = 0
        self._fingerprint = loop_config.get("fingerprint", {})
        self._fault_marker = fault_marker(loop_config.get("checkpoint_root", ""), loop_config.get("trainer_name", ""))

    # --- set-up
    def adamw(self, params, lr: float) -> torch.optim.AdamW:
        """AdamW with the section's betas and decay, in the implementation `adamw_impl` picks for the device."""
        return torch.optim.AdamW(params, lr=lr, betas=self.optim.betas, weight_decay=self.optim.weight_decay,
                                 **adamw_impl(self.device.type, self.optim.fused))

    def resume(self, *, modules: Mapping[str, Any], optimizers: Mapping[str, torch.optim.Optimizer],
               ema: EMA | None = None) -> bool:
        """Register what a checkpoint holds and load the latest checkpoint of this run name into it. True when
        that checkpoint is a finished run's: its result is reported again and the caller trains nothing."""
        self._modules, self._optimizers, self._ema = dict(modules), dict(optimizers), ema
        checkpoint = ray.train.get_checkpoint() if self.loop_config.get("trainer_name") else None
        if checkpoint is None:
            return False
        checkpoint, why = newest_intact(checkpoint)
        if why and self.rank == 0:
            log.warning("%s", why)
        if checkpoint is None:
            return False
        with checkpoint.as_directory() as d:
            meta = load_meta(d)
            for name, module in self._modules.items():
                load_module(d, name, module)
            for name, opt in self._optimizers.items():
                load_optimizer(d, name, opt)
            if ema is not None:
                ema.load_state_dict(load_tensors(d, "ema"))
        self.step = self.start_step = meta["step"]
        self.guard.total = meta.get("nonfinite_total", 0)
        if meta.get("final"):
            if self.logger:  # this run may be another store's adoption of the folder: give it the result it reports
                self.logger.log_metrics(meta["final"], self.step)
                for key, value in meta.get("final_tags", {}).items():
                    self.logger.set_tag(key, value)
                self.logger.flush(self.train.mlflow_flush_timeout_s)
            ray.train.report({"step": self.step, "resumed_finished": 1, **meta["final"]}, checkpoint=None)
            return True
        log.info("rank %d resumed from step %d", self.rank, self.step)
        if self.logger:
            self.logger.log_metrics({"train/resumed_from_step": self.step}, self.step)
        return False

    def prepare(self, module: torch.nn.Module, **ddp_kwargs) -> torch.nn.Module:
        """Optionally channels-last and `torch.compile` (train.channels_last, train.compile), then wrap for DDP
        with the scaling section's options (`pipelines/train/ddp.py`: bucket views, bf16 gradient compression).
        Checkpoints keep using the plain module registered in `resume`, so their keys never carry `_orig_mod.`
        or `module.` prefixes."""
        if self.train.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if self.train.compile:
            module = torch.compile(module)
        if self.scaling is None:
            return ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp_kwargs or None)
        wrapped = ray.train.torch.prepare_model(module, parallel_strategy_kwargs=ddp.ddp_kwargs(self.scaling, **ddp_kwargs))
        return ddp.configure_ddp(wrapped, self.scaling)  # bf16 gradient compression when configured

    def record_nodes(self) -> None:
        """Tag the run with the Ray nodes the ranks ran on (a collective: every rank calls it)."""
        nodes = node_ids()
        if self.logger:
            self.logger.set_tag("train_nodes", ",".join(sorted(set(nodes))))

    def batches(self, shard, *, batch_size: int, shuffle_buffer: int, seed: int, by_shape: bool = False) -> Iterator[dict]:
        """This rank's endless batch stream, reshuffled per epoch; the seed moves with the resume point. `by_shape`:
        rows of several shapes (aspect-ratio buckets), batched one shape at a time."""
        return batches_forever(shard, batch_size=batch_size, shuffle_buffer=shuffle_buffer,
                               seed=seed + 1000 * self.rank + self.step, device=self.device, by_shape=by_shape)

    def autocast(self):
        return autocast(self.device, self.train.mixed_precision)

    # --- the loop
    def run(self, updates: list[Update], batches: Iterator[dict], *, samples_per_batch: int,
            ema_model: torch.nn.Module | None = None,
            extra_metrics: Callable[[], Mapping[str, float]] | None = None) -> Iterator[int]:
        """Train until `train.max_steps`, yielding each completed step (after its metrics were logged and before
        its checkpoint is written) so the stage can add its own periodic work. `extra_metrics()` is logged with
        the metrics on rank 0 (Stage A: the data reader's skip counts)."""
        accum = self.optim.grad_accum_steps
        lr_factor = warmup_schedule(self.optim)
        self._progress = progress = Progress(self.stage, self.train.max_steps, every=self.train.log_every,
                                             start_step=self.step) if self.rank == 0 else None
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}  # steps that produced each metric (the discriminator's start mid-interval)
        self._loop_started, self._first_step = time.perf_counter(), self.step
        self._samples_per_step = samples_per_batch * accum
        # The stage's set-up (models, resume, DDP, its own helpers) is its own number, not the first steps' data wait.
        self.timer.restart()
        if self.logger:
            self.logger.log_metrics({"perf/setup_s": self._loop_started - self._created}, self.step)
        while self.step < self.train.max_steps:
            maybe_inject_fault(self.train, self.step, self.rank, self.world_size, self._fault_marker)
            for update in updates:
                for group in update.optimizer.param_groups:
                    group["lr"] = update.lr * lr_factor(self.step)
            micro_batches = []
            for _ in range(accum):
                micro_batches.append(dict(next(batches)))
                self.timer.data_ready()
            self.last_batch = micro_batches[-1]

            step_sums: dict[str, torch.Tensor] = {}
            counted = True
            for i, update in enumerate(updates):
                if self.step < update.starts_at:
                    continue
                if not self._apply(update, micro_batches, step_sums):
                    if i == 0:
                        counted = False
                    log.warning("rank %d: non-finite %s at step %d, update skipped", self.rank,
                                f"loss/gradient ({update.name or 'main'})", self.step)
                    break
            if not counted:
                continue

            self.step += 1
            self.timer.step_done(samples_per_batch * accum)
            if self._ema is not None and ema_model is not None:
                self._ema.update(ema_model)
            for k, v in step_sums.items():
                sums[k] = sums[k] + v if k in sums else v
                counts[k] = counts.get(k, 0) + 1

            if self.step % self.train.log_every == 0 or self.step == self.train.max_steps:
                self._log_interval(sums, counts, updates[0].optimizer, progress, extra_metrics)
                sums, counts = {}, {}
            yield self.step
            if self.step % self.train.checkpoint_every == 0 and self.step < self.train.max_steps:
                report({"step": self.step, **self.metrics}, self.write_checkpoint, self.rank)
            self.timer.restart()  # the stage's periodic work and checkpoints count as neither compute nor data wait

    def _apply(self, update: Update, micro_batches: list[dict], step_sums: dict[str, torch.Tensor]) -> bool:
        """Accumulate the update's gradients over the micro-batches and take its guarded optimiser step.
        False when the step was skipped (non-finite loss or gradients on any rank)."""
        opt, n = update.optimizer, len(micro_batches)
        opt.zero_grad(set_to_none=True)  # also drops what an earlier update's loss left in these parameters
        local: dict[str, torch.Tensor] = {}
        for j, batch in enumerate(micro_batches):
            with _no_sync(update.model, last=j == n - 1):
                loss, metrics = update.loss(batch, self.step)
                (poison_nonfinite(loss) / n).backward()
            for k, v in metrics.items():
                v = torch.as_tensor(v, device=self.device).detach().float()
                local[f"train/{k}"] = local[f"train/{k}"] + v / n if f"train/{k}" in local else v / n
        params = [p for group in opt.param_groups for p in group["params"]]
        norm = grad_norm(params).to(self.device)
        if self.guard.should_skip(norm, agreed=True):
            opt.zero_grad(set_to_none=True)
            return False
        if self.optim.grad_clip:
            torch.nn.utils.clip_grads_with_norm_(params, self.optim.grad_clip, norm)
        opt.step()
        local[f"train/grad_norm{'_' + update.name if update.name else ''}"] = norm.float()
        step_sums.update(local)
        return True

    def _log_interval(self, sums: dict[str, torch.Tensor], counts: dict[str, int], opt: torch.optim.Optimizer,
                      progress: Progress | None, extra_metrics: Callable[[], Mapping[str, float]] | None) -> None:
        perf = self.timer.pop()
        if sums:
            names = list(sums)
            # The interval's mean of each metric over the steps that produced it; the interval's one host sync.
            values = (torch.stack([sums[k] for k in names]).cpu() / torch.tensor([counts[k] for k in names])).tolist()
            self.metrics.update(zip(names, values))
        self.metrics.update(perf)
        self.metrics["perf/images_per_s"] = perf["perf/samples_per_s_per_worker"] * self.world_size
        self.metrics["train/lr"] = opt.param_groups[0]["lr"]
        self.metrics["train/nonfinite_skipped"] = self.guard.total
        if self.device.type == "cuda":  # what the memory-budget check (pipelines/train/memory.py) is held against
            self.metrics["perf/gpu_peak_allocated_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        if self.logger:
            self.logger.log_metrics({**self.metrics, **(extra_metrics() if extra_metrics else {})}, self.step)
        if progress is not None:
            progress.update(self.step, loss=self.metrics.get("train/loss", self.metrics.get("train/total")),
                            images_per_s=self.metrics["perf/images_per_s"],
                            data_wait=perf["perf/data_wait_fraction"])

    # --- checkpoints and the end of the run
    def write_checkpoint(self, directory: Path, final: dict | None = None,
                         export: Callable[[Path], None] | None = None) -> None:
        modules = dict(self._modules)
        if self._ema is not None:
            modules["ema"] = self._ema.state_dict()
        meta = {"step": self.step, "nonfinite_total": self.guard.total, "config": self.loop_config.get("config"),
                "fingerprint": self._fingerprint, **self.loop_config.get("checkpoint_meta", {})}
        if final is not None:
            meta["final"] = final
            meta["final_tags"] = dict(self.logger.tags) if self.logger else {}
            if export is not None:
                export(directory)
        save_checkpoint(directory, modules=modules, optimizers=self._optimizers, meta=meta)

    def session_metrics(self) -> dict[str, float]:
        """What this process trained: images/s over its own steps (a resumed run counts from its resume)."""
        seconds = time.perf_counter() - self._loop_started
        done = self.step - self._first_step
        out: dict[str, float] = {"steps": float(self.step)}
        if done > 0 and seconds > 0:
            out["perf/images_per_s"] = done * self._samples_per_step * self.world_size / seconds
        return out

    def finish(self, final: dict, export: Callable[[Path], None] | None = None) -> None:
        """Log the final metrics, flush rank 0's MLflow queue, and report the last checkpoint (with the
        publishable `export` written into it) to Ray Train."""
        if self.logger:
            self.logger.log_metrics(final, self.step)
            timeout = self.train.mlflow_flush_timeout_s
            if not self.logger.flush(timeout):
                log.error("MLflow still unreachable after %.0f s: %d logging calls were not sent (the checkpoint "
                          "and the model are unaffected)", timeout, self.logger.pending())
        if self._progress is not None:  # rank 0: the stage's one summary line
            loss = self.metrics.get("train/loss", self.metrics.get("train/total"))
            self._progress.done(f"{self.step - self.start_step} steps", loss=loss,
                                images_per_s=final.get("perf/images_per_s"))
        report({"step": self.step, **self.metrics, **final}, lambda d: self.write_checkpoint(d, final, export), self.rank)


def newest_intact(checkpoint: "ray.train.Checkpoint") -> tuple["ray.train.Checkpoint | None", str]:
    """The checkpoint to resume from, and what to say about it: Ray Train's latest when it is intact; else the newest
    intact one beside it (a truncated safetensors file, say, must not fail every restart of the run), and a line
    naming the damaged file and the checkpoint used instead ("" when nothing was wrong)."""
    with checkpoint.as_directory() as d:
        why = damage(d)
    if not why:
        return checkpoint, ""
    fs, parent = checkpoint.filesystem, posixpath.dirname(checkpoint.path.rstrip("/"))
    best: tuple[int, "ray.train.Checkpoint"] | None = None
    for info in fs.get_file_info(pafs.FileSelector(parent)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_") or info.path == checkpoint.path:
            continue
        candidate = ray.train.Checkpoint(info.path, filesystem=fs)
        with candidate.as_directory() as d:
            if not damage(d) and (best is None or load_meta(d)["step"] > best[0]):
                best = (load_meta(d)["step"], candidate)
    if best is None:
        return None, f"checkpoint {checkpoint.path} is damaged ({why}) and no intact one is left: training from step 0"
    return best[1], (f"checkpoint {checkpoint.path} is damaged ({why}): resuming from the newest intact one, "
                     f"{best[1].path} (step {best[0]})")


def latest_checkpoint_meta(checkpoint_root: str, trainer_name: str, storage_cfg=None) -> tuple[str, dict] | None:
    """The newest checkpoint (by step) Ray Train kept for this run name, as (uri, meta); None when there is none."""
    loc = storage.resolve(f"{checkpoint_root.rstrip('/')}/{trainer_name}", storage_cfg)
    if not storage.exists(loc):
        return None
    best: tuple[str, dict] | None = None
    for info in loc.filesystem.get_file_info(pafs.FileSelector(loc.path)):
        if info.type != pafs.FileType.Directory or not info.base_name.startswith("checkpoint_"):
            continue
        meta_loc = loc.join(info.base_name, "meta.json")
        try:
            meta = json.loads(storage.read_bytes(meta_loc))
        except (FileNotFoundError, OSError, ValueError):
            continue  # a checkpoint being written, or not one of ours
        if best is None or meta.get("step", -1) > best[1].get("step", -1):
            best = (loc.join(info.base_name).uri, meta)
    return best


def check_resumable(checkpoint_root: str, trainer_name: str, fields: Mapping[str, Any], *, storage_cfg=None,
                    allow_changed: bool = False) -> dict | None:
    """Driver side, before any worker starts: the latest checkpoint of `trainer_name` must have been trained
    with the same fingerprint `fields` (see `fingerprint_fields`). Returns its meta, with its `uri` (None: nothing
    to resume). Raises ConfigError naming the differing fields unless `allow_changed`. (The DAG never gets here
    with a different config: its run names carry the config and the upstream runs, `dag.executor.run_name`.)"""
    found = latest_checkpoint_meta(checkpoint_root, trainer_name, storage_cfg)
    if found is None:
        return None
    uri, meta = found
    old = meta.get("fingerprint")
    if old and fingerprint(old) != fingerprint(fields) and not allow_changed:
        raise ConfigError(
            f"checkpoint {uri} (step {meta.get('step')}) of run {trainer_name!r} was trained with a different config "
            f"({fingerprint_diff(old, fields)}): start fresh with --set run.name=NEW (a name not used yet), or resume it "
            f"with the new settings with --set run.resume_changed_config=true")
    return {**meta, "uri": uri}


@contextlib.contextmanager
def training_run(cfg, *, stage: str, experiment_id: str, trainer_name: str, fields: Mapping[str, Any],
                 upstream_run_ids: tuple[str, ...], parent_run_id: str | None, tags: Mapping[str, str],
                 params: Mapping[str, Any], dataset: tuple[str, str, str]) -> Iterator[tuple[str, bool]]:
    """A training stage's MLflow run (driver side), yielding (run id, resumed).

    First the checkpoints under `trainer_name` must fit this config (`check_resumable`). The unfinished run of
    the same Ray Train name, when there is one, is resumed and keeps its params; a new run gets `params` and
    `dataset` = (uri, name, digest) as its training input. Tagged `ray_train_name` (how a resume finds it)."""
    found = check_resumable(cfg.run.checkpoint_root, trainer_name, fields, storage_cfg=cfg.storage,
                            allow_changed=cfg.run.resume_changed_config)
    resume_id = tracking.unfinished_training_run(experiment_id, trainer_name)
    if found is not None and resume_id is None:  # e.g. left by a deleted MLflow store, or one of another path
        print(f"[{stage}] adopting checkpoint {found['uri']} (step {found.get('step')}): trained with this config on "
              f"the same inputs, and no unfinished run of this MLflow store owns it; a new run continues from it "
              f"(run.py --force {stage}, or a new run.name, trains from scratch instead)", flush=True)
    with tracking.stage_run(
        experiment_id=experiment_id, stage=stage, run_name=trainer_name, upstream_run_ids=upstream_run_ids,
        parent_run_id=parent_run_id, resume_run_id=resume_id, tags={"ray_train_name": trainer_name, **tags},
    ) as run:
        run_id = run.info.run_id
        if resume_id is None:
            tracking.log_params(MlflowClient(), run_id, params)
            tracking.log_dataset_input(*dataset, "training")
        else:
            log.info("resuming MLflow run %s of %s", run_id, trainer_name)
        yield run_id, resume_id is not None


def build_trainer(train_fn: Callable[[dict], None], cfg, section, *, trainer_name: str, run_id: str,
                  fingerprint: Mapping[str, Any], datasets: dict, **loop_config) -> "ray.train.torch.TorchTrainer":
    """The TorchTrainer of a training stage (driver side): `section` is the stage's config section (its scaling and
    train settings), `loop_config` what its worker function needs beyond what every stage passes (the config, the
    MLflow run, the Ray Train name and checkpoint root, the config fingerprint; `checkpoint_meta`, a dict, is written
    into every checkpoint's meta.json). Checkpoints go to
    `run.checkpoint_root` (local or s3://); re-running with the same `trainer_name` resumes from them."""
    ckpt_loc = storage.resolve(cfg.run.checkpoint_root, cfg.storage)
    scaling, train = section.scaling, section.train
    return ray.train.torch.TorchTrainer(
        train_fn,
        train_loop_config={
            "config": cfg.model_dump(mode="json"),
            "tracking_uri": tracking.tracking_uri(cfg.mlflow),
            "mlflow_run_id": run_id,
            "trainer_name": trainer_name,
            "checkpoint_root": cfg.run.checkpoint_root,
            "fingerprint": dict(fingerprint),
            **loop_config,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=scaling.num_workers,
            use_gpu=scaling.use_gpu,
            resources_per_worker=scaling.resources_per_worker(),
            placement_strategy=scaling.placement_strategy,
            accelerator_type=scaling.accelerator_type(),
        ),
        run_config=ray.train.RunConfig(
            name=trainer_name,
            storage_path=ckpt_loc.path,
            storage_filesystem=ckpt_loc.filesystem if ckpt_loc.scheme == "s3" else None,
            failure_config=ray.train.FailureConfig(max_failures=train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=train.keep_checkpoints),
            logging_config=train_logging_config(),
        ),
        datasets=datasets,
    )


def fit_and_publish(trainer, registered_model_name: str,
                    publish: Callable[[Path], tuple[str, int | None]]) -> tuple[dict, str, int | None, str]:
    """Train (or resume) to the end, then publish the export in the final checkpoint with `publish(folder)` as a
    version of `registered_model_name`, unless that checkpoint was published already (a re-run of a finished run
    reports the same final checkpoint again: its version is reused, never registered twice).
    Returns (final metrics, model URI, registered version, checkpoint URI)."""
    result = trainer.fit()
    if result.error is not None:
        raise result.error
    with result.checkpoint.as_directory() as d:
        final = load_meta(d)["final"]
        published = published_from(registered_model_name, result.checkpoint.path)
        if published is None:
            lease.check_held()  # still the owner of this run (not taken over as dead): only then publish
            published = publish(Path(d))
            mark_published(registered_model_name, published[1], result.checkpoint.path)
    return final, published[0], published[1], result.checkpoint.path

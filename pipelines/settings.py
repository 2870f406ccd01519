"""Config sections shared by several stages: run identity, Ray, MLflow, scaling, optimiser, train loop.

Stage-specific sections live next to the stage that reads them; `pipelines/config.py` assembles the
whole pipeline config from all of them.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from ldm_core.config import StrictConfig


class RunSection(StrictConfig):
    name: str = "quickstart"
    """Name of this pipeline run. Ray Train run names, checkpoint folders and MLflow run names derive from it;
    re-running with the same name resumes unfinished training from its last checkpoint."""
    output_uri: str = "outputs"
    """Root for everything the pipeline writes (datasets it prepares, checkpoints, latents, samples).
    A local path (made absolute at load time), file:// or s3://bucket/prefix."""
    storage_path: str | None = None
    """Ray Train checkpoint root (local or s3://). None: `<output_uri>/checkpoints`."""
    seed: int = 0
    """Global seed: model init, data shuffling, noise."""

    @property
    def checkpoint_root(self) -> str:
        return self.storage_path or f"{self.output_uri.rstrip('/')}/checkpoints"


class RaySection(StrictConfig):
    address: str | None = None
    """Ray cluster to attach to ("auto" for one started with `ray start` on this machine, "host:6379",
    "ray://host:10001"). None: the RAY_ADDRESS variable when set (as under `ray job submit`), else a new
    local Ray for this process."""
    num_cpus: int | None = None
    """CPUs of a new local Ray (None: all of this machine's). Ignored when attaching to a cluster."""


class MlflowSection(StrictConfig):
    tracking_uri: str = "sqlite:///outputs/mlflow.db"
    """Tracking store. The MLFLOW_TRACKING_URI variable, when set, wins over this value. A relative
    sqlite path is made absolute at load time."""
    artifact_location: str | None = None
    """Artifact root for a newly created experiment (local path or s3://). None: `<output_uri>/mlartifacts`
    for local stores; the server's default for http(s) tracking servers."""
    experiment: str = "ldm-quickstart"
    """Experiment holding every run of the pipeline."""
    autoencoder_model_name: str = "ldm-autoencoder"
    """Registered-model name under which Stage A publishes the autoencoder."""
    unet_model_name: str = "ldm-unet"
    """Registered-model name under which Stage B publishes the U-Net."""


class ScalingSection(StrictConfig):
    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL and bf16 autocast; False: CPU workers on gloo."""
    cpus_per_worker: float = Field(default=0.5, gt=0)
    """CPUs each train worker reserves. Keep it fractional on small machines so Ray Data's read and decode
    tasks can still be scheduled next to the workers."""
    gpus_per_worker: float = Field(default=1.0, ge=0)
    """GPUs each worker reserves when use_gpu is true."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the workers. STRICT_SPREAD puts one worker per node."""

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res


class OptimSection(StrictConfig):
    lr: float = Field(default=4.5e-6, gt=0)
    """Peak learning rate (after warm-up), per step of the global batch."""
    betas: tuple[float, float] = (0.5, 0.9)
    """Adam betas."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW decoupled weight decay."""
    warmup_steps: int = Field(default=0, ge=0)
    """Linear learning-rate warm-up from 0 over this many optimiser steps."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm to this value; None disables clipping."""
    grad_accum_steps: int = Field(default=1, ge=1)
    """Micro-batches accumulated per optimiser step (DDP all-reduce only on the last one)."""


class TrainLoopSection(StrictConfig):
    max_steps: int = Field(default=1000, ge=1)
    """Optimiser steps to train for, in total across resumes."""
    log_every: int = Field(default=10, ge=1)
    """Log metrics to MLflow every this many steps (rank 0)."""
    image_every: int = Field(default=200, ge=1)
    """Log an image grid every this many steps (rank 0)."""
    checkpoint_every: int = Field(default=200, ge=1)
    """Report a checkpoint to Ray Train every this many steps (and always at the end)."""
    keep_checkpoints: int = Field(default=2, ge=1)
    """Checkpoints Ray Train keeps."""
    mixed_precision: Literal["no", "bf16"] = "bf16"
    """bf16 autocast for the forward pass on GPU (losses and norms stay fp32). Ignored on CPU."""
    ema_decay: float | None = Field(default=None, gt=0, lt=1)
    """Keep an exponential moving average of the weights with this decay; None: no EMA."""
    max_consecutive_nonfinite: int = Field(default=20, ge=1)
    """Steps with a NaN/inf loss are skipped; this many in a row stops the run (last good checkpoint kept)."""
    max_failures: int = Field(default=2, ge=0)
    """Ray Train FailureConfig: worker-group restarts (from the last checkpoint) before the run fails."""
    fail_at_step: int | None = None
    """TEST-ONLY fault hook: rank 1 (or 0 with one worker) kills its process once when it reaches this step."""

    @field_validator("fail_at_step")
    @classmethod
    def _positive(cls, v):
        if v is not None and v < 1:
            raise ValueError("must be >= 1")
        return v

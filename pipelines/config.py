"""The pipeline config: one YAML file, validated into typed sections, plus `--set a.b=c` overrides.

    cfg = load_config("configs/quickstart.yaml", ["stage_a.train.max_steps=20"])

Precedence is explicit and single: YAML file, then each `--set` in order. Unknown keys, wrong types and
bad values fail before anything runs, with the dotted path of every offending field.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, model_validator

from ldm_core.autoencoder import AutoencoderConfig
from ldm_core.config import ConfigError, StrictConfig, format_validation_error
from ldm_core.diffusion import DiffusionConfig
from ldm_core.discriminator import DiscriminatorConfig
from ldm_core.losses import AutoencoderLossConfig
from ldm_core.perceptual import LPIPSConfig
from ldm_core.unet import UNetConfig
from pipelines.data.config import DataConfig
from pipelines.digits import DigitClassifierConfig
from pipelines.settings import (
    MlflowSection,
    OptimSection,
    RaySection,
    RunSection,
    ScalingSection,
    TrainLoopSection,
)
from pipelines.storage import StorageConfig
from pipelines.text_encoders import TextEncoderConfig


class StageAOptim(OptimSection):
    disc_lr: float | None = Field(default=None, gt=0)
    """Discriminator learning rate; None: same as `lr`."""


class StageAEval(StrictConfig):
    scale_batches: int = Field(default=8, ge=1)
    """Batches (per worker) of sampled latents used to measure the latent scale factor 1/std."""
    max_batches: int = Field(default=8, ge=1)
    """Held-out batches (per worker) for the final PSNR / SSIM / LPIPS evaluation."""
    grid_images: int = Field(default=8, ge=1)
    """Images in each reconstruction grid (input row above reconstruction row)."""


class StageAConfig(StrictConfig):
    model: AutoencoderConfig = AutoencoderConfig()
    """The autoencoder (KL or deterministic)."""
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    """PatchGAN discriminator."""
    loss: AutoencoderLossConfig = AutoencoderLossConfig()
    """Reconstruction + LPIPS + KL + adversarial loss weights and the discriminator start step."""
    lpips: LPIPSConfig = LPIPSConfig()
    """LPIPS network and which backbone weights to use."""
    optim: StageAOptim = StageAOptim()
    """Optimisers (autoencoder and discriminator)."""
    train: TrainLoopSection = TrainLoopSection()
    """Loop length, logging, checkpointing, precision, fault handling."""
    scaling: ScalingSection = ScalingSection()
    """Ray Train workers and their resources."""
    eval: StageAEval = StageAEval()
    """Latent-scale measurement and held-out evaluation after training."""


class EncodeScaling(StrictConfig):
    num_actors: int = Field(default=1, ge=1)
    """Encoder actors in the Ray Data actor pool (each holds the autoencoder and the text encoder)."""
    use_gpu: bool = False
    """One GPU per actor (else CPU actors)."""
    cpus_per_actor: float = Field(default=1.0, gt=0)
    """CPUs each encoder actor reserves."""
    gpus_per_actor: float = Field(default=1.0, ge=0)
    """GPUs each encoder actor reserves when use_gpu is true."""


class EncodeConfig(StrictConfig):
    autoencoder_uri: str | None = None
    """MLflow model URI of the Stage A autoencoder (models:/name/version, runs:/id/autoencoder).
    None: the latest registered version of `mlflow.autoencoder_model_name`."""
    output_uri: str | None = None
    """Where the Parquet latents go (local or s3://). None: `<run.output_uri>/latents/<stage A run id>-<key>`, the
    key a hash of the dataset digest, the text encoder and the resolution (so each combination gets its own folder)."""
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    """Text encoder whose hidden states condition the U-Net."""
    batch_size: int = Field(default=64, ge=1)
    """Images per encoder call."""
    rows_per_shard: int = Field(default=2048, ge=1)
    """Rows per Parquet file (each write task packs this many rows before writing; its last file may hold fewer)."""
    scaling: EncodeScaling = EncodeScaling()
    """The actor pool."""
    fail_after_rows: int | None = Field(default=None, ge=1)
    """TEST-ONLY fault hook: a writer raises after writing this many rows (an interrupted encode: no manifest)."""


class StageBOptim(OptimSection):
    lr: float = Field(default=1e-4, gt=0)
    """Peak learning rate (after warm-up)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """Adam betas."""


class StageBTrainLoop(TrainLoopSection):
    ema_decay: float | None = Field(default=0.999, gt=0, lt=1)
    """Keep an exponential moving average of the U-Net weights with this decay (sampled from and published); None: no EMA."""
    image_every: int = Field(default=500, ge=1)
    """Every this many steps rank 0 logs a grid of samples for `sample.prompts` (EMA weights, DDIM, `sample.guidance`)."""


class StageBConfig(StrictConfig):
    unet: UNetConfig = UNetConfig()
    """The text-conditioned U-Net; `context_dim` must equal the text encoder's hidden size."""
    diffusion: DiffusionConfig = DiffusionConfig()
    """Noise schedule and prediction target."""
    latents_uri: str | None = None
    """Parquet latents written by the encode step. None: the output of the latest encode run."""
    batch_size: int = Field(default=64, ge=1)
    """Latents per worker per step."""
    shuffle_buffer: int = Field(default=1024, ge=0)
    """Ray Data local shuffle buffer (rows)."""
    cond_drop_prob: float = Field(default=0.1, ge=0, le=1)
    """Probability of replacing a caption by the empty prompt (classifier-free guidance training)."""
    optim: StageBOptim = StageBOptim()
    """Optimiser."""
    train: StageBTrainLoop = StageBTrainLoop()
    """Loop length, logging, sample grids, checkpointing, precision, EMA, fault handling."""
    scaling: ScalingSection = ScalingSection()
    """Ray Train workers and their resources."""
    sample_steps: int = Field(default=25, ge=1)
    """DDIM steps for the in-training sample grids."""
    sample_columns: int = Field(default=4, ge=1)
    """Samples per prompt in each in-training grid (the same seeded noise every time, so grids are comparable)."""
    eval_batches: int = Field(default=4, ge=0)
    """Held-out batches (per worker) for the final held-out loss at fixed timesteps and noise (0: skip)."""


class SampleConfig(StrictConfig):
    unet_uri: str | None = None
    """MLflow model URI of the Stage B U-Net. None: the model of the latest finished stage_b run."""
    prompts: list[str] = ["a handwritten digit zero", "a handwritten digit seven"]
    """Prompts rendered by `pipelines/sample.py` and by the pipeline's sample stage."""
    num_per_prompt: int = Field(default=4, ge=1)
    """Images per prompt."""
    steps: int = Field(default=50, ge=1)
    """Sampler steps."""
    guidance: float = Field(default=4.0, ge=0)
    """Classifier-free guidance scale s in eps_u + s * (eps_c - eps_u); 1 = no guidance."""
    eta: float = Field(default=0.0, ge=0)
    """DDIM eta (0: deterministic DDIM, 1: DDPM-like ancestral noise)."""
    sampler: Literal["ddim", "ddpm"] = "ddim"
    """Sampling algorithm."""
    seed: int = 0
    """Seed of the initial noise: the same seed gives the same images."""
    use_ema: bool = True
    """Use the EMA weights when the model has them."""
    out_dir: str | None = None
    """Where PNGs and the grid go. None: `<run.output_uri>/samples/<stage B run id>`."""
    evaluate_digits: bool = False
    """Score prompt adherence with a digit classifier trained on real MNIST (for the MNIST prompts)."""
    digit_classifier: DigitClassifierConfig = DigitClassifierConfig()
    """The MNIST judge used when `evaluate_digits` is on (cached under `<run.output_uri>/cache/digit_classifier`)."""
    batch_size: int = Field(default=64, ge=1)
    """Samples per sampler call (the U-Net sees twice as many with guidance)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to sample: "auto" picks CUDA when visible, else the CPU."""
    mixed_precision: Literal["no", "bf16"] = "bf16"
    """bf16 autocast of the U-Net on CUDA. Ignored on CPU."""


class PipelineConfig(StrictConfig):
    run: RunSection = RunSection()
    """Run name, output root, seed."""
    storage: StorageConfig = StorageConfig()
    """Object-storage endpoint settings (credentials come from the standard AWS sources, never from here)."""
    mlflow: MlflowSection = MlflowSection()
    """Tracking store, experiment and registered-model names."""
    ray: RaySection = RaySection()
    """Which Ray cluster to use."""
    data: DataConfig
    """The sharded image dataset and how it is streamed."""
    stage_a: StageAConfig = StageAConfig()
    """Stage A: autoencoder training."""
    encode: EncodeConfig = EncodeConfig()
    """Pre-encoding images and captions to Parquet latents."""
    stage_b: StageBConfig = StageBConfig()
    """Stage B: latent diffusion U-Net training."""
    sample: SampleConfig = SampleConfig()
    """Sampling prompts to images."""

    @model_validator(mode="after")
    def _absolute_local_paths(self):
        # Ray Train wants absolute storage paths, and a relative path means something else on every node.
        self.run.output_uri = _absolute(self.run.output_uri)
        if self.run.storage_path is not None:
            self.run.storage_path = _absolute(self.run.storage_path)
        self.data.uri = _absolute(self.data.uri)
        for section, name in ((self.encode, "output_uri"), (self.stage_b, "latents_uri"), (self.sample, "out_dir")):
            if getattr(section, name) is not None:
                setattr(section, name, _absolute(getattr(section, name)))
        if self.mlflow.tracking_uri.startswith("sqlite:///") and not self.mlflow.tracking_uri.startswith("sqlite:////"):
            rel = self.mlflow.tracking_uri[len("sqlite:///"):]
            self.mlflow.tracking_uri = "sqlite:///" + str(Path(rel).resolve())
        return self


def _absolute(uri: str) -> str:
    if "://" in uri and not uri.startswith("file://"):
        return uri
    return str(Path(uri.removeprefix("file://")).expanduser().resolve())


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    node = tree
    for i, key in enumerate(keys[:-1]):
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {dotted}: '{'.'.join(keys[: i + 1])}' is a value, not a section")
        node = child
    node[keys[-1]] = value


def parse_override(item: str) -> tuple[str, Any]:
    """`a.b=c` -> ("a.b", parsed c); the value is read as YAML, so numbers, bools, lists and null work."""
    if "=" not in item:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. stage_a.train.max_steps=20")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"--set {item!r}: bad key {key!r}")
    return key, yaml.safe_load(raw) if raw.strip() else ""


def load_config_dict(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if not isinstance(tree, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides or []:
        key, value = parse_override(item)
        _set_dotted(tree, key, value)
    return tree


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and validate a pipeline config; raises ConfigError naming every bad field."""
    tree = load_config_dict(path, overrides)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as e:
        where = f"{path}" if path else "config"
        raise ConfigError(f"invalid config ({where}):\n{format_validation_error(e)}") from None


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--config", default="configs/quickstart.yaml", help="pipeline YAML (default: %(default)s)")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="override one config value by its dotted path, e.g. --set stage_a.train.max_steps=20 (repeatable)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, args.overrides)


def parse_cli(argv: list[str] | None, parser: argparse.ArgumentParser) -> tuple[PipelineConfig, argparse.Namespace]:
    """Every entry point's front: `--config` and `--set` added to `parser`, parsed and validated. A bad config
    exits with one "error: ..." message naming the field, before anything starts."""
    args = add_config_args(parser).parse_args(argv)
    try:
        return config_from_args(args), args
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None

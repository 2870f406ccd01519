"""The pipeline config: one YAML file, validated into typed sections, plus `--set a.b=c` overrides.

    cfg = load_config("configs/quickstart.yaml", ["stage_a.train.max_steps=20"])

Precedence is explicit and single: YAML file, then each `--set` in order. Unknown keys, wrong types and
bad values fail before anything runs, with the dotted path of every offending field.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import yaml
from pydantic import AfterValidator, Field, ValidationError, model_validator

from ldm_core.config import ConfigError, StrictConfig, format_validation_error
from ldm_core.model_configs import (AutoencoderConfig, AutoencoderLossConfig, DiffusionConfig, DiscriminatorConfig,
                                    LPIPSConfig, UNetConfig)
from pipelines.config.data import DataConfig
from pipelines.config.prompts import judged_prompts
from pipelines.config.sections import (
    DigitClassifierConfig,
    MlflowSection,
    OptimSection,
    RaySection,
    RunSection,
    ScalingSection,
    StorageConfig,
    TextEncoderConfig,
    TrainLoopSection,
    absolute_sqlite_uri,
    check_uri,
)


class StageAOptim(OptimSection):
    disc_lr: float | None = Field(default=None, gt=0)
    """Discriminator learning rate; None: same as `lr`."""
    grad_clip: float | None = Field(default=1.0, gt=0)
    """Clip the global gradient norm of the autoencoder (and of the discriminator) to this value; None: no
    clipping, as in the reference (taming-transformers, LDM). Stage A's loss is summed over the C*H*W pixels
    (LDM's convention, which keeps kl_weight=1e-6 in balance), so its gradient norm is in the thousands: on
    the quickstart train/grad_norm (logged before clipping) was 0.8e4 to 1.5e4 on every logged step
    (2026-11-25). A clip at 1.0 therefore acts on every step and turns each update into a normalised-gradient
    step before Adam: Adam ignores a constant gradient scale, but a per-step 1/||g|| reweights the steps in
    its moment estimates (large-gradient steps, e.g. early ones and GAN steps, count less). Kept on because
    it measured better: the quickstart's held-out PSNR / SSIM was 22.68 dB / 0.783 with the clip and
    18.69 dB / 0.727 without it (one run each, seed 0, 2026-11-25, each resumed once from its step-100
    checkpoint after a Ray OOM kill on a loaded box; without the clip the GAN phase drove the total loss
    to -743 at step 200)."""


class StageAEval(StrictConfig):
    scale_batches: int = Field(default=8, ge=1)
    """Batches (per worker) of sampled latents used to measure the latent scale factor 1/std."""
    max_batches: int = Field(default=8, ge=1)
    """Held-out batches (per worker) for each PSNR / SSIM / LPIPS evaluation (the final one and the periodic ones)."""
    every: int = Field(default=0, ge=0)
    """Also evaluate every this many steps during training (same metrics, same held-out batches, the weights
    that would be published: EMA when on), logged at that step, so that MLflow draws held-out PSNR / SSIM as
    a curve. Each costs `max_batches` held-out forward passes per worker. 0: only after training."""
    grid_images: int = Field(default=8, ge=1)
    """Images in each reconstruction grid (input row above reconstruction row)."""


class StageAConfig(StrictConfig):
    model: AutoencoderConfig = AutoencoderConfig()
    """The autoencoder (KL or deterministic). With `init_from`, the imported architecture replaces it (only
    `dropout` and `gradient_checkpointing` are kept)."""
    init_from: str | None = None
    """Start from these autoencoder weights instead of random ones (see pipelines/models/interop.py): a diffusers
    folder (a pipeline's `vae/` or an AutoencoderKL), an SD single-file checkpoint (.safetensors; .ckpt only
    via torch.load(weights_only=True)) or one of our published models; a local path, s3:// or an MLflow
    URI (runs:/, models:/). None: train from scratch."""
    train_decoder_only: bool = False
    """Freeze the encoder and quant_conv and train only the decoder (SD's ft-MSE recipe), so latents already
    encoded with the `init_from` autoencoder stay valid. Needs `init_from`."""
    remeasure_scale_factor: bool = False
    """With `init_from`: measure the latent scale factor 1/std on this data (as a fresh autoencoder does)
    instead of keeping the imported one (SD 1.x: 0.18215). Ignored without `init_from`."""
    discriminator: DiscriminatorConfig = DiscriminatorConfig()
    """PatchGAN discriminator."""
    loss: AutoencoderLossConfig = AutoencoderLossConfig()
    """Reconstruction + LPIPS + KL + adversarial loss weights and the discriminator start step."""
    lpips: LPIPSConfig = LPIPSConfig()
    """LPIPS network and which backbone weights to use."""
    perceptual_weight_if_random: float | None = Field(default=None, ge=0)
    """The perceptual loss weight when the LPIPS backbone turns out random (`lpips.backbone` auto without cached
    torchvision weights, or random): an untrained backbone's distance is not perceptual, and on the photos it
    slowed learning (benchmarks/README.md, photo recipes). The LPIPS metric is still logged, marked by the
    run's `lpips_backbone` tag; the weight used is the run's `perceptual_weight_used` tag. None:
    `loss.perceptual_weight` whatever the backbone."""
    optim: StageAOptim = StageAOptim()
    """Optimisers (autoencoder and discriminator)."""
    train: TrainLoopSection = TrainLoopSection()
    """Loop length, logging, checkpointing, precision, fault handling."""
    scaling: ScalingSection = ScalingSection()
    """Ray Train workers and their resources."""
    eval: StageAEval = StageAEval()
    """Latent-scale measurement and held-out evaluation after training."""

    @model_validator(mode="after")
    def _decoder_only_needs_weights(self):
        if self.train_decoder_only and not self.init_from:
            raise ValueError("train_decoder_only needs init_from (a frozen random encoder makes meaningless latents)")
        return self


def _alias_not_reserved(alias: str) -> str:
    if alias.lower() == "latest" or re.fullmatch(r"v\d+", alias):
        raise ValueError(f"{alias!r} is not an alias MLflow accepts (reserved: 'latest' and versions like 'v3')")
    return alias


ModelAlias = Annotated[str, Field(pattern=r"^[A-Za-z0-9_-]{1,255}$"), AfterValidator(_alias_not_reserved)]
"""A registered-model alias MLflow accepts: letters, digits, _ and -; not "latest" nor a version ("v3")."""


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
    None: `autoencoder_alias` when set, else the latest registered version of `mlflow.autoencoder_model_name`.
    (`pipelines/run.py` sets it to the exact version its Stage A produced.)"""
    autoencoder_alias: ModelAlias | None = None
    """Registered-model alias to load when `autoencoder_uri` is not set, e.g. "champion" for
    models:/<mlflow.autoencoder_model_name>-promoted@champion (aliases live on the promoted model, which only the
    promoter writes: pipelines/models/provenance.py): only a version someone promoted is used, never merely the newest
    one anybody registered. It is resolved once, at start, to the version it points to; that version is loaded and
    recorded (tags `autoencoder_uri`, `autoencoder_alias`). A missing alias is an error. None: the latest version."""
    output_uri: str | None = None
    """Where the Parquet latents go (local or s3://). None: `<run.output_uri>/latents/<stage A run id>-<key>`, the
    key a hash of the dataset digest, the text encoder and the resolution (so each combination gets its own folder)."""
    text_encoder: TextEncoderConfig = TextEncoderConfig()
    """Text encoder whose hidden states condition the U-Net."""
    batch_size: int = Field(default=64, ge=1)
    """Images per encoder call."""
    latent_normalization: Literal["scalar", "per_channel"] = "scalar"
    """How the latents are normalised for Stage B (which reads it from the latents' manifest, never from here):
    "scalar", Stable Diffusion's scale_factor * z (LDM Sec. 4.3.2), or "per_channel", (z - mean_c) / std_c with the
    per-channel statistics Stage A measured (diffusers' `latents_mean` / `latents_std`, SDXL-era VAEs), so that a
    channel with a small std is not left nearly silent. per_channel needs an autoencoder with measured statistics."""
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
    """Every this many steps rank 0 logs a grid of samples for `sample.prompts` (EMA weights, DDIM, `sample.guidance`,
    `sample.guidance_rescale`)."""


class StageBPromptEval(StrictConfig):
    """Prompt accuracy of the MNIST digit judge (`pipelines/models/judge.py`), measured on the published U-Net (EMA
    weights) right after training and logged in the Stage B run itself (`eval/prompt_accuracy`, per digit
    `eval/prompt_accuracy_<d>`; for two-digit number prompts the number metrics of `judge.number_adherence`), at this
    fixed sampler budget: DDIM, eta 0, trailing steps, `sample.prompts`,
    the judge of `sample.digit_classifier`. A held-out number that moves with the training options, so runs
    compare in MLflow whatever the sample stage is set to."""

    enabled: bool | None = None
    """None: on when every one of `sample.prompts` names a digit (the quickstart's MNIST prompts) or every one a
    two-digit number (configs/numbers.yaml); true: always (then the prompts must be such); false: never."""
    num_per_prompt: int = Field(default=10, ge=1)
    """Samples per prompt."""
    steps: int = Field(default=25, ge=1)
    """DDIM steps."""
    guidance: float = Field(default=4.0, ge=0)
    """Classifier-free guidance scale."""
    guidance_rescale: float = Field(default=0.0, ge=0, le=1)
    """Guidance rescale phi (Lin et al. 2024, Sec. 3.4; `sample.guidance_rescale`); 0: off."""
    seed: int = 0
    """Seed of the initial noise (the same noise for every run, so runs differ only by their U-Net)."""

    def active(self, prompts: list[str]) -> bool:
        """Whether to measure for these prompts (see `enabled`)."""
        return judged_prompts(prompts) is not None if self.enabled is None else self.enabled


LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out", "ff.proj", "ff.out", "proj_in", "proj_out", "conv1", "conv2")
"""Module names a LoRA adapter may wrap (each matches that module in every block of `ldm_core.unet.UNet`): the
attention projections (self- and cross-attention), the GEGLU feed-forward's two linears, the transformers' input
and output projections, and the ResBlocks' 3x3 convs."""


class LoraSection(StrictConfig):
    """Low-rank adapters (Hu et al. 2021): each targeted weight W becomes W + (alpha / rank) B A with A (rank x in)
    and B (out x rank, zero at the start) trained and W frozen. Made with `peft` (`pipelines/models/lora.py`)."""

    rank: int = Field(default=8, ge=1)
    """r, the inner width of B A."""
    alpha: float | None = Field(default=None, gt=0)
    """The update is scaled by alpha / rank. None: alpha = rank (scale 1, diffusers' default)."""
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    """Dropout on the adapter's input (training only)."""
    target_modules: list[Literal[LORA_TARGETS]] = Field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out"])  # type: ignore[valid-type]
    """Which modules get adapters (`LORA_TARGETS`); default the attention projections q, k, v and out, as
    diffusers' train_text_to_image_lora.py. Feed-forward ("ff.proj", "ff.out") and convs ("conv1", "conv2") are
    opt-in."""
    base_precision: Literal["bf16", "fp32"] = "bf16"
    """dtype of the frozen base weights on GPUs (bf16 halves them; it needs `train.mixed_precision: bf16`). On the
    CPU the base stays in fp32."""

    @property
    def scaling(self) -> float:
        """alpha / rank, the factor of B A."""
        return (self.alpha or self.rank) / self.rank

    @model_validator(mode="after")
    def _some_targets(self):
        if not self.target_modules or len(set(self.target_modules)) != len(self.target_modules):
            raise ValueError(f"target_modules: name at least one module, each once (got {self.target_modules})")
        return self


class StageBConfig(StrictConfig):
    unet: UNetConfig = UNetConfig()
    """The text-conditioned U-Net; `context_dim` must equal the text encoder's hidden size. With `init_from`,
    the imported architecture replaces it (only `dropout` and `gradient_checkpointing` are kept)."""
    init_from: str | None = None
    """Start from these U-Net weights instead of random ones (see pipelines/models/interop.py): a diffusers folder
    (a pipeline's `unet/` or a UNet2DConditionModel), an SD single-file checkpoint or one of our U-Net
    bundles (its EMA weights); a local path, s3:// or an MLflow URI. None: train from scratch."""
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
    prompt_eval: StageBPromptEval = StageBPromptEval()
    """The MNIST judge's prompt accuracy at a fixed sampler budget, logged in the Stage B run."""
    lora: LoraSection | None = None
    """Fine-tune `init_from` with LoRA adapters instead of all its weights: only the adapters train (the optimiser,
    DDP and EMA see only them), checkpoints hold the adapters and a reference to the base (URI + digest), and the
    result is published as `mlflow.lora_model_name`. None: train every weight."""

    @model_validator(mode="after")
    def _lora_needs_a_base(self):
        if self.lora is None:
            return self
        if not self.init_from:
            raise ValueError("lora: needs stage_b.init_from (the base model whose weights the adapters modify)")
        if self.scaling.use_gpu and self.lora.base_precision == "bf16" and self.train.mixed_precision != "bf16":
            raise ValueError("lora.base_precision=bf16 on GPUs needs train.mixed_precision=bf16 (set lora.base_precision=fp32 "
                             "to train without autocast)")
        return self


class SampleConfig(StrictConfig):
    unet_uri: str | None = None
    """MLflow model URI of the Stage B U-Net. None: `unet_alias` when set, else the model of the latest finished
    stage_b run. (`pipelines/run.py` sets it to the exact version its Stage B produced.)"""
    unet_alias: ModelAlias | None = None
    """Registered-model alias to load when `unet_uri` is not set, e.g. "champion" for
    models:/<mlflow.unet_model_name>-promoted@champion (pipelines/models/provenance.py), resolved once to its version, which
    is loaded and recorded (tags `unet_uri`, `unet_alias`, and samples.json). A missing alias is an error. None: the latest finished stage_b run."""
    lora_uri: str | None = None
    """MLflow URI of LoRA adapters (models:/<mlflow.lora_model_name>/<version>): sample from their base (the one they
    record, checked by its weights digest) with the adapters folded in at `lora_scale`. Then `unet_uri`, when set, must
    be that base."""
    lora_scale: float = Field(default=1.0, ge=0)
    """Strength of the adapters: W + lora_scale (alpha / r) B A (0: the base alone, 1: as trained)."""
    prompts: list[str] = ["a handwritten digit zero", "a handwritten digit seven"]
    """Prompts rendered by `pipelines/sample.py` and by the pipeline's sample stage."""
    num_per_prompt: int = Field(default=4, ge=1)
    """Images per prompt."""
    steps: int = Field(default=50, ge=1)
    """Sampler steps."""
    guidance: float = Field(default=4.0, ge=0, le=100)
    """Classifier-free guidance scale s in eps_u + s * (eps_c - eps_u); 1 = no guidance. At most 100 (usual values
    are 1 to 15; far larger ones only saturate the image, and 1e30 overflows)."""
    guidance_rescale: float = Field(default=0.0, ge=0, le=1)
    """Guidance rescale phi (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    Sec. 3.4; diffusers' `guidance_rescale`): the guided prediction x_cfg is rescaled to the conditional one's std,
    x = phi * x_cfg * std(x_cond) / std(x_cfg) + (1 - phi) * x_cfg, per sample. Zero-terminal-SNR models need it
    against over-exposure at high guidance; the paper uses 0.7. 0: off (plain guidance). Also used by the Stage B
    sample grids, and recorded in a diffusers export's model_index.json (`_call_defaults`)."""
    eta: float | None = Field(default=None, ge=0)
    """Fresh noise per step in DDIM's terms (Song et al. 2021, eq. 16): 0 deterministic DDIM, 1 DDPM-like ancestral
    noise. None: the sampler's own (ddim: 0; ddpm is ancestral, eta 1 by construction, and takes no other)."""
    sampler: Literal["ddim", "ddpm"] = "ddim"
    """Sampling algorithm."""
    timestep_spacing: Literal["trailing", "leading", "linspace"] = "trailing"
    """Which `steps` of the T timesteps the sampler visits, exactly as diffusers' DDIMScheduler (`ldm_core.sampling`
    docstring; Lin et al. 2024, Table 2). "trailing" and "linspace" start at t = T-1, which a zero-terminal-SNR model
    needs; Stable Diffusion's DDIM uses "leading" with steps_offset=1 and set_alpha_to_one=false."""
    steps_offset: int = Field(default=0, ge=0)
    """Added to every visited timestep of "leading" spacing (Stable Diffusion: 1); ignored by "trailing" and
    "linspace", as in diffusers."""
    set_alpha_to_one: bool = True
    """After the last visited timestep step to alpha_bar = 1, the clean sample (true), or to alpha_bar_0
    (false, Stable Diffusion's setting)."""
    height: int | None = Field(default=None, ge=1)
    """Height of the images in pixels, a multiple of the autoencoder's downsampling factor. None: the height the U-Net
    was trained on (its latent shape). The U-Net is convolutional: other shapes work, as far as it generalises."""
    width: int | None = Field(default=None, ge=1)
    """Width of the images in pixels, as `height`. None: the width the U-Net was trained on."""
    seed: int = 0
    """Seed of the initial noise: the same seed gives the same images."""
    use_ema: bool = True
    """Use the EMA weights when the model has them."""
    out_dir: str | None = None
    """Where PNGs and the grid go. None: `<run.output_uri>/samples/<stage B run id>-<key>`, the key a hash of the
    prompts and these settings (a folder per request: another request never overwrites this one's files)."""
    evaluate_digits: bool = False
    """Score prompt adherence with a digit classifier trained on real MNIST: one digit per image for digit prompts
    ("a handwritten digit seven"), one per half for two-digit numbers ("the number 42", both must be right;
    `judge.number_adherence` logs seen- and held-out-number accuracy)."""
    forgetting_prompts: list[str] = []
    """With `evaluate_digits`: prompts the base model already knew (e.g. the quickstart's "a handwritten digit
    seven"), also rendered and judged, logged as `eval/old_prompt_accuracy`, so a fine-tune's forgetting shows."""
    ink_reference: str | None = None
    """With `evaluate_digits`: a bundled data source (e.g. "mnist_bold") whose mean stroke ink fraction the samples'
    (`eval/ink_fraction`) is compared to (`eval/ink_fraction_reference`, `eval/ink_fraction_gap`). None: not compared."""
    digit_classifier: DigitClassifierConfig = DigitClassifierConfig()
    """The MNIST judge used when `evaluate_digits` is on (cached under `<run.output_uri>/cache/digit_classifier`)."""
    batch_size: int = Field(default=64, ge=1)
    """Samples per sampler call (the U-Net sees twice as many with guidance)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where to sample: "auto" picks CUDA when visible, else the CPU."""
    mixed_precision: Literal["no", "bf16"] = "bf16"
    """bf16 autocast of the U-Net on CUDA. Ignored on CPU."""

    @model_validator(mode="after")
    def _ddpm_is_ancestral(self):
        if self.sampler == "ddpm" and self.eta not in (None, 1.0):
            raise ValueError(f"sample.eta={self.eta}: sampler=ddpm is ancestral (eta 1 by construction); "
                             f"use sampler=ddim for another eta, or leave eta unset")
        return self


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
    def _prompt_eval_needs_digit_prompts(self):
        prompts = self.sample.prompts
        if self.stage_b.prompt_eval.enabled and judged_prompts(prompts) is None:
            raise ValueError(f"stage_b.prompt_eval.enabled=true needs sample.prompts that each name a digit "
                             f"(e.g. 'a handwritten digit seven') or each a two-digit number ('the number 42'), "
                             f"got {self.sample.prompts}")
        steps, T = self.stage_b.prompt_eval.steps, self.stage_b.diffusion.num_timesteps
        if self.stage_b.prompt_eval.active(prompts) and steps > T:
            raise ValueError(f"stage_b.prompt_eval.steps={steps}: more than stage_b.diffusion.num_timesteps={T}")
        return self

    @model_validator(mode="after")
    def _absolute_local_paths(self):
        # Ray Train wants absolute storage paths, and a relative path means something else on every node.
        self.run.output_uri = _absolute(self.run.output_uri, "run.output_uri")
        if self.run.storage_path is not None:
            self.run.storage_path = _absolute(self.run.storage_path, "run.storage_path")
        self.data.uri = _absolute(self.data.uri, "data.uri")
        for section, name in (("encode", "output_uri"), ("stage_b", "latents_uri"), ("sample", "out_dir")):
            if getattr(getattr(self, section), name) is not None:
                setattr(getattr(self, section), name, _absolute(getattr(getattr(self, section), name), f"{section}.{name}"))
        for section in ("stage_a", "stage_b"):  # local weights only: runs:/, models:/ and s3:// stay as they are
            init_from = getattr(self, section).init_from
            if init_from and urlparse(init_from).scheme in ("", "file"):
                getattr(self, section).init_from = _absolute(init_from, f"{section}.init_from")
        self.mlflow.tracking_uri = absolute_sqlite_uri(self.mlflow.tracking_uri)
        return self


def _absolute(uri: str, field: str) -> str:
    check_uri(uri, field)  # ftp://... and other schemes nothing here can write: refused, not made a local folder
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
    try:
        return key, yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {item!r}: the value is not valid YAML: {_yaml_problem(e)}") from None


def _yaml_where(path: Path, e: yaml.YAMLError) -> str:
    """`file:line:column` of a YAML error (1-based), or just the file when PyYAML gives no position."""
    mark = getattr(e, "problem_mark", None)
    return f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)


def _yaml_problem(e: yaml.YAMLError) -> str:
    """PyYAML's description of the problem, on one line (its str() spans several, with a code excerpt)."""
    parts = [getattr(e, "context", None), getattr(e, "problem", None)]
    return ", ".join(p for p in parts if p) or str(e).splitlines()[0]


def load_config_dict(path: str | os.PathLike | None, overrides: list[str] | None = None) -> dict:
    tree: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{_yaml_where(path, e)}: not valid YAML: {_yaml_problem(e)}") from None
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

"""Rendering images from a published U-Net: load its bundle (and the autoencoder and text encoder of its
lineage), run a sampler with classifier-free guidance, decode; and score digit prompts with the MNIST judge.
Used by `pipelines/sample.py` and by Stage B's own prompt evaluation."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import math

import numpy as np
import torch
from PIL import Image

from ldm_core.autoencoder import denormalize_latents
from ldm_core.config import ConfigError
from ldm_core.diffusion import NoiseSchedule
from ldm_core.sampling import SAMPLERS, Condition, SamplingPlan, sampling_plan
from pipelines.config import PipelineConfig, SampleConfig
from pipelines.data.sources import open_source
from pipelines.data.text_encoders import load_text_encoder
from pipelines.config.prompts import judged_prompts
from pipelines.models.judge import ink_fraction, load_or_train_classifier, number_adherence, prompt_adherence
from pipelines.models.interop import import_unet
from pipelines.models.registry import UNetBundle, load_autoencoder, load_unet_bundle
from pipelines.platform import storage
from pipelines.platform.progress import Progress
from pipelines.platform.devices import autocast, pick_device

log = logging.getLogger("sample")


def sample_settings(sc: SampleConfig) -> dict:
    """The settings of a sample request besides its prompts and folder (what `samples.json` records, and what the
    default folder's key hashes)."""
    return sc.model_dump(mode="json", exclude={"prompts", "out_dir"})


def output_dir(cfg: PipelineConfig, bundle: UNetBundle, prompts: list[str]) -> str:
    """`sample.out_dir`, else `<run.output_uri>/samples/<stage B run id>-<key>`, the key a hash of the prompts and
    the sample settings: a folder per request, so that sampling other prompts (or other settings) of the same U-Net
    never overwrites the grid and `samples.json` an earlier request wrote there (the DAG's sample stage included);
    the same request again writes the same images to the same folder."""
    if cfg.sample.out_dir:
        return cfg.sample.out_dir
    request = {"prompts": list(prompts), "settings": sample_settings(cfg.sample)}
    key = hashlib.sha256(json.dumps(request, sort_keys=True).encode()).hexdigest()[:10]
    return f"{samples_parent(cfg)}/{bundle.stage_b_run_id}-{key}"


def samples_parent(cfg) -> str:
    """Where the default sample folders live, one per Stage B run sampled."""
    return f"{cfg.run.output_uri.rstrip('/')}/samples"




# ---------------------------------------------------------------------------------------------------
# Generation (pure: tensors in, tensors out)
# ---------------------------------------------------------------------------------------------------


def initial_noise(seed: int, num: int, latent_shape: tuple[int, ...]) -> torch.Tensor:
    """x_T for the `num` columns of the grid, (num, C, h, w), drawn on the CPU from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn((num, *latent_shape), generator=g, dtype=torch.float32)


def plan_for(sc: SampleConfig, schedule: NoiseSchedule) -> SamplingPlan:
    """The sampler's plan for `sc`'s steps and step settings on the U-Net's `schedule`; a zero-terminal-SNR model
    must start from pure noise at t = T-1."""
    T = schedule.num_timesteps
    if sc.steps > T:
        raise ConfigError(f"sample.steps={sc.steps}: more than the model's {T} diffusion timesteps")
    try:
        plan = sampling_plan(schedule, sc.steps, spacing=sc.timestep_spacing, steps_offset=sc.steps_offset,
                             set_alpha_to_one=sc.set_alpha_to_one, eta=sc.eta)
    except ValueError as e:
        raise ConfigError(f"sample.timestep_spacing/steps_offset: {e}") from None
    first = plan.timesteps[0]
    if schedule.config.zero_terminal_snr and first != T - 1:
        raise ConfigError(f"sample.timestep_spacing={sc.timestep_spacing!r} (steps_offset={sc.steps_offset}) starts at t={first}, "
                          f"but the model was trained with zero terminal SNR: sampling must start from pure noise at "
                          f"t={T - 1} (Lin et al. 2024, Sec. 3.3); use sample.timestep_spacing=trailing")
    return plan


def condition_for(sc: SampleConfig, context: torch.Tensor, context_mask: torch.Tensor | None, null_context: torch.Tensor,
                  null_mask: torch.Tensor | None) -> Condition:
    """The sampler's condition for prompt states context (P, L, D) / mask (P, L), with `sc`'s guidance settings."""
    return Condition(context, context_mask, null_context, null_mask, guidance_scale=sc.guidance,
                     guidance_rescale=sc.guidance_rescale)


@torch.no_grad()
def generate(
    unet: torch.nn.Module,
    autoencoder: torch.nn.Module,
    plan: SamplingPlan,
    condition: Condition,
    *,
    latent_shape: tuple[int, ...],
    scale_factor: float,
    num_per_prompt: int,
    seed: int,
    sampler: str = "ddim",
    batch_size: int = 64,
    mixed_precision: str = "no",
    progress: Progress | None = None,
    latents_mean: list[float] | None = None,
    latents_std: list[float] | None = None,
) -> torch.Tensor:
    """Images (P * N, C, H, W) in [-1, 1] for the P prompt conditions of `condition` (context (P, L, D)).

    Sample j of every prompt starts from the same x_T[j] (see `initial_noise`); the latents are divided
    by `scale_factor` (the one the U-Net was trained with, LDM Sec. 4.3.2), or with per-channel `latents_mean` /
    `latents_std` denormalised channel by channel (`ldm_core.autoencoder.denormalize_latents`), and decoded. Batches of `batch_size` samples (2x that through the
    U-Net with guidance); samplers that add noise (eta > 0, ddpm) draw it from a generator seeded with
    `seed + 1 + batch index`, so results do not depend on anything but the arguments. `plan` holds the schedule the
    U-Net was trained with (rebuilt from its diffusion config, zero-terminal-SNR rescaling included).
    """
    if sampler not in SAMPLERS:
        raise ConfigError(f"sample.sampler: unknown {sampler!r}; choose one of {sorted(SAMPLERS)}")
    device = condition.context.device
    p, n = condition.context.shape[0], num_per_prompt
    x_T = initial_noise(seed, n, latent_shape).repeat(p, 1, 1, 1)  # (N, C, h, w) -> (P * N, C, h, w)
    mask = condition.context_mask
    cond = dataclasses.replace(condition, context=condition.context.repeat_interleave(n, 0),  # (P, L, D) -> (P * N, L, D)
                               context_mask=None if mask is None else mask.repeat_interleave(n, 0))  # prompt-major
    out = []
    for b, i in enumerate(range(0, p * n, batch_size)):
        sl = slice(i, i + batch_size)
        g = torch.Generator().manual_seed(seed + 1 + b)
        with autocast(device, mixed_precision):
            z = SAMPLERS[sampler](unet, x_T[sl].to(device), plan, cond.rows(sl), generator=g)
        z = denormalize_latents(z.float(), scale_factor, latents_mean, latents_std)
        out.append(autoencoder.decode(z).float().clamp(-1, 1).cpu())
        if progress is not None:
            progress.update(min(i + batch_size, p * n))
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------------------------------


def sample_latent_shape(sc: SampleConfig, trained: tuple[int, int, int], f: int) -> tuple[int, int, int]:
    """The latent shape (c, h, w) to sample: `sc.height` / `sc.width` divided by the autoencoder's factor f, each
    defaulting to the U-Net's `trained` latent shape. A side that is not a multiple of f is refused, naming it."""
    channels, h, w = trained
    for name, value in (("height", sc.height), ("width", sc.width)):
        if value is not None and value % f:
            raise ConfigError(f"sample.{name}={value} (--{name}): not a multiple of the autoencoder's downsampling "
                              f"factor f={f}")
    return (channels, (sc.height or h * f) // f, (sc.width or w * f) // f)


@dataclasses.dataclass
class Renderer:
    """A published U-Net with the autoencoder and text encoder of its lineage, loaded once (`Renderer.load`) and
    rendering any number of prompt sets and `SampleConfig` settings (shapes, steps, guidance) after."""

    model_uri: str
    bundle: UNetBundle
    unet: torch.nn.Module
    autoencoder: torch.nn.Module
    text_encoder: object
    device: torch.device

    @classmethod
    def load(cls, cfg: PipelineConfig, model_uri: str) -> "Renderer":
        sc = cfg.sample
        device = pick_device(sc.device)
        bundle = load_unet_bundle(model_uri, use_ema=sc.use_ema, lora_scale=sc.lora_scale, load_base=import_unet)
        try:  # fail before sampling, not after
            storage.check_writable(storage.resolve(cfg.sample.out_dir or samples_parent(cfg), cfg.storage))
        except (OSError, ValueError) as e:
            raise ConfigError(f"sample.out_dir: {e}") from None
        plan_for(sc, bundle.schedule)  # fail before loading the rest
        autoencoder = load_autoencoder(bundle.autoencoder_uri).to(device)
        if bundle.latents_mean is None and not math.isclose(float(autoencoder.scale_factor), bundle.scale_factor, rel_tol=1e-5):
            log.warning("autoencoder %s has scale_factor %.6g but the U-Net was trained on latents scaled by %.6g: using the U-Net's",
                        bundle.autoencoder_uri, float(autoencoder.scale_factor), bundle.scale_factor)
        text_encoder = load_text_encoder(bundle.text_encoder, device)
        if text_encoder.hidden_size != bundle.hidden_size:
            raise ConfigError(f"text encoder {bundle.text_encoder.name_or_path!r} has hidden size {text_encoder.hidden_size}, "
                              f"but the U-Net {model_uri} was trained on {bundle.hidden_size}")
        return cls(model_uri, bundle, bundle.unet.to(device).eval(), autoencoder, text_encoder, device)

    @property
    def downsample_factor(self) -> int:
        return self.autoencoder.downsample_factor

    def __call__(self, sc: SampleConfig, prompts: list[str], progress: Progress | None = None) -> torch.Tensor:
        """Images (P * N, C, H, W) in [-1, 1] for `prompts` at `sc`'s settings (its shape, steps, guidance, seed)."""
        bundle = self.bundle
        plan = plan_for(sc, bundle.schedule.to(self.device))
        latent_shape = sample_latent_shape(sc, tuple(bundle.latent_shape), self.downsample_factor)
        context, mask = self.text_encoder.encode(prompts)
        log.info("sampling %d x %d images of %dx%d with %s (autoencoder %s, text encoder %s) on %s", len(prompts),
                 sc.num_per_prompt, latent_shape[1] * self.downsample_factor, latent_shape[2] * self.downsample_factor,
                 self.model_uri, bundle.autoencoder_uri, bundle.text_encoder.name_or_path, self.device)
        condition = condition_for(sc, context.to(self.device), mask.to(self.device), bundle.null_context.to(self.device),
                                  bundle.null_mask.to(self.device))
        return generate(
            self.unet, self.autoencoder, plan, condition, latent_shape=latent_shape, scale_factor=bundle.scale_factor,
            num_per_prompt=sc.num_per_prompt, seed=sc.seed, sampler=sc.sampler, batch_size=sc.batch_size,
            mixed_precision=sc.mixed_precision, progress=progress, latents_mean=bundle.latents_mean,
            latents_std=bundle.latents_std,
        )


def render(cfg: PipelineConfig, prompts: list[str], model_uri: str,
           progress: Progress | None = None) -> tuple[torch.Tensor, Renderer]:
    """Images (P * N, C, H, W) in [-1, 1] for `prompts` with the U-Net at `model_uri` and `cfg.sample`'s settings,
    decoded by the autoencoder of its lineage; and the loaded `Renderer` (its `.bundle`: the U-Net's bundle), to
    render more with. `progress` counts the images done."""
    renderer = Renderer.load(cfg, model_uri)
    return renderer(cfg.sample, prompts, progress), renderer


def score_digits(cfg: PipelineConfig, images: torch.Tensor, prompts: list[str]) -> dict[str, float]:
    """The MNIST judge's prompt adherence for `render`'s images (`cfg.sample.num_per_prompt` per prompt): one digit per
    image for digit prompts, one per half for two-digit numbers ("the number 42", `judge.number_adherence`)."""
    sc = cfg.sample
    clf = load_or_train_classifier(sc.digit_classifier, cache_uri=f"{cfg.run.output_uri.rstrip('/')}/cache/digit_classifier",
                                   storage_cfg=cfg.storage)
    per_sample = [p for p in prompts for _ in range(sc.num_per_prompt)]
    if judged_prompts(prompts) == "numbers":  # "the number 42": a digit in each half
        metrics = number_adherence(images, per_sample, clf)
        log.info("number adherence %.4f: seen numbers %s, held-out numbers %s (classifier held-out accuracy %.4f)",
                 metrics["eval/prompt_accuracy"], metrics.get("eval/number_accuracy_seen", "n/a"),
                 metrics.get("eval/number_accuracy_held_out", "n/a"), metrics["eval/classifier_holdout_accuracy"])
        return metrics
    metrics = prompt_adherence(images, per_sample, clf)
    metrics["eval/ink_fraction"] = float(ink_fraction(images).mean())
    if sc.ink_reference:
        metrics["eval/ink_fraction_reference"] = reference_ink_fraction(sc.ink_reference, cfg.data.resolution)
        metrics["eval/ink_fraction_gap"] = metrics["eval/ink_fraction"] - metrics["eval/ink_fraction_reference"]
    log.info("prompt adherence %.4f (classifier held-out accuracy %.4f), ink fraction %.4f",
             metrics["eval/prompt_accuracy"], metrics["eval/classifier_holdout_accuracy"], metrics["eval/ink_fraction"])
    return metrics


def reference_ink_fraction(source: str, resolution: int) -> float:
    """The mean stroke ink fraction (`judge.ink_fraction`) of a bundled data source's images at `resolution`."""
    images = [torch.from_numpy(np.asarray(Image.open(io.BytesIO(s.data)).convert("L"), dtype=np.float32))
              for s in open_source(source, resolution=resolution)]
    return float(ink_fraction(torch.stack(images)[:, None] / 127.5 - 1).mean())


def forgetting_metrics(cfg: PipelineConfig, model_uri: str) -> dict[str, float]:
    """The judge's prompt accuracy on `sample.forgetting_prompts` (what the base model already knew), as
    `eval/old_prompt_accuracy`: a fine-tune that keeps it has not forgotten."""
    prompts = cfg.sample.forgetting_prompts
    images, _ = render(cfg, prompts, model_uri)
    old = score_digits(cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"ink_reference": None})}), images, prompts)
    return {"eval/old_prompt_accuracy": old["eval/prompt_accuracy"], "eval/old_ink_fraction": old["eval/ink_fraction"]}


def digit_prompt_accuracy(cfg: PipelineConfig, model_uri: str) -> dict[str, float]:
    """Stage B's own quality number: the MNIST judge's prompt accuracy for `sample.prompts` rendered by the U-Net
    at `model_uri` with the fixed budget of `stage_b.prompt_eval` (DDIM, eta 0, trailing steps, EMA weights; no
    other `sample.*` setting takes part), so Stage B runs with different training options compare in MLflow."""
    budget = cfg.stage_b.prompt_eval
    settings = SampleConfig(
        prompts=cfg.sample.prompts, num_per_prompt=budget.num_per_prompt, steps=budget.steps, guidance=budget.guidance,
        guidance_rescale=budget.guidance_rescale,
        seed=budget.seed, evaluate_digits=True, digit_classifier=cfg.sample.digit_classifier, batch_size=cfg.sample.batch_size,
        device=cfg.sample.device, mixed_precision=cfg.sample.mixed_precision,
    )
    eval_cfg = cfg.model_copy(update={"sample": settings})
    images, _ = render(eval_cfg, settings.prompts, model_uri)
    return score_digits(eval_cfg, images, settings.prompts)

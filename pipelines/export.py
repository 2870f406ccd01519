"""Export: a published autoencoder or U-Net bundle in the layouts Stable Diffusion tools load.

    python pipelines/export.py --model-uri models:/ldm-autoencoder/3 --format diffusers --out exports/vae3
    python pipelines/export.py --model-uri models:/ldm-unet/2 --format diffusers --out s3://bucket/exports/unet2
    python pipelines/export.py --model-uri models:/ldm-unet/2 --format sd-single-file --out exports/unet2-sd

`--format diffusers`:
- an autoencoder: a diffusers `AutoencoderKL` folder (`config.json` with our latent scale as `scaling_factor`,
  `diffusion_pytorch_model.safetensors`): `AutoencoderKL.from_pretrained(DIR)`;
- a U-Net bundle: `unet/`, `vae/` (the autoencoder of its lineage) and `scheduler/` (DDIM with SD's settings:
  "leading" spacing, steps_offset 1, set_alpha_to_one false, the bundle's beta schedule and prediction); when
  the text encoder is a CLIP text model also `text_encoder/`, `tokenizer/` and `model_index.json`, so
  `StableDiffusionPipeline.from_pretrained(DIR)` loads it. `model_index.json` also records, under
  `_call_defaults`, the classifier-free guidance `sample.*` settings as `StableDiffusionPipeline.__call__`
  arguments (`guidance_scale`, `guidance_rescale`): diffusers skips keys that start with "_", so pass them
  yourself, `pipe(prompt, **json.load(open(DIR + "/model_index.json"))["_call_defaults"])`.

LoRA adapters (`models:/ldm-unet-lora/1`, from `stage_b.lora`) with `--format diffusers` become
`pytorch_lora_weights.safetensors` (their EMA weights when they have them), the layout
`StableDiffusionPipeline.load_lora_weights(DIR)` reads (diffusers 0.42; `pipelines/models/lora.py`): load it on the
base exported the same way. `--merged` folds the adapters into their base instead and exports that whole U-Net
bundle in either format.

`--format sd-single-file`: the original CompVis layout ComfyUI / A1111 read: `vae.safetensors` (a standalone
VAE, keys `encoder.*`, `decoder.*`) for an autoencoder; `model.safetensors` (`model.diffusion_model.*`,
`first_stage_model.*` and, for CLIP, `cond_stage_model.transformer.*`) for a U-Net bundle. Its metadata
records our configs, so `pipelines/models/interop.py` reads it back exactly; other tools read only the weights and assume
SD's conventions for the rest (32 GroupNorm groups, SD 1.x's 8 heads or SD 2.x's 64-channel heads), so a model
that differs from them is refused in one line that names the field (export it with `--format diffusers`).

`--out` is a local folder or `s3://` prefix that must not exist or be empty: the export is written beside it
and renamed into place (locally), or uploaded with the top-level index last (S3). The export is logged as an
artifact of an MLflow run tagged `stage=export` whose `upstream_run_ids` is the run that made the model.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import torch
from safetensors.torch import load_file, save_file

from ldm_core import convert
from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.diffusion import DiffusionConfig
from ldm_core.unet import UNet, UNetConfig
from pipelines.platform import storage, tracking
from pipelines.config import PipelineConfig, SampleConfig
from pipelines.config.pipeline import LoraSection
from pipelines.models import lora
from pipelines.models.checkpoints import FILE_MODE
from pipelines.platform.cli import parse_cli
from pipelines.models.interop import SINGLE_FILE_FORMAT, TRAINING_OPTIONS, InteropError, import_unet
from pipelines.models.registry import UNetBundle, load_autoencoder, read_unet_bundle, run_id_of
from pipelines.platform.runtime import exit_on, setup_logging

log = logging.getLogger("export")
STAGE = "export"
FORMATS = ("diffusers", "sd-single-file")
ARTIFACT_PATH = "export"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
UPLOAD_CHUNK = 16 << 20
CLIP_MODEL_TYPES = ("clip", "clip_text_model")
# diffusers' names for our beta schedules (its squaredcos_cap_v2 is Nichol & Dhariwal's cosine with max beta 0.999).
DIFFUSERS_BETA_SCHEDULES = {"linear": "linear", "scaled_linear": "scaled_linear", "cosine": "squaredcos_cap_v2"}
DIFFUSERS_PREDICTIONS = {"eps": "epsilon", "v": "v_prediction"}


@dataclass
class ExportResult:
    run_id: str
    out: str
    format: str
    files: list[str]


# ----------------------------------------------------------------------------------------------------
# Layouts (pure: models in, files in a local folder out).
# ----------------------------------------------------------------------------------------------------


def sd_scheduler_config(diffusion: DiffusionConfig) -> dict:
    """A diffusers `DDIMScheduler` config with Stable Diffusion's DDIM settings for our noise schedule. A model
    trained with `zero_terminal_snr` gets Lin et al.'s sampler instead: the rescaled betas, trailing timesteps from
    t = T-1 and alpha_bar = 1 past t = 0. Either way diffusers then takes the steps `ldm_core.sampling.ddim_sample`
    takes with the same settings (the same timesteps, each step landing on t - T // steps; final latents within 1e-4,
    tests/test_sampler_parity.py), for every step count but those where diffusers' trailing spacing emits an extra
    timestep of -1 (at T = 1000: 61, 497 and 60 other counts in [1, 1000]): there diffusers takes that one more,
    wrong step, and our sampler does not."""
    zero = diffusion.zero_terminal_snr
    return {
        "_class_name": "DDIMScheduler",
        "num_train_timesteps": diffusion.num_timesteps,
        "beta_start": diffusion.beta_start,
        "beta_end": diffusion.beta_end,
        "beta_schedule": DIFFUSERS_BETA_SCHEDULES[diffusion.beta_schedule],
        "trained_betas": None,
        "clip_sample": False,
        "set_alpha_to_one": zero,
        "steps_offset": 0 if zero else 1,
        "timestep_spacing": "trailing" if zero else "leading",
        "rescale_betas_zero_snr": zero,
        "prediction_type": DIFFUSERS_PREDICTIONS[diffusion.prediction],
    }


def pipeline_call_defaults(sample: SampleConfig) -> dict:
    """`sample`'s guidance settings as `StableDiffusionPipeline.__call__` keyword arguments (diffusers' names)."""
    return {"guidance_scale": sample.guidance, "guidance_rescale": sample.guidance_rescale}


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _save(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    os.chmod(path, FILE_MODE)  # readable by others as any new file (safetensors alone writes 0600)


def write_diffusers_autoencoder(model: AutoencoderKL, folder: Path, sample_size: int | list[int] | None = None,
                                latents_mean: list[float] | None = None, latents_std: list[float] | None = None) -> None:
    """A diffusers AutoencoderKL folder; `latents_mean` / `latents_std` (a U-Net trained on per-channel normalised
    latents) go into its config.json under diffusers' names, beside `scaling_factor`."""
    tensors, cfg = convert.autoencoder_to_state(model, "diffusers")
    config = convert.autoencoder_config_to_diffusers(cfg, float(model.scale_factor), sample_size)
    if latents_mean is not None:
        config |= {"latents_mean": list(latents_mean), "latents_std": list(latents_std)}
    _write_json(folder / "config.json", config)
    _save(folder / DIFFUSERS_WEIGHTS, tensors)


def write_diffusers_unet(unet: UNet, folder: Path, sample_size: int | list[int] | None = None) -> None:
    _write_json(folder / "config.json", convert.unet_config_to_diffusers(unet.config, sample_size=sample_size))
    links = convert.unet_links(unet.config, "diffusers", projection="linear")
    _save(folder / DIFFUSERS_WEIGHTS, convert.export_state(unet.state_dict(), links))


def _clip_text_encoder(bundle: UNetBundle):
    """The bundle's text encoder when it is a CLIP text model (what StableDiffusionPipeline takes), else None."""
    from pipelines.data.text_encoders import load_text_encoder

    encoder = load_text_encoder(bundle.text_encoder)
    return encoder if encoder.model_type in CLIP_MODEL_TYPES else None


def _ldm_unet_projection(cfg) -> str:
    # SD 1.x single files use 1x1-conv projections, SD 2.x (fixed head width) linear ones; readers tell them apart so.
    return "linear" if cfg.head_dim else "conv1x1"


# What a reader of an SD single file assumes, since the weights do not record it: SD's GroupNorm32 everywhere; SD 1.x's
# 8 heads where the transformers' projections are 1x1 convs, SD 2.x's 64-channel heads where they are linear
# (CompVis' v1/v2 inference configs; ComfyUI, A1111 and `convert.*_config_from_ldm` read files so).
SD_NORM_GROUPS = 32
SD1_NUM_HEADS = 8
SD2_HEAD_DIM = 64


def _sd_convention_problems(unet: UNetConfig | None, autoencoder: AutoencoderConfig | None) -> list[str]:
    problems = []
    if unet is not None:
        if unet.norm_groups != SD_NORM_GROUPS:
            problems.append(f"stage_b.unet.norm_groups={unet.norm_groups} (read as {SD_NORM_GROUPS})")
        if unet.head_dim is None and unet.num_heads != SD1_NUM_HEADS:
            problems.append(f"stage_b.unet.num_heads={unet.num_heads} (read as SD 1.x's {SD1_NUM_HEADS} heads)")
        if unet.head_dim is not None and unet.head_dim != SD2_HEAD_DIM:
            problems.append(f"stage_b.unet.head_dim={unet.head_dim} (read as SD 2.x's {SD2_HEAD_DIM}-channel heads)")
    if autoencoder is not None:
        if autoencoder.norm_groups != SD_NORM_GROUPS:
            problems.append(f"stage_a.model.norm_groups={autoencoder.norm_groups} (read as {SD_NORM_GROUPS})")
        if not autoencoder.mid_attention:
            problems.append("stage_a.model.mid_attention=False (SD's VAE always has a mid-block attention)")
    return problems


def _differences(ours, assumed, section: str) -> list[str]:
    return [f"{section}.{name}={getattr(ours, name)} (read as {getattr(assumed, name)})" for name in type(ours).model_fields
            if name not in TRAINING_OPTIONS and getattr(ours, name) != getattr(assumed, name)]


def check_sd_single_file(unet: tuple[UNetConfig, dict] | None, autoencoder: tuple[AutoencoderConfig, dict] | None) -> None:
    """Refuse a single-file export that other tools would misread. An SD single file records shapes, not configs:
    ComfyUI, A1111, CompVis' code and diffusers' `from_single_file` take the rest from SD's conventions (above).
    Each (config, exported state) must follow them, and must read back, as those tools read it
    (`convert.*_config_from_ldm`), as its own config; every field that does not is named. (Our own reader takes
    the configs from the file's metadata and is exact for any model.)"""
    problems = _sd_convention_problems(unet and unet[0], autoencoder and autoencoder[0])
    if not problems:  # readable with SD's conventions: anything else read differently from the shapes?
        if unet is not None:
            assumed = convert.unet_config_from_ldm(unet[1])
            chans = [unet[0].model_channels * m for m in unet[0].channel_mult]
            if [unet[0].heads(ch) for ch in chans] == [assumed.heads(ch) for ch in chans]:  # the same heads, either way
                assumed = assumed.model_copy(update={"num_heads": unet[0].num_heads, "head_dim": unet[0].head_dim})
            problems += _differences(unet[0], assumed, "stage_b.unet")
        if autoencoder is not None:
            problems += _differences(autoencoder[0], convert.autoencoder_config_from_ldm(autoencoder[1]), "stage_a.model")
    if problems:
        raise InteropError(
            "--format sd-single-file: tools that read SD single files take GroupNorm groups and attention heads from "
            f"SD's conventions, and would compute something else with this model: {'; '.join(problems)}; "
            "export with --format diffusers (its config.json records them)")


def export_autoencoder(model: AutoencoderKL, fmt: str, folder: Path) -> None:
    if fmt == "diffusers":
        write_diffusers_autoencoder(model, folder)
        return
    state, cfg = convert.autoencoder_to_state(model, "ldm")
    convert.autoencoder_config_to_diffusers(cfg, float(model.scale_factor))  # the same limits apply
    check_sd_single_file(None, (cfg, state))
    _save(folder / "vae.safetensors", state, {
        "format": SINGLE_FILE_FORMAT, "autoencoder_config": cfg.model_dump_json(),
        "scale_factor": repr(float(model.scale_factor)),
    })


def diffusers_sample_size(size) -> int | list[int]:
    """diffusers' `sample_size` for (height, width): one int for a square, else [height, width] (which
    StableDiffusionPipeline reads as the default height and width)."""
    height, width = (int(s) for s in size)
    return height if height == width else [height, width]


def export_unet(bundle: UNetBundle, autoencoder: AutoencoderKL, fmt: str, folder: Path,
                sample: SampleConfig | None = None) -> None:
    """Write the U-Net bundle (with its autoencoder and, for CLIP, text encoder) as `fmt` into `folder`; `sample`
    (default: SampleConfig's defaults) gives the diffusers pipeline's `_call_defaults`."""
    autoencoder.scale_factor.fill_(bundle.scale_factor)  # the scale the U-Net was trained with
    clip = _clip_text_encoder(bundle)
    if fmt == "diffusers":
        f = autoencoder.downsample_factor
        write_diffusers_unet(bundle.unet, folder / "unet", sample_size=diffusers_sample_size(bundle.latent_shape[-2:]))
        write_diffusers_autoencoder(autoencoder, folder / "vae", sample_size=diffusers_sample_size([s * f for s in bundle.latent_shape[-2:]]),
                                    latents_mean=bundle.latents_mean, latents_std=bundle.latents_std)
        if bundle.latents_mean is not None:
            log.warning("the U-Net was trained on per-channel normalised latents: vae/config.json has latents_mean / "
                        "latents_std, which SDXL-style pipelines apply but StableDiffusionPipeline ignores (decode its "
                        "output_type='latent' result as latents * latents_std + latents_mean yourself)")
        _write_json(folder / "scheduler" / "scheduler_config.json", sd_scheduler_config(bundle.diffusion))
        if clip is None:
            log.warning("text encoder %s is not a CLIP text model: no StableDiffusionPipeline layout (load unet/, vae/ "
                        "and scheduler/ one by one)", bundle.text_encoder.name_or_path)
            return
        clip.model.save_pretrained(str(folder / "text_encoder"), safe_serialization=True)
        clip.tokenizer.save_pretrained(str(folder / "tokenizer"))
        _write_json(folder / "model_index.json", {
            "_class_name": "StableDiffusionPipeline",
            "feature_extractor": [None, None], "safety_checker": [None, None], "image_encoder": [None, None],
            "requires_safety_checker": False,
            "scheduler": ["diffusers", "DDIMScheduler"], "text_encoder": ["transformers", type(clip.model).__name__],
            "tokenizer": ["transformers", type(clip.tokenizer).__name__], "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "_call_defaults": pipeline_call_defaults(sample or SampleConfig()),
        })
        return
    if bundle.latents_mean is not None:
        raise InteropError("--format sd-single-file: the U-Net was trained on per-channel normalised latents "
                           "(encode.latent_normalization=per_channel), which SD single files cannot record; export "
                           "with --format diffusers (its vae/config.json has latents_mean / latents_std)")
    cfg = bundle.unet_config
    convert.unet_config_to_diffusers(cfg)  # the same limits apply
    links = convert.unet_links(cfg, "ldm", projection=_ldm_unet_projection(cfg))
    tensors = {convert.LDM_UNET_PREFIX + k: v for k, v in convert.export_state(bundle.unet.state_dict(), links).items()}
    vae, vae_cfg = convert.autoencoder_to_state(autoencoder, "ldm")
    check_sd_single_file((cfg, {k[len(convert.LDM_UNET_PREFIX):]: v for k, v in tensors.items()}), (vae_cfg, vae))
    if bundle.scale_factor != convert.SD1_SCALE_FACTOR or bundle.diffusion.prediction != "eps":
        # Sampling settings, not the network: the same weights, but a tool must be told them (our metadata does).
        log.warning("latent scale %s, %s prediction: tools that read SD 1.x single files assume %s and eps; set them "
                    "there, or export with --format diffusers (its configs record them)", bundle.scale_factor,
                    bundle.diffusion.prediction, convert.SD1_SCALE_FACTOR)
    tensors |= {convert.LDM_VAE_PREFIX + k: v for k, v in vae.items()}
    if clip is not None:  # SD 1.x names: cond_stage_model.transformer.text_model.* (transformers 5 drops "text_model.")
        tensors |= {f"cond_stage_model.transformer.{k if k.startswith('text_model.') else 'text_model.' + k}": v.detach().cpu()
                    for k, v in clip.model.state_dict().items()}
    _save(folder / "model.safetensors", tensors, {
        "format": SINGLE_FILE_FORMAT, "unet_config": cfg.model_dump_json(),
        "autoencoder_config": vae_cfg.model_dump_json(), "scale_factor": repr(float(bundle.scale_factor)),
        "diffusion": bundle.diffusion.model_dump_json(),
    })


# ----------------------------------------------------------------------------------------------------
# Where the result goes.
# ----------------------------------------------------------------------------------------------------


def _top_level_last(files: list[Path], root: Path) -> list[Path]:
    # The folder's index (model_index.json) goes last: a reader never sees a half-uploaded pipeline as complete.
    return sorted(files, key=lambda p: (p.parent == root and p.name == "model_index.json", str(p)))


def check_out(out: str, storage_cfg) -> storage.Location:
    """The resolved `--out`, refused when it already holds something (nothing is overwritten) or cannot be written."""
    try:
        loc = storage.resolve(storage.check_uri(out, "--out"), storage_cfg)
    except ValueError as e:
        raise InteropError(str(e)) from None
    if loc.scheme == "file":
        path = Path(loc.path)
        if path.exists() and (not path.is_dir() or any(path.iterdir())):
            raise InteropError(f"--out {out}: already exists and is not an empty folder (nothing is overwritten)")
    elif storage.list_files(loc):
        raise InteropError(f"--out {out}: the prefix already holds objects (nothing is overwritten)")
    storage.check_writable(loc)
    return loc


def publish(local: Path, loc: storage.Location) -> list[str]:
    """Copy the finished export to its destination; returns the relative paths written."""
    files = _top_level_last([p for p in local.rglob("*") if p.is_file()], local)
    rel = [str(p.relative_to(local)) for p in files]
    if loc.scheme == "file":
        target = Path(loc.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        shutil.copytree(local, staging, dirs_exist_ok=True)
        if target.is_dir():
            target.rmdir()  # empty (checked): replaced in one rename
        os.replace(staging, target)
        return rel
    for path, name in zip(files, rel):  # streamed: an SD checkpoint is gigabytes
        target = loc.join(name)
        with open(path, "rb") as src, target.filesystem.open_output_stream(target.path) as dst:
            shutil.copyfileobj(src, dst, UPLOAD_CHUNK)
    return rel


# ----------------------------------------------------------------------------------------------------
# The stage.
# ----------------------------------------------------------------------------------------------------


def export_lora(folder: Path, out: Path) -> None:
    """The adapters of a LoRA bundle `folder` (EMA weights when present) as diffusers' `pytorch_lora_weights.safetensors`."""
    meta = json.loads((folder / "config.json").read_text())
    weights = meta["weights"]["ema"] or meta["weights"]["raw"]
    state = lora.to_diffusers(load_file(str(folder / weights)), UNetConfig.model_validate(meta["unet"]),
                              LoraSection.model_validate(meta["lora"]["config"]))
    _save(out / lora.DIFFUSERS_LORA_WEIGHTS, state, {"format": "pt"})


def _load(model_uri: str, workdir: Path, merged: bool = False):
    """("autoencoder", AutoencoderKL), ("unet", UNetBundle) or, unless `merged`, ("lora", bundle folder) published
    at `model_uri` (a LoRA bundle read as a UNetBundle is its base with the adapters folded in)."""
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(workdir)))
    except Exception as e:  # MlflowException for an unknown model/version/run, OSError for a bad artifact store
        raise InteropError(f"--model-uri {model_uri}: cannot be read from MLflow ({type(e).__name__}: "
                           f"{str(e).splitlines()[0]})") from None
    if (root / "artifacts" / "autoencoder" / "config.json").is_file():
        return "autoencoder", AutoencoderKL.from_pretrained(root / "artifacts" / "autoencoder").eval()
    if (root / "artifacts" / "unet" / "config.json").is_file():
        folder = root / "artifacts" / "unet"
        if not merged and json.loads((folder / "config.json").read_text()).get("lora"):
            return "lora", folder
        return "unet", read_unet_bundle(folder, use_ema=True, load_base=import_unet)
    raise InteropError(f"--model-uri {model_uri}: neither an autoencoder nor a U-Net bundle of this pipeline")


def run_export(cfg: PipelineConfig, model_uri: str, fmt: str, out: str, merged: bool = False) -> ExportResult:
    """Export the model at `model_uri` as `fmt` to `out` and log it as an artifact of a `stage=export` run. `merged`:
    LoRA adapters folded into their base, exported as a whole U-Net."""
    if fmt not in FORMATS:
        raise InteropError(f"--format {fmt!r}: choose one of {', '.join(FORMATS)}")
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow))
    loc = check_out(out, cfg.storage)
    with tempfile.TemporaryDirectory(prefix="ldm-export-") as tmp:
        kind, model = _load(model_uri, Path(tmp) / "model", merged)
        upstream = [run_id_of(model_uri)]
        local = Path(tmp) / "export"
        if kind == "lora" and fmt != "diffusers":
            raise InteropError(f"--model-uri {model_uri}: LoRA adapters export only as --format diffusers "
                               f"(pytorch_lora_weights.safetensors); add --merged to export base + adapters as one model")
        if kind == "lora":
            export_lora(model, local)
        elif kind == "autoencoder":
            export_autoencoder(model, fmt, local)
        else:
            export_unet(model, load_autoencoder(model.autoencoder_uri), fmt, local, cfg.sample)
        with tracking.stage_run(
            experiment_id=tracking.setup(cfg.mlflow, cfg.run.output_uri), stage=STAGE,
            run_name=f"{cfg.run.name}-export", upstream_run_ids=upstream,
        ) as run:
            files = publish(local, loc)
            mlflow.set_tags({"model_uri": model_uri, "export_format": fmt, "export_uri": loc.uri, "model_kind": kind,
                             "merged": str(merged).lower()})
            mlflow.log_artifacts(str(local), ARTIFACT_PATH)
            log.info("exported %s (%s) as %s to %s", model_uri, kind, fmt, loc.uri)
            return ExportResult(run_id=run.info.run_id, out=loc.uri, format=fmt, files=files)


def main(argv: list[str] | None = None) -> ExportResult:
    setup_logging()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-uri", required=True, help="MLflow URI of an autoencoder or U-Net bundle (models:/ldm-unet/3)")
    parser.add_argument("--format", required=True, help=f"one of {', '.join(FORMATS)}")
    parser.add_argument("--out", required=True, help="local folder or s3:// prefix (must not exist or be empty)")
    parser.add_argument("--merged", action="store_true", help="LoRA adapters: fold them into their base and export the "
                                                               "whole U-Net")
    cfg, args = parse_cli(argv, parser)
    with exit_on(ConfigError, OSError):
        result = run_export(cfg, args.model_uri, args.format, args.out, merged=args.merged)
    print(f"export finished: run {result.run_id}, {len(result.files)} files in {result.out}")
    return result


if __name__ == "__main__":
    main()

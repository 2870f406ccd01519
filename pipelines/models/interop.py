"""Stable Diffusion / diffusers weights in and out of the pipeline.

Import (`stage_a.init_from`, `stage_b.init_from`, or directly):

    vae = import_autoencoder("/models/sd-v1-5")                          # diffusers pipeline folder (its vae/)
    vae = import_autoencoder("s3://bucket/vae-ft-mse")                  # diffusers AutoencoderKL folder on S3
    unet = import_unet("/models/v1-5-pruned-emaonly.safetensors")       # original single-file checkpoint
    vae = import_autoencoder("models:/ldm-autoencoder/3")               # our own published model (MLflow URI)

A source is a local path, `file://`, `s3://bucket/key` or an MLflow artifact URI (`runs:/`, `models:/`,
`mlflow-artifacts:/`), holding one of: a diffusers pipeline folder (`vae/`, `unet/`), a diffusers model
folder (`config.json` + `diffusion_pytorch_model.safetensors`), an original SD/LDM single-file checkpoint
(`.safetensors`; `.ckpt` / `.pt` only through `torch.load(weights_only=True)`, nothing else is unpickled),
a standalone VAE file, or one of our own published models. Tensor and config mapping: `ldm_core/convert.py`.

Export (`pipelines/export.py`) writes the same layouts back.
"""

from __future__ import annotations

import json
import logging
import pickle
import shutil
import tempfile
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import pyarrow.fs as pafs
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from ldm_core import convert
from ldm_core.autoencoder import FORMAT_NAME as AUTOENCODER_FORMAT
from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.unet import UNet, UNetConfig
from pipelines.platform import storage
from pipelines.config import PipelineConfig, StageAConfig, StageBConfig
from pipelines.platform.storage import StorageConfig

log = logging.getLogger(__name__)

Component = Literal["vae", "unet"]
MLFLOW_SCHEMES = ("runs", "models", "mlflow-artifacts")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_WEIGHTS_INDEX = "diffusion_pytorch_model.safetensors.index.json"
DIFFUSERS_PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
DOWNLOAD_CHUNK = 16 << 20
DIFFUSERS_CLASS = {"vae": "AutoencoderKL", "unet": "UNet2DConditionModel"}
SINGLE_FILE_FORMAT = "ldm_pipeline.sd-single-file"
"""safetensors metadata `format` of our own single-file exports, which also record the configs the weights
cannot tell (GroupNorm groups, attention heads, the latent scale)."""
TRAINING_OPTIONS = ("dropout", "gradient_checkpointing")
"""Config fields that are the user's training choices, not the imported architecture (kept from the config)."""


class InteropError(ConfigError):
    """A model source that cannot be read or cannot be represented (one line, for the entry points)."""


# ----------------------------------------------------------------------------------------------------
# Sources -> a local path.
# ----------------------------------------------------------------------------------------------------


def _scheme(uri: str) -> str:
    return urlparse(str(uri)).scheme


def fetch(uri: str, workdir: str | Path, storage_cfg: StorageConfig | None = None, component: Component | None = None) -> Path:
    """A local path holding `uri` (the path itself when it is local). From a remote folder that is a whole
    diffusers pipeline only `component`'s subfolder is copied (a pipeline folder is gigabytes)."""
    uri = str(uri)
    scheme = _scheme(uri)
    if scheme in MLFLOW_SCHEMES:
        import mlflow

        try:
            return Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(workdir)))
        except Exception as e:  # MlflowException, OSError: anything here means "cannot read that URI"
            raise InteropError(f"{uri}: cannot download from MLflow ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    if scheme not in ("", "file", "s3", "s3a"):
        raise InteropError(f"{uri}: unsupported source; use a local path, s3://, runs:/, models:/ or mlflow-artifacts:/")
    loc = storage.resolve(uri, storage_cfg)
    if loc.scheme == "file":
        if not Path(loc.path).exists():
            raise InteropError(f"{uri}: no such file or folder")
        return Path(loc.path)
    try:
        info = loc.filesystem.get_file_info(loc.path)
        if info.type == pafs.FileType.File:
            dest = Path(workdir) / Path(loc.path).name
            _download(loc, dest)
            return dest
        files = storage.list_files(loc)
    except OSError as e:
        raise InteropError(f"{uri}: cannot read ({str(e).splitlines()[0]})") from None
    if not files:
        raise InteropError(f"{uri}: no such object or prefix")
    rel = [f[len(loc.path):].lstrip("/") for f in files]
    if component and any(r.startswith(f"{component}/") for r in rel):
        rel = [r for r in rel if r.startswith(f"{component}/")]
    dest = Path(workdir) / "source"
    for r in rel:
        _download(loc.join(r), dest / r)
    return dest


def _download(loc: storage.Location, dest: Path) -> None:
    """Stream one object to a local file (checkpoints are gigabytes: never whole in memory)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with loc.filesystem.open_input_stream(loc.path) as src, open(dest, "wb") as out:
        shutil.copyfileobj(src, out, DOWNLOAD_CHUNK)


# ----------------------------------------------------------------------------------------------------
# Local path -> tensors and configs.
# ----------------------------------------------------------------------------------------------------


def load_checkpoint_file(path: str | Path, shapes_only: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a .safetensors file, or of a .ckpt / .pt / .bin file read with
    `torch.load(weights_only=True)` (never a full unpickle). SD's .ckpt wraps them in "state_dict".
    `shapes_only` returns meta tensors from a safetensors header (no data read)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        try:
            if shapes_only:
                with safe_open(str(path), framework="pt") as f:
                    return {k: torch.empty(f.get_slice(k).get_shape(), device="meta") for k in f.keys()}
            return load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a corrupt header
            raise InteropError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None
    if path.suffix in PICKLE_SUFFIXES:
        try:
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
            raise InteropError(
                f"{path}: cannot be read with torch.load(weights_only=True) ({str(e).splitlines()[0][:160]}); it needs a "
                "full unpickle, which could run arbitrary code and is never done here: convert it to .safetensors first"
            ) from None
        if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
            obj = obj["state_dict"]
        if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
            raise InteropError(f"{path}: does not hold a flat dict of tensors (or one under 'state_dict')")
        return obj
    raise InteropError(f"{path}: unknown checkpoint type {path.suffix!r} (expected .safetensors, or .ckpt/.pt/.bin)")


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InteropError(f"{path}: not readable JSON ({e})") from None
    if not isinstance(data, dict):
        raise InteropError(f"{path}: expected a JSON object")
    return data


def _diffusers_weights(folder: Path) -> dict[str, torch.Tensor]:
    if (folder / DIFFUSERS_WEIGHTS).is_file():
        return load_checkpoint_file(folder / DIFFUSERS_WEIGHTS)
    if (folder / DIFFUSERS_WEIGHTS_INDEX).is_file():
        files = sorted(set(_read_json(folder / DIFFUSERS_WEIGHTS_INDEX).get("weight_map", {}).values()))
        tensors: dict[str, torch.Tensor] = {}
        for name in files:
            tensors.update(load_checkpoint_file(folder / name))
        return tensors
    if (folder / DIFFUSERS_PICKLED_WEIGHTS).is_file():
        return load_checkpoint_file(folder / DIFFUSERS_PICKLED_WEIGHTS)
    raise InteropError(f"{folder}: a diffusers model folder without {DIFFUSERS_WEIGHTS} (or its sharded index / .bin)")


def _locate(path: Path, component: Component) -> tuple[str, Path]:
    """What `path` is, for `component`: ("ours", folder), ("diffusers", model folder) or ("single", file)."""
    if path.is_file():
        return "single", path
    ours_key = "autoencoder" if component == "vae" else "unet"
    candidates = [path, path / "artifacts" / ours_key, path / component]
    for folder in candidates:
        config = folder / "config.json"
        if not config.is_file():
            continue
        meta = _read_json(config)
        if meta.get("format") == (AUTOENCODER_FORMAT if component == "vae" else _bundle_format()):
            return "ours", folder
        if meta.get("_class_name") == DIFFUSERS_CLASS[component]:
            return "diffusers", folder
        if meta.get("_class_name") or meta.get("format"):
            continue  # another model (e.g. a text encoder): keep looking
    files = [p for p in path.iterdir() if p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES]
    if len(files) == 1:
        return "single", files[0]
    raise InteropError(f"{path}: holds no {DIFFUSERS_CLASS[component]} (no diffusers folder, {component}/ subfolder, "
                       f"single-file checkpoint or model of this pipeline)")


def single_file_metadata(path: Path) -> dict[str, str]:
    """The safetensors header metadata of a file written by `pipelines/export.py` ({} for anything else)."""
    if path.suffix != ".safetensors":
        return {}
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception:  # unreadable: load_checkpoint_file reports it
        return {}
    return meta if meta.get("format") == SINGLE_FILE_FORMAT else {}


def _bundle_format() -> str:
    from pipelines.models.registry import UNET_FORMAT

    return UNET_FORMAT


def _single_file_part(path: Path, component: Component, shapes_only: bool) -> dict[str, torch.Tensor]:
    vae, unet = convert.split_ldm_checkpoint(load_checkpoint_file(path, shapes_only=shapes_only))
    part = vae if component == "vae" else unet
    if not part:
        prefix = convert.LDM_VAE_PREFIX if component == "vae" else convert.LDM_UNET_PREFIX
        raise InteropError(f"{path}: no {prefix}* tensors: not a Stable Diffusion single-file checkpoint with a {component}")
    return part


def _with_training_options(imported, configured):
    """The imported architecture with the user's training-only options."""
    if configured is None:
        return imported
    return imported.model_copy(update={k: getattr(configured, k) for k in TRAINING_OPTIONS})


# ----------------------------------------------------------------------------------------------------
# Import.
# ----------------------------------------------------------------------------------------------------


def _read_autoencoder(path: Path, uri: str, config_only: bool, norm_groups: int):
    kind, where = _locate(path, "vae")
    if kind == "ours":
        model = AutoencoderKL.from_pretrained(where)
        return model.config if config_only else model
    if kind == "diffusers":
        raw = _read_json(where / "config.json")
        cfg, scale = convert.autoencoder_config_from_diffusers(raw)
        if config_only:
            return cfg
        merged = {**convert.DIFFUSERS_VAE_DEFAULTS, **raw}
        return convert.autoencoder_from_state(
            _diffusers_weights(where), cfg, "diffusers", scale,
            use_quant_conv=merged["use_quant_conv"], use_post_quant_conv=merged["use_post_quant_conv"],
        )
    state = _single_file_part(where, "vae", shapes_only=config_only)
    meta = single_file_metadata(where)
    if "autoencoder_config" in meta:
        cfg, scale = AutoencoderConfig.model_validate_json(meta["autoencoder_config"]), float(meta["scale_factor"])
    else:
        cfg, scale = convert.autoencoder_config_from_ldm(state, norm_groups=norm_groups), convert.SD1_SCALE_FACTOR
        log.info("%s: single-file VAE, using SD's published latent scale %s", uri, scale)
    return cfg if config_only else convert.autoencoder_from_state(state, cfg, "ldm", scale)


def import_autoencoder(
    uri: str, storage_cfg: StorageConfig | None = None, *, config_only: bool = False, norm_groups: int = 32,
) -> AutoencoderKL | AutoencoderConfig:
    """Our AutoencoderKL (float32, CPU, train mode) from any supported source, with its latent scale factor:
    diffusers' `scaling_factor`, ours, or SD's published 0.18215 for a single-file checkpoint.
    `config_only` returns just its AutoencoderConfig (reading no weights where the format allows).
    `norm_groups` is for single-file checkpoints, whose weights do not record it (SD: 32)."""
    with tempfile.TemporaryDirectory(prefix="ldm-import-") as tmp:
        path = fetch(uri, tmp, storage_cfg, "vae")
        try:
            return _read_autoencoder(path, uri, config_only, norm_groups)
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, InteropError):
                raise
            raise InteropError(f"{uri}: {str(e).splitlines()[0]}") from None


def _read_unet(path: Path, config_only: bool, norm_groups: int, num_heads: int | None, head_dim: int | None):
    kind, where = _locate(path, "unet")
    if kind == "ours":
        from pipelines.models.registry import read_unet_bundle

        if config_only:
            return UNetConfig.model_validate(_read_json(where / "config.json")["unet"])
        return read_unet_bundle(where, use_ema=True, load_base=import_unet).unet.train().requires_grad_(True)
    if kind == "diffusers":
        cfg = convert.unet_config_from_diffusers(_read_json(where / "config.json"))
        return cfg if config_only else convert.unet_from_state(_diffusers_weights(where), cfg, "diffusers")
    state = _single_file_part(where, "unet", shapes_only=config_only)
    meta = single_file_metadata(where)
    if "unet_config" in meta:
        cfg = UNetConfig.model_validate_json(meta["unet_config"])
    else:
        cfg = convert.unet_config_from_ldm(state, norm_groups=norm_groups, num_heads=num_heads, head_dim=head_dim)
    return cfg if config_only else convert.unet_from_state(state, cfg, "ldm")


def import_unet(
    uri: str, storage_cfg: StorageConfig | None = None, *, config_only: bool = False, norm_groups: int = 32,
    num_heads: int | None = None, head_dim: int | None = None,
) -> UNet | UNetConfig:
    """Our UNet (float32, CPU, train mode) from any supported source (a U-Net bundle gives its EMA weights).
    `config_only` returns just its UNetConfig. `norm_groups`, `num_heads` / `head_dim` are for single-file
    checkpoints, whose weights do not record them (defaults: SD 1.x's 32 groups and 8 heads, 64-channel heads
    for SD 2.x's linear projections)."""
    with tempfile.TemporaryDirectory(prefix="ldm-import-") as tmp:
        path = fetch(uri, tmp, storage_cfg, "unet")
        try:
            return _read_unet(path, config_only, norm_groups, num_heads, head_dim)
        except (ValueError, FileNotFoundError) as e:
            if isinstance(e, InteropError):
                raise
            raise InteropError(f"{uri}: {str(e).splitlines()[0]}") from None


# ----------------------------------------------------------------------------------------------------
# Starting a stage from imported weights.
# ----------------------------------------------------------------------------------------------------


def _use_tracking_store(cfg: PipelineConfig, *uris: str | None) -> None:
    """Point MLflow at the pipeline's store when a source is an MLflow URI (entry points read init_from before they
    set up tracking, and MLflow's default store is ./mlruns, not the configured one)."""
    if any(uri and _scheme(uri) in MLFLOW_SCHEMES for uri in uris):
        import mlflow

        from pipelines.platform.tracking import tracking_uri

        mlflow.set_tracking_uri(tracking_uri(cfg.mlflow))


def adopt_init_architectures(cfg: PipelineConfig, sections: tuple[str, ...] = ("stage_a", "stage_b")) -> PipelineConfig:
    """The pipeline config with `stage_a.model` / `stage_b.unet` replaced by the architecture of their
    `init_from` (keeping the configured dropout and gradient checkpointing). Driver side, before the config
    goes to the workers; a config without init_from comes back unchanged. Reads configs, not weights. `sections`:
    which of the two to adopt."""
    updates = {}
    sa = cfg.stage_a if "stage_a" in sections else StageAConfig()
    sb = cfg.stage_b if "stage_b" in sections else StageBConfig()
    _use_tracking_store(cfg, sa.init_from, sb.init_from)
    if sa.init_from:
        model = _with_training_options(import_autoencoder(sa.init_from, cfg.storage, config_only=True), sa.model)
        if model != sa.model:
            log.info("stage_a.model: the architecture of %s", sa.init_from)
        updates["stage_a"] = sa.model_copy(update={"model": model})
    if sb.init_from:
        unet = _with_training_options(import_unet(sb.init_from, cfg.storage, config_only=True), sb.unet)
        if unet != sb.unet:
            log.info("stage_b.unet: the architecture of %s", sb.init_from)
        updates["stage_b"] = sb.model_copy(update={"unet": unet})
    return cfg.model_copy(update=updates) if updates else cfg


def init_from_run_ids(cfg: PipelineConfig, stage: str) -> tuple[str, ...]:
    """Lineage: the MLflow run that produced `stage`'s `init_from` when that is a `runs:/` or `models:/` URI (a
    model of this pipeline, or one logged to MLflow), as one more of the stage's `upstream_run_ids`; () otherwise
    (a path, s3://, or a URI whose run cannot be told, which is logged)."""
    section = getattr(cfg, stage, None)
    uri = getattr(section, "init_from", None)
    if not uri or _scheme(uri) not in ("runs", "models"):
        return ()
    from pipelines.models.registry import run_id_of

    _use_tracking_store(cfg, uri)
    ref = uri.partition(":/")[2]
    if _scheme(uri) == "models" and "@" in ref and "/" not in ref:  # models:/name@alias: the registry's models:/name/alias
        uri = "models:/" + ref.replace("@", "/", 1)
    try:
        return (run_id_of(uri),)
    except ConfigError as e:
        log.warning("%s.init_from=%s: no MLflow run to record as its upstream (%s)", stage, uri, e)
        return ()


def _as_configured(imported, configured, field: str, uri: str):
    """The imported network rebuilt with the configured training options, in train mode; the configured
    architecture must be the imported one."""
    if _with_training_options(imported.config, configured) != configured:
        diff = [k for k in type(configured).model_fields
                if getattr(imported.config, k) != getattr(configured, k) and k not in TRAINING_OPTIONS]
        raise InteropError(f"{field} differs from the architecture of {uri} in {', '.join(diff)} "
                           f"(the driver adopts it with adopt_init_architectures before training)")
    model = type(imported)(configured)
    model.load_state_dict(imported.state_dict())
    return model.train()


def load_init_autoencoder(section: StageAConfig, storage_cfg: StorageConfig | None = None) -> AutoencoderKL:
    """Stage A's starting autoencoder: `section.init_from` (a StageAConfig) imported, in train mode, with its
    published scale factor in the `scale_factor` buffer. `section.model` must be the imported architecture
    (see `adopt_init_architectures`). Freezing for `train_decoder_only` is `freeze_encoder`'s job (it applies
    to a resumed model too)."""
    if not section.init_from:
        raise InteropError("stage_a.init_from is not set: nothing to load")
    return _as_configured(import_autoencoder(section.init_from, storage_cfg), section.model, "stage_a.model", section.init_from)


def freeze_encoder(model: AutoencoderKL) -> None:
    """Freeze E and quant_conv (SD's ft-MSE recipe): q(z | x), and so every existing latent, stays as it was."""
    for module in (model.encoder, model.quant_conv):
        module.requires_grad_(False)


def keeps_published_scale(section: StageAConfig) -> bool:
    """Whether Stage A publishes the imported autoencoder's own scale factor (True) or measures 1/std (False)."""
    return bool(section.init_from) and not section.remeasure_scale_factor


def load_init_unet(section: StageBConfig, storage_cfg: StorageConfig | None = None) -> UNet:
    """Stage B's starting U-Net: `section.init_from` (a StageBConfig) imported, in train mode. `section.unet`
    must be the imported architecture (see `adopt_init_architectures`)."""
    if not section.init_from:
        raise InteropError("stage_b.init_from is not set: nothing to load")
    return _as_configured(import_unet(section.init_from, storage_cfg), section.unet, "stage_b.unet", section.init_from)

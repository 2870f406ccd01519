"""Publishing trained models to MLflow and loading them back by URI.

The stage contracts: Stage A publishes the autoencoder (weights + config + measured latent scale) as
an MLflow model registered under `mlflow.autoencoder_model_name`; later stages load it with
`load_autoencoder("models:/ldm-autoencoder/3")` or `load_autoencoder("runs:/<run_id>/autoencoder")`.
The weights inside are the model's own `save_pretrained` folder, so nothing is unpickled.

Stage B publishes the U-Net bundle the same way (`publish_unet`, registered under `mlflow.unet_model_name`):
raw and EMA weights, the U-Net and diffusion configs, the text encoder, the empty-prompt condition, the latent
shape and scale, and the autoencoder it was trained on; `load_unet_bundle(uri)` gives it back ready to sample.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import mlflow
import numpy as np
import torch
from pydantic import ValidationError
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ldm_core.autoencoder import AutoencoderKL
from ldm_core.config import ConfigError, format_validation_error
from ldm_core.diffusion import DiffusionConfig, NoiseSchedule
from ldm_core.unet import UNet, UNetConfig
from pipelines.config.pipeline import LoraSection
from pipelines.models import lora
from pipelines.data.text_encoders import TextEncoderConfig
from pipelines.models.checkpoints import save_tensors
from pipelines.models.provenance import (PROMOTED_FROM_TAG, pinned_requirement, promoted_model_name,
                                         record_artifact_digests, verify_artifact_digests)

_CODE_DIR = Path(__file__).resolve().parent / "pyfunc"
# The pyfunc flavour needs the project itself to serve: the pins match pyproject.toml, and the project is pinned to
# the version that logs the model (pipelines.models.provenance.pinned_requirement).
PYFUNC_REQUIREMENTS = ["torch==2.14.1", "numpy", "safetensors", "pydantic>=2.9"]


def publish_pretrained(
    directory: str | Path, *, artifact_key: str, code_file: str, name: str, registered_model_name: str | None,
    description: str, signature=None,
) -> tuple[str, int | None]:
    """Log a `save_pretrained` folder as a pyfunc model of the active run (and register it, with `description` on
    the registered model and the run that made the version on the version).

    Returns (model_uri, registered_version). The model URI is `models:/<registered name>/<version>` when
    registered, else the logged model's own URI. A registered version is tagged with the sha256 of its files.
    """
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(_CODE_DIR / code_file),
        artifacts={artifact_key: str(directory)},
        registered_model_name=registered_model_name,
        pip_requirements=[*PYFUNC_REQUIREMENTS, pinned_requirement()],
        signature=signature,
    )
    version = info.registered_model_version
    if registered_model_name and version is not None:
        record_artifact_digests(registered_model_name, version)
        client = MlflowClient()
        client.update_registered_model(registered_model_name, description=description)
        client.update_model_version(registered_model_name, version,
                                    description=f"Trained by run {mlflow.active_run().info.run_id}.")
        return f"models:/{registered_model_name}/{version}", int(version)
    return info.model_uri, None


class ModelURIError(ConfigError):
    """A model URI that is malformed, names no model, or names a model of another kind."""


def check_model_uri(model_uri: str) -> str:
    """`model_uri` unchanged when it is models:/<name>/<version or alias>, models:/<model id> or runs:/<run id>/<path>;
    ModelURIError otherwise."""
    scheme, _, ref = model_uri.partition(":/")
    parts = ref.split("/")
    ok = (scheme == "runs" and len(parts) >= 2 and all(parts)) or (scheme == "models" and len(parts) in (1, 2) and all(parts))
    if not ok:
        raise ModelURIError(f"model URI {model_uri!r} is malformed: expected models:/<name>/<version>, "
                            "models:/<name>/<alias> or runs:/<run id>/<artifact path>")
    return model_uri


def _first_line(e: BaseException) -> str:
    return next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)


def download_pretrained(model_uri: str, artifact_key: str) -> Path:
    """Local folder holding the `save_pretrained` files of a published model, every file of a registered version
    checked against the sha256 recorded at registration."""
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=check_model_uri(model_uri)))
    except (mlflow.exceptions.MlflowException, OSError) as e:
        raise ModelURIError(f"model {model_uri} cannot be loaded: {_first_line(e)}") from None
    verify_artifact_digests(model_uri, root)
    folder = root / "artifacts" / artifact_key
    if not (folder / "config.json").is_file():
        kinds = sorted(p.name for p in (root / "artifacts").iterdir()) if (root / "artifacts").is_dir() else []
        raise ModelURIError(f"model {model_uri} holds no '{artifact_key}' weights"
                            + (f" (it holds {', '.join(kinds)}: a model of another kind)" if kinds else ""))
    return folder


def publish_autoencoder(model: AutoencoderKL, workdir: str | Path, registered_model_name: str | None) -> tuple[str, int | None]:
    folder = Path(workdir) / "autoencoder"
    model.save_pretrained(folder)
    return publish_pretrained(
        folder, artifact_key="autoencoder", code_file="autoencoder.py", name="autoencoder",
        registered_model_name=registered_model_name,
        description="Stage A's autoencoder: images to latents and back, with the latent scale factor it measured. "
                    "pipelines/encode_latents.py loads it by this name; as a pyfunc it reconstructs images.",
    )


def load_autoencoder(model_uri: str) -> AutoencoderKL:
    """The Stage A autoencoder (eval mode, frozen) with its measured latent scale factor."""
    model = AutoencoderKL.from_pretrained(download_pretrained(model_uri, "autoencoder")).eval()
    model.requires_grad_(False)
    return model


def version_of_alias(registered_model_name: str, alias: str, field: str) -> str:
    """models:/<name>-promoted/<version> that the alias models:/<name>-promoted@<alias> points to now: aliases live on
    the promoted model, which only the promoter writes (pipelines/provenance.py). Loading that URI (not the alias)
    means a later move of the alias cannot change what this run loads. ModelURIError, naming `field`, when the
    alias does not exist."""
    promoted = promoted_model_name(registered_model_name)
    try:
        version = MlflowClient().get_model_version_by_alias(promoted, alias).version
    except mlflow.exceptions.MlflowException as e:
        raise ModelURIError(f"{field}={alias}: registered model {promoted!r} has no alias {alias!r} "
                            f"({_first_line(e)}); promote a version first, as the promoter: python "
                            f"infra/mlflow/promote.py {registered_model_name} <version> --alias {alias}") from None
    return f"models:/{promoted}/{version}"


def model_to_load(uri: str | None, alias: str | None, registered_model_name: str, alias_field: str,
                  latest: Callable[[], str]) -> str:
    """`uri` when given, else the version `alias` of `registered_model_name` points to now, else `latest()`."""
    if uri:
        return uri
    if alias:
        return version_of_alias(registered_model_name, alias, alias_field)
    return latest()


def run_id_of(model_uri: str) -> str:
    """The MLflow run that produced a model URI (models:/name/version, models:/m-<id>, runs:/<id>/...)."""
    if check_model_uri(model_uri).startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/", 1)[0]
    client = mlflow.MlflowClient()
    ref = model_uri[len("models:/"):]
    try:
        if "/" in ref:
            name, version = ref.split("/", 1)
            if version.isdigit():
                mv = client.get_model_version(name, version)
            else:
                mv = client.get_model_version_by_alias(name, version)
            if PROMOTED_FROM_TAG in mv.tags:  # a promoted copy: the run that trained the candidate
                return run_id_of(mv.tags[PROMOTED_FROM_TAG])
            return mv.run_id
        return client.get_logged_model(ref).source_run_id
    except mlflow.exceptions.MlflowException as e:
        raise ModelURIError(f"model {model_uri} cannot be loaded: {_first_line(e)}") from None


# ----------------------------------------------------------------------------------------------------
# Stage B: the U-Net bundle (weights + everything needed to sample from them).
# ----------------------------------------------------------------------------------------------------

UNET_FORMAT = "ldm_pipeline.UNetBundle"
UNET_FORMAT_VERSION = 1
UNET_WEIGHTS = "unet.safetensors"
UNET_EMA_WEIGHTS = "unet_ema.safetensors"
LORA_WEIGHTS = "unet_lora.safetensors"
LORA_EMA_WEIGHTS = "unet_lora_ema.safetensors"
NULL_CONDITION_FILE = "null_condition.safetensors"
UNET_PYFUNC_PARAMS = {"steps": 50, "guidance_scale": 4.0, "guidance_rescale": 0.0, "eta": 0.0, "seed": 0, "use_ema": True}
"""Inference params of the U-Net pyfunc (DDIM steps, CFG scale, CFG rescale, DDIM eta, noise seed, EMA weights) and
their defaults."""


@dataclass
class UNetBundle:
    """A published Stage B model, ready to sample from (see pipelines/sample.py)."""

    unet: UNet
    """The U-Net in eval mode, frozen, on the CPU (EMA weights when requested and present)."""
    unet_config: UNetConfig
    """Shape of the U-Net (context_dim = the text encoder's hidden size)."""
    diffusion: DiffusionConfig
    """The noise schedule and prediction target (eps or v) it was trained with."""
    schedule: NoiseSchedule
    """`diffusion`'s betas / alpha_bar on the CPU (`.to(device)` before sampling)."""
    text_encoder: TextEncoderConfig
    """The text encoder the U-Net was trained with (name/path and the max_length of its token sequences)."""
    hidden_size: int
    """Width D of the text encoder's hidden states."""
    null_context: torch.Tensor
    """Empty-prompt hidden states (L, D) float32: the unconditional input of classifier-free guidance."""
    null_mask: torch.Tensor
    """Empty-prompt attention mask (L,) bool."""
    latent_shape: tuple[int, int, int]
    """(C, h, w) of the scaled latents the U-Net denoises."""
    scale_factor: float
    """The latent scale the U-Net was trained with: decode `denormalize_latents(z, scale_factor, latents_mean,
    latents_std)`, that is z / scale_factor for Stable Diffusion's scalar normalisation."""
    autoencoder_uri: str
    """MLflow URI of the Stage A autoencoder whose latents the U-Net denoises (decode with it)."""
    encode_run_id: str | None
    """Lineage: the encode run that wrote the training latents."""
    stage_a_run_id: str | None
    """Lineage: the Stage A run that trained the autoencoder."""
    stage_b_run_id: str | None
    """Lineage: the Stage B run that trained these weights."""
    use_ema: bool
    """Whether `unet` holds the EMA weights."""
    step: int = 0
    """Optimiser steps the weights were trained for."""
    meta: dict = field(default_factory=dict)
    latents_mean: list[float] | None = None
    """Per-channel latent mean of a per-channel normalisation (`encode.latent_normalization`); None: scalar."""
    latents_std: list[float] | None = None
    """Per-channel latent std of a per-channel normalisation; None: scalar."""
    """The whole config.json."""


def save_unet_bundle(
    directory: str | Path,
    *,
    unet_state: Mapping[str, torch.Tensor],
    ema_state: Mapping[str, torch.Tensor] | None,
    unet_config: UNetConfig,
    diffusion: DiffusionConfig,
    text_encoder: TextEncoderConfig,
    hidden_size: int,
    null_context: torch.Tensor,
    null_mask: torch.Tensor,
    latent_shape: tuple[int, ...],
    scale_factor: float,
    autoencoder_uri: str,
    encode_run_id: str | None = None,
    stage_a_run_id: str | None = None,
    stage_b_run_id: str | None = None,
    extra: Mapping[str, Any] | None = None,
    latents_mean: list[float] | None = None,
    latents_std: list[float] | None = None,
    lora: Mapping[str, Any] | None = None,
) -> Path:
    """Write a U-Net bundle folder: raw (+ EMA) weights, the null condition and config.json. Nothing pickled.

    `ema_state` is a full U-Net state dict holding the EMA weights (buffers as in `unet_state`). With `lora`
    ({"config": the stage_b.lora section, "base": `pipelines.models.lora.base_reference`}) the bundle is a LoRA
    adapter: the two states are the adapters' (`lora.adapter_state`) and the base weights stay where `base` says.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    raw_file, ema_file = (LORA_WEIGHTS, LORA_EMA_WEIGHTS) if lora else (UNET_WEIGHTS, UNET_EMA_WEIGHTS)
    save_tensors(directory / raw_file, unet_state)
    if ema_state is not None:
        save_tensors(directory / ema_file, ema_state)
    save_tensors(directory / NULL_CONDITION_FILE, {"context": null_context.float(), "mask": null_mask.to(torch.bool)})
    meta = {
        "format": UNET_FORMAT,
        "format_version": UNET_FORMAT_VERSION,
        "unet": unet_config.model_dump(mode="json"),
        "diffusion": diffusion.model_dump(mode="json"),
        "text_encoder": {**text_encoder.model_dump(mode="json"), "hidden_size": int(hidden_size)},
        "latent_shape": [int(s) for s in latent_shape],
        "scale_factor": float(scale_factor),
        **({"latents_mean": list(latents_mean), "latents_std": list(latents_std)} if latents_mean is not None else {}),
        "autoencoder_uri": autoencoder_uri,
        "encode_run_id": encode_run_id,
        "stage_a_run_id": stage_a_run_id,
        "stage_b_run_id": stage_b_run_id,
        "weights": {"raw": raw_file, "ema": ema_file if ema_state is not None else None},
        "null_condition": NULL_CONDITION_FILE,
        **({"lora": dict(lora)} if lora else {}),
        **dict(extra or {}),
    }
    (directory / "config.json").write_text(json.dumps(meta, indent=2) + "\n")
    return directory


BaseLoader = Callable[[str], UNet]
"""Loads a LoRA bundle's base U-Net from its URI (`pipelines.models.interop.import_unet`, which reads bundles of
this module too: the caller hands it in, so that the two modules do not import each other)."""


def read_unet_bundle(directory: str | Path, use_ema: bool = True, lora_scale: float = 1.0,
                     load_base: BaseLoader | None = None) -> UNetBundle:
    """Load a folder written by `save_unet_bundle` (on the CPU, eval mode, frozen). A LoRA adapter's bundle needs
    `load_base`: its base, which must still have the weights digest it was trained on, comes back with the
    adapters folded in at `lora_scale`."""
    directory = Path(directory)
    config_path = directory / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} does not exist: not a U-Net bundle folder")
    meta = json.loads(config_path.read_text())
    if meta.get("format") != UNET_FORMAT or meta.get("format_version") != UNET_FORMAT_VERSION:
        raise ConfigError(f"{config_path}: format {meta.get('format')!r} v{meta.get('format_version')!r}, "
                          f"expected {UNET_FORMAT!r} v{UNET_FORMAT_VERSION}")
    try:
        unet_config = UNetConfig.model_validate(meta["unet"])
        diffusion = DiffusionConfig.model_validate(meta["diffusion"])
        text = dict(meta["text_encoder"])
        hidden_size = int(text.pop("hidden_size"))
        text_encoder = TextEncoderConfig.model_validate(text)
    except ValidationError as e:
        raise ConfigError(f"{config_path}:\n{format_validation_error(e)}") from None
    ema_file = meta["weights"].get("ema")
    chosen = ema_file if (use_ema and ema_file) else meta["weights"]["raw"]
    if meta.get("lora"):
        if load_base is None:
            raise ConfigError(f"{config_path}: LoRA adapters; their base is needed to load them (load_base)")
        base = load_base(meta["lora"]["base"]["uri"])
        lora.check_base(meta["lora"]["base"], lora.base_digest(base), str(directory))
        unet = lora.apply(base, LoraSection.model_validate(meta["lora"]["config"]), load_file(str(directory / chosen)), lora_scale)
    else:
        unet = UNet(unet_config)
        unet.load_state_dict(load_file(str(directory / chosen)))
    unet.eval().requires_grad_(False)
    null = load_file(str(directory / meta["null_condition"]))
    return UNetBundle(
        unet=unet, unet_config=unet_config, diffusion=diffusion, schedule=NoiseSchedule(diffusion),
        text_encoder=text_encoder, hidden_size=hidden_size, null_context=null["context"], null_mask=null["mask"].to(torch.bool),
        latent_shape=tuple(int(s) for s in meta["latent_shape"]), scale_factor=float(meta["scale_factor"]),
        autoencoder_uri=meta["autoencoder_uri"], encode_run_id=meta.get("encode_run_id"),
        stage_a_run_id=meta.get("stage_a_run_id"), stage_b_run_id=meta.get("stage_b_run_id"),
        use_ema=chosen == ema_file, step=int(meta.get("step", 0)), meta=meta,
        latents_mean=meta.get("latents_mean"), latents_std=meta.get("latents_std"),
    )


def publish_unet(directory: str | Path, registered_model_name: str | None) -> tuple[str, int | None]:
    """Log a `save_unet_bundle` folder as the pyfunc model "unet" of the active run (and register it).

    Returns (model_uri, registered_version), as `publish_pretrained`.
    """
    from mlflow.models import infer_signature

    directory = Path(directory)
    if directory.name != "unet":  # MLflow names the artifact folder after the source folder
        with tempfile.TemporaryDirectory() as tmp:
            shutil.copytree(directory, Path(tmp) / "unet")
            return publish_unet(Path(tmp) / "unet", registered_model_name)
    meta = json.loads((directory / "config.json").read_text())
    example_out = np.zeros((1, *meta["latent_shape"]), dtype=np.float32)
    signature = infer_signature(["a prompt"], example_out, params=dict(UNET_PYFUNC_PARAMS))
    return publish_pretrained(
        directory, artifact_key="unet", code_file="unet.py", name="unet", registered_model_name=registered_model_name,
        description="Stage B's text-conditioned U-Net bundle: weights and EMA weights, configs, the null condition, and "
                    "the autoencoder and text encoder it was trained with. pipelines/sample.py --model-uri "
                    "models:/ldm-unet/VERSION draws images from it.",
        signature=signature,
    )


def load_unet_bundle(model_uri: str, use_ema: bool = True, lora_scale: float = 1.0,
                     load_base: BaseLoader | None = None) -> UNetBundle:
    """The Stage B U-Net published at `model_uri` (models:/ldm-unet/3, runs:/<id>/unet, models:/m-<id>); LoRA
    adapters (models:/ldm-unet-lora/1) come with their base (`load_base`), folded in at `lora_scale`."""
    bundle = read_unet_bundle(download_pretrained(model_uri, "unet"), use_ema=use_ema, lora_scale=lora_scale,
                              load_base=load_base)
    if bundle.stage_b_run_id is None:
        bundle.stage_b_run_id = run_id_of(model_uri)
    return bundle


def lora_base_of(model_uri: str) -> str | None:
    """The base URI that the LoRA adapters published at `model_uri` record (None: a whole U-Net)."""
    meta = json.loads((download_pretrained(model_uri, "unet") / "config.json").read_text())
    return meta.get("lora", {}).get("base", {}).get("uri")


TAG_CHECKPOINT = "checkpoint"
"""Model-version tag: the training checkpoint a version was published from (so it is published only once)."""


def published_from(registered_model_name: str, checkpoint_uri: str) -> tuple[str, int] | None:
    """The registered version already published from this checkpoint (a re-run of a finished training run
    reports the same final checkpoint again): (model_uri, version), or None."""
    versions = MlflowClient().search_model_versions(f"name='{registered_model_name}'")
    for mv in sorted(versions, key=lambda v: int(v.version)):
        if mv.tags.get(TAG_CHECKPOINT) == checkpoint_uri:
            return f"models:/{registered_model_name}/{mv.version}", int(mv.version)
    return None


def mark_published(registered_model_name: str, version: int | None, checkpoint_uri: str) -> None:
    if version is not None:
        MlflowClient().set_model_version_tag(registered_model_name, str(version), TAG_CHECKPOINT, checkpoint_uri)


def registered_model_lost(run, cfg=None) -> str:
    """What a finished training run's published model lacks ("" when it is there): its `model_uri` tag, and the
    registered version that URI names (a deleted version makes the DAG train again rather than fail later)."""
    uri = run.data.tags.get("model_uri", "")
    if not uri:
        return "no model_uri tag"
    if uri.startswith("models:/") and uri.count("/") == 2 and uri.rsplit("/", 1)[1].isdigit():
        name, version = uri[len("models:/"):].split("/")
        MlflowClient().get_model_version(name, version)
    return ""

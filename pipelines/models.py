"""Publishing trained models to MLflow and loading them back by URI.

The stage contracts: Stage A publishes the autoencoder (weights + config + measured latent scale) as
an MLflow model registered under `mlflow.autoencoder_model_name`; later stages load it with
`load_autoencoder("models:/ldm-autoencoder/3")` or `load_autoencoder("runs:/<run_id>/autoencoder")`.
The weights inside are the model's own `save_pretrained` folder, so nothing is unpickled.
"""

from __future__ import annotations

from pathlib import Path

import mlflow

from ldm_core.autoencoder import AutoencoderKL

_CODE_DIR = Path(__file__).resolve().parent / "mlflow_models"
# The pyfunc flavour needs the project itself to serve; the pins match pyproject.toml.
PYFUNC_REQUIREMENTS = ["torch==2.14.1", "numpy", "safetensors", "pydantic>=2.9", "ldm-pipeline"]


def publish_pretrained(
    directory: str | Path, *, artifact_key: str, code_file: str, name: str, registered_model_name: str | None
) -> tuple[str, int | None]:
    """Log a `save_pretrained` folder as a pyfunc model of the active run (and register it).

    Returns (model_uri, registered_version). The model URI is `models:/<registered name>/<version>` when
    registered, else the logged model's own URI.
    """
    info = mlflow.pyfunc.log_model(
        name=name,
        python_model=str(_CODE_DIR / code_file),
        artifacts={artifact_key: str(directory)},
        registered_model_name=registered_model_name,
        pip_requirements=PYFUNC_REQUIREMENTS,
    )
    version = info.registered_model_version
    if registered_model_name and version is not None:
        return f"models:/{registered_model_name}/{version}", int(version)
    return info.model_uri, None


def download_pretrained(model_uri: str, artifact_key: str) -> Path:
    """Local folder holding the `save_pretrained` files of a published model."""
    root = Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri))
    folder = root / "artifacts" / artifact_key
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{model_uri} holds no '{artifact_key}' weights folder (looked in {folder})")
    return folder


def publish_autoencoder(model: AutoencoderKL, workdir: str | Path, registered_model_name: str | None) -> tuple[str, int | None]:
    folder = Path(workdir) / "autoencoder"
    model.save_pretrained(folder)
    return publish_pretrained(
        folder, artifact_key="autoencoder", code_file="autoencoder_pyfunc.py", name="autoencoder",
        registered_model_name=registered_model_name,
    )


def load_autoencoder(model_uri: str) -> AutoencoderKL:
    """The Stage A autoencoder (eval mode, frozen) with its measured latent scale factor."""
    model = AutoencoderKL.from_pretrained(download_pretrained(model_uri, "autoencoder")).eval()
    model.requires_grad_(False)
    return model


def run_id_of(model_uri: str) -> str:
    """The MLflow run that produced a model URI (models:/name/version, models:/m-<id>, runs:/<id>/...)."""
    if model_uri.startswith("runs:/"):
        return model_uri[len("runs:/"):].split("/", 1)[0]
    client = mlflow.MlflowClient()
    ref = model_uri[len("models:/"):]
    if "/" in ref:
        name, version = ref.split("/", 1)
        if version.isdigit():
            return client.get_model_version(name, version).run_id
        return client.get_model_version_by_alias(name, version).run_id
    return client.get_logged_model(ref).source_run_id

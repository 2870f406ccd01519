"""What a registered model version is, and who may promote it.

* **Digests.** Registering a version records the sha256 of every file MLflow stores for it (the model-version tag
  `ldm.sha256`, a JSON object `{relative path: hex digest}`); every load of a registered version
  (`pipelines.models.registry.download_pretrained`: `load_autoencoder`, `load_unet_bundle`, so sample.py too) checks the
  downloaded files against it and refuses a mismatch in one line naming the file. Published models are pyfunc
  "models from code": `mlflow.pyfunc.load_model` runs the `.py` stored with them, so a file changed in storage is
  code run by whoever loads the model next.
* **The requirement.** A logged model requires exactly the `ldm-pipeline` version that logged it.
* **Promotion.** The pipeline's MLflow user registers candidates (`mlflow.autoencoder_model_name`,
  `mlflow.unet_model_name`). A promoter (another MLflow user, infra/mlflow/add_user.py) copies a reviewed candidate's
  files into the experiment `ldm-promoted` and registers them as a version of the promoted model
  `<name>-promoted`, where the aliases (`@champion`) live. Both belong to the promoter; the pipeline's user can read
  them and change nothing: no new version, no alias move, no file under a promoted version.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import logging
import tempfile
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError

logger = logging.getLogger(__name__)

DIGESTS_TAG = "ldm.sha256"
"""Model-version tag: {path relative to the model's root: sha256 hex} of every file stored for the version."""
PROMOTED_FROM_TAG = "ldm.promoted_from"
"""Model-version tag of a promoted version: the candidate it was copied from (models:/<name>/<version>)."""
PROMOTED_SUFFIX = "-promoted"
PROMOTION_EXPERIMENT = "ldm-promoted"
"""The promoter's experiment: the runs that hold the files of promoted versions."""


class ArtifactDigestError(ConfigError):
    """A registered model version whose stored files are not the ones registered."""


def promoted_model_name(registered_model_name: str) -> str:
    """The promoted model of a candidate model: `ldm-unet` -> `ldm-unet-promoted`."""
    return registered_model_name + PROMOTED_SUFFIX


def pinned_requirement() -> str:
    """The requirement a logged model carries on this project: the exact version that logs it."""
    return f"ldm-pipeline=={importlib.metadata.version('ldm-pipeline')}"


REGISTRATION_FILE = "registered_model_meta"
"""The file MLflow writes into a model when registering it (the registered name and version): it differs between a
candidate and its promoted copy, and is no input of loading, so it is the one file the digests leave out."""


def file_digests(root: str | Path) -> dict[str, str]:
    """{path relative to `root` (POSIX): sha256 hex} of every file under `root` (but MLflow's REGISTRATION_FILE)."""
    root = Path(root)
    digests = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.relative_to(root).as_posix() != REGISTRATION_FILE):
        sha = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                sha.update(block)
        digests[path.relative_to(root).as_posix()] = sha.hexdigest()
    return digests


def record_artifact_digests(registered_model_name: str, version: int | str) -> dict[str, str]:
    """Download what the server stored for this version, and tag the version with the sha256 of every file."""
    uri = f"models:/{registered_model_name}/{version}"
    with tempfile.TemporaryDirectory() as tmp:
        digests = file_digests(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
    MlflowClient().set_model_version_tag(registered_model_name, str(version), DIGESTS_TAG,
                                         json.dumps(digests, sort_keys=True))
    return digests


def _registered_version(model_uri: str) -> tuple[str, str] | None:
    """(name, version) of a models:/<name>/<version> or models:/<name>@<alias> URI; None for other URIs."""
    if not model_uri.startswith("models:/"):
        return None
    ref = model_uri[len("models:/"):]
    if "@" in ref:
        name, alias = ref.split("@", 1)
        return name, MlflowClient().get_model_version_by_alias(name, alias).version
    name, _, version = ref.partition("/")
    return (name, version) if version else None


def verify_artifact_digests(model_uri: str, root: str | Path, *, required: bool = False) -> None:
    """Check the files downloaded from a registered version (under `root`, the model's root) against the sha256
    recorded at registration: ArtifactDigestError, in one line naming the file, for a changed, missing or added
    file. A version registered without digests is loaded with a warning (`required`: refused); other URIs
    (runs:/, a logged model's models:/m-<id>) have no registration to check against."""
    registered = _registered_version(model_uri)
    if registered is None:
        return
    name, version = registered
    recorded = MlflowClient().get_model_version(name, version).tags.get(DIGESTS_TAG)
    if recorded is None:
        message = f"model {model_uri}: registered without sha256 digests ({DIGESTS_TAG} tag)"
        if required:
            raise ArtifactDigestError(message)
        logger.warning("%s: its files are not checked", message)
        return
    expected, found = json.loads(recorded), file_digests(root)
    for path in sorted(expected.keys() | found.keys()):
        if path not in found:
            raise ArtifactDigestError(f"model {model_uri}: {path} is missing from storage (registered with sha256 "
                                      f"{expected[path][:16]}...)")
        if path not in expected:
            raise ArtifactDigestError(f"model {model_uri}: {path} was not there at registration: refusing to load it")
        if found[path] != expected[path]:
            raise ArtifactDigestError(f"model {model_uri}: {path} has sha256 {found[path][:16]}..., not the "
                                      f"{expected[path][:16]}... registered: refusing to load it")


CODE_DIR = Path(__file__).resolve().parent / "pyfunc"
"""The pyfunc code files of this checkout: the only code a promoted model may carry."""


def check_model_code(model_uri: str, root: str | Path) -> None:
    """Refuse (ArtifactDigestError, one line naming the file) a model whose Python files are not, byte for byte,
    this checkout's `pipelines/models/pyfunc/` files of the same name: `mlflow.pyfunc.load_model` runs them, and a
    candidate's digests were recorded by the pipeline's own user, so they cannot vouch for its code."""
    for path in sorted(Path(root).rglob("*.py")):
        ours = CODE_DIR / path.name
        if not ours.is_file() or ours.read_bytes() != path.read_bytes():
            raise ArtifactDigestError(f"model {model_uri}: {path.relative_to(root).as_posix()} is not this checkout's "
                                      f"pipelines/models/pyfunc/{path.name}: refusing to promote it")


def promote(registered_model_name: str, version: int | str, alias: str = "champion") -> str:
    """As the promoter: copy candidate `registered_model_name`/`version` (its files checked against its digests, its
    code against this checkout's: `check_model_code`) into
    a run of the experiment `ldm-promoted`, register that copy as a version of the promoted model with the same
    digests and a tag naming the candidate (lineage follows it: `pipelines.models.registry.run_id_of`), and point `alias` at
    it. Returns models:/<promoted name>/<version>."""
    client = MlflowClient()
    candidate = client.get_model_version(registered_model_name, str(version))
    source_uri = f"models:/{registered_model_name}/{version}"
    experiment = mlflow.get_experiment_by_name(PROMOTION_EXPERIMENT)
    if experiment is None:
        raise ConfigError(f"no experiment {PROMOTION_EXPERIMENT!r}: create it and hand it to the promoter first "
                          f"(infra/mlflow/add_user.py promoter --experiment {PROMOTION_EXPERIMENT} ...)")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=source_uri, dst_path=tmp))
        verify_artifact_digests(source_uri, root, required=True)
        check_model_code(source_uri, root)
        with mlflow.start_run(experiment_id=experiment.experiment_id, run_name=f"promote {registered_model_name}/{version}",
                              tags={"stage": "promote", PROMOTED_FROM_TAG: source_uri}) as run:
            mlflow.log_artifacts(str(root), artifact_path="model")
    promoted = promoted_model_name(registered_model_name)
    try:  # on a shared server the admin creates it and hands it to the promoter (add_user.py); a local store has none
        client.get_registered_model(promoted)
    except mlflow.exceptions.MlflowException:
        client.create_registered_model(promoted)
    copy = client.create_model_version(
        promoted, source=f"runs:/{run.info.run_id}/model", run_id=run.info.run_id,
        tags={DIGESTS_TAG: candidate.tags[DIGESTS_TAG], PROMOTED_FROM_TAG: source_uri},
        description=f"{source_uri}, promoted")
    uri = f"models:/{promoted}/{copy.version}"
    with tempfile.TemporaryDirectory() as tmp:  # what the server stored for the copy is what was reviewed
        verify_artifact_digests(uri, mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp), required=True)
    client.set_registered_model_alias(promoted, alias, copy.version)
    return uri

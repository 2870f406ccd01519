"""Registered models that encode and sample load are pinned: with `encode.autoencoder_alias` /
`sample.unet_alias` they load the version the alias points to (never merely the newest one registered), and
record that version. Aliases live on the promoted models, which `pipelines.models.provenance.promote` fills (who may run it
is tests/test_infra.py's business). Real MLflow SQLite stores; the encode run on a real local Ray."""

from __future__ import annotations

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from pipelines.data import latents
from pipelines.platform import storage
from pipelines.config import load_config
from pipelines.encode_latents import autoencoder_to_load, run_encode
from pipelines.encode_latents import main as encode_main
from pipelines.models.provenance import PROMOTION_EXPERIMENT, promote, record_artifact_digests
from pipelines.models.registry import ModelURIError
from pipelines.sample import apply_flags, build_parser, unet_to_load
from tests.helpers import REPO
from tests.test_encode import digits_dataset, publish_tiny_autoencoder, tiny_config


def register_versions(name: str, count: int) -> list[str]:
    """`count` versions of registered model `name`, each from its own run's artifact. Returns their versions."""
    client = MlflowClient()
    client.create_registered_model(name)
    # An experiment of this store: an earlier test in the process may have left another store's one active.
    mlflow.set_experiment("alias-versions")
    versions = []
    for _ in range(count):
        with mlflow.start_run() as run:
            mlflow.log_text("weights", "model/weights.txt")
        versions.append(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run_id=run.info.run_id).version)
        record_artifact_digests(name, versions[-1])
    return versions


def promote_in_this_store(name: str, version: str, alias: str = "champion") -> str:
    if mlflow.get_experiment_by_name(PROMOTION_EXPERIMENT) is None:
        mlflow.create_experiment(PROMOTION_EXPERIMENT)
    return promote(name, version, alias)


def test_alias_fields_accept_only_aliases_mlflow_accepts():
    cfg = load_config(REPO / "configs/quickstart.yaml", ["encode.autoencoder_alias=champion", "sample.unet_alias=prod_2"])
    assert (cfg.encode.autoencoder_alias, cfg.sample.unet_alias) == ("champion", "prod_2")
    for bad in ("latest", "LATEST", "v3", "two words", "a/b"):
        with pytest.raises(Exception, match="sample.unet_alias"):
            load_config(REPO / "configs/quickstart.yaml", [f"sample.unet_alias={bad}"])
    # The quickstart keeps working offline as before: no alias, the latest version.
    quick = load_config(REPO / "configs/quickstart.yaml")
    assert quick.encode.autoencoder_alias is None and quick.sample.unet_alias is None
    # The cluster config loads only promoted models.
    cluster = load_config(REPO / "configs/sd_f8.yaml")
    assert cluster.encode.autoencoder_alias == "champion" and cluster.sample.unet_alias == "champion"


def test_the_alias_picks_the_promoted_version_not_the_newest(tmp_path, mlflow_uri):
    cfg = load_config(REPO / "configs/quickstart.yaml", [f"run.output_uri={tmp_path / 'out'}"])
    ae = register_versions(cfg.mlflow.autoencoder_model_name, 3)
    unet = register_versions(cfg.mlflow.unet_model_name, 2)
    assert promote_in_this_store(cfg.mlflow.autoencoder_model_name, ae[0]) == "models:/ldm-autoencoder-promoted/1"
    assert promote_in_this_store(cfg.mlflow.unet_model_name, unet[0]) == "models:/ldm-unet-promoted/1"
    # An alias moved on the candidates' model (which the pipeline's user owns) is not what the alias fields read.
    MlflowClient().set_registered_model_alias(cfg.mlflow.autoencoder_model_name, "champion", ae[-1])

    assert autoencoder_to_load(cfg) == f"models:/ldm-autoencoder/{ae[-1]}"  # no alias: the newest
    cfg.encode.autoencoder_alias = "champion"
    assert autoencoder_to_load(cfg) == "models:/ldm-autoencoder-promoted/1"
    cfg.encode.autoencoder_uri = f"models:/ldm-autoencoder/{ae[1]}"  # an explicit URI (the DAG's) wins
    assert autoencoder_to_load(cfg) == f"models:/ldm-autoencoder/{ae[1]}"

    args = build_parser().parse_args(["--model-alias", "champion"])
    sample_cfg = apply_flags(load_config(REPO / "configs/quickstart.yaml"), args)
    assert sample_cfg.sample.unet_alias == "champion"
    assert unet_to_load(sample_cfg) == "models:/ldm-unet-promoted/1"

    # A missing alias is an error naming the field, never a silent fall-back to the newest version.
    cfg.encode.autoencoder_uri = None
    cfg.encode.autoencoder_alias = "staging"
    with pytest.raises(ModelURIError, match="encode.autoencoder_alias=staging: registered model "
                                            "'ldm-autoencoder-promoted' has no alias 'staging'"):
        autoencoder_to_load(cfg)
    sample_cfg.sample.unet_alias = "staging"
    with pytest.raises(ModelURIError, match="sample.unet_alias=staging"):
        unet_to_load(sample_cfg)


@pytest.mark.slow
def test_encode_loads_and_records_the_version_the_alias_points_to(tmp_path, mlflow_uri, ray_local, capsys):
    data_uri = digits_dataset(tmp_path, num=16)
    cfg = tiny_config(tmp_path, data_uri)
    candidate_uri, champion_run, _ = publish_tiny_autoencoder(cfg, tmp_path / "ae1")
    newest_uri, _, _ = publish_tiny_autoencoder(cfg, tmp_path / "ae2")
    assert candidate_uri.endswith("/1") and newest_uri.endswith("/2")
    champion_uri = promote_in_this_store(cfg.mlflow.autoencoder_model_name, "1")

    with pytest.raises(SystemExit, match="encode.autoencoder_alias=missing"):
        encode_main(["--config", str(REPO / "configs/quickstart.yaml"), "--set", f"data.uri={data_uri}",
                     "--set", "data.resolution=16", "--set", f"run.output_uri={tmp_path / 'out'}",
                     "--set", "encode.autoencoder_alias=missing"])

    cfg.encode.autoencoder_alias = "champion"
    cfg.encode.output_uri = str(tmp_path / "latents")
    result = run_encode(cfg)
    run = MlflowClient().get_run(result.run_id)
    assert run.data.tags["autoencoder_uri"] == champion_uri  # the pinned version, not the alias
    assert run.data.tags["autoencoder_alias"] == "champion"
    assert run.data.tags["upstream_run_ids"] == champion_run  # the promoted copy leads to the run that trained it
    manifest = storage.read_json(storage.resolve(cfg.encode.output_uri).join(latents.MANIFEST))
    assert manifest["autoencoder_uri"] == champion_uri and manifest["stage_a_run_id"] == champion_run

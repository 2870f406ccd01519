"""Encode on a real local Ray: tiny MNIST shards + a tiny published autoencoder -> local Parquet latents + manifest.

The autoencoder is a small random AutoencoderKL with a scale factor, published to a real MLflow store inside a
run tagged stage=stage_a (what Stage A does at its end); the text encoder is the embedded all-MiniLM-L6-v2.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from mlflow.tracking import MlflowClient

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.config import ConfigError
from pipelines.data import latents
from pipelines.platform import storage, tracking
from pipelines.config import PipelineConfig, load_config
from pipelines.data import build_dataset, to_model_range
from pipelines.encode_latents import main as encode_main
from pipelines.encode_latents import run_encode
from pipelines.models.registry import publish_autoencoder
from tests.helpers import REPO, tiny_later_stages

pytestmark = pytest.mark.slow

NUM_IMAGES = 40
RESOLUTION = 16
SCALE_FACTOR = 0.5
TINY_AE = AutoencoderConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4, mid_attention=False)


def tiny_config(tmp_path: Path, data_uri: str, *extra: str) -> PipelineConfig:
    """The quickstart shrunk to seconds: 16 px images, 4x8x8 latents, a 2-level 8-channel U-Net, 4 steps."""
    return load_config(REPO / "configs/quickstart.yaml", [
        f"run.output_uri={tmp_path / 'out'}",
        f"data.uri={data_uri}",
        f"data.resolution={RESOLUTION}",
        "data.holdout_fraction=0.2",
        *tiny_later_stages(),
        *extra,
    ])


def digits_dataset(tmp_path: Path, num: int = NUM_IMAGES, resolution: int = RESOLUTION, stride: int = 97) -> str:
    """A real shard set of every `stride`-th bundled MNIST digit (the bundle is sorted by label, so a prefix would
    be all zeros): several different captions. Returns its URI."""
    from itertools import islice

    from pipelines.data import write_shards
    from pipelines.data.sources import open_source

    uri = str(tmp_path / f"digits-{num}")
    write_shards(islice(open_source("mnist", resolution=resolution), 0, num * stride, stride), uri, shard_size=16, name="digits")
    return uri


def publish_tiny_autoencoder(cfg: PipelineConfig, workdir: Path, channel_stats=None) -> tuple[str, str, AutoencoderKL]:
    """A random tiny autoencoder with a scale factor (and per-channel `channel_stats` (means, stds) when given),
    published as Stage A would. Returns (model URI, run id, model)."""
    torch.manual_seed(0)
    model = AutoencoderKL(TINY_AE).eval()
    model.scale_factor.fill_(SCALE_FACTOR)
    if channel_stats is not None:
        model.latents_mean, model.latents_std = channel_stats
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    with tracking.stage_run(experiment_id=experiment_id, stage="stage_a", run_name="tiny-stage_a") as run:
        uri, _ = publish_autoencoder(model, workdir, cfg.mlflow.autoencoder_model_name)
    return uri, run.info.run_id, model


def first_posteriors(cfg: PipelineConfig, model: AutoencoderKL, rows: dict[str, np.ndarray]):
    """(indices into `rows`, the autoencoder's posterior) of the dataset's first 4 (centre-cropped) images."""
    images, _ = build_dataset(cfg.data.model_copy(update={"crop": "center"}), split="all", shuffle=False)
    first = images.take(4)
    index = {k: i for i, k in enumerate(rows["key"])}
    x = to_model_range(torch.as_tensor(np.stack([r["image"] for r in first])))
    with torch.no_grad():
        return [index[r["key"]] for r in first], model.encode(x)


def read_rows(uri: str, storage_cfg=None) -> dict[str, np.ndarray]:
    """Every row of a latents folder (split "all"), via the Ray Data reader, as numpy columns."""
    ds, _ = latents.build_latent_dataset(uri, storage_cfg, split="all", shuffle=False,
                                         columns=["key", "caption", *latents.TRAIN_COLUMNS, "holdout", "text_encoder"])
    rows = ds.take_all()
    return {k: np.stack([r[k] for r in rows]) if k not in ("key", "caption", "text_encoder") else np.array([r[k] for r in rows])
            for k in rows[0]}


@pytest.fixture
def setup(tmp_path, mlflow_uri, ray_local):
    data_uri = digits_dataset(tmp_path)
    cfg = tiny_config(tmp_path, data_uri)
    model_uri, stage_a_run, model = publish_tiny_autoencoder(cfg, tmp_path / "ae")
    return cfg, model_uri, stage_a_run, model


def test_interrupted_encode_leaves_no_manifest_then_a_rerun_completes_it(setup, tmp_path):
    """Encode crashes midway (the writer's fault hook): part files but no manifest, a FAILED run. The re-run
    completes the folder: scaled posterior moments, text states, manifest, null condition, lineage; the Ray Data
    reader streams it back. (test_stage_b.py does the same on S3.)"""
    cfg, model_uri, stage_a_run, model = setup
    out = str(tmp_path / "latents")
    loc = storage.resolve(out)
    cfg.encode.output_uri = out
    cfg.encode.fail_after_rows = 16
    with pytest.raises(Exception, match="fault hook"):
        run_encode(cfg)  # encode.autoencoder_uri unset: the latest registered version
    partial = storage.list_files(loc, ".parquet")
    assert partial and not storage.exists(loc.join(latents.MANIFEST))
    with pytest.raises(latents.LatentsError, match="interrupted encode"):
        latents.read_latents_manifest(out)
    experiment_id = mlflow.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    assert [r.info.status for r in tracking.find_runs(experiment_id, "tags.stage = 'encode'")] == ["FAILED"]

    cfg.encode.fail_after_rows = None
    result = run_encode(cfg)
    assert result.latents_uri == out and not result.reused
    manifest = storage.read_json(loc.join(latents.MANIFEST))
    assert manifest["num_rows"] == result.num_rows == NUM_IMAGES
    assert manifest["autoencoder_uri"] == model_uri and manifest["stage_a_run_id"] == stage_a_run
    assert manifest["encode_run_id"] == result.run_id
    assert manifest["scale_factor"] == SCALE_FACTOR and manifest["latent_shape"] == [4, 8, 8]
    assert manifest["text_encoder"] == {"name_or_path": "all-MiniLM-L6-v2", "max_length": 12, "hidden_size": 384,
                                        "model_type": "bert"}
    assert 0 < manifest["num_holdout"] < NUM_IMAGES
    # Only this attempt's files are left, all listed, each at most encode.rows_per_shard rows.
    files = storage.list_files(loc, ".parquet")
    assert sorted(files) == sorted(loc.join(f["path"]).path for f in manifest["files"])
    assert not set(partial) & set(files)
    for f in manifest["files"]:
        with loc.filesystem.open_input_file(loc.join(f["path"]).path) as fh:
            assert pq.read_metadata(fh).num_rows == f["num_rows"] <= 16
    assert sum(f["num_rows"] for f in manifest["files"]) == NUM_IMAGES

    rows = read_rows(result.latents_uri)
    assert len(set(rows["key"])) == len(rows["key"]) == NUM_IMAGES
    assert rows["latent_mean"].shape == (NUM_IMAGES, 4, 8, 8) and rows["text_hidden"].shape == (NUM_IMAGES, 12, 384)
    assert set(rows["text_encoder"]) == {"all-MiniLM-L6-v2"}
    assert rows["holdout"].sum() == manifest["num_holdout"]
    train, _ = latents.build_latent_dataset(out, split="train", shuffle=False)
    assert train.count() == NUM_IMAGES - manifest["num_holdout"]

    # The moments are the autoencoder's posterior of the (centre-cropped) image, times the scale factor.
    picked, posterior = first_posteriors(cfg, model, rows)
    assert np.allclose(rows["latent_mean"][picked], (posterior.mean * SCALE_FACTOR).numpy(), atol=1e-5)
    assert np.allclose(rows["latent_std"][picked], (posterior.std * SCALE_FACTOR).numpy(), atol=1e-5)
    assert (rows["latent_std"] > 0).all()

    # Text: real tokens only (padding zeroed and masked); equal captions -> equal states, different -> different.
    mask = rows["text_mask"]
    assert mask[:, :2].all() and not mask.all()
    assert np.all(rows["text_hidden"][~mask] == 0)
    captions = rows["caption"]
    assert len(set(captions)) >= 5
    same = np.nonzero(captions == captions[0])[0]
    assert len(same) > 1 and all(np.array_equal(rows["text_hidden"][0], rows["text_hidden"][i]) for i in same)
    other = int(np.nonzero(captions != captions[0])[0][0])
    assert not np.allclose(rows["text_hidden"][0], rows["text_hidden"][other], atol=1e-3)

    # The null condition: the empty prompt ([CLS] [SEP] for MiniLM), stored next to the manifest.
    null_context, null_mask = latents.read_null_condition(result.latents_uri, manifest)
    assert null_context.shape == (12, 384) and null_mask.tolist() == [True, True] + [False] * 10
    assert torch.isfinite(null_context).all() and null_context[:2].abs().sum() > 0

    # MLflow: stage and lineage tags, counts and throughput.
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    tags, metrics = run.data.tags, run.data.metrics
    assert tags["stage"] == "encode" and tags["upstream_run_ids"] == stage_a_run
    assert tags["latents_uri"] == result.latents_uri and tags["text_encoder"] == "all-MiniLM-L6-v2"
    assert tags["dataset_digest"] == manifest["dataset_digest"]
    assert metrics["encode/rows"] == NUM_IMAGES and metrics["perf/images_per_s"] > 0
    assert metrics["encode/files"] == len(manifest["files"]) and metrics["encode/stale_files_removed"] == len(partial)

    # A third run with the same inputs reuses the folder; other inputs into the same folder are refused.
    again = run_encode(cfg)
    assert again.reused and again.manifest["digest"] == manifest["digest"]
    other = cfg.model_copy(deep=True)
    other.encode.text_encoder.max_length = 8
    with pytest.raises(latents.LatentsError, match="max_length"):
        run_encode(other)




def test_per_channel_normalisation_encodes_with_the_autoencoders_statistics(tmp_path, mlflow_uri, ray_local):
    """encode.latent_normalization=per_channel: rows hold (mu - mean_c) / std_c and sigma / std_c (scale 1), the
    manifest records the three numbers Stage B and the export read, the folder differs from the scalar one's, and an
    autoencoder without measured statistics is refused before any work."""
    data_uri = digits_dataset(tmp_path)
    cfg = tiny_config(tmp_path, data_uri, "encode.latent_normalization=per_channel")
    publish_tiny_autoencoder(cfg, tmp_path / "plain")
    with pytest.raises(ConfigError, match="per_channel: the autoencoder has no measured per-channel"):
        run_encode(cfg)
    mean, std = [0.1, -0.2, 0.3, 0.05], [0.5, 0.4, 0.45, 0.01]
    _, _, model = publish_tiny_autoencoder(cfg, tmp_path / "stats", channel_stats=(mean, std))
    result = run_encode(cfg)  # the latest registered version: the one with statistics
    manifest = result.manifest
    assert (manifest["scale_factor"], manifest["latents_mean"], manifest["latents_std"]) == (1.0, mean, std)
    assert manifest["settings"]["latent_normalization"] == "per_channel"  # so its default folder is not the scalar one's
    rows = read_rows(result.latents_uri)
    picked, posterior = first_posteriors(cfg, model, rows)
    m, s = torch.tensor(mean).reshape(1, 4, 1, 1), torch.tensor(std).reshape(1, 4, 1, 1)
    assert np.allclose(rows["latent_mean"][picked], ((posterior.mean - m) / s).numpy(), atol=1e-4)
    assert np.allclose(rows["latent_std"][picked], (posterior.std / s).numpy(), atol=1e-4)


def test_missing_autoencoder_and_bad_resolution_fail_before_any_work(tmp_path, mlflow_uri, ray_local):
    data_uri = digits_dataset(tmp_path, num=8)
    cfg = tiny_config(tmp_path, data_uri)
    with pytest.raises(ConfigError, match="mlflow.autoencoder_model_name"):
        run_encode(cfg)
    publish_tiny_autoencoder(cfg, tmp_path / "ae")
    with pytest.raises(SystemExit, match="data.resolution=15"):
        encode_main(["--config", str(REPO / "configs/quickstart.yaml"), "--set", f"data.uri={data_uri}",
                     "--set", "data.resolution=15", "--set", f"run.output_uri={tmp_path / 'out'}"])

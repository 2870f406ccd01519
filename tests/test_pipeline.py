"""The DAG driver (pipelines/run.py) on a real local Ray and MLflow store: prepare -> stage_a, caching by
cache key, --force, and config errors reported before any stage starts."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines import run as pipeline
from pipelines.config import load_config
from tests.helpers import REPO, tiny_overrides

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, *extra: str):
    overrides = tiny_overrides(tmp_path, str(tmp_path / "data" / "mnist"))
    overrides += ["data.source=mnist", "data.limit=96", "data.shard_size=32", "run.name=dagtest"]
    return load_config(REPO / "configs/quickstart.yaml", overrides + list(extra))


def test_prepare_and_stage_a_then_all_cache_hits_then_force(ray_local, mlflow_uri, tmp_path, capsys):
    cfg = _cfg(tmp_path)
    first = pipeline.run_pipeline(cfg, until="stage_a")
    assert [first[s].status for s in ("prepare", "stage_a")] == ["ran", "ran"]
    assert (tmp_path / "data" / "mnist" / "manifest.json").is_file()

    client = MlflowClient()
    stage_a = client.get_run(first["stage_a"].run_id)
    prepare = client.get_run(first["prepare"].run_id)
    assert stage_a.data.tags["stage"] == "stage_a" and prepare.data.tags["stage"] == "prepare"
    assert stage_a.data.tags["upstream_run_ids"] == prepare.info.run_id  # lineage: dataset -> autoencoder
    assert stage_a.data.tags["dataset_digest"] == prepare.data.tags["dataset_digest"]
    parent_id = stage_a.data.tags["mlflow.parentRunId"]
    summary = client.download_artifacts(parent_id, "summary.json")
    assert "stage_a" in Path(summary).read_text()

    # Nothing changed: everything is reused and no training step runs (no new stage_a run, no new checkpoint).
    ckpt_root = Path(cfg.run.checkpoint_root)
    checkpoints_before = sorted(ckpt_root.rglob("checkpoint_*"))
    second = pipeline.run_pipeline(_cfg(tmp_path), until="stage_a")
    assert second["prepare"].status == "skipped" and second["stage_a"].status == "reused"
    assert second["stage_a"].run_id == first["stage_a"].run_id
    assert sorted(ckpt_root.rglob("checkpoint_*")) == checkpoints_before
    assert "[stage_a] reused" in capsys.readouterr().out

    # A changed stage_a setting changes its cache key: it runs again.
    third = pipeline.run_pipeline(_cfg(tmp_path, "stage_a.optim.lr=5e-4"), until="stage_a")
    assert third["stage_a"].status == "ran" and third["stage_a"].run_id != first["stage_a"].run_id

    # --force reruns a cached stage.
    forced = pipeline.run_pipeline(_cfg(tmp_path), until="stage_a", force="stage_a")
    assert forced["stage_a"].status in {"ran", "resumed"}
    assert forced["stage_a"].run_id not in {first["stage_a"].run_id, third["stage_a"].run_id}


def test_config_errors_stop_the_pipeline_before_any_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"), "--set", "stage_a.train.max_stepz=3"])
    assert "stage_a.train.max_stepz" in str(e.value)
    with pytest.raises(ConfigError, match="--until"):
        pipeline.run_pipeline(_cfg(tmp_path), until="stage_z")

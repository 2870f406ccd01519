"""The DAG driver (pipelines/run.py) on a real local Ray and MLflow store: prepare -> stage_a -> encode -> stage_b
-> sample on a tiny config; lineage, cache hits, partial re-runs, --force / --from / --until, and config errors
reported before any stage starts. (A driver killed in the middle of a stage: tests/test_cluster.py, on S3.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines import run as pipeline
from pipelines.config import load_config
from tests.helpers import REPO, tiny_later_stages, tiny_overrides

pytestmark = pytest.mark.slow

STAGES = pipeline.STAGE_NAMES


def _overrides(tmp_path: Path, *extra: str) -> list[str]:
    overrides = tiny_overrides(tmp_path, str(tmp_path / "data" / "mnist"))
    overrides += ["data.source=mnist", "data.limit=96", "data.shard_size=32", "run.name=dagtest", *tiny_later_stages()]
    return overrides + list(extra)


def _cfg(tmp_path: Path, *extra: str):
    return load_config(REPO / "configs/quickstart.yaml", _overrides(tmp_path, *extra))


def _checkpoints(cfg) -> list[Path]:
    return sorted(Path(cfg.run.checkpoint_root).rglob("checkpoint_*"))


@pytest.mark.timeout(1800)  # six pipeline runs and a --clean: past the default 600 s on a loaded 2-core box
def test_full_dag_with_lineage_then_cache_hits_then_only_changed_stages_rerun(ray_local, mlflow_uri, tmp_path, capsys,
                                                                             monkeypatch):
    cfg = _cfg(tmp_path)
    first = pipeline.run_pipeline(cfg)
    assert [first[s].status for s in STAGES] == ["ran"] * len(STAGES)
    out = capsys.readouterr().out
    for stage in STAGES:
        assert f"[{stage}] ran" in out

    # Lineage: every stage run is a child of one parent run, tagged with its stage and what it consumed.
    client = MlflowClient()
    runs = {s: client.get_run(first[s].run_id) for s in STAGES}
    parent_id = runs["prepare"].data.tags["mlflow.parentRunId"]
    for stage, run in runs.items():
        assert run.info.status == "FINISHED"
        assert run.data.tags["stage"] == stage
        assert run.data.tags["mlflow.parentRunId"] == parent_id
    upstream = {s: runs[s].data.tags["upstream_run_ids"] for s in STAGES}
    assert upstream["stage_a"] == first["prepare"].run_id
    assert upstream["encode"] == first["stage_a"].run_id
    assert upstream["stage_b"] == f"{first['encode'].run_id},{first['stage_a'].run_id}"
    assert upstream["sample"] == first["stage_b"].run_id
    # Walk back from the samples to the dataset digest through the tags alone.
    run_id = first["sample"].run_id
    while client.get_run(run_id).data.tags["stage"] != "prepare":
        run_id = client.get_run(run_id).data.tags["upstream_run_ids"].split(",")[0]
    manifest = json.loads((tmp_path / "data" / "mnist" / "manifest.json").read_text())
    assert client.get_run(run_id).data.tags["dataset_digest"] == manifest["digest"]
    assert runs["encode"].data.tags["latents_uri"] == first["encode"].outputs["latents_uri"]
    assert runs["stage_b"].data.tags["latents_uri"] == first["encode"].outputs["latents_uri"]

    # The parent run's summary: a table over every stage plus the reconstruction and sample grids.
    summary = json.loads(Path(client.download_artifacts(parent_id, "summary.json")).read_text())
    assert [row["stage"] for row in summary["stages"]] == list(STAGES)
    assert {a.path for a in client.list_artifacts(parent_id, "summary")} == {
        "summary/holdout_final.png", "summary/grid.png"}
    assert "stage_a/eval/psnr" in client.get_run(parent_id).data.metrics
    samples = Path(first["sample"].outputs["out_dir"])
    assert (samples / "grid.png").is_file() and len(list(samples.glob("p*.png"))) == 4

    # Nothing changed: every stage is reused, no training step runs (no new run, no new checkpoint).
    checkpoints = _checkpoints(cfg)
    second = pipeline.run_pipeline(_cfg(tmp_path))
    assert [second[s].status for s in STAGES] == ["skipped"] + ["reused"] * (len(STAGES) - 1)
    assert [second[s].run_id for s in STAGES] == [first[s].run_id for s in STAGES]
    assert _checkpoints(cfg) == checkpoints
    assert "[stage_b] reused" in capsys.readouterr().out

    # A Stage B setting changes the keys of stage_b and sample only: those two run, the rest is reused.
    third = pipeline.run_pipeline(_cfg(tmp_path, "stage_b.optim.lr=5e-4"))
    assert [third[s].status for s in STAGES] == ["skipped", "reused", "reused", "ran", "ran"]
    assert third["stage_b"].run_id != first["stage_b"].run_id
    assert client.get_run(third["sample"].run_id).data.tags["upstream_run_ids"] == third["stage_b"].run_id

    # --force S reruns S (from scratch, under a fresh Ray Train name) even though it is cached; --until stops.
    forced = pipeline.run_pipeline(_cfg(tmp_path), force="stage_b", until="stage_b")
    assert list(forced) == list(STAGES[:4]) and forced["stage_b"].status == "ran"
    assert forced["stage_b"].run_id not in {first["stage_b"].run_id, third["stage_b"].run_id}
    assert "train/resumed_from_step" not in client.get_run(forced["stage_b"].run_id).data.metrics

    # --from S takes the stages before S from the cache only: a changed Stage A setting has no cached run.
    with pytest.raises(RuntimeError, match="--from stage_b: stage stage_a has no finished run"):
        pipeline.run_pipeline(_cfg(tmp_path, "stage_a.optim.lr=5e-4"), from_stage="stage_b")
    # The newest finished run of a key is the one reused (the forced stage_b), and a stage is reused only from a
    # run that consumed the very upstream runs chosen now: the old samples came from the older stage_b.
    started = pipeline.run_pipeline(_cfg(tmp_path), from_stage="sample")
    assert started["stage_b"].status == "reused" and started["stage_b"].run_id == forced["stage_b"].run_id
    assert started["sample"].status == "ran"
    assert client.get_run(started["sample"].run_id).data.tags["upstream_run_ids"] == forced["stage_b"].run_id

    # A new MLflow store over the same outputs/ (a deleted store, a team server): a complete result with its own
    # lineage. Stage A adopts its checkpoint folder (same config, same dataset: no step runs) and says so; encode
    # runs again, so Stage B's upstream runs are new: it trains fresh in its own folder, never resuming the one
    # trained on the first store's latents.
    capsys.readouterr()
    monkeypatch.chdir(tmp_path)  # as users type it: a path relative to where they run (the workers run elsewhere)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///elsewhere.db")
    elsewhere = pipeline.run_pipeline(_cfg(tmp_path))
    assert [elsewhere[s].status for s in STAGES] == ["skipped", "ran", "ran", "ran", "ran"]
    assert "[stage_a] adopting checkpoint " in capsys.readouterr().out
    other = MlflowClient(f"sqlite:///{tmp_path / 'elsewhere.db'}")
    runs = {s: other.get_run(elsewhere[s].run_id) for s in STAGES[1:]}  # (a skipped prepare makes no run)
    assert all(run.info.status == "FINISHED" for run in runs.values())
    assert runs["stage_b"].data.tags["upstream_run_ids"] == f"{elsewhere['encode'].run_id},{elsewhere['stage_a'].run_id}"
    assert runs["stage_b"].data.tags["latents_uri"] == elsewhere["encode"].outputs["latents_uri"] != first["encode"].outputs["latents_uri"]
    trained_in = {s: client.get_run(first[s].run_id).data.tags["ray_train_name"] for s in ("stage_a", "stage_b")}
    assert runs["stage_a"].data.tags["ray_train_name"] == trained_in["stage_a"]  # adopted: the same folder
    first_a = client.get_run(first["stage_a"].run_id).data
    for key in ("eval/psnr", "eval/ssim", "final/scale_factor"):  # the adopted run shows the result it publishes
        assert runs["stage_a"].data.metrics[key] == pytest.approx(first_a.metrics[key])
    assert runs["stage_a"].data.tags["lpips_backbone"] == first_a.tags["lpips_backbone"]
    assert runs["stage_b"].data.tags["ray_train_name"] != trained_in["stage_b"]  # fresh: a folder of its own
    assert "train/resumed_from_step" not in runs["stage_b"].data.metrics

    # --clean stage_b removes the folders of stage_b and sample that only this store points at, and keeps those
    # that the first store's runs still point at; this store's runs of those stages are no longer reused.
    capsys.readouterr()
    assert pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"),
                          *[f"--set={o}" for o in _overrides(tmp_path)], "--clean", "stage_b"]) == {}
    out = capsys.readouterr().out
    ours = [f"{cfg.run.checkpoint_root}/{runs['stage_b'].data.tags['ray_train_name']}", elsewhere["sample"].outputs["out_dir"]]
    theirs = [f"{cfg.run.checkpoint_root}/{client.get_run(first['stage_b'].run_id).data.tags['ray_train_name']}",
              first["sample"].outputs["out_dir"]]
    for folder in ours:
        assert f"removed  {folder}" in out and not Path(folder).exists(), out
    for folder in theirs:
        assert f"kept     {folder}: run " in out and Path(folder).is_dir(), out
    assert "cache_key" not in other.get_run(elsewhere["stage_b"].run_id).data.tags
    assert "cache_key" in other.get_run(elsewhere["encode"].run_id).data.tags


def test_config_errors_stop_the_pipeline_before_any_stage(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"), "--set", "stage_a.train.max_stepz=3"])
    assert "stage_a.train.max_stepz" in str(e.value)
    with pytest.raises(ConfigError, match="--until"):
        pipeline.run_pipeline(_cfg(tmp_path), until="stage_z")
    assert not (tmp_path / "data").exists()

"""Bad input to the DAG as a new user gives it (issue 30): each refusal is one line and a non-zero exit, comes before
Ray starts, and leaves nothing the next run would trip on (no MLflow store or run, no lease, no output folder)."""

from __future__ import annotations

import pytest
import ray

from pipelines import run as pipeline
from tests.helpers import REPO, tiny_overrides

PROBES = {
    "from_an_empty_store": (["--from", "stage_b"], "error: --from stage_b: stage stage_a has no finished run for this "
                                                   "config in sqlite:///"),
    "more_workers_than_cpus": (["--set", "stage_a.scaling.num_workers=64"], "error: CPU budget: stage_a.scaling.num_workers"),
    "no_dataset_and_no_source": (["--set", "data.source=null"], "error: data.uri="),
    "text_encoder_not_in_the_cache": (["--set", "encode.text_encoder.name_or_path=nobody/no-such-encoder"],
                                      "error: text_encoder.name_or_path='nobody/no-such-encoder': cannot load the model"),
    "unreachable_mlflow": (["--set", "mlflow.tracking_uri=http://127.0.0.1:9"],
                           "error: MLflow tracking server http://127.0.0.1:9 is unreachable (Connection refused)"),
    "unknown_field": (["--set", "stage_a.train.max_stepz=3"], "error: invalid config ("),
    "unknown_stage": (["--from", "stage_z"], "error: argument --from: invalid choice: 'stage_z'"),
    # Retried first, and said so before the wait (the one warning this table allows).
    "unreachable_s3": (["--set", "data.source=null", "--set", "data.uri=s3://probe/data", "--set",
                        "storage.s3_endpoint_url=http://127.0.0.1:9", "--set", "storage.s3_max_attempts=3"],
                       "error: object storage unreachable, still failing after storage.s3_max_attempts retries"),
}
SAID_FIRST = {"unreachable_s3": "S3 endpoint http://127.0.0.1:9 is unreachable (Connection refused): retrying each "
                                "request up to storage.s3_max_attempts=3 times, for up to about 2 s, before giving up"}


@pytest.mark.parametrize("probe", PROBES)
def test_a_refusal_is_one_line_before_anything_starts_or_is_written(probe, tmp_path, monkeypatch, capsys, caplog):
    args, line = PROBES[probe]
    store = tmp_path / "mlflow.db"
    if "mlflow.tracking_uri" in " ".join(args):
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
    ray_was_up = ray.is_initialized()
    base = [f"--set={o}" for o in [*tiny_overrides(tmp_path, str(tmp_path / "data")), "data.source=mnist"]]
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"), *base, *args])
    message = str(e.value.code)
    assert message.startswith(line) and "\n" not in message, message
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= 30] == ([SAID_FIRST[probe]] if probe in SAID_FIRST else [])
    assert not store.exists() and not (tmp_path / "out").exists() and not (tmp_path / "data").exists()
    assert ray_was_up or not ray.is_initialized()

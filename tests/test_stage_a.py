"""Stage A on a real local Ray: 2 DDP workers on gloo, real Ray Data shards, a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipelines.config import load_config
from pipelines.models import load_autoencoder
from pipelines.stage_a import run_stage_a
from tests.helpers import REPO, mnist_dataset, tiny_overrides

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, data_uri: str, *extra: str):
    return load_config(REPO / "configs/quickstart.yaml", tiny_overrides(tmp_path, data_uri) + list(extra))


def test_two_worker_run_publishes_checkpoint_metrics_images_and_model(ray_local, mlflow_uri, tmp_path):
    data_uri = mnist_dataset(tmp_path)
    cfg = _cfg(tmp_path, data_uri, "stage_a.loss.disc_start=2")  # both loss branches run
    result = run_stage_a(cfg)

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "stage_a"
    assert run.data.tags["lpips_backbone"] in {"pretrained", "random"}
    assert run.data.params["stage_a.model.base_channels"] == "8"
    assert run.data.params["stage_a.scaling.num_workers"] == "2"
    for key in ("train/rec", "train/kl", "train/g_adv", "train/disc_loss", "train/adaptive_weight", "train/lr",
                "perf/images_per_s", "perf/data_wait_fraction", "eval/psnr", "eval/ssim", "eval/lpips",
                "eval/bicubic_psnr", "final/scale_factor"):
        assert key in run.data.metrics, key
    history = client.get_metric_history(result.run_id, "train/rec")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert run.data.metrics["train/adaptive_weight"] > 0  # the GAN term was on by step 4

    images = [a.path for a in client.list_artifacts(result.run_id, "reconstructions")]
    assert "reconstructions/holdout_final.png" in images and len(images) >= 2

    # The dataset is a logged input with its manifest digest.
    inputs = run.inputs.dataset_inputs
    assert len(inputs) == 1 and inputs[0].dataset.digest == run.data.tags["dataset_digest"][:36]

    # Registered model: loads back as the exact module, with the measured scale factor.
    assert result.model_uri.startswith("models:/")
    model = load_autoencoder(result.model_uri)
    assert model.scale_factor.item() == pytest.approx(result.metrics["scale_factor"], rel=1e-6)
    assert model.scale_factor.item() != 1.0
    assert client.get_model_version(cfg.mlflow.autoencoder_model_name, str(result.model_version)).run_id == result.run_id

    # Checkpoint: safetensors + resolved config + step, nothing pickled.
    ckpt = Path(run.data.tags["checkpoint"])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["config"]["stage_a"]["train"]["max_steps"] == 4
    assert (ckpt / "autoencoder_state.safetensors").is_file() and (ckpt / "autoencoder" / "model.safetensors").is_file()
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.pkl"))


def test_worker_crash_resumes_from_last_checkpoint(ray_local, mlflow_uri, tmp_path):
    data_uri = mnist_dataset(tmp_path)
    cfg = _cfg(
        tmp_path, data_uri,
        "stage_a.train.max_steps=5", "stage_a.train.checkpoint_every=2", "stage_a.train.fail_at_step=3",
        "stage_a.train.max_failures=1", "run.name=crashy",
    )
    result = run_stage_a(cfg)

    marker = Path(cfg.run.checkpoint_root) / "crashy-stage_a" / ".fault_injected"
    assert marker.read_text().strip() == "step=3"  # the fault really fired
    client = MlflowClient()
    resumed = client.get_metric_history(result.run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] == [2.0]  # restarted from the step-2 checkpoint

    ckpt = Path(client.get_run(result.run_id).data.tags["checkpoint"])
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 5
    # Adam counts its own updates: exactly max_steps, so no step was applied twice or lost.
    adam = load_file(str(ckpt / "opt_g.safetensors"))
    steps = {float(v) for k, v in adam.items() if k.endswith(".step")}
    assert steps == {5.0}

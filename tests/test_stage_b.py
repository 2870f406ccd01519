"""Stage B on a real local Ray: encode to Parquet on S3 (a real moto server), then train the U-Net with 2 DDP
workers streaming those latents from S3, publish, and load the bundle back. (Stage B restarted from a checkpoint
after a failed worker or a killed driver: tests/test_pipeline.py; a 2-rank restart: tests/test_stage_a.py.)
(The local-disk variant of the Parquet, with an interrupted encode, is in test_encode.py.)"""

from __future__ import annotations

import json
from pathlib import Path

import boto3
import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ldm_core.config import ConfigError
from ldm_core.sampling import Condition, ddim_sample, sampling_plan
from pipelines.data import latents
from pipelines.encode_latents import run_encode
from pipelines.models.registry import load_unet_bundle
from pipelines.stage_b import main as stage_b_main
from pipelines.stage_b import run_stage_b
from tests.helpers import REPO
from tests.test_encode import SCALE_FACTOR, digits_dataset, publish_tiny_autoencoder, tiny_config

pytestmark = pytest.mark.slow


def test_encode_to_s3_then_two_worker_stage_b_and_its_published_bundle(tmp_path, mlflow_uri, ray_local, s3_bucket):
    latents_uri = f"s3://{s3_bucket}/latents/digits"
    cfg = tiny_config(
        tmp_path, digits_dataset(tmp_path), f"encode.output_uri={latents_uri}", "run.name=tiny",
        "stage_b.scaling.num_workers=2",
    )
    ae_uri, stage_a_run, _ = publish_tiny_autoencoder(cfg, tmp_path / "ae")
    encoded = run_encode(cfg)
    assert encoded.latents_uri == latents_uri
    keys = {o["Key"] for o in boto3.client("s3").list_objects_v2(Bucket=s3_bucket)["Contents"]}
    assert {"latents/digits/manifest.json", "latents/digits/null_condition.safetensors"} <= keys
    assert {f"latents/digits/{f['path']}" for f in encoded.manifest["files"]} <= keys

    # The U-Net must fit the latents: each mismatch is named before anything is trained.
    for field, value in (("context_dim", 32), ("in_channels", 3)):
        bad = cfg.model_copy(deep=True)
        setattr(bad.stage_b.unet, field, value)
        with pytest.raises(ConfigError, match=f"stage_b.unet.{field}={value}"):
            run_stage_b(bad)

    result = run_stage_b(cfg)  # stage_b.latents_uri unset: the latest finished encode run
    assert result.latents_uri == latents_uri

    client = MlflowClient()
    run = client.get_run(result.run_id)
    tags, metrics = run.data.tags, run.data.metrics
    assert run.info.status == "FINISHED" and tags["stage"] == "stage_b"
    assert tags["upstream_run_ids"] == f"{encoded.run_id},{stage_a_run}"
    assert tags["latents_uri"] == latents_uri and tags["encode_run_id"] == encoded.run_id
    assert tags["model_uri"] == result.model_uri == "models:/ldm-unet/1"
    history = client.get_metric_history(result.run_id, "train/loss")
    assert {m.step for m in history} == {1, 2, 3, 4} and all(np.isfinite(m.value) for m in history)
    assert "train/resumed_from_step" not in metrics
    for key in ("train/grad_norm", "train/lr", "perf/images_per_s", "perf/data_wait_fraction", "perf/setup_s",
                "eval/holdout_loss", "eval/holdout_loss_ema"):
        assert np.isfinite(metrics[key]), key
    grids = {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert {"samples/step_0000002.png", "samples/step_0000004.png"} <= grids
    assert run.inputs.dataset_inputs[0].dataset.digest == encoded.manifest["digest"][:36]

    # The checkpoint: 4 optimiser steps exactly, EMA updated 4 times.
    ckpt = Path(tags["checkpoint"])
    assert json.loads((ckpt / "meta.json").read_text())["step"] == 4
    assert {float(v) for k, v in load_file(str(ckpt / "opt.safetensors")).items() if k.endswith(".step")} == {4.0}
    assert int(load_file(str(ckpt / "ema.safetensors"))["_ema.num_updates"]) == 4

    # The published bundle: EMA and raw weights, configs, lineage and the null condition of the latents.
    bundle = load_unet_bundle(result.model_uri)
    raw = load_unet_bundle(result.model_uri, use_ema=False)
    assert bundle.use_ema and not raw.use_ema and bundle.step == 4
    assert any(not torch.equal(a, b) for a, b in zip(bundle.unet.parameters(), raw.unet.parameters()))
    assert bundle.unet_config == cfg.stage_b.unet and bundle.diffusion == cfg.stage_b.diffusion
    assert bundle.text_encoder.name_or_path == "all-MiniLM-L6-v2" and bundle.text_encoder.max_length == 12
    assert bundle.latent_shape == (4, 8, 8) and bundle.scale_factor == SCALE_FACTOR
    assert (bundle.autoencoder_uri, bundle.encode_run_id, bundle.stage_a_run_id, bundle.stage_b_run_id) == (
        ae_uri, encoded.run_id, stage_a_run, result.run_id)
    null_context, null_mask = latents.read_null_condition(latents_uri, encoded.manifest)
    assert torch.equal(bundle.null_context, null_context) and torch.equal(bundle.null_mask, null_mask)
    z = ddim_sample(bundle.unet, torch.randn(2, *bundle.latent_shape, generator=torch.Generator().manual_seed(0)),
                    sampling_plan(bundle.schedule, 2), Condition(null_context.expand(2, -1, -1), null_mask.expand(2, -1),
                                                                 bundle.null_context, bundle.null_mask, guidance_scale=2.0))
    assert z.shape == (2, 4, 8, 8) and torch.isfinite(z).all()

    # The pyfunc flavour: prompts -> scaled latents, reproducible by seed.
    pyfunc = mlflow.pyfunc.load_model(result.model_uri)
    out = pyfunc.predict(["a handwritten digit three", ""], params={"steps": 2, "seed": 1})
    assert out.shape == (2, 4, 8, 8) and np.isfinite(out).all()
    assert np.array_equal(out, pyfunc.predict(["a handwritten digit three", ""], params={"steps": 2, "seed": 1}))


def test_stage_b_without_latents_fails_clearly(tmp_path, mlflow_uri, ray_local):
    args = ["--config", str(REPO / "configs/quickstart.yaml"), "--set", f"run.output_uri={tmp_path / 'out'}",
            "--set", f"data.uri={tmp_path / 'none'}"]
    with pytest.raises(SystemExit, match="no finished encode run"):
        stage_b_main(args)
    with pytest.raises(SystemExit, match="interrupted encode"):
        (tmp_path / "half" / "parts-x").mkdir(parents=True)
        (tmp_path / "half" / "parts-x" / "part-00000-000.parquet").write_bytes(b"PAR1")
        stage_b_main(args + ["--set", f"stage_b.latents_uri={tmp_path / 'half'}"])


def test_stage_b_training_recipe_options_and_prompt_accuracy_in_the_run(tmp_path, mlflow_uri, ray_local):
    """Min-SNR-5, offset noise, input perturbation and zero-terminal-SNR + v reach the training loss and the published
    schedule; with digit prompts the run itself logs the MNIST judge's prompt accuracy at the fixed budget."""
    prompts = ["a handwritten digit three", "a handwritten digit eight"]
    cfg = tiny_config(
        tmp_path, digits_dataset(tmp_path), "run.name=recipes", f"sample.prompts={json.dumps(prompts)}",
        "stage_b.diffusion.prediction=v", "stage_b.diffusion.zero_terminal_snr=true", "stage_b.diffusion.snr_gamma=5",
        "stage_b.diffusion.offset_noise=0.1", "stage_b.diffusion.input_perturbation=0.1",
        "stage_b.prompt_eval.num_per_prompt=3", "stage_b.prompt_eval.steps=3",
        "sample.digit_classifier.epochs=1", "sample.digit_classifier.min_holdout_accuracy=0.5",
    )
    assert cfg.stage_b.prompt_eval.active(cfg.sample.prompts)
    publish_tiny_autoencoder(cfg, tmp_path / "ae")
    run_encode(cfg)
    result = run_stage_b(cfg)

    metrics = MlflowClient().get_run(result.run_id).data.metrics
    # Min-SNR: the optimised loss is the weighted one, the plain MSE is logged next to it.
    for key in ("train/loss", "train/mse", "train/snr_weight_mean", "eval/holdout_loss_ema"):
        assert np.isfinite(metrics[key]), key
    assert 0 < metrics["train/snr_weight_mean"] <= 1
    # The judge's numbers: 3 samples per prompt, so each accuracy is a multiple of 1/3 (overall of 1/6).
    for key in ("eval/prompt_accuracy", "eval/prompt_accuracy_3", "eval/prompt_accuracy_8", "eval/classifier_holdout_accuracy"):
        assert metrics[key] == pytest.approx(result.metrics[key]), key
    assert round(metrics["eval/prompt_accuracy"] * 6, 6).is_integer() and 0 <= metrics["eval/prompt_accuracy"] <= 1
    # The published bundle rebuilds the zero-terminal-SNR schedule the U-Net was trained on.
    bundle = load_unet_bundle(result.model_uri)
    assert bundle.diffusion == cfg.stage_b.diffusion and bundle.schedule.alpha_bar[-1].item() == 0.0


def test_stage_b_trains_through_an_mlflow_server_outage_and_every_metric_arrives(tmp_path, ray_local, monkeypatch):
    """A real `mlflow server` is killed while Stage B trains and restarted (same port, same store) seconds later:
    training never waits for it, and the metrics logged during the outage arrive with their original times."""
    import threading
    import time

    from tests.conftest import free_port
    from tests.helpers import start_mlflow_server, stop_process_group

    port, root = free_port(), tmp_path / "mlflow-server"
    server = {"proc": start_mlflow_server(port, root)}
    uri = f"http://127.0.0.1:{port}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    steps = 40
    cfg = tiny_config(tmp_path, digits_dataset(tmp_path), "run.name=outage", f"stage_b.train.max_steps={steps}",
                      "stage_b.train.checkpoint_every=1000", "stage_b.train.image_every=1000", "sample.prompts=[]")
    publish_tiny_autoencoder(cfg, tmp_path / "ae")
    run_encode(cfg)
    outage: dict = {}

    def kill_and_restart_mid_training():
        client = MlflowClient(uri)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            runs = client.search_runs([client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id],
                                      "tags.stage = 'stage_b'")
            seen = [m.step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")] if runs else []
            if seen and max(seen) >= 2:
                outage["last_step_before"] = max(seen)
                break
            time.sleep(0.2)
        stop_process_group(server["proc"])
        outage["down"] = time.time() * 1000
        time.sleep(8)
        outage["up"] = time.time() * 1000
        server["proc"] = start_mlflow_server(port, root)

    watcher = threading.Thread(target=kill_and_restart_mid_training, daemon=True)
    watcher.start()
    try:
        result = run_stage_b(cfg)
        watcher.join(timeout=300)
        assert "up" in outage, "the server was never taken down"
        assert outage["last_step_before"] < steps
        history = MlflowClient(uri).get_metric_history(result.run_id, "train/loss")
        assert sorted({m.step for m in history}) == list(range(1, steps + 1))  # nothing lost (the last step also
        # carries the final summary's train/loss)
        during = [m.step for m in history if outage["down"] <= m.timestamp <= outage["up"]]
        assert during, "no step was trained while the server was down: training waited for MLflow"
        run = MlflowClient(uri).get_run(result.run_id)
        assert run.info.status == "FINISHED" and "eval/holdout_loss" in run.data.metrics
    finally:
        stop_process_group(server["proc"])

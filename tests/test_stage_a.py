"""Stage A on a real local Ray: 2 DDP workers on gloo, real Ray Data shards, a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from pipelines.config import load_config
from pipelines.models.registry import load_autoencoder
from pipelines.stage_a import run_stage_a
from tests.helpers import REPO, mnist_dataset, tiny_overrides

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, data_uri: str, *extra: str):
    return load_config(REPO / "configs/quickstart.yaml", tiny_overrides(tmp_path, data_uri) + list(extra))


def test_two_worker_run_crashes_resumes_publishes_then_a_rerun_reuses_it_and_a_changed_config_is_refused(
        ray_local, mlflow_uri, tmp_path):
    """One Stage A run whose rank dies at step 3 (after the step-2 checkpoint) and is restarted from it, then the
    same command again (reused, nothing trained or published) and a changed setting under the same name (refused)."""
    from pipelines.stage_a import main

    data_uri = mnist_dataset(tmp_path)
    extra = ["stage_a.loss.disc_start=2",  # both loss branches run
             "stage_a.eval.every=2",  # a held-out point mid-run: the curve in the MLflow UI
             "stage_a.train.fail_at_step=3", "stage_a.train.max_failures=1", "run.name=crashy"]
    cfg = _cfg(tmp_path, data_uri, *extra)
    result = run_stage_a(cfg)

    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "stage_a"
    assert run.data.tags["lpips_backbone"] in {"pretrained", "random"}
    assert run.data.params["stage_a.model.base_channels"] == "8"
    assert run.data.params["stage_a.scaling.num_workers"] == "2"
    for key in ("train/rec", "train/kl", "train/g_adv", "train/disc_loss", "train/adaptive_weight", "train/lr",
                "perf/images_per_s", "perf/data_wait_fraction", "perf/setup_s", "eval/psnr", "eval/ssim", "eval/lpips",
                "eval/bicubic_psnr", "final/scale_factor"):
        assert key in run.data.metrics, key
    assert run.data.metrics["perf/setup_s"] > 0  # the stage's set-up, kept out of the first steps' data wait
    history = client.get_metric_history(result.run_id, "train/rec")
    assert {m.step for m in history} == {1, 2, 3, 4}
    assert run.data.metrics["train/adaptive_weight"] > 0  # the GAN term was on by step 4
    # Held-out PSNR as a curve: step 2 during training, step 4 at the end (the final evaluation).
    curve = {m.step: m.value for m in client.get_metric_history(result.run_id, "eval/psnr")}
    assert sorted(curve) == [2, 4] and all(5.0 < v < 60.0 for v in curve.values())
    assert curve[4] == pytest.approx(result.metrics["eval/psnr"])
    assert {m.step for m in client.get_metric_history(result.run_id, "eval/bicubic_psnr")} == {2, 4}

    # The crash: the fault fired at step 3, the group restarted from the step-2 checkpoint.
    marker = Path(cfg.run.checkpoint_root) / "crashy-stage_a" / ".fault_injected"
    assert marker.read_text().strip() == "step=3"
    assert [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")] == [2.0]

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
    # ... and the per-channel statistics of the same latents, beside it: with equal counts per channel their pooled
    # std is the scalar's 1 / scale_factor, and each is a metric of the run.
    mean = torch.tensor(model.latents_mean, dtype=torch.float64)
    std = torch.tensor(model.latents_std, dtype=torch.float64)
    assert mean.shape == std.shape == (cfg.stage_a.model.latent_channels,) and (std > 0).all()
    pooled = (std.pow(2) + (mean - mean.mean()).pow(2)).mean().sqrt().item()
    assert pooled == pytest.approx(1.0 / model.scale_factor.item(), rel=1e-5)
    assert run.data.metrics["latent_channel_std_3"] == pytest.approx(model.latents_std[3])
    assert client.get_model_version(cfg.mlflow.autoencoder_model_name, str(result.model_version)).run_id == result.run_id

    # Checkpoint: safetensors + resolved config + step, nothing pickled; Adam counts its own updates: exactly
    # max_steps, so across the crash no step was applied twice or lost.
    ckpt = Path(run.data.tags["checkpoint"])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["config"]["stage_a"]["train"]["max_steps"] == 4
    assert (ckpt / "autoencoder_state.safetensors").is_file() and (ckpt / "autoencoder" / "model.safetensors").is_file()
    assert not list(ckpt.rglob("*.pt")) and not list(ckpt.rglob("*.pkl"))
    assert {float(v) for k, v in load_file(str(ckpt / "opt_g.safetensors")).items() if k.endswith(".step")} == {4.0}

    # Same name, same settings: the finished checkpoint is not trained or published again.
    again = run_stage_a(cfg)
    assert (again.model_uri, again.model_version) == (result.model_uri, result.model_version)
    assert len(client.search_model_versions(f"name='{cfg.mlflow.autoencoder_model_name}'")) == 1

    # Training longer is a resume; training something else under the same name is refused in one line.
    new_lr = cfg.stage_a.optim.lr * 2
    overrides = tiny_overrides(tmp_path, data_uri) + extra + [f"stage_a.optim.lr={new_lr}"]
    args = ["--config", str(REPO / "configs/quickstart.yaml")] + [a for o in overrides for a in ("--set", o)]
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    message = str(exit_info.value.code)
    assert message.startswith("error: ") and "\n" not in message
    assert f"stage_a.optim.lr: {cfg.stage_a.optim.lr} -> {new_lr}" in message and "run.resume_changed_config=true" in message
    assert len(client.search_model_versions(f"name='{cfg.mlflow.autoencoder_model_name}'")) == 1


def test_fine_tune_an_imported_diffusers_vae_decoder_only_keeps_encoder_and_published_scale(ray_local, mlflow_uri, tmp_path):
    """SD's ft-MSE recipe on a (tiny, random) diffusers VAE: the encoder stays as imported, so existing latents
    stay valid, the decoder trains, and the published scale factor is the imported one, not a re-measured one."""
    diffusers = pytest.importorskip("diffusers")
    import torch

    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(block_out_channels=[8, 16], layers_per_block=1, norm_num_groups=4, latent_channels=4,
                                  down_block_types=["DownEncoderBlock2D"] * 2, up_block_types=["UpDecoderBlock2D"] * 2,
                                  scaling_factor=0.3)
    vae.save_pretrained(str(tmp_path / "vae"), safe_serialization=True)
    cfg = _cfg(tmp_path, mnist_dataset(tmp_path), f"stage_a.init_from={tmp_path / 'vae'}", "stage_a.train_decoder_only=true",
               "stage_a.train.max_steps=2", "stage_a.optim.lr=0.001", "run.name=finetune")
    result = run_stage_a(cfg)

    published = load_autoencoder(result.model_uri)
    assert published.scale_factor.item() == pytest.approx(0.3) == result.metrics["scale_factor"]
    ours = {k: v for k, v in published.state_dict().items()}
    from pipelines.models.interop import load_init_autoencoder
    from pipelines.models.interop import adopt_init_architectures

    imported = load_init_autoencoder(adopt_init_architectures(cfg).stage_a, cfg.storage).state_dict()
    encoder_keys = [k for k in imported if k.startswith(("encoder.", "quant_conv."))]
    decoder_keys = [k for k in imported if k.startswith("decoder.") and imported[k].is_floating_point()]
    assert encoder_keys and decoder_keys
    assert all(torch.equal(ours[k], imported[k]) for k in encoder_keys)  # frozen
    assert any(not torch.equal(ours[k], imported[k]) for k in decoder_keys)  # trained

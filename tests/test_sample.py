"""Sampling: prompts -> images through the published U-Net, its autoencoder and its text encoder.

The first half exercises the pure generation and writing functions on tiny random models; the second half
publishes a tiny U-Net bundle to a real MLflow store (in a run tagged stage=stage_b, as Stage B does) and
drives `run_sample` and the CLI end to end.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient
from PIL import Image

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.diffusion import DiffusionConfig, NoiseSchedule
from ldm_core.sampling import Condition, ddim_sample, sampling_plan
from ldm_core.unet import UNet, UNetConfig
from pipelines import sample
from pipelines.models import inference
from pipelines.platform import storage, tracking
from pipelines.config import SampleConfig, load_config
from pipelines.models.judge import load_or_train_classifier
from pipelines.models.registry import publish_autoencoder, publish_unet, read_unet_bundle, save_unet_bundle
from pipelines.data.text_encoders import TextEncoderConfig, load_text_encoder
from tests.helpers import REPO

CONTEXT_DIM = 8
TINY_AE = AutoencoderConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1, norm_groups=4, mid_attention=False)
TINY_UNET = UNetConfig(model_channels=8, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2,
                       norm_groups=4, context_dim=CONTEXT_DIM)
TINY_DIFFUSION = DiffusionConfig(num_timesteps=100)


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """A freshly built U-Net outputs exactly 0 (zero-initialised last layers): give every weight some noise so
    that conditions, guidance and steps make a difference."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return module.eval()


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    unet = _perturbed(UNet(TINY_UNET), 1)
    ae = AutoencoderKL(TINY_AE).eval()
    ae.scale_factor.fill_(0.7)
    g = torch.Generator().manual_seed(2)
    context = torch.randn(3, 5, CONTEXT_DIM, generator=g)  # three "prompts"
    mask = torch.ones(3, 5, dtype=torch.bool)
    mask[0, 3:] = False
    null = torch.randn(5, CONTEXT_DIM, generator=g)
    return {"unet": unet, "ae": ae, "schedule": NoiseSchedule(TINY_DIFFUSION), "context": context, "mask": mask, "null": null}


def _generate(tiny, context=None, context_mask=None, **settings):
    """`inference.generate` with `sample.*` settings (defaults: 2 per prompt, 4 steps, guidance 3) on the tiny models."""
    sc = SampleConfig(**{"num_per_prompt": 2, "steps": 4, "guidance": 3.0, **settings})
    condition = inference.condition_for(sc, tiny["context"] if context is None else context,
                                     tiny["mask"] if context_mask is None else context_mask, tiny["null"], None)
    return inference.generate(tiny["unet"], tiny["ae"], inference.plan_for(sc, tiny["schedule"]), condition, latent_shape=(4, 4, 4),
                           scale_factor=0.7, num_per_prompt=sc.num_per_prompt, seed=sc.seed, sampler=sc.sampler,
                           batch_size=sc.batch_size, mixed_precision="no")


def test_generate_is_reproducible_and_seeded(tiny):
    a, b = _generate(tiny), _generate(tiny)
    assert a.shape == (6, 3, 8, 8) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1
    assert not torch.allclose(a, _generate(tiny, seed=1))
    # The batch split does not change the images, nor does an ancestral sampler's noise.
    assert torch.allclose(a, _generate(tiny, batch_size=4), atol=1e-5)
    assert torch.equal(_generate(tiny, eta=1.0), _generate(tiny, eta=1.0))
    assert torch.equal(_generate(tiny, sampler="ddpm"), _generate(tiny, sampler="ddpm"))
    with pytest.raises(ValueError, match="sample.eta=0.5: sampler=ddpm is ancestral"):
        SampleConfig(sampler="ddpm", eta=0.5)  # the ddpm sampler would refuse it too; the config says so first


def test_generate_matches_ddim_with_the_given_steps_and_guidance(tiny):
    """The images are DDIM(steps, guidance) from the seeded noise, decoded with the latent scale undone."""
    steps, guidance = 3, 2.5
    images = _generate(tiny, steps=steps, guidance=guidance, num_per_prompt=1)
    x_T = inference.initial_noise(0, 1, (4, 4, 4)).repeat(3, 1, 1, 1)
    z = ddim_sample(tiny["unet"], x_T, sampling_plan(tiny["schedule"], steps),
                    Condition(tiny["context"], tiny["mask"], tiny["null"], None, guidance_scale=guidance))
    expected = tiny["ae"].decode(z / 0.7).clamp(-1, 1)
    assert torch.allclose(images, expected, atol=1e-5)
    assert not torch.allclose(images, _generate(tiny, steps=steps + 2, guidance=guidance, num_per_prompt=1), atol=1e-3)
    assert not torch.allclose(images, _generate(tiny, steps=steps, guidance=0.0, num_per_prompt=1), atol=1e-3)


def test_generate_rescales_guidance_when_asked(tiny):
    """sample.guidance_rescale reaches the sampler's guidance (Lin et al. 2024, Sec. 3.4); 0 is plain guidance."""
    images = _generate(tiny, steps=3, guidance=6.0, guidance_rescale=0.7, num_per_prompt=1)
    x_T = inference.initial_noise(0, 1, (4, 4, 4)).repeat(3, 1, 1, 1)
    z = ddim_sample(tiny["unet"], x_T, sampling_plan(tiny["schedule"], 3),
                    Condition(tiny["context"], tiny["mask"], tiny["null"], None, guidance_scale=6.0, guidance_rescale=0.7))
    assert torch.allclose(images, tiny["ae"].decode(z / 0.7).clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(images, _generate(tiny, steps=3, guidance=6.0, num_per_prompt=1), atol=1e-3)
    with pytest.raises(ValueError, match="guidance_rescale"):
        SampleConfig(guidance_rescale=1.5)


def test_generate_decodes_per_channel_normalised_latents(tiny, tmp_path):
    """A U-Net trained on per-channel normalised latents: its samples are denormalised channel by channel before the
    decoder (x * std_c + mean_c), and the bundle carries the statistics."""
    mean, std = [0.2, -0.1, 0.0, 0.3], [0.5, 0.4, 0.45, 0.02]
    sc = SampleConfig(steps=3, guidance=3.0, num_per_prompt=1)
    condition = inference.condition_for(sc, tiny["context"], tiny["mask"], tiny["null"], None)
    images = inference.generate(tiny["unet"], tiny["ae"], inference.plan_for(sc, tiny["schedule"]), condition,
                                latent_shape=(4, 4, 4), scale_factor=1.0, num_per_prompt=1, seed=0, latents_mean=mean,
                                latents_std=std)
    x_T = inference.initial_noise(0, 1, (4, 4, 4)).repeat(3, 1, 1, 1)
    z = ddim_sample(tiny["unet"], x_T, sampling_plan(tiny["schedule"], 3), condition)
    z = z * torch.tensor(std).reshape(1, 4, 1, 1) + torch.tensor(mean).reshape(1, 4, 1, 1)
    assert torch.allclose(images, tiny["ae"].decode(z).clamp(-1, 1), atol=1e-5)

    folder = save_unet_bundle(
        tmp_path / "unet", unet_state=tiny["unet"].state_dict(), ema_state=None, unet_config=TINY_UNET,
        diffusion=TINY_DIFFUSION, text_encoder=TextEncoderConfig(), hidden_size=CONTEXT_DIM, null_context=tiny["null"],
        null_mask=torch.ones(5, dtype=torch.bool), latent_shape=(4, 4, 4), scale_factor=1.0, autoencoder_uri="",
        latents_mean=mean, latents_std=std)
    bundle = read_unet_bundle(folder)
    assert (bundle.scale_factor, bundle.latents_mean, bundle.latents_std) == (1.0, mean, std)


def test_generate_takes_stable_diffusions_ddim_steps_when_asked(tiny):
    """sample.timestep_spacing / steps_offset / set_alpha_to_one reach the sampler: SD's leading steps with offset 1
    and alpha_bar_0 at the end give DDIM with exactly those settings, and differ from the default trailing steps."""
    sd = dict(timestep_spacing="leading", steps_offset=1, set_alpha_to_one=False)
    images = _generate(tiny, steps=3, num_per_prompt=1, **sd)
    x_T = inference.initial_noise(0, 1, (4, 4, 4)).repeat(3, 1, 1, 1)
    z = ddim_sample(tiny["unet"], x_T, sampling_plan(tiny["schedule"], 3, spacing="leading", steps_offset=1, set_alpha_to_one=False),
                    Condition(tiny["context"], tiny["mask"], tiny["null"], None, guidance_scale=3.0))
    assert torch.allclose(images, tiny["ae"].decode(z / 0.7).clamp(-1, 1), atol=1e-5)
    assert not torch.allclose(images, _generate(tiny, steps=3, num_per_prompt=1), atol=1e-3)


def test_prompt_images_do_not_depend_on_the_other_prompts(tiny):
    all_three = _generate(tiny)
    last_alone = _generate(tiny, context=tiny["context"][2:], context_mask=tiny["mask"][2:])
    assert torch.allclose(all_three[4:], last_alone, atol=1e-5)
    # Column j shares its noise across prompts, yet different prompts give different images.
    assert not torch.allclose(all_three[0], all_three[2], atol=1e-3)


def test_write_samples_pngs_grid_and_manifest(tmp_path, tiny):
    images = _generate(tiny)
    prompts = ["a handwritten digit zero", "A digit: 7!", "a handwritten digit zero"]
    paths, grid_uri, grid = sample.write_samples(images, prompts, 2, str(tmp_path / "out"), None, {"seed": 0})
    assert len(paths) == 6 and len(set(paths)) == 6
    assert paths[2].endswith("p01_a-digit-7_000.png")
    for path, image in zip(paths, images):
        png = Image.open(path)
        assert png.size == (8, 8) and png.mode == "RGB"
        # The PNG holds the image (up to 8-bit quantisation).
        arr = torch.from_numpy(np.array(png)).permute(2, 0, 1).float() / 127.5 - 1
        assert torch.allclose(arr, image, atol=1 / 127.5 + 1e-6)
    grid_png = Image.open(grid_uri)
    # make_grid: 2 columns, 3 rows of 8 px images with 2 px padding.
    assert grid_png.size == (2 * (8 + 2) + 2, 3 * (8 + 2) + 2) == grid.shape[1::-1]
    manifest = json.loads((tmp_path / "out" / "samples.json").read_text())
    assert [e["prompt_index"] for e in manifest["images"]] == [0, 0, 1, 1, 2, 2]
    assert manifest["seed"] == 0 and manifest["grid"] == "grid.png"


def test_grayscale_png():
    png = Image.open(io.BytesIO(sample.to_png(torch.zeros(1, 4, 6))))
    assert png.mode == "L" and png.size == (6, 4)


# ---------------------------------------------------------------------------------------------------
# End to end: a tiny U-Net bundle published to a real MLflow store, then run_sample and the CLI.
# ---------------------------------------------------------------------------------------------------

QUICKSTART = str(REPO / "configs" / "quickstart.yaml")
TEXT = TextEncoderConfig(max_length=8)
DIGIT_PROMPTS = ["a handwritten digit three", "a handwritten digit eight"]


def _publish_unet(tmp, experiment_id: str, *, ae_uri: str, ae_run: str, seed: int, status: str = "FINISHED",
                  diffusion: DiffusionConfig = TINY_DIFFUSION) -> tuple[str, str]:
    """What Stage B leaves behind: a run tagged stage=stage_b with the published bundle and a model_uri tag."""
    encoder = load_text_encoder(TEXT)
    null_context, null_mask = encoder.encode([""])
    unet_cfg = TINY_UNET.model_copy(update={"context_dim": encoder.hidden_size})
    torch.manual_seed(seed)
    raw = _perturbed(UNet(unet_cfg), seed).state_dict()
    ema = _perturbed(UNet(unet_cfg), seed + 100).state_dict()
    with tracking.stage_run(experiment_id=experiment_id, stage="stage_b", run_name=f"tiny-stage-b-{seed}",
                            upstream_run_ids=[ae_run]) as run:
        folder = save_unet_bundle(
            tmp / f"bundle-{seed}" / "unet", unet_state=raw, ema_state=ema, unet_config=unet_cfg, diffusion=diffusion,
            text_encoder=TEXT, hidden_size=encoder.hidden_size, null_context=null_context[0], null_mask=null_mask[0],
            latent_shape=(4, 4, 4), scale_factor=0.7, autoencoder_uri=ae_uri, stage_a_run_id=ae_run,
            stage_b_run_id=run.info.run_id,
        )
        model_uri, _ = publish_unet(folder, None)
        mlflow.set_tag("model_uri", model_uri)
    if status != "FINISHED":
        MlflowClient().set_terminated(run.info.run_id, status=status)
    return model_uri, run.info.run_id


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    """A tracking store holding a Stage A autoencoder and three Stage B runs: older, latest finished, newest failed."""
    tmp = tmp_path_factory.mktemp("published")
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    overrides = [f"run.output_uri={tmp / 'out'}", f"mlflow.tracking_uri={uri}", f"data.uri={tmp / 'data'}",
                 "sample.steps=3", "sample.num_per_prompt=2", f"sample.prompts={json.dumps(DIGIT_PROMPTS)}",
                 "sample.evaluate_digits=false"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        cfg = load_config(QUICKSTART, overrides)
        experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
        ae = AutoencoderKL(TINY_AE).eval()
        ae.scale_factor.fill_(0.7)
        with tracking.stage_run(experiment_id=experiment_id, stage="stage_a", run_name="tiny-stage-a") as run:
            ae_uri, _ = publish_autoencoder(ae, tmp, None)
            mlflow.set_tag("model_uri", ae_uri)
        ae_run = run.info.run_id
        older, _ = _publish_unet(tmp, experiment_id, ae_uri=ae_uri, ae_run=ae_run, seed=1)
        latest, latest_run = _publish_unet(tmp, experiment_id, ae_uri=ae_uri, ae_run=ae_run, seed=2)
        failed, _ = _publish_unet(tmp, experiment_id, ae_uri=ae_uri, ae_run=ae_run, seed=3, status="FAILED")
        yield {"cfg": cfg, "overrides": overrides, "tmp": tmp, "uri": uri, "latest": latest, "latest_run": latest_run,
               "older": older, "failed": failed, "ae_uri": ae_uri}
    mlflow.set_tracking_uri(None)


def _cfg(published, *extra: str):
    return load_config(QUICKSTART, published["overrides"] + list(extra))


def test_a_zero_terminal_snr_model_is_sampled_only_from_pure_noise(published, tmp_path):
    """A U-Net trained with zero terminal SNR must start sampling at t = T-1: leading spacing is refused before any
    work, trailing (the default) samples."""
    experiment_id = MlflowClient().create_experiment("zero-snr")  # not the config's: "latest" stays as it was
    zero = TINY_DIFFUSION.model_copy(update={"prediction": "v", "zero_terminal_snr": True})
    uri, _ = _publish_unet(published["tmp"], experiment_id, ae_uri=published["ae_uri"], ae_run="", seed=7, diffusion=zero)
    leading = _cfg(published, f"sample.unet_uri={uri}", "sample.timestep_spacing=leading", "sample.steps_offset=1",
                   f"sample.out_dir={tmp_path / 'leading'}")
    with pytest.raises(ConfigError, match="zero terminal SNR.*use sample.timestep_spacing=trailing"):
        sample.run_sample(leading, log_to_mlflow=False)
    assert not (tmp_path / "leading").exists()
    result = sample.run_sample(_cfg(published, f"sample.unet_uri={uri}", f"sample.out_dir={tmp_path / 'trailing'}"),
                               log_to_mlflow=False)
    assert len(result.image_paths) == 4 and torch.isfinite(result.images).all()


def test_run_sample_uses_the_latest_finished_stage_b_and_records_lineage(published):
    cfg = _cfg(published)
    result = sample.run_sample(cfg)
    assert result.model_uri == published["latest"] != published["failed"]
    assert len(result.image_paths) == 4 and all(Path(p).is_file() for p in result.image_paths)
    assert Path(result.grid_path).is_file()
    assert result.out_dir.startswith(f"{cfg.run.output_uri}/samples/{published['latest_run']}-")
    # another request of the same U-Net gets a folder of its own: the first one's grid and samples.json stay
    other = sample.run_sample(cfg, prompts=["a handwritten digit one"], log_to_mlflow=False)
    assert other.out_dir != result.out_dir and Path(result.grid_path).is_file()
    assert json.loads((Path(result.out_dir) / "samples.json").read_text())["prompts"] == list(cfg.sample.prompts)
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.tags["stage"] == "sample"
    assert run.data.tags["upstream_run_ids"] == published["latest_run"]
    assert run.data.tags["autoencoder_uri"] == published["ae_uri"]
    assert run.data.params["sample.steps"] == "3" and run.data.params["sample.guidance"] == str(cfg.sample.guidance)
    logged = {a.path for a in MlflowClient().list_artifacts(result.run_id, "samples")}
    assert sample.GRID_ARTIFACT in logged
    manifest = json.loads((Path(result.out_dir) / "samples.json").read_text())
    assert manifest["model_uri"] == published["latest"] and manifest["use_ema"] is True and manifest["run_id"] == result.run_id


def test_same_seed_same_images_other_seed_other_images(published, tmp_path):
    a = sample.run_sample(_cfg(published, f"sample.out_dir={tmp_path / 'a'}"), log_to_mlflow=False)
    b = sample.run_sample(_cfg(published, f"sample.out_dir={tmp_path / 'b'}"), log_to_mlflow=False)
    assert a.run_id is None and torch.equal(a.images, b.images)
    assert [Path(p).read_bytes() for p in a.image_paths] == [Path(p).read_bytes() for p in b.image_paths]
    c = sample.run_sample(_cfg(published, f"sample.out_dir={tmp_path / 'c'}", "sample.seed=1"), log_to_mlflow=False)
    assert not torch.allclose(a.images, c.images, atol=1e-3)


def test_cli_flags_override_the_config(published, tmp_path):
    out = tmp_path / "cli"
    result = sample.main(["--config", QUICKSTART, *[f"--set={o}" for o in published["overrides"]],
                          "--prompt", "a handwritten digit five", "--num", "3", "--steps", "2", "--guidance", "0",
                          "--seed", "7", "--out", str(out), "--model-uri", published["older"], "--no-mlflow"])
    assert result.model_uri == published["older"]
    assert sorted(p.name for p in out.glob("*.png")) == ["grid.png"] + [f"p00_a-handwritten-digit-five_{j:03d}.png" for j in range(3)]
    settings = json.loads((out / "samples.json").read_text())["settings"]
    assert (settings["num_per_prompt"], settings["steps"], settings["guidance"], settings["seed"]) == (3, 2, 0.0, 7)
    # The flags are what the images were made with: the same values through the config give the same images,
    # and changing any one of steps or guidance changes them.
    same = ["sample.prompts=['a handwritten digit five']", "sample.num_per_prompt=3", "sample.steps=2", "sample.guidance=0",
            "sample.seed=7", f"sample.unet_uri={published['older']}", f"sample.out_dir={tmp_path / 'cfg'}"]
    assert torch.equal(result.images, sample.run_sample(_cfg(published, *same), log_to_mlflow=False).images)
    for change in ("sample.steps=3", "sample.guidance=4"):
        other = sample.run_sample(_cfg(published, *same, change), log_to_mlflow=False).images
        assert not torch.allclose(result.images, other, atol=1e-3), change


def test_a_square_trained_model_samples_the_shape_asked_for(published, tmp_path):
    """The published U-Net was trained on 4x4 latents (8x8 px through f=2): by default it samples that shape;
    --height/--width give any multiple of f, here 8x16 px; a side the autoencoder cannot make is one line."""
    base = ["--config", QUICKSTART, *[f"--set={o}" for o in published["overrides"]], "--no-mlflow"]
    square = sample.main(base + ["--out", str(tmp_path / "square")])
    assert square.images.shape[-2:] == (8, 8)
    wide = sample.main(base + ["--height", "8", "--width", "16", "--out", str(tmp_path / "wide")])
    assert wide.images.shape == (4, 3, 8, 16) and torch.isfinite(wide.images).all()
    assert {Image.open(p).size for p in wide.image_paths} == {(16, 8)}  # PIL: (width, height)
    assert json.loads((tmp_path / "wide" / "samples.json").read_text())["settings"]["width"] == 16
    with pytest.raises(SystemExit) as e:
        sample.main(base + ["--width", "15", "--out", str(tmp_path / "odd")])
    assert str(e.value).startswith("error: sample.width=15 (--width): not a multiple") and "\n" not in str(e.value)
    assert not (tmp_path / "odd").exists()


def test_ema_weights_by_default_raw_on_request(published, tmp_path):
    ema = sample.run_sample(_cfg(published, f"sample.out_dir={tmp_path / 'ema'}"), log_to_mlflow=False)
    raw = sample.main(["--config", QUICKSTART, *[f"--set={o}" for o in published["overrides"]], "--no-ema",
                       "--out", str(tmp_path / "raw"), "--no-mlflow"])
    assert json.loads((tmp_path / "raw" / "samples.json").read_text())["use_ema"] is False
    assert not torch.allclose(ema.images, raw.images, atol=1e-3)


def test_evaluate_digits_logs_prompt_adherence(published):
    cfg = _cfg(published, "sample.evaluate_digits=true", "sample.digit_classifier.epochs=1",
               "sample.digit_classifier.min_holdout_accuracy=0.5")
    result = sample.run_sample(cfg)
    logged = MlflowClient().get_run(result.run_id).data.metrics
    for key in ("eval/prompt_accuracy", "eval/prompt_accuracy_3", "eval/prompt_accuracy_8", "eval/classifier_holdout_accuracy"):
        assert logged[key] == pytest.approx(result.metrics[key]), key
    # The figures are the classifier's verdicts on these very images.
    clf = load_or_train_classifier(cfg.sample.digit_classifier, cache_uri=f"{cfg.run.output_uri}/cache/digit_classifier")
    assert clf.from_cache
    predicted = clf.predict(result.images)
    assert logged["eval/prompt_accuracy_3"] == pytest.approx(float((predicted[:2] == 3).float().mean()))
    assert logged["eval/prompt_accuracy"] == pytest.approx(float((predicted == torch.tensor([3, 3, 8, 8])).float().mean()))
    assert logged["eval/classifier_holdout_accuracy"] == pytest.approx(clf.holdout_accuracy)
    with pytest.raises(ConfigError, match="none of the prompts names a digit"):
        sample.run_sample(cfg, prompts=["a photo of a cat"], log_to_mlflow=False)


def test_no_stage_b_run_is_a_clear_error(tmp_path, monkeypatch, capsys):
    args = ["--config", QUICKSTART, f"--set=run.output_uri={tmp_path}", "--prompt", "a handwritten digit one"]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(SystemExit) as missing:
        sample.main(args)
    assert str(missing.value).startswith("error: no U-Net to sample from: experiment 'ldm-quickstart'")
    assert "does not exist" in str(missing.value) and "\n" not in str(missing.value)
    # The experiment exists but holds only a failed Stage B run.
    cfg = load_config(QUICKSTART, [f"run.output_uri={tmp_path}"])
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    MlflowClient().set_terminated(
        MlflowClient().create_run(experiment_id, tags={"stage": "stage_b", "model_uri": "models:/ldm-unet/1"}).info.run_id,
        status="FAILED")
    with pytest.raises(SystemExit, match="has no finished stage_b run with a published model"):
        sample.main(args)


def test_bad_values_are_one_line_errors(published, tmp_path):
    base = ["--config", QUICKSTART, *[f"--set={o}" for o in published["overrides"]], "--out", str(tmp_path)]
    with pytest.raises(SystemExit) as e:
        sample.main(base + ["--steps", "0"])
    assert str(e.value).startswith("error: --steps: sample.steps:") and "\n" not in str(e.value)
    with pytest.raises(SystemExit, match=r"sample.steps=500: more than the model's 100 diffusion timesteps"):
        sample.main(base + ["--steps", "500"])
    with pytest.raises(SystemExit, match="error: --sampler"):
        sample.main(base + ["--sampler", "euler"])
    with pytest.raises(SystemExit, match="config file not found"):
        sample.main(["--config", str(tmp_path / "nope.yaml")])


def test_bad_model_uris_outputs_and_guidance_fail_in_one_line_before_sampling(published, tmp_path, moto_server,
                                                                              monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    base = ["--config", QUICKSTART, *[f"--set={o}" for o in published["overrides"]]]
    experiment_id = mlflow.get_experiment_by_name(published["cfg"].mlflow.experiment).experiment_id
    sample_runs = len(MlflowClient().search_runs([experiment_id], "tags.stage = 'sample'"))
    cases = [
        (["--model-uri", "runs:/abc"], "error: model URI 'runs:/abc' is malformed"),
        (["--model-uri", "models:/nope/1"], "error: model models:/nope/1 cannot be loaded: Registered Model with name=nope not found"),
        (["--model-uri", published["ae_uri"]], f"error: model {published['ae_uri']} holds no 'unet' weights "
                                               "(it holds autoencoder: a model of another kind)"),
        (["--out", "s3://no-such-bucket-h13/samples"], "error: sample.out_dir: s3://no-such-bucket-h13/samples: "
                                                       "bucket 'no-such-bucket-h13' does not exist"),
        (["--out", "ftp://host/samples"], "error: --out: unsupported storage URI 'ftp://host/samples'"),
        (["--guidance", "1e30"], "error: --guidance: sample.guidance: Input should be less than or equal to 100"),
    ]
    for flags, expected in cases:
        caplog.clear()
        with pytest.raises(SystemExit) as e:
            sample.main(base + flags)
        assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)
        assert not any(r.getMessage().startswith("sampling ") for r in caplog.records)  # failed before sampling
    assert list(tmp_path.iterdir()) == []  # no `ftp:` folder, nothing else
    assert len(MlflowClient().search_runs([experiment_id], "tags.stage = 'sample'")) == sample_runs


def test_samples_go_to_object_storage(published, s3_bucket):
    out = f"s3://{s3_bucket}/samples/run-1"
    result = sample.run_sample(_cfg(published, f"sample.out_dir={out}"), log_to_mlflow=False)
    loc = storage.resolve(out)
    names = [p.rsplit("/", 1)[-1] for p in storage.list_files(loc)]
    assert sorted(names) == sorted(["grid.png", "samples.json"] + [p.rsplit("/", 1)[-1] for p in result.image_paths])
    assert result.grid_path == f"{out}/grid.png"
    png = Image.open(io.BytesIO(storage.read_bytes(loc.join(result.image_paths[0].rsplit("/", 1)[-1]))))
    assert png.size == tuple(result.images.shape[-2:])


@pytest.mark.parametrize("shape,kwargs", [
    ((7, 3, 5, 6), {"nrow": 3, "padding": 2, "pad_value": -1.0}),  # a last row part-filled, the samples' grid
    ((4, 1, 8, 8), {"nrow": 4, "padding": 1}),  # grey: three equal channels
    ((1, 3, 4, 4), {}),  # one image: itself
    ((6, 4, 3, 3), {"nrow": 10, "padding": 0}),  # fewer images than nrow, four channels
])
def test_image_grid_lays_out_images_as_torchvision_does(shape, kwargs):
    from torchvision.utils import make_grid as torchvision_grid

    images = torch.randn(*shape)
    ours = tracking.make_grid(images, **kwargs)
    assert torch.equal(ours, torchvision_grid(images, **kwargs))

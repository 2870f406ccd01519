"""LoRA fine-tuning (stage_b.lora, pipelines/models/lora.py): adapters made with peft on our U-Net, only they train,
they fold into the base, and diffusers' load_lora_weights reads our export to the same U-Net output."""

from __future__ import annotations

from pathlib import Path

import diffusers
import pytest
import torch
from safetensors.torch import save_file

from ldm_core import convert
from ldm_core.config import ConfigError
from ldm_core.unet import UNet, UNetConfig
from pipelines.config import load_config
from pipelines.config.pipeline import LoraSection
from pipelines.models import lora
from tests.helpers import REPO

TOL = 1e-5
EVERY_TARGET = ["to_q", "to_k", "to_v", "to_out", "ff.proj", "ff.out", "proj_in", "proj_out", "conv1", "conv2"]
TINY = UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], num_heads=2,
                  norm_groups=8, context_dim=12, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)


def perturbed_unet(seed: int = 0) -> UNet:
    """Random weights everywhere (also the zero-initialised projections), eval mode."""
    torch.manual_seed(seed)
    unet = UNet(TINY).eval()
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    return unet


def random_adapters(model: torch.nn.Module, seed: int = 1) -> None:
    """Non-zero A and B (a fresh adapter's B is 0, which would hide a wrong layout)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def inputs(seed: int = 2):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(2, 4, 8, 8, generator=g), torch.tensor([3, 517]), torch.randn(2, 7, TINY.context_dim, generator=g)


def test_adapters_wrap_the_attention_projections_by_default_and_only_they_train():
    base = perturbed_unet()
    x, t, ctx = inputs()
    with torch.no_grad():
        before = base(x, t, ctx)
    digest = lora.base_digest(base)
    model = lora.attach(base, LoraSection())
    wrapped = {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, lora.LoraLayer)}
    assert wrapped == {"to_q", "to_k", "to_v", "to_out"}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    with torch.no_grad():  # B starts at 0: the base model's function, and the same base digest
        assert torch.equal(model(x, t, ctx), before)
    assert lora.base_digest(model) == digest
    state = lora.adapter_state(model)
    transformers = sum(type(m).__name__ == "SpatialTransformer" for m in model.modules())
    assert len(state) == 2 * 4 * 2 * transformers * TINY.transformer_depth  # A and B, 4 projections, 2 attentions
    opt_in = lora.attach(perturbed_unet(), LoraSection(target_modules=["ff.proj", "conv1"]))
    names = {name.rsplit(".", 2)[-2:] == ["ff", "proj"] or name.endswith("conv1")
             for name, m in opt_in.named_modules() if isinstance(m, lora.LoraLayer)}
    assert names == {True}
    lora.cast_base(opt_in, torch.bfloat16)
    assert {p.dtype for p in opt_in.parameters() if p.requires_grad} == {torch.float32}
    assert {p.dtype for p in opt_in.parameters() if not p.requires_grad} == {torch.bfloat16}


def test_lora_config_needs_a_base_and_known_targets(tmp_path):
    base = [f"run.output_uri={tmp_path}"]
    with pytest.raises(ConfigError, match="lora: needs stage_b.init_from"):
        load_config(REPO / "configs/quickstart.yaml", base + ["stage_b.lora={}"])
    with pytest.raises(ConfigError, match="stage_b.lora.target_modules"):
        load_config(REPO / "configs/quickstart.yaml", base + ["stage_b.init_from=/models/sd", "stage_b.lora.target_modules=[qkv]"])
    cfg = load_config(REPO / "configs/quickstart.yaml", base + ["stage_b.init_from=/models/sd", "stage_b.lora.rank=4"])
    assert cfg.stage_b.lora.rank == 4 and cfg.stage_b.lora.scaling == 1.0


def test_diffusers_load_lora_weights_reads_our_export_to_the_same_unet_output(tmp_path):
    """Every target kind, alpha != rank: our U-Net with adapters == diffusers' UNet2DConditionModel (our export)
    after StableDiffusionPipeline.load_lora_weights(our pytorch_lora_weights.safetensors), within 1e-5; and merged
    into the base, the same output again."""
    from pipelines.export import write_diffusers_unet

    base = perturbed_unet()
    write_diffusers_unet(base, tmp_path / "unet", sample_size=8)
    section = LoraSection(rank=4, alpha=2.0, target_modules=EVERY_TARGET)
    model = lora.attach(base, section).eval()
    random_adapters(model)
    save_file(lora.to_diffusers(lora.adapter_state(model), TINY, section), str(tmp_path / lora.DIFFUSERS_LORA_WEIGHTS))

    unet = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    x, t, ctx = inputs()
    with torch.no_grad():
        without = unet(x, t, encoder_hidden_states=ctx).sample
    pipe = diffusers.StableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=diffusers.DDIMScheduler(clip_sample=False),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.load_lora_weights(str(tmp_path))
    with torch.no_grad():
        theirs = pipe.unet(x, t, encoder_hidden_states=ctx).sample
        ours = model(x, t, ctx)
        merged = lora.merge(model)(x, t, ctx)
    assert (theirs - without).abs().max() > 0.05  # the adapters change the output (so they were read)
    assert (theirs - ours).abs().max() <= TOL
    assert (merged - ours).abs().max() <= TOL
    assert not any(isinstance(m, lora.LoraLayer) for m in model.modules())  # merged: a plain UNet again


SD_ON_A10G = ["data.resolution=512", "stage_b.batch_size=4", "stage_b.unet.gradient_checkpointing=false",
              "stage_b.scaling.num_workers=4", "stage_b.scaling.gpu_type=A10G", "data.batch_size=2"]
"""configs/sd_f8.yaml's SD-sized U-Net (861M) at 512 px (64x64 latents), 4 per GPU, no gradient checkpointing, on a
node of 24 GB A10Gs (22 GiB usable), as diffusers' train_text_to_image_lora.py runs by default (Stage A's batch
is lowered so that its own A100 budget at 512 px is not what fails)."""


@pytest.mark.slow  # fake-tensor runs of the SD-sized U-Net: seconds each, a minute on a loaded box
def test_memory_budget_fits_an_sd_lora_on_an_a10g_where_a_full_fine_tune_does_not(capsys):
    from pipelines.run import main

    args = ["--config", str(REPO / "configs/sd_f8.yaml"), "--memory", *[a for s in SD_ON_A10G for a in ("--set", s)]]
    with pytest.raises(SystemExit) as e:
        main(args)
    assert str(e.value).startswith("error: stage_b: estimated peak") and "A10G's 22 GiB" in str(e.value)
    full = capsys.readouterr().out
    assert "unet Adam moments" in full and "DOES NOT FIT" in full

    main(args + ["--set", "stage_b.init_from=/models/stable-diffusion-v1-5", "--set", "stage_b.lora.rank=8"])
    out = capsys.readouterr().out
    stage_b = out[out.index("stage_b: estimated peak"):]
    assert "unet base weights (frozen, bf16)" in stage_b and "LoRA adapters Adam moments" in stage_b
    assert "GPU A10G: 22 GiB -> fits" in stage_b and "unet Adam moments" not in stage_b

# ----------------------------------------------------------------------------------------------------
# End to end: a LoRA Stage B on a real local Ray and MLflow store, crash + resume, publish, sample, export.
# ----------------------------------------------------------------------------------------------------


def publish_base(cfg, encoded, workdir: Path, seed: int) -> tuple[str, str, UNet]:
    """A U-Net bundle on the encoded latents, registered as `mlflow.unet_model_name` as Stage B would (random
    weights: what matters here is which weights the adapters sit on). Returns (model URI, run id, U-Net)."""
    from pipelines.data import latents
    from pipelines.data.text_encoders import TextEncoderConfig
    from pipelines.models.registry import publish_unet, save_unet_bundle
    from pipelines.platform import tracking

    torch.manual_seed(seed)
    unet = UNet(cfg.stage_b.unet)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(torch.randn(p.shape) * 0.05)
    manifest, text = encoded.manifest, encoded.manifest["text_encoder"]
    null_context, null_mask = latents.read_null_condition(encoded.latents_uri, manifest)
    folder = save_unet_bundle(
        workdir / "unet", unet_state=unet.state_dict(), ema_state=None, unet_config=cfg.stage_b.unet,
        diffusion=cfg.stage_b.diffusion, text_encoder=TextEncoderConfig(name_or_path=text["name_or_path"], max_length=text["max_length"]),
        hidden_size=text["hidden_size"], null_context=null_context, null_mask=null_mask, latent_shape=manifest["latent_shape"],
        scale_factor=manifest["scale_factor"], autoencoder_uri=manifest["autoencoder_uri"])
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    with tracking.stage_run(experiment_id=experiment_id, stage="stage_b", run_name=f"base-{seed}") as run:
        uri, _ = publish_unet(folder, cfg.mlflow.unet_model_name)
    return uri, run.info.run_id, unet


@pytest.mark.slow
def test_lora_stage_b_crash_resume_publish_sample_and_export(tmp_path, mlflow_uri, ray_local):
    import json

    from mlflow.tracking import MlflowClient
    from safetensors.torch import load_file

    from pipelines.encode_latents import run_encode
    from pipelines.export import main as export_main
    from pipelines.models.interop import import_unet
    from pipelines.models.registry import load_unet_bundle
    from pipelines.sample import main as sample_main
    from pipelines.stage_b import run_stage_b
    from tests.test_encode import digits_dataset, publish_tiny_autoencoder, tiny_config

    data = digits_dataset(tmp_path)
    sd_eps = "stage_b.unet.transformer_norm_eps=1e-6"  # SD's, so that the merged U-Net exports to diffusers exactly
    first = tiny_config(tmp_path, data, "run.name=lora", sd_eps)
    publish_tiny_autoencoder(first, tmp_path / "ae")
    encoded = run_encode(first)
    base_uri, base_run, base = publish_base(first, encoded, tmp_path / "base1", seed=0)
    assert base_uri == "models:/ldm-unet/1"
    overrides = ["run.name=lora", f"stage_b.init_from={base_uri}", "stage_b.lora.rank=2", "stage_b.lora.alpha=4",
                 "stage_b.train.fail_at_step=3", "stage_b.train.max_failures=1", "stage_b.optim.lr=0.01"]
    cfg = tiny_config(tmp_path, data, *overrides)
    result = run_stage_b(cfg)

    # Trained 4 steps through a worker crash at step 3 (resumed from the step-2 checkpoint), published as an adapter.
    client = MlflowClient()
    run = client.get_run(result.run_id)
    assert result.model_uri == "models:/ldm-unet-lora/1" and run.info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(result.run_id, "train/resumed_from_step")] == [2.0]
    assert base_run in run.data.tags["upstream_run_ids"].split(",")
    digest = lora.base_digest(base)
    assert (run.data.tags["lora_base_uri"], run.data.tags["lora_base_digest"]) == (base_uri, digest)
    version = client.get_model_version("ldm-unet-lora", "1")
    assert version.tags["base_model_uri"] == base_uri and version.tags["latents_uri"] == encoded.latents_uri
    assert version.tags["base_digest"] == digest

    # The checkpoint holds the adapters (and their optimiser state and EMA) and a reference to the base, no U-Net.
    ckpt = Path(run.data.tags["checkpoint"])
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["step"] == 4 and meta["lora_base"] == {"uri": base_uri, "digest": digest}
    assert not (ckpt / "unet.safetensors").exists()
    adapters = load_file(str(ckpt / "unet_lora.safetensors"))
    assert adapters and all(".lora_A." in k or ".lora_B." in k for k in adapters)
    assert any(k.endswith("lora_B.weight") and v.abs().max() > 0 for k, v in adapters.items())  # B moved off 0
    ema = load_file(str(ckpt / "ema.safetensors"))
    assert int(ema.pop("_ema.num_updates")) == 4 and all(".lora_" in k for k in ema)
    assert {float(v) for k, v in load_file(str(ckpt / "opt.safetensors")).items() if k.endswith(".step")} == {4.0}
    base_bytes = sum(t.numel() * t.element_size() for t in base.state_dict().values())
    assert lora.adapter_bytes(adapters) < base_bytes / 4

    # The published adapter loads with its base: scale 0 is the base exactly, scale 1 differs from it.
    at_zero = load_unet_bundle(result.model_uri, lora_scale=0.0, load_base=import_unet).unet
    assert all(torch.equal(a, b) for a, b in zip(at_zero.state_dict().values(), base.state_dict().values()))
    tuned = load_unet_bundle(result.model_uri, load_base=import_unet).unet
    assert any(not torch.equal(a, b) for a, b in zip(tuned.state_dict().values(), base.state_dict().values()))

    # Resuming the same run name on another base is refused in one line.
    other_uri, _, _ = publish_base(first, encoded, tmp_path / "base2", seed=1)
    with pytest.raises(lora.BaseMismatch) as e:  # a ConfigError: the entry points print it as one line, exit 1
        run_stage_b(tiny_config(tmp_path, data, *overrides, f"stage_b.init_from={other_uri}"))
    assert "LoRA adapters trained on base models:/ldm-unet/1" in str(e.value) and "\n" not in str(e.value)

    # sample.py: base + adapter, both recorded in its run.
    sampled = sample_main(["--config", str(REPO / "configs/quickstart.yaml"), "--set", f"run.output_uri={tmp_path / 'out'}",
                           "--set", "sample.steps=2", "--prompt", "a handwritten digit three", "--num", "1",
                           "--lora-uri", result.model_uri, "--lora-scale", "0.5", "--out", str(tmp_path / "samples")])
    tags = client.get_run(sampled.run_id).data.tags
    assert (tags["lora_uri"], tags["lora_scale"], tags["unet_uri"]) == (result.model_uri, "0.5", base_uri)
    assert len(sampled.image_paths) == 1

    # Export: the adapters as diffusers reads them, and merged into the base as a whole U-Net.
    export = ["--config", str(REPO / "configs/quickstart.yaml"), "--set", f"run.output_uri={tmp_path / 'out'}",
              "--model-uri", result.model_uri, "--format", "diffusers"]
    export_main(export + ["--out", str(tmp_path / "lora")])
    exported = load_file(str(tmp_path / "lora" / lora.DIFFUSERS_LORA_WEIGHTS))
    assert exported and all(k.startswith("unet.") and ".lora_" in k and "attn" in k for k in exported)
    export_main(export + ["--merged", "--out", str(tmp_path / "merged")])
    merged = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "merged" / "unet")).eval()
    x = torch.randn(1, 4, 8, 8)
    ctx = torch.randn(1, 5, cfg.stage_b.unet.context_dim)
    with torch.no_grad():
        gap = (merged(x, torch.tensor([10]), encoder_hidden_states=ctx).sample - tuned(x, torch.tensor([10]), ctx)).abs().max()
    assert gap <= TOL
    with pytest.raises(SystemExit, match="LoRA adapters export only as --format diffusers"):
        export_main(export[:-1] + ["sd-single-file", "--out", str(tmp_path / "single")])


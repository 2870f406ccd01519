"""Stable Diffusion / diffusers interop: import, export and their numerics against diffusers itself.

Randomly initialised diffusers models of several tiny configs (one with SD 1.x's block layout at a reduced
width) are imported into ldm_core and must give the same encoder mean / logvar, decoder output and U-Net
output to max-abs <= 1e-5 in float32; exports must load back into diffusers with the same outputs.
"""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldm_core import convert
from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.unet import UNet, UNetConfig

diffusers = pytest.importorskip("diffusers")

from benchmarks.parity_cases import (SD_HEADS, SD_READER_UNET, UNET_CONFIGS, UNET_LATENT, VAE_CONFIGS,  # noqa: E402
                                      _bundle_on_tiny_clip, _perturbed, diffusers_unet, diffusers_vae, save_diffusers,
                                      sd_single_file, tiny_clip, unet_gap, vae_gaps)
from pipelines.models import interop  # noqa: E402  (after the skip: the module is only useful with diffusers around)

REPO = Path(__file__).resolve().parents[1]
TOL = 1e-5


# ----------------------------------------------------------------------------------------------------
# Config mapping.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("cls, table", [("AutoencoderKL", convert.DIFFUSERS_VAE_DEFAULTS),
                                        ("UNet2DConditionModel", convert.DIFFUSERS_UNET_DEFAULTS)])
def test_default_tables_are_the_installed_diffusers_defaults(cls, table):
    params = inspect.signature(getattr(diffusers, cls).__init__).parameters
    installed = {k: list(p.default) if isinstance(p.default, tuple) else p.default for k, p in params.items() if k != "self"}
    assert installed == table


@pytest.mark.parametrize("config, field", [
    (dict(down_block_types=["AttnDownEncoderBlock2D"]), "down_block_types"),
    (dict(shift_factor=0.1159), "shift_factor"),
    (dict(block_out_channels=[48, 64]), "block_out_channels"),
    (dict(act_fn="gelu"), "act_fn"),
    (dict(brand_new_field=3), "brand_new_field"),
])
def test_vae_config_we_cannot_represent_is_named(config, field):
    base = {"_class_name": "AutoencoderKL", "block_out_channels": [8, 16], "norm_num_groups": 4,
            "down_block_types": ["DownEncoderBlock2D"] * 2, "up_block_types": ["UpDecoderBlock2D"] * 2}
    with pytest.raises(ConfigError, match=field):
        convert.autoencoder_config_from_diffusers({**base, **config})


@pytest.mark.parametrize("config, field", [
    (dict(down_block_types=["SimpleCrossAttnDownBlock2D", "DownBlock2D"]), "SimpleCrossAttnDownBlock2D"),
    (dict(addition_embed_type="text_time"), "addition_embed_type"),  # SDXL
    (dict(attention_head_dim=[2, 3]), "attention_head_dim"),
    (dict(layers_per_block=[1, 2]), "layers_per_block"),
    (dict(up_block_types=["UpBlock2D", "UpBlock2D"]), "mirror"),
    (dict(class_embed_type="timestep"), "class_embed_type"),
])
def test_unet_config_we_cannot_represent_is_named(config, field):
    base = {"_class_name": "UNet2DConditionModel", "block_out_channels": [16, 32], "norm_num_groups": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"], "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 1, "attention_head_dim": 2, "cross_attention_dim": 8}
    with pytest.raises(ConfigError, match=field):
        convert.unet_config_from_diffusers({**base, **config})


def test_another_class_is_refused():
    with pytest.raises(ConfigError, match="ControlNetModel"):
        convert.unet_config_from_diffusers({"_class_name": "ControlNetModel"})


# ----------------------------------------------------------------------------------------------------
# Import parity.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(VAE_CONFIGS))
def test_imported_diffusers_autoencoder_matches_diffusers(name, tmp_path):
    ref = diffusers_vae(name)
    ours = interop.import_autoencoder(str(save_diffusers(ref, tmp_path / "vae")))
    gaps = vae_gaps(ref, ours)
    print(f"vae {name}: {gaps}")
    assert max(gaps.values()) <= TOL, gaps
    assert float(ours.scale_factor) == pytest.approx(ref.config.scaling_factor)


@pytest.mark.parametrize("name", sorted(UNET_CONFIGS))
def test_imported_diffusers_unet_matches_diffusers(name, tmp_path):
    ref = diffusers_unet(name)
    ours = interop.import_unet(str(save_diffusers(ref, tmp_path / "unet")))
    gap = unet_gap(ref, ours)
    print(f"unet {name}: {gap:.3g}")
    assert gap <= TOL


def test_pipeline_folder_gives_each_component(tmp_path):
    root = tmp_path / "sd"
    vae, unet = diffusers_vae("sd1-layout"), diffusers_unet("sd1-layout")
    save_diffusers(vae, root / "vae")
    save_diffusers(unet, root / "unet")
    (root / "text_encoder").mkdir()
    (root / "text_encoder" / "config.json").write_text(json.dumps({"model_type": "clip_text_model"}))
    assert max(vae_gaps(vae, interop.import_autoencoder(str(root))).values()) <= TOL
    assert unet_gap(unet, interop.import_unet(str(root))) <= TOL


def test_weights_that_do_not_fit_the_config_are_reported(tmp_path):
    folder = save_diffusers(diffusers_vae("grey-3-levels"), tmp_path / "vae")
    weights = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    weights.pop("decoder.conv_out.bias")
    weights["encoder.extra.weight"] = torch.zeros(1)
    save_file(weights, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(interop.InteropError, match=r"missing tensors, e\.g\. decoder\.conv_out\.bias.*unexpected.*encoder\.extra"):
        interop.import_autoencoder(str(folder))


# ----------------------------------------------------------------------------------------------------
# Original single-file checkpoints.
# ----------------------------------------------------------------------------------------------------

# Tensor names of the real SD v1.5 single file (v1-5-pruned-emaonly.safetensors) that the layout must produce,
# with their rank; the widths here are reduced, the names and ranks are not.
SD1_KEYS = {
    "first_stage_model.encoder.down.0.block.0.norm1.weight": 1,
    "first_stage_model.encoder.down.2.downsample.conv.weight": 4,
    "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": 4,
    "first_stage_model.encoder.mid.attn_1.q.weight": 4,
    "first_stage_model.encoder.mid.attn_1.proj_out.weight": 4,
    "first_stage_model.decoder.up.3.upsample.conv.weight": 4,
    "first_stage_model.decoder.up.0.block.2.conv2.weight": 4,
    "first_stage_model.decoder.up.1.block.0.nin_shortcut.weight": 4,
    "first_stage_model.quant_conv.weight": 4,
    "model.diffusion_model.time_embed.0.weight": 2,
    "model.diffusion_model.input_blocks.0.0.weight": 4,
    "model.diffusion_model.input_blocks.1.1.proj_in.weight": 4,
    "model.diffusion_model.input_blocks.3.0.op.weight": 4,
    "model.diffusion_model.input_blocks.4.0.skip_connection.weight": 4,
    "model.diffusion_model.input_blocks.9.0.op.weight": 4,
    "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": 4,
    "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": 2,
    "model.diffusion_model.middle_block.1.transformer_blocks.0.ff.net.0.proj.weight": 2,
    "model.diffusion_model.output_blocks.2.1.conv.weight": 4,
    "model.diffusion_model.output_blocks.5.2.conv.weight": 4,
    "model.diffusion_model.output_blocks.8.2.conv.weight": 4,
    "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.attn1.to_out.0.weight": 2,
    "model.diffusion_model.out.2.weight": 4,
}


def test_single_file_checkpoint_imports_to_diffusers_outputs(tmp_path):
    vae, unet = diffusers_vae("sd1-layout"), diffusers_unet("sd1-layout")
    state = sd_single_file(vae, unet)
    assert {k: state[k].ndim for k in SD1_KEYS if k in state} == SD1_KEYS
    path = tmp_path / "v1-tiny.safetensors"
    save_file(state, str(path))
    ours_vae = interop.import_autoencoder(str(path))
    assert float(ours_vae.scale_factor) == pytest.approx(convert.SD1_SCALE_FACTOR)  # not in the file: SD's published value
    gaps = vae_gaps(vae, ours_vae)
    gap = unet_gap(unet, interop.import_unet(str(path)))  # 8 heads: what an SD 1.x file implies
    print(f"single-file vae {gaps}, unet {gap:.3g}")
    assert max(gaps.values()) <= TOL and gap <= TOL


def test_ckpt_reads_with_weights_only_and_refuses_anything_else(tmp_path):
    vae, unet = diffusers_vae("sd1-layout"), diffusers_unet("sd1-layout")
    state = sd_single_file(vae, unet)
    torch.save({"state_dict": state, "global_step": 470000}, tmp_path / "v1.ckpt")
    assert max(vae_gaps(vae, interop.import_autoencoder(str(tmp_path / "v1.ckpt"))).values()) <= TOL

    evil = tmp_path / "evil.ckpt"
    # A pickle that would call a function on load: weights_only refuses it, and so do we, with a clear message.
    torch.save({"state_dict": state, "callback": subprocess.Popen}, evil)
    with pytest.raises(interop.InteropError, match=r"weights_only=True.*never done here"):
        interop.import_unet(str(evil))


def test_single_file_without_the_component_is_refused(tmp_path):
    path = tmp_path / "te.safetensors"
    save_file({"cond_stage_model.transformer.x": torch.zeros(2)}, str(path))
    with pytest.raises(interop.InteropError, match=r"no model\.diffusion_model\.\* tensors"):
        interop.import_unet(str(path))
    with pytest.raises(interop.InteropError, match="no such file"):
        interop.import_unet(str(tmp_path / "missing.safetensors"))


# ----------------------------------------------------------------------------------------------------
# Remote sources.
# ----------------------------------------------------------------------------------------------------


def test_import_from_s3_pipeline_folder(s3_bucket, tmp_path):
    import boto3

    vae = diffusers_vae("grey-3-levels")
    local = save_diffusers(vae, tmp_path / "sd" / "vae")
    (tmp_path / "sd" / "unet").mkdir()
    (tmp_path / "sd" / "unet" / "huge.bin").write_bytes(b"not needed for the vae")
    s3 = boto3.client("s3")
    for path in (tmp_path / "sd").rglob("*"):
        if path.is_file():
            s3.upload_file(str(path), s3_bucket, f"models/sd/{path.relative_to(tmp_path / 'sd')}")
    ours = interop.import_autoencoder(f"s3://{s3_bucket}/models/sd")
    assert max(vae_gaps(vae, ours).values()) <= TOL
    assert local.is_dir()
    with pytest.raises(interop.InteropError, match="no such object"):
        interop.import_autoencoder(f"s3://{s3_bucket}/models/nothing-here")


@pytest.mark.slow  # publishes models to a real MLflow store (tens of seconds on a loaded 2-core box)
def test_import_from_mlflow_artifacts_and_our_own_models(mlflow_uri, tmp_path):
    import mlflow

    from pipelines.models.registry import publish_autoencoder

    vae = diffusers_vae("grey-3-levels")
    mlflow.set_experiment("interop-tests")
    with mlflow.start_run() as run:
        mlflow.log_artifacts(str(save_diffusers(vae, tmp_path / "vae")), "vae")
        ours = interop.import_autoencoder(f"runs:/{run.info.run_id}/vae")
        uri, _ = publish_autoencoder(ours, tmp_path / "pub", "ldm-autoencoder")
    assert max(vae_gaps(vae, ours).values()) <= TOL
    again = interop.import_autoencoder(uri)
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), again.state_dict().values()))
    with pytest.raises(interop.InteropError, match="cannot download from MLflow"):
        interop.import_autoencoder("models:/no-such-model/7")


# ----------------------------------------------------------------------------------------------------
# Starting the stages from imported weights.
# ----------------------------------------------------------------------------------------------------


def _pipeline_config(*overrides: str):
    from pipelines.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", list(overrides))


def test_init_from_adopts_the_architecture_and_loads_the_weights(tmp_path):
    vae, unet = diffusers_vae("sd1-layout"), diffusers_unet("sd1-layout")
    path = tmp_path / "v1.safetensors"
    save_file(sd_single_file(vae, unet), str(path))
    cfg = _pipeline_config(f"stage_a.init_from={path}", "stage_a.train_decoder_only=true",
                           f"stage_b.init_from={path}", "stage_b.unet.gradient_checkpointing=true")
    assert cfg.stage_a.model.channel_mult != [1, 2, 4, 4]  # the quickstart's own
    cfg = interop.adopt_init_architectures(cfg)
    assert cfg.stage_a.model.base_channels == 32 and cfg.stage_a.model.channel_mult == [1, 2, 4, 4]
    assert cfg.stage_b.unet.context_dim == 48 and cfg.stage_b.unet.gradient_checkpointing  # training option kept

    model = interop.load_init_autoencoder(cfg.stage_a, cfg.storage)
    assert model.training and max(vae_gaps(vae, model).values()) <= TOL
    assert interop.keeps_published_scale(cfg.stage_a) and float(model.scale_factor) == pytest.approx(convert.SD1_SCALE_FACTOR)
    interop.freeze_encoder(model)
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {n for n, _ in model.named_parameters() if n.startswith(("encoder.", "quant_conv."))}
    assert unet_gap(unet, interop.load_init_unet(cfg.stage_b, cfg.storage)) <= TOL

    remeasure = _pipeline_config(f"stage_a.init_from={path}", "stage_a.remeasure_scale_factor=true")
    assert not interop.keeps_published_scale(remeasure.stage_a)
    with pytest.raises(interop.InteropError, match="stage_a.model differs .* channel_mult"):
        interop.load_init_autoencoder(_pipeline_config(f"stage_a.init_from={path}").stage_a)


def test_pipeline_checks_the_gpu_budget_of_the_imported_architecture(tmp_path):
    """run.py's up-front memory check sees the U-Net that will train: stage_b.init_from's (here SD 1.x's shape,
    ~19 GiB), not the quickstart's configured one (~0.1 GiB) that it replaces. A diffusers config is all it reads."""
    from pipelines.run import run_pipeline

    (tmp_path / "sd1-unet").mkdir()
    (tmp_path / "sd1-unet" / "config.json").write_text(json.dumps({
        "_class_name": "UNet2DConditionModel", "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768,
        "attention_head_dim": 8, "sample_size": 64}))
    gpu = ["stage_b.scaling.use_gpu=true", "stage_b.scaling.gpu_memory_gib=4", f"run.output_uri={tmp_path / 'out'}"]
    from pipelines import stage_b
    from pipelines.train.memory import check_memory_budget

    assert check_memory_budget(_pipeline_config(*gpu), stage_b.STAGE).fits  # the configured U-Net alone would pass
    with pytest.raises(ConfigError, match=r"^stage_b: estimated peak 1\d\.\d GiB per GPU .* exceeds the configured GPU's 4 GiB"):
        run_pipeline(_pipeline_config(*gpu, f"stage_b.init_from={tmp_path / 'sd1-unet'}"), from_stage="stage_b")


def test_init_from_an_mlflow_model_is_in_the_stage_runs_upstream_run_ids(mlflow_uri, tmp_path):
    """Lineage: a stage started from runs:/ or models:/ (also models:/name@alias) lists the run that made that model
    after the runs of its DAG inputs; a path or s3:// source adds nothing."""
    import mlflow

    from pipelines.models.registry import publish_autoencoder
    from pipelines.dag.executor import Context
    from pipelines.dag.stage import Outcome
    from pipelines.run import STAGES

    mlflow.set_experiment("interop-tests")
    with mlflow.start_run() as source:
        uri, version = publish_autoencoder(AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=[1, 2], num_res_blocks=1,
                                                                           norm_groups=4)), tmp_path / "pub", "ldm-autoencoder")
    mlflow.MlflowClient().set_registered_model_alias("ldm-autoencoder", "champion", version)
    source_run = source.info.run_id
    outcomes = {stage: Outcome(stage, "ran", f"{stage}-run", "key") for stage in ("prepare", "stage_a", "encode")}
    nodes = {stage.name: stage for stage in STAGES}

    def upstream(stage: str, *overrides: str) -> tuple[str, ...]:
        cfg = _pipeline_config(f"mlflow.tracking_uri={mlflow_uri}", *overrides)
        return Context(cfg, cfg, "0", "parent", outcomes, nodes[stage], "key", f"run-{stage}").upstream()

    assert uri.startswith("models:/ldm-autoencoder/")
    assert upstream("stage_a", f"stage_a.init_from={uri}") == ("prepare-run", source_run)
    assert upstream("stage_a", "stage_a.init_from=models:/ldm-autoencoder@champion") == ("prepare-run", source_run)
    assert upstream("stage_b", f"stage_b.init_from=runs:/{source_run}/unet") == ("encode-run", "stage_a-run", source_run)
    assert upstream("encode", f"stage_a.init_from={uri}") == ("stage_a-run",)  # its input is Stage A's run, not the source
    assert upstream("stage_b", f"stage_b.init_from={tmp_path / 'unet'}") == ("encode-run", "stage_a-run")


@pytest.mark.slow  # trains on a real local Ray with a real MLflow store (a minute on a loaded 2-core box)
def test_stage_b_fine_tunes_an_imported_diffusers_unet(ray_local, mlflow_uri, tmp_path):
    """stage_b.init_from a (tiny, random) diffusers UNet2DConditionModel folder: Stage B adopts its architecture,
    starts from its weights and trains them; the published bundle is that architecture, a few optimiser steps away."""
    from pipelines.encode_latents import run_encode
    from pipelines.models.registry import load_unet_bundle
    from pipelines.stage_b import run_stage_b
    from tests.test_encode import digits_dataset, publish_tiny_autoencoder, tiny_config

    torch.manual_seed(0)
    ref = _perturbed(diffusers.UNet2DConditionModel(
        sample_size=8, block_out_channels=[16, 32], layers_per_block=1, norm_num_groups=8, cross_attention_dim=384,
        attention_head_dim=4, down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"]), 9)
    save_diffusers(ref, tmp_path / "unet")
    cfg = tiny_config(tmp_path, digits_dataset(tmp_path), f"stage_b.init_from={tmp_path / 'unet'}", "stage_b.train.max_steps=2",
                      "stage_b.optim.lr=0.001", "stage_b.optim.warmup_steps=0", "run.name=finetune-unet")
    assert (cfg.stage_b.unet.model_channels, cfg.stage_b.unet.num_heads) == (8, 2)  # the tiny config's own U-Net
    publish_tiny_autoencoder(cfg, tmp_path / "ae")
    run_encode(cfg)
    result = run_stage_b(cfg)

    bundle = load_unet_bundle(result.model_uri, use_ema=False)
    imported = interop.import_unet(str(tmp_path / "unet"))
    assert bundle.step == 2 and bundle.unet_config == imported.config.model_copy(update={"gradient_checkpointing": False})
    assert (bundle.unet_config.model_channels, bundle.unet_config.num_heads) == (16, 4)
    steps = {k: (bundle.unet.state_dict()[k] - v).abs().max().item() for k, v in imported.state_dict().items()}
    # Adam moves each weight by at most about lr per step: started from the import, and trained.
    assert max(steps.values()) < 0.01 and sum(d > 0 for d in steps.values()) > len(steps) // 2


def test_decoder_only_without_weights_is_a_config_error():
    with pytest.raises(ConfigError, match="train_decoder_only needs init_from"):
        _pipeline_config("stage_a.train_decoder_only=true")


# ----------------------------------------------------------------------------------------------------
# Export.
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("grey_output", [False, True])
def test_exported_autoencoder_loads_in_diffusers_with_our_outputs(tmp_path, grey_output):
    from pipelines.export import write_diffusers_autoencoder

    torch.manual_seed(0)
    ours = _perturbed(AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                                                       norm_groups=8, grey_output=grey_output)), 3)
    ours.scale_factor.fill_(0.37)
    write_diffusers_autoencoder(ours, tmp_path / "vae")
    ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    gaps = vae_gaps(ref, ours)
    print(f"export vae grey_output={grey_output}: {gaps}")
    assert max(gaps.values()) <= TOL and ref.config.scaling_factor == pytest.approx(0.37)


@pytest.mark.parametrize("head_dim", [None, 8])
def test_exported_unet_loads_in_diffusers_with_our_outputs(tmp_path, head_dim):
    from pipelines.export import write_diffusers_unet

    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], num_heads=2,
                     head_dim=head_dim, norm_groups=8, context_dim=12, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)
    ours = _perturbed(UNet(cfg), 4)
    write_diffusers_unet(ours, tmp_path / "unet", sample_size=UNET_LATENT)
    ref = diffusers.UNet2DConditionModel.from_pretrained(str(tmp_path / "unet")).eval()
    gap = unet_gap(ref, ours)
    print(f"export unet head_dim={head_dim}: {gap:.3g}")
    assert gap <= TOL


def test_unet_with_our_default_norm_eps_is_not_exported_inexactly(tmp_path):
    from pipelines.export import write_diffusers_unet

    cfg = UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2,
                     norm_groups=8, context_dim=12)
    with pytest.raises(ConfigError, match="transformer_norm_eps"):
        write_diffusers_unet(UNet(cfg), tmp_path / "unet")


@pytest.mark.parametrize("convention", ["sd1", "sd2"])
def test_sd_single_file_export_is_read_by_diffusers_from_single_file_with_sds_conventions(tmp_path, convention):
    """Another tool's reading of our single file: diffusers' from_single_file, offline, given the config an SD reader
    builds (the file's shapes plus SD's conventions, not our config): the same outputs as ours."""
    from pipelines.export import export_unet, write_diffusers_autoencoder, write_diffusers_unet

    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=64, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], norm_groups=32,
                     context_dim=32, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS, **SD_HEADS[convention])
    unet = _perturbed(UNet(cfg), 7)
    vae = _perturbed(AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1)), 8)
    export_unet(_bundle_on_tiny_clip(unet, tmp_path, convert.SD1_SCALE_FACTOR), vae, "sd-single-file", tmp_path / "single")
    single = str(tmp_path / "single" / "model.safetensors")

    write_diffusers_unet(unet, tmp_path / "unet-config", sample_size=UNET_LATENT)
    config = json.loads((tmp_path / "unet-config" / "config.json").read_text())
    config |= SD_READER_UNET[convention](config["block_out_channels"])
    (tmp_path / "unet-config" / "config.json").write_text(json.dumps(config))
    (tmp_path / "unet-config" / "diffusion_pytorch_model.safetensors").unlink()  # the config only: weights from the file
    write_diffusers_autoencoder(vae, tmp_path / "vae-config")
    (tmp_path / "vae-config" / "diffusion_pytorch_model.safetensors").unlink()

    ref_unet = diffusers.UNet2DConditionModel.from_single_file(single, config=str(tmp_path / "unet-config"),
                                                               local_files_only=True).eval()
    ref_vae = diffusers.AutoencoderKL.from_single_file(single, config=str(tmp_path / "vae-config"), local_files_only=True).eval()
    gap, gaps = unet_gap(ref_unet, unet), vae_gaps(ref_vae, vae)
    print(f"from_single_file {convention}: unet {gap:.3g}, vae {gaps}")
    assert gap <= TOL and max(gaps.values()) <= TOL
    assert ref_vae.config.norm_num_groups == 32 and ref_unet.config.use_linear_projection == (convention == "sd2")


def test_sd_single_file_export_refuses_a_model_sd_readers_would_misread(tmp_path):
    """The quickstart's U-Net (4 heads, 8 groups) and autoencoder (8 groups): an SD reader would build 8 heads and 32
    groups and compute something else (diffusers' from_single_file: max-abs 0.2 for 2 heads). Refused, naming each
    field and the format that records them; nothing is written."""
    from pipelines.config import load_config
    from pipelines.export import export_autoencoder, export_unet

    quick = load_config(REPO / "configs" / "quickstart.yaml", [])
    assert quick.stage_b.unet.num_heads != 8 and quick.stage_b.unet.norm_groups != 32 and quick.stage_a.model.norm_groups != 32
    unet_cfg = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=4,
                          norm_groups=8, context_dim=32, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=[1, 2], num_res_blocks=1, norm_groups=8))
    with pytest.raises(interop.InteropError) as e:
        export_unet(_bundle_on_tiny_clip(UNet(unet_cfg), tmp_path, convert.SD1_SCALE_FACTOR), vae, "sd-single-file",
                    tmp_path / "single")
    message = str(e.value)
    assert "\n" not in message and message.endswith("export with --format diffusers (its config.json records them)")
    for field in ("stage_b.unet.num_heads=4 (read as SD 1.x's 8 heads)", "stage_b.unet.norm_groups=8 (read as 32)",
                  "stage_a.model.norm_groups=8 (read as 32)"):
        assert field in message, field
    with pytest.raises(interop.InteropError, match=r"stage_b\.unet\.head_dim=32 \(read as SD 2\.x's 64-channel heads\)"):
        sd2_narrow = unet_cfg.model_copy(update={"head_dim": 32, "norm_groups": 32})
        export_unet(_bundle_on_tiny_clip(UNet(sd2_narrow), tmp_path / "b", convert.SD1_SCALE_FACTOR),
                    AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1)),
                    "sd-single-file", tmp_path / "single")
    with pytest.raises(interop.InteropError, match=r"stage_a\.model\.mid_attention=False"):
        export_autoencoder(AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1,
                                                           mid_attention=False)), "sd-single-file", tmp_path / "vae")
    assert not (tmp_path / "single").exists() and not (tmp_path / "vae").exists()


def test_scheduler_config_is_sds_ddim_and_matches_our_schedule():
    from ldm_core.diffusion import DiffusionConfig, NoiseSchedule
    from pipelines.export import sd_scheduler_config

    for schedule in ("scaled_linear", "linear", "cosine"):
        diffusion = DiffusionConfig(beta_schedule=schedule, prediction="v")
        config = sd_scheduler_config(diffusion)
        sched = diffusers.DDIMScheduler.from_config(config)
        assert (sched.config.timestep_spacing, sched.config.steps_offset, sched.config.set_alpha_to_one) == ("leading", 1, False)
        assert sched.config.prediction_type == "v_prediction"
        ours = NoiseSchedule(diffusion).alpha_bar.double()
        assert torch.allclose(sched.alphas_cumprod.double(), ours, atol=1e-6), schedule

    # A zero-terminal-SNR model exports Lin et al.'s sampler: rescaled betas, trailing steps from T-1.
    from ldm_core.sampling import sample_timesteps

    zero = DiffusionConfig(prediction="v", zero_terminal_snr=True)
    sched = diffusers.DDIMScheduler.from_config(sd_scheduler_config(zero))
    assert torch.allclose(sched.alphas_cumprod.double(), NoiseSchedule(zero).alpha_bar.double(), atol=1e-6)
    assert sched.alphas_cumprod[-1].item() == 0.0 and sched.config.prediction_type == "v_prediction"
    sched.set_timesteps(25)
    assert sched.timesteps.tolist() == sample_timesteps(zero.num_timesteps, 25, "trailing")


def test_diffusers_pipeline_export_carries_the_guidance_settings(tmp_path):
    """model_index.json records sample.guidance / sample.guidance_rescale as StableDiffusionPipeline.__call__ arguments
    under `_call_defaults`, which diffusers' loader skips ("_" keys) and its pipeline takes as they are."""
    from pipelines.config import SampleConfig
    from pipelines.export import export_unet

    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=8,
                     norm_groups=32, context_dim=32, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1)).eval()
    export_unet(_bundle_on_tiny_clip(_perturbed(UNet(cfg), 6), tmp_path, 0.8), vae, "diffusers", tmp_path / "sd",
                SampleConfig(guidance=5.0, guidance_rescale=0.7))
    call = json.loads((tmp_path / "sd" / "model_index.json").read_text())["_call_defaults"]
    assert call == {"guidance_scale": 5.0, "guidance_rescale": 0.7}
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"), safety_checker=None)
    side = UNET_LATENT * vae.downsample_factor

    def run(**kwargs):
        return pipe("a cat", num_inference_steps=2, height=side, width=side, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs).images

    rescaled = run(**call)
    assert torch.isfinite(rescaled).all() and not torch.allclose(rescaled, run(guidance_scale=5.0), atol=1e-6)


def test_non_square_bundle_exports_its_shape_as_the_pipelines_default(tmp_path):
    """A U-Net trained on 8x16 latents: unet/ and vae/ record sample_size [height, width], which
    StableDiffusionPipeline takes as its default height and width."""
    import dataclasses

    from pipelines.export import export_unet

    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=8,
                     norm_groups=32, context_dim=32, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1)).eval()
    bundle = dataclasses.replace(_bundle_on_tiny_clip(_perturbed(UNet(cfg), 6), tmp_path, 0.8), latent_shape=(4, 8, 16))
    export_unet(bundle, vae, "diffusers", tmp_path / "sd")
    assert json.loads((tmp_path / "sd" / "unet" / "config.json").read_text())["sample_size"] == [8, 16]
    assert json.loads((tmp_path / "sd" / "vae" / "config.json").read_text())["sample_size"] == [16, 32]
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"), safety_checker=None)
    latents = pipe("a cat", num_inference_steps=2, output_type="latent", generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, 8, 16)


def test_per_channel_bundle_exports_latents_mean_and_std(tmp_path):
    """A U-Net trained on per-channel normalised latents: vae/config.json gets diffusers' latents_mean / latents_std
    (scaling_factor 1), which diffusers' AutoencoderKL reads; an SD single file, which cannot record them, is refused."""
    import dataclasses

    from pipelines.export import export_unet

    torch.manual_seed(0)
    cfg = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=8,
                     norm_groups=32, context_dim=32, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)
    vae = AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1)).eval()
    mean, std = [0.2, -0.1, 0.0, 0.3], [0.5, 0.4, 0.45, 0.02]
    bundle = dataclasses.replace(_bundle_on_tiny_clip(UNet(cfg), tmp_path, 1.0), latents_mean=mean, latents_std=std)
    export_unet(bundle, vae, "diffusers", tmp_path / "sd")
    ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "sd" / "vae"))
    assert (ref.config.scaling_factor, list(ref.config.latents_mean), list(ref.config.latents_std)) == (1.0, mean, std)
    with pytest.raises(interop.InteropError, match="per-channel normalised latents"):
        export_unet(bundle, vae, "sd-single-file", tmp_path / "single")


def _publish_tiny_autoencoder(tmp_path, seed: int = 5, sd_conventions: bool = False) -> tuple[AutoencoderKL, str, str]:
    """`sd_conventions`: 32 GroupNorm groups (32 channels), so that it can also be exported as an SD single file."""
    import mlflow

    from pipelines.models.registry import publish_autoencoder

    torch.manual_seed(seed)
    width = dict(base_channels=32, norm_groups=32) if sd_conventions else dict(base_channels=8, norm_groups=4)
    model = _perturbed(AutoencoderKL(AutoencoderConfig(channel_mult=[1, 2], num_res_blocks=1, **width)), seed)
    model.scale_factor.fill_(0.8)
    mlflow.set_experiment("interop-tests")  # not whichever experiment an earlier test left active
    with mlflow.start_run() as run:
        uri, _ = publish_autoencoder(model, tmp_path / "pub", "ldm-autoencoder")
    return model, uri, run.info.run_id


def _export_cli(tmp_path, mlflow_uri, *args: str):
    from pipelines.export import main

    return main(["--config", str(REPO / "configs" / "quickstart.yaml"), "--set", f"run.output_uri={tmp_path / 'out'}",
                 "--set", f"mlflow.tracking_uri={mlflow_uri}", *args])


@pytest.mark.slow  # publishes models to a real MLflow store (tens of seconds on a loaded 2-core box)
def test_export_cli_diffusers_local_and_single_file_to_s3(tmp_path, mlflow_uri, s3_bucket):
    import mlflow

    model, uri, source_run = _publish_tiny_autoencoder(tmp_path, sd_conventions=True)
    result = _export_cli(tmp_path, mlflow_uri, "--model-uri", uri, "--format", "diffusers", "--out", str(tmp_path / "vae"))
    ref = diffusers.AutoencoderKL.from_pretrained(str(tmp_path / "vae")).eval()
    assert max(vae_gaps(ref, model).values()) <= TOL and ref.config.scaling_factor == pytest.approx(0.8)
    run = mlflow.MlflowClient().get_run(result.run_id)
    assert run.data.tags["stage"] == "export" and run.data.tags["upstream_run_ids"] == source_run
    logged = {a.path for a in mlflow.MlflowClient().list_artifacts(result.run_id, "export")}
    assert "export/config.json" in logged and "export/diffusion_pytorch_model.safetensors" in logged

    out = f"s3://{s3_bucket}/exports/vae"
    _export_cli(tmp_path, mlflow_uri, "--model-uri", uri, "--format", "sd-single-file", "--out", out)
    back = interop.import_autoencoder(f"{out}/vae.safetensors")
    assert float(back.scale_factor) == pytest.approx(0.8)  # our metadata, not SD's default
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.state_dict().values()))


@pytest.mark.slow  # publishes models to a real MLflow store (tens of seconds on a loaded 2-core box)
def test_export_cli_refuses_bad_input_in_one_line_and_overwrites_nothing(tmp_path, mlflow_uri):
    _, uri, _ = _publish_tiny_autoencoder(tmp_path)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    good = {"--model-uri": uri, "--format": "diffusers", "--out": str(tmp_path / "x")}
    cases = [
        ({"--format": "onnx"}, "--format 'onnx': choose one of diffusers, sd-single-file"),
        ({"--model-uri": "models:/no-such-model/3"}, "cannot be read from MLflow"),
        ({"--model-uri": "runs:/0123456789abcdef/autoencoder"}, "cannot be read from MLflow"),
        ({"--out": "ftp://host/x"}, "unsupported storage URI"),
        ({"--out": str(tmp_path / "full")}, "already exists and is not an empty folder"),
        ({"--format": "sd-single-file"}, "stage_a.model.norm_groups=4 (read as 32); export with --format diffusers"),
    ]
    for change, message in cases:
        with pytest.raises(SystemExit) as e:
            _export_cli(tmp_path, mlflow_uri, *[s for kv in {**good, **change}.items() for s in kv])
        assert str(e.value).startswith("error: ") and message in str(e.value) and "\n" not in str(e.value), change
    assert not (tmp_path / "x").exists() and (tmp_path / "full" / "keep.txt").read_text() == "mine"
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]

    proc = subprocess.run(  # the script itself: non-zero exit, the error as its last line
        [sys.executable, str(REPO / "pipelines" / "export.py"), "--config", str(REPO / "configs" / "quickstart.yaml"),
         "--set", f"mlflow.tracking_uri={mlflow_uri}", "--set", f"run.output_uri={tmp_path / 'out'}",
         "--model-uri", uri, "--format", "nope", "--out", str(tmp_path / "e")],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode != 0 and proc.stderr.strip().splitlines()[-1].startswith("error: --format 'nope'")


@pytest.mark.slow  # publishes models to a real MLflow store (tens of seconds on a loaded 2-core box)
def test_unet_bundle_on_clip_exports_a_stable_diffusion_pipeline(tmp_path, mlflow_uri):
    import mlflow

    from ldm_core.diffusion import DiffusionConfig
    from pipelines.models.registry import publish_unet, save_unet_bundle
    from pipelines.data.text_encoders import TextEncoderConfig

    autoencoder, ae_uri, _ = _publish_tiny_autoencoder(tmp_path, sd_conventions=True)
    factor = autoencoder.downsample_factor
    cfg = UNetConfig(model_channels=32, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=8,
                     norm_groups=32, context_dim=32, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)
    torch.manual_seed(1)
    unet = _perturbed(UNet(cfg), 6)
    text = TextEncoderConfig(name_or_path=str(tiny_clip(tmp_path / "clip")), max_length=16)
    bundle_dir = save_unet_bundle(
        tmp_path / "bundle", unet_state=unet.state_dict(), ema_state=None, unet_config=cfg, diffusion=DiffusionConfig(),
        text_encoder=text, hidden_size=32, null_context=torch.zeros(16, 32), null_mask=torch.zeros(16, dtype=torch.bool),
        latent_shape=(4, UNET_LATENT, UNET_LATENT), scale_factor=0.8, autoencoder_uri=ae_uri)
    with mlflow.start_run() as run:
        unet_uri, _ = publish_unet(bundle_dir, "ldm-unet")

    imported = interop.import_unet(unet_uri)  # our own bundle as an init_from source
    assert all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), imported.state_dict().values()))

    result = _export_cli(tmp_path, mlflow_uri, "--model-uri", unet_uri, "--format", "diffusers", "--out", str(tmp_path / "sd"))
    assert mlflow.MlflowClient().get_run(result.run_id).data.tags["upstream_run_ids"] == run.info.run_id
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(str(tmp_path / "sd"), safety_checker=None)
    sched = pipe.scheduler.config
    assert type(pipe.scheduler).__name__ == "DDIMScheduler"
    assert (sched.timestep_spacing, sched.steps_offset, sched.set_alpha_to_one, sched.beta_schedule) == \
        ("leading", 1, False, "scaled_linear")
    assert (sched.beta_start, sched.beta_end, sched.num_train_timesteps) == (0.00085, 0.012, 1000)
    assert pipe.vae.config.scaling_factor == pytest.approx(0.8) and pipe.vae_scale_factor == factor
    assert unet_gap(pipe.unet.eval(), unet) <= TOL
    assert max(vae_gaps(pipe.vae.eval(), autoencoder).values()) <= TOL
    side = UNET_LATENT * factor
    latents = pipe("a cat", num_inference_steps=2, height=side, width=side, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    assert latents.shape == (1, 4, UNET_LATENT, UNET_LATENT) and torch.isfinite(latents).all()

    _export_cli(tmp_path, mlflow_uri, "--model-uri", unet_uri, "--format", "sd-single-file", "--out", str(tmp_path / "single"))
    state = load_file(str(tmp_path / "single" / "model.safetensors"))
    assert any(k.startswith("cond_stage_model.transformer.text_model.") for k in state)
    back = interop.import_unet(str(tmp_path / "single" / "model.safetensors"))
    assert back.config == cfg and all(torch.equal(a, b) for a, b in zip(unet.state_dict().values(), back.state_dict().values()))
    vae_back = interop.import_autoencoder(str(tmp_path / "single" / "model.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(autoencoder.state_dict().values(), vae_back.state_dict().values()))

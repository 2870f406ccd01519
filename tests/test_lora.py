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

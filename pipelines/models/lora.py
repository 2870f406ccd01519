"""LoRA adapters on our U-Net (Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", eq. 3),
made with `peft`: each targeted weight W (out x in) computes W x + (alpha / r) B A x, with A (r x in) and B
(out x r, zero at the start, so training starts from the base model's function) trained and W frozen.

    unet = attach(load_init_unet(sb), sb.lora)        # adapters on stage_b.lora.target_modules, base frozen
    state = adapter_state(unet)                       # {"<module>.lora_A.weight": ..., "<module>.lora_B.weight": ...}
    plain = merge(unet, scale=0.8)                    # W + 0.8 (alpha / r) B A folded in: a plain UNet again
    to_diffusers(state, unet.config, sb.lora)         # the keys diffusers' load_lora_weights reads

Adapters are published with a reference to their base (`base_reference`): the base's URI and a digest of its
weights, so a checkpoint or a published adapter is never combined with other weights than it was trained on.
"""

from __future__ import annotations

import hashlib
from typing import Mapping

import torch
from torch import nn

from ldm_core import convert
from ldm_core.config import ConfigError
from ldm_core.ema import unwrap_model
from ldm_core.unet import UNet, UNetConfig
from pipelines.config.pipeline import LoraSection

ADAPTER = "default"
"""peft's name for the one adapter a model carries here."""
DIFFUSERS_LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
"""The file `StableDiffusionPipeline.load_lora_weights(folder)` reads."""
DIFFUSERS_PREFIX = "unet."
"""diffusers' prefix of the U-Net's adapters in that file (the text encoder's would be `text_encoder.`)."""

# peft is imported where it is used: with transformers behind it, it costs ~3 s per process, and every Train
# worker and driver imports this module, LoRA or not.


def __getattr__(name: str):
    if name == "LoraLayer":  # peft's adapter layer class: tests and callers tell adapter layers by it
        from peft.tuners.lora import LoraLayer

        return LoraLayer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class BaseMismatch(ConfigError):
    """Adapters meeting a base model other than the one they were trained on (one line, for the entry points)."""


def attach(unet: UNet, section: LoraSection) -> UNet:
    """`unet` (in place) with adapters on `section.target_modules` in every block; everything else frozen."""
    from peft import LoraConfig, inject_adapter_in_model

    config = LoraConfig(r=section.rank, lora_alpha=section.alpha or section.rank, lora_dropout=section.dropout,
                        target_modules=list(section.target_modules), init_lora_weights=True)
    return inject_adapter_in_model(config, unet, adapter_name=ADAPTER)


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that train (with adapters attached: the adapters' only)."""
    return [p for p in model.parameters() if p.requires_grad]


def cast_base(unet: nn.Module, dtype: torch.dtype) -> None:
    """The frozen base weights to `dtype` (bf16 on GPUs: half the memory; autocast runs the forward); the adapters
    stay in fp32, as their optimiser and EMA expect."""
    for p in unet.parameters():
        if not p.requires_grad:
            p.data = p.data.to(dtype)


def base_digest(unet: nn.Module) -> str:
    """sha256 of a U-Net's base weights (names, shapes and fp32 values, in name order; adapters left out and
    peft's `base_layer.` wrappers removed), so the same weights give the same digest whatever file they came from."""
    h = hashlib.sha256()
    state = {k.replace(".base_layer.", "."): v for k, v in unwrap_model(unet).state_dict().items() if ".lora_" not in k}
    for name in sorted(state):
        tensor = state[name].detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(tensor.shape)};".encode())
        h.update(tensor.numpy().tobytes())
    return h.hexdigest()


def base_reference(uri: str, unet: nn.Module) -> dict[str, str]:
    """What a checkpoint or a published adapter records of its base: the URI and the digest of its weights."""
    return {"uri": uri, "digest": base_digest(unet)}


def check_base(reference: Mapping[str, str], digest: str, where: str, hint: str = "") -> None:
    """BaseMismatch unless `digest` is the digest `reference` (of adapters in `where`) was trained on."""
    if reference.get("digest") != digest:
        raise BaseMismatch(
            f"{where}: LoRA adapters trained on base {reference.get('uri')} (weights digest "
            f"{str(reference.get('digest'))[:12]}) meet a base with weights digest {digest[:12]}; adapters only apply to "
            f"the weights they were trained on" + (f" ({hint})" if hint else ""))


def adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors, keyed `<module>.lora_A.weight` / `<module>.lora_B.weight` (our module names)."""
    from peft import get_peft_model_state_dict

    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(unwrap_model(model), adapter_name=ADAPTER).items()}


def load_adapter_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load `adapter_state`'s tensors into a model with the same adapters attached; every adapter tensor must be
    there and nothing else."""
    from peft import set_peft_model_state_dict

    model = unwrap_model(model)
    result = set_peft_model_state_dict(model, dict(state), adapter_name=ADAPTER)
    missing = [k for k in result.missing_keys if ".lora_" in k]
    if missing or result.unexpected_keys:
        raise ConfigError(f"LoRA adapters do not fit the model: {len(missing)} missing (e.g. {missing[:2]}), "
                          f"{len(result.unexpected_keys)} unexpected (e.g. {result.unexpected_keys[:2]})")


class AdapterWeights:
    """The part of a LoRA U-Net a training checkpoint holds, the adapters (`state_dict` / `load_state_dict`, as
    the loop's checkpoints expect of a module)."""

    def __init__(self, model: nn.Module):
        self.model = model

    def state_dict(self) -> dict[str, torch.Tensor]:
        return adapter_state(self.model)

    def load_state_dict(self, state: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        load_adapter_state(self.model, state)


@torch.no_grad()
def merge(unet: UNet, scale: float = 1.0) -> UNet:
    """`unet` (in place) with every adapter folded into its base weight, W + scale (alpha / r) B A, and peft's
    wrappers replaced by the plain layers: an ordinary UNet."""
    from peft.tuners.lora import LoraLayer

    for name, module in list(unet.named_modules()):
        if not isinstance(module, LoraLayer):
            continue
        module.set_scale(ADAPTER, scale)
        module.merge(adapter_names=[ADAPTER])
        parent, _, child = name.rpartition(".")
        setattr(unet.get_submodule(parent) if parent else unet, child, module.get_base_layer())
    return unet


def apply(base: UNet, section: LoraSection, state: Mapping[str, torch.Tensor], scale: float = 1.0) -> UNet:
    """`base` with the adapters `state` (trained with `section`) folded in at `scale`."""
    model = attach(base, section)
    load_adapter_state(model, state)
    return merge(model, scale)


def to_diffusers(state: Mapping[str, torch.Tensor], unet_config: UNetConfig, section: LoraSection) -> dict[str, torch.Tensor]:
    """The adapters in the layout `StableDiffusionPipeline.load_lora_weights` (diffusers 0.42) reads: peft's
    `lora_A` / `lora_B` under `unet.<diffusers module>`, with alpha / r folded into B (a file without alphas is
    read with alpha = r, scale 1), fp32. The module names are `ldm_core.convert`'s map of our U-Net to diffusers'
    (its transformers' projections linear, as `pipelines/export.py` writes the U-Net)."""
    links = convert.unet_links(unet_config, "diffusers", projection="linear")
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        module, _, leaf = key.partition(".lora_")  # "down_attn.1.blocks.0.attn1.to_q", "A.weight"
        (theirs,) = links[module].theirs
        tensor = tensor.detach().to("cpu", torch.float32)
        if leaf.startswith("B."):
            tensor = tensor * section.scaling
        out[f"{DIFFUSERS_PREFIX}{theirs}.lora_{leaf}"] = tensor.contiguous()
    return out


def adapter_bytes(state: Mapping[str, torch.Tensor]) -> int:
    """Bytes of the adapters' tensors (what a checkpoint or a published adapter adds to the base)."""
    return sum(t.numel() * t.element_size() for t in state.values())

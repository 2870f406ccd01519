"""Whole-pipeline variants compared on one config: each variant is `pipelines/run.py --until stage_b` with its own
overrides, sharing the upstream stages (the prepared data, Stage A) through the DAG's cache.

    .venv/bin/python benchmarks/bench_variants.py --study numbers-text [--variants split,whole] \\
        [--set data.uri=... --set mlflow.tracking_uri=... --set run.output_uri=...] [--results FILE] [--plot FILE]
    .venv/bin/python benchmarks/bench_variants.py --study latent-norm ...

Studies:

  numbers-text  configs/numbers.yaml (issue 26): does the text path compose? `split` writes every digit as a word of
                its own before tokenizing (`encode.text_encoder.split_digits`, the config's setting), `whole` leaves
                MiniLM's WordPiece to read "42" as one token. Metrics are the ones Stage B logs at its fixed
                prompt-evaluation budget (DDIM 25 steps, guidance 4, 10 samples per number): seen-number and
                held-out-number accuracy (both digits right), and per position on the held-out numbers.
  latent-norm   configs/photos.yaml (issue 33): scalar latent scale (SD's), per-channel normalisation (diffusers'
                latents_mean / latents_std) and scalar + offset noise (Guttenberg 2023, 0.1). Metrics: Stage B's
                held-out denoising loss (EMA weights; eps units, but over differently normalised latents, so read it
                with care) and the brightness leak: for each of the photographs' captions, `--samples` images
                (DDIM 25 steps, guidance 4, the same noise for every variant) and their mean luma against the mean
                luma of that photograph's crops in the prepared data. Reported over the captions Stage B trained on:
                the mean absolute gap, and the slope of sample brightness on data brightness (1: brightness follows
                the caption; 0: every caption comes out equally bright, the leak of Lin et al. 2024 and Guttenberg
                2023), each the mean over three sampling seeds, with its spread over them (the noise floor of a
                comparison); apart, the gap on the held-out photographs' captions (generalisation, not the leak).

Every variant is run in its own process with its own local Ray, in the current folder (so the config's relative
paths, `outputs/...`, are the ones of a pipeline already run there); the upstream stages are computed once (by the
pipeline run before, or the first variant) and reused through the DAG's cache after; a variant that equals a
finished run (the config as it is) is that run, read back. Each finished variant appends one JSON line to --results; a re-invocation
skips the variants already there, so an interrupted benchmark continues (`--rescore` measures the study's extra
metrics again for the rows already there, from their registered models, e.g. after the metric changed). At the end a
table is printed and, with --plot, a bar chart of the study's metrics is written.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


@dataclass(frozen=True)
class Study:
    config: str
    variants: dict[str, list[str]]
    """Variant name -> `--set` overrides."""
    metrics: tuple[str, ...]
    """Stage B run metrics to read back."""
    extra: Callable[[list[str], str], dict[str, float]] | None = None
    """(config args, model URI) -> more metrics measured on the published U-Net."""
    labels: dict[str, str] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------
# The brightness leak (latent-norm)
# ---------------------------------------------------------------------------------------------------


def luma(images):
    """(N, C, H, W) in [-1, 1] -> each image's mean Rec. 601 luma in [0, 1]."""
    import numpy as np

    x = (np.asarray(images, dtype=np.float64) + 1.0) / 2.0
    if x.shape[1] == 3:
        x = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    return x.reshape(x.shape[0], -1).mean(axis=1)


def data_luma_by_caption(data_uri: str) -> dict[str, list[tuple[str, float]]]:
    """(key, mean luma) of every stored image of each caption in a prepared Parquet dataset (a photograph's crops)."""
    import io

    import numpy as np
    import pyarrow.parquet as pq
    from PIL import Image

    out: dict[str, list[tuple[str, float]]] = {}
    for path in sorted(Path(data_uri).glob("*.parquet")):
        table = pq.read_table(path, columns=["key", "image", "caption"]).to_pydict()
        for key, data, caption in zip(table["key"], table["image"], table["caption"]):
            rgb = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.float64) / 255.0
            out.setdefault(caption, []).append((key, float((rgb @ [0.299, 0.587, 0.114]).mean())))
    return out


def brightness_leak(config_args: list[str], model_uri: str, samples: int = 8, seeds: tuple[int, ...] = (0, 1, 2)
                    ) -> dict[str, float]:
    """The leak metrics, each the mean over `seeds` (each seed: `samples` images per caption, the same noise for
    every model), with the spread over the seeds (`_seed_std`) of the two headline figures: the noise floor a
    difference between variants must clear."""
    import numpy as np

    from pipelines.config import load_config
    from pipelines.data.reader import in_split
    from pipelines.models.inference import Renderer

    import mlflow

    from pipelines.platform import tracking

    cfg = load_config(config_args[0], config_args[1:])
    mlflow.set_tracking_uri(tracking.tracking_uri(cfg.mlflow))  # where the model URI resolves
    crops = data_luma_by_caption(cfg.data.uri)
    captions = sorted(crops)
    want = np.array([np.mean([luma for _, luma in crops[c]]) for c in captions])
    # A caption is held out when Stage B never trained on its images (configs/photos.yaml holds out whole
    # photographs): its gap measures generalisation to an unseen photograph, not the leak.
    split = cfg.data.holdout_fraction, cfg.data.holdout_by
    held = np.array([not any(in_split(k, "train", *split) for k, _ in crops[c]) for c in captions])
    renderer = Renderer.load(cfg, model_uri)  # the U-Net, autoencoder and text encoder, once for every seed
    per_seed = []
    for seed in seeds:
        sc = cfg.sample.model_copy(update={"num_per_prompt": samples, "steps": 25, "guidance": 4.0, "seed": seed,
                                           "height": None, "width": None})
        images = renderer(sc, captions)
        per_seed.append(luma(images.numpy()).reshape(len(captions), samples).mean(axis=1))
    got = np.stack(per_seed)  # (seeds, captions)
    trained = ~held
    gaps = np.abs(got[:, trained] - want[trained]).mean(axis=1)
    slopes = np.array([np.polyfit(want[trained], g[trained], 1)[0] for g in got])
    held_gaps = np.abs(got[:, held] - want[held]).mean(axis=1) if held.any() else np.full(len(seeds), np.nan)
    return {"leak/mean_abs_gap": float(gaps.mean()), "leak/mean_abs_gap_seed_std": float(gaps.std()),
            "leak/slope": float(slopes.mean()), "leak/slope_seed_std": float(slopes.std()),
            "leak/sample_luma_std": float(got[:, trained].std(axis=1).mean()),
            "leak/data_luma_std": float(want[trained].std()),
            "leak/held_out_mean_abs_gap": float(held_gaps.mean()), "leak/seeds": len(seeds),
            "leak/trained_captions": int(trained.sum()),
            "leak/held_out_captions": [c for c, h in zip(captions, held) if h],
            **{f"leak/gap/{c}": float(g - w) for c, g, w in zip(captions, got.mean(axis=0), want)}}


STUDIES: dict[str, Study] = {
    "numbers-text": Study(
        config="configs/numbers.yaml",
        variants={
            "split": ["encode.text_encoder.split_digits=true"],
            "whole": ["encode.text_encoder.split_digits=false"],
        },
        metrics=("eval/number_accuracy_seen", "eval/number_accuracy_held_out", "eval/held_out_tens_accuracy",
                 "eval/held_out_units_accuracy", "eval/holdout_loss_ema"),
        labels={"split": "digits split (the config)", "whole": "WordPiece as is"},
    ),
    "latent-norm": Study(
        config="configs/photos.yaml",
        variants={
            "scalar": ["encode.latent_normalization=scalar"],
            "per_channel": ["encode.latent_normalization=per_channel"],
            "offset_noise": ["encode.latent_normalization=scalar", "stage_b.diffusion.offset_noise=0.1"],
        },
        metrics=("eval/holdout_loss_ema",),
        extra=brightness_leak,
    ),
}


# ---------------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------------

STAGE_B_LINE = re.compile(r"^\[stage_b\]\s+(\S+)\s+([\d.]+)s\s+(?:run\s+)?([0-9a-f]{32})")


def variant_sets(study: Study, name: str, overrides: list[str]) -> list[str]:
    """The `--set` overrides that make variant `name`: its run name, its own settings, then the caller's."""
    return [f"run.name={Path(study.config).stem}-{name}", *study.variants[name], *overrides]


def run_variant(study: Study, name: str, overrides: list[str]) -> dict:
    config = str(REPO / study.config)
    cmd = [sys.executable, str(REPO / "pipelines" / "run.py"), "--config", config, "--until", "stage_b"]
    sets = variant_sets(study, name, overrides)
    for o in sets:
        cmd += ["--set", o]
    started = time.monotonic()
    proc = subprocess.run(cmd, capture_output=True, text=True)  # in the caller's folder: the config's relative paths
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"error: variant {name} failed (exit {proc.returncode}):\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}")
    found = [STAGE_B_LINE.match(line) for line in proc.stdout.splitlines()]
    found = [m for m in found if m]
    if not found:
        raise SystemExit(f"error: variant {name}: no [stage_b] line in run.py's output:\n{proc.stdout[-2000:]}")
    status, _, run_id = found[-1].groups()

    from mlflow.tracking import MlflowClient

    from pipelines.config import load_config

    cfg = load_config(config, sets)
    run = MlflowClient(cfg.mlflow.tracking_uri).get_run(run_id)
    # The stage's own run time, also when this variant is a run made before (reused: its line says 0 s)
    stage_seconds = (run.info.end_time - run.info.start_time) / 1000
    row = {"variant": name, "overrides": study.variants[name], "stage_b_run_id": run_id, "stage_b_status": status,
           "stage_b_seconds": round(stage_seconds, 1), "seconds": round(seconds, 1), "load_1min": round(os.getloadavg()[0], 2),
           "finished_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
           "model_uri": run.data.tags.get("model_uri"), **{m: run.data.metrics.get(m) for m in study.metrics}}
    if study.extra is not None:
        row |= study.extra([config, *sets], row["model_uri"])
    return row


def rescore(study: Study, row: dict, overrides: list[str]) -> dict:
    """`row` with the study's extra metrics measured again from its registered model."""
    if study.extra is None or not row.get("model_uri"):
        return row
    kept = {k: v for k, v in row.items() if not k.startswith("leak/")}
    return kept | study.extra([str(REPO / study.config), *variant_sets(study, row["variant"], overrides)],
                              row["model_uri"])


def table(study: Study, rows: list[dict]) -> str:
    keys = [*study.metrics, *([k for k, v in rows[0].items() if k.startswith("leak/") and "/gap/" not in k
                               and isinstance(v, float)] if rows else [])]
    lines = ["| variant | " + " | ".join(keys) + " | Stage B s |", "|---" * (len(keys) + 2) + "|"]
    for r in rows:
        cells = [f"{r[k]:.4f}" if isinstance(r.get(k), float) else "n/a" for k in keys]
        lines.append(f"| {r['variant']} | " + " | ".join(cells) + f" | {r['stage_b_seconds']:.0f} |")
    return "\n".join(lines)


def plot(study: Study, rows: list[dict], path: str, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    keys = [k for k in (*study.metrics, "leak/mean_abs_gap", "leak/slope", "leak/held_out_mean_abs_gap")
            if any(isinstance(r.get(k), float) for r in rows)]
    fig, ax = plt.subplots(figsize=(1.6 + 1.5 * len(keys), 3.4))
    width = 0.8 / max(len(rows), 1)
    for i, r in enumerate(rows):
        values = [r.get(k) or 0.0 for k in keys]
        spread = [r.get(f"{k}_seed_std") or 0.0 for k in keys]  # the sampling seeds' spread, where measured
        bars = ax.bar(np.arange(len(keys)) + (i - (len(rows) - 1) / 2) * width, values, width, yerr=spread,
                      capsize=2, label=study.labels.get(r["variant"], r["variant"]))
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
    ax.set_xticks(np.arange(len(keys)), [k.split("/", 1)[1].replace("_", " ") for k in keys], fontsize=8)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--study", required=True, choices=sorted(STUDIES))
    parser.add_argument("--variants", help="comma-separated (default: all of the study's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="config override for every variant (repeatable), e.g. the output and tracking URIs")
    parser.add_argument("--results", help="JSON lines file (default /tmp/ldm-bench-variants/<study>.jsonl)")
    parser.add_argument("--plot", help="PNG to write the bar chart to")
    parser.add_argument("--rescore", action="store_true",
                        help="measure the study's extra metrics again for the rows already in --results (rewrites it)")
    args = parser.parse_args(argv)
    study = STUDIES[args.study]
    names = args.variants.split(",") if args.variants else list(study.variants)
    unknown = [n for n in names if n not in study.variants]
    if unknown:
        raise SystemExit(f"error: unknown variant(s) {unknown} of {args.study}; choose from {list(study.variants)}")
    results = Path(args.results or f"/tmp/ldm-bench-variants/{args.study}.jsonl")
    results.parent.mkdir(parents=True, exist_ok=True)
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    if args.rescore and rows:
        rows = [rescore(study, r, args.overrides) if r["variant"] in names else r for r in rows]
        tmp = results.with_suffix(results.suffix + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(results)  # whole or not at all
    for name in names:
        if any(r["variant"] == name for r in rows):
            continue
        print(f"[{name}] running ...", flush=True)
        row = run_variant(study, name, args.overrides)
        print(f"[{name}] {json.dumps(row)}", flush=True)
        with results.open("a") as f:
            f.write(json.dumps(row) + "\n")
        rows.append(row)
    rows = [r for r in rows if r["variant"] in names]
    print(table(study, rows))
    if args.plot and rows:
        plot(study, rows, args.plot, f"{args.study} ({study.config}), {datetime.now(timezone.utc):%Y-%m-%d}")
        print(f"wrote {args.plot}")


if __name__ == "__main__":
    main()

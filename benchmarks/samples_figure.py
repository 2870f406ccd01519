"""A labelled figure of chosen prompts' samples from a sample stage's folder (its `samples.json` and PNGs).

    .venv/bin/python benchmarks/samples_figure.py --samples outputs/samples/<stage_b run id> \\
        --prompts "the number 42" "the number 24" ... --columns 8 --out benchmarks/results/numbers_grid.png \\
        [--title "..."]

One row per prompt, its first `--columns` samples in order (the sample stage's fixed seeds, so anyone re-running
the same model gets the same images), the prompt written at the row's left. Each row's label can carry a mark
(`--marks`, e.g. "held out"), given per prompt in the same order.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", required=True, help="a sample stage's output folder (local)")
    parser.add_argument("--prompts", nargs="+", required=True)
    parser.add_argument("--marks", nargs="*", default=[], help="a label suffix per prompt ('' for none)")
    parser.add_argument("--columns", type=int, default=8)
    parser.add_argument("--out", required=True)
    parser.add_argument("--title", default="")
    parser.add_argument("--dpi", type=int, default=100)
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    folder = Path(args.samples)
    manifest = json.loads((folder / "samples.json").read_text())
    by_prompt: dict[str, list[str]] = {}
    for entry in sorted(manifest["images"], key=lambda e: (e["prompt_index"], e["sample_index"])):
        by_prompt.setdefault(entry["prompt"], []).append(entry["file"])
    missing = [p for p in args.prompts if p not in by_prompt]
    if missing:
        raise SystemExit(f"error: {folder}/samples.json has no samples of {missing}")
    marks = args.marks + [""] * (len(args.prompts) - len(args.marks))
    first = Image.open(folder / by_prompt[args.prompts[0]][0])
    aspect = first.height / first.width
    fig, axes = plt.subplots(len(args.prompts), args.columns, squeeze=False,
                             figsize=(1.0 + 0.9 * args.columns, 0.9 * aspect * len(args.prompts) + 0.5))
    for row, (prompt, mark) in enumerate(zip(args.prompts, marks)):
        for col in range(args.columns):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            files = by_prompt[prompt]
            if col < len(files):
                ax.imshow(Image.open(folder / files[col]).convert("L"), cmap="gray", vmin=0, vmax=255)
        label = prompt.removeprefix("the number ") + (f"\n{mark}" if mark else "")
        axes[row][0].set_ylabel(label, rotation=0, ha="right", va="center", fontsize=8)
    if args.title:
        fig.suptitle(args.title, fontsize=9)
    fig.subplots_adjust(left=0.12, right=0.99, top=0.93 if args.title else 0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    fig.savefig(args.out, dpi=args.dpi)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

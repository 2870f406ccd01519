"""Aspect-ratio buckets (`data.buckets`, pipelines/data/buckets.py): the shapes a grid generates, the bucket every image
lands in, batches of one shape, latents files of one shape, and a two-bucket DAG (Stage B crashing and resuming
mid-way) whose buckets reach the samples."""

from __future__ import annotations

import io
import json
import math
import types
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient
from PIL import Image
from pydantic import ValidationError

from pipelines.config.data import BucketGrid, DataConfig
from pipelines.data.buckets import ShapeBatcher, check_shapes, cropped_fraction, nearest_bucket
from pipelines.data.reader import decode_image
from ldm_core.config import ConfigError
from tests.helpers import REPO, tiny_later_stages, tiny_overrides


def _png(height: int, width: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------------
# Shapes and the bucket of an image
# ---------------------------------------------------------------------------------------------------


def test_a_grid_holds_every_step_multiple_shape_near_the_area_within_the_aspect_limit():
    grid = BucketGrid(area=256 * 256, step=32, max_aspect=2.0)
    shapes = grid.shapes()
    assert (256, 256) in shapes
    for h, w in shapes:
        assert h % 32 == 0 and w % 32 == 0
        assert max(h, w) <= 2.0 * min(h, w)
        assert h * w <= 256 * 256 and (h + 32) * w > 256 * 256  # the tallest multiple of step that fits the area
    # both orientations of every shape, and one shape per width
    assert {(w, h) for h, w in shapes} == set(shapes)
    assert len({w for _, w in shapes}) == len(shapes)
    assert [w / h for h, w in shapes] == sorted((w / h for h, w in shapes), reverse=True)


def test_every_image_lands_in_the_bucket_nearest_its_aspect_ratio_and_is_cropped_as_little_as_it_allows():
    buckets = [(32, 64), (48, 48), (64, 32), (40, 56)]
    rng = np.random.default_rng(0)
    for i in range(40):
        h, w = (int(v) for v in rng.integers(20, 140, 2))
        array, notes = decode_image(_png(h, w, i), resolution=48, crop="center", random_flip=False, min_size=0,
                                    rng=rng, buckets=buckets)
        got = array.shape[1:]
        distance = {b: abs(math.log(b[1] / b[0]) - math.log(w / h)) for b in buckets}
        assert distance[got] == min(distance.values()), (h, w, got)
        assert got == nearest_bucket(h, w, buckets)
        # covering the bucket and cropping: the discarded share is the least any bucket of this list allows
        assert cropped_fraction(h, w, got) == pytest.approx(min(cropped_fraction(h, w, b) for b in buckets), abs=1e-9)
        assert ("upscaled" in notes) == (max(got[0] / h, got[1] / w) > 1)
    assert nearest_bucket(40, 40, [(32, 64), (64, 32)]) == (32, 64)  # a tie: the first listed
    # without buckets, today's behaviour: every image at the resolution
    array, _ = decode_image(_png(30, 90), resolution=(32, 48), crop="center", random_flip=False, min_size=0, rng=rng)
    assert array.shape == (3, 32, 48)


def test_bucket_settings_are_checked_with_one_line_each():
    cfg = DataConfig(uri="x", buckets={"area": 48 * 48, "step": 16, "max_aspect": 2.0})
    assert cfg.resolution == 48 and cfg.size in cfg.shapes  # default: the bucket nearest a square
    assert DataConfig(uri="x", buckets=[[32, 64], [64, 32]]).size == (32, 64)
    assert DataConfig(uri="x").shapes == [(256, 256)]  # no buckets: one shape, today's
    with pytest.raises(ValidationError, match=r"resolution 48 is not one of the buckets \[\[32, 64\], \[64, 32\]\]"):
        DataConfig(uri="x", buckets=[[32, 64], [64, 32]], resolution=48)
    with pytest.raises(ValidationError, match="listed twice"):
        DataConfig(uri="x", buckets=[[32, 64], [32, 64]])
    with pytest.raises(ValidationError, match="no shape fits"):
        DataConfig(uri="x", buckets={"area": 100, "step": 64})
    with pytest.raises(ConfigError) as e:
        check_shapes(DataConfig(uri="x", buckets=[[32, 48], [44, 32]]), 4, 8)
    assert str(e.value).startswith("a bucket of data.buckets=[44, 32]: every side must be a multiple of the "
                                   "autoencoder's downsampling factor f=8") and "\n" not in str(e.value)
    assert check_shapes(DataConfig(uri="x", buckets=[[32, 48], [48, 32]], resolution=[48, 32]), 4, 8) == [
        (4, 6, 4), (4, 4, 6)]  # the default shape first


# ---------------------------------------------------------------------------------------------------
# Batches of one shape
# ---------------------------------------------------------------------------------------------------


def _ragged(shapes: list[tuple[int, int]], start: int) -> dict[str, np.ndarray]:
    images = np.empty(len(shapes), dtype=object)
    images[:] = [np.full((3, h, w), start + i, np.uint8) for i, (h, w) in enumerate(shapes)]
    return {"image": images, "id": np.arange(start, start + len(shapes))}


def test_every_batch_has_one_shape_and_no_row_is_lost_or_repeated():
    rng = np.random.default_rng(1)
    shapes = [(8, 16), (16, 8), (12, 12)]
    batcher, out, sent = ShapeBatcher(5), [], 0
    for size in rng.integers(1, 9, 30):
        picks = [shapes[int(k)] for k in rng.integers(0, 3, int(size))]
        out += list(batcher.add(_ragged(picks, sent)))
        sent += len(picks)
    full = len(out)
    out += list(batcher.flush())
    ids = []
    for k, batch in enumerate(out):
        assert batch["image"].dtype == np.uint8 and batch["image"].ndim == 4  # stacked: one shape
        assert len(batch["id"]) == 5 or k >= full  # full batches, then the flushed remainders
        for image, i in zip(batch["image"], batch["id"]):
            assert image[0, 0, 0] == i % 256  # rows keep their own columns together
        ids += batch["id"].tolist()
    assert sorted(ids) == list(range(sent))
    # a fixed-shape batch (no buckets) passes whole, remainders carried to the next add
    plain = ShapeBatcher(4)
    got = list(plain.add({"image": np.zeros((6, 3, 8, 8), np.uint8)})) + list(plain.add({"image": np.zeros((2, 3, 8, 8), np.uint8)}))
    assert [len(b["image"]) for b in got] == [4, 4] and plain.pending == 0


def test_the_latents_writer_puts_each_shape_in_its_own_files(tmp_path):
    import pyarrow as pa
    from ray.data.block import BlockAccessor
    from ray.data.extensions import ArrowTensorArray

    from pipelines.data.latents import LatentParquetSink, shape_counts

    def block(n: int, h: int, w: int):
        return pa.table({"latent_mean": ArrowTensorArray.from_numpy(np.zeros((n, 4, h, w), np.float32)),
                         "caption_truncated": np.zeros(n, bool), "holdout": np.zeros(n, bool)})

    def merged(*blocks):  # what Ray Data hands the writer when it merged blocks of two shapes: variable-shaped columns
        images = np.empty(sum(b.num_rows for b in blocks), dtype=object)
        images[:] = [row for b in blocks for row in BlockAccessor.for_block(b).to_numpy("latent_mean")]
        return pa.table({"latent_mean": ArrowTensorArray.from_numpy(images),
                         "caption_truncated": np.zeros(len(images), bool), "holdout": np.zeros(len(images), bool)})

    sink = LatentParquetSink(str(tmp_path), None, "parts-x", rows_per_file=5)
    written = sink.write([block(3, 4, 6), block(4, 6, 4), merged(block(2, 4, 6), block(1, 6, 4)), block(1, 4, 6)],
                         types.SimpleNamespace(task_idx=0))
    by_shape = {}
    for entry in written:
        table = pq.read_table(tmp_path / entry["path"])
        assert table.schema.field("latent_mean").type.shape == tuple(entry["latent_shape"][0:])
        by_shape[tuple(entry["latent_shape"])] = by_shape.get(tuple(entry["latent_shape"]), 0) + entry["num_rows"]
    assert by_shape == {(4, 4, 6): 6, (4, 6, 4): 5}
    sink.on_write_complete(types.SimpleNamespace(write_returns=[written]))
    assert shape_counts(sink.files) == [{"shape": [4, 4, 6], "rows": 6}, {"shape": [4, 6, 4], "rows": 5}]


# ---------------------------------------------------------------------------------------------------
# Two buckets from prepare to sample
# ---------------------------------------------------------------------------------------------------


def _mixed_folder(root: Path, n: int = 48) -> Path:
    """Wide and tall photographs-to-be of several sizes (aspect 1.4-2), each with a caption saying which."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        long_side, ratio = int(rng.integers(40, 90)), float(rng.uniform(1.4, 2.0))
        h, w = (round(long_side / ratio), long_side) if i % 2 else (long_side, round(long_side / ratio))
        (root / f"img{i:03d}.png").write_bytes(_png(h, w, i))
        (root / f"img{i:03d}.txt").write_text("a wide picture" if i % 2 else "a tall picture")
    return root


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_a_two_bucket_dag_resumes_stage_b_and_keeps_every_shape_to_the_samples(ray_local, mlflow_uri, tmp_path):
    from pipelines import run as pipeline
    from pipelines.config import load_config
    from pipelines.data import build_dataset
    from pipelines.data.buckets import iter_shape_batches
    from pipelines.sample import run_sample

    overrides = [
        *tiny_overrides(tmp_path, str(tmp_path / "data" / "mixed")), *tiny_later_stages(),
        f"data.source={_mixed_folder(tmp_path / 'folder')}", "data.shard_size=16", "run.name=buckets",
        "data.resolution=[32, 48]", "data.buckets=[[32, 48], [48, 32]]", "data.holdout_fraction=0.25",
        "stage_b.train.max_failures=1", "stage_b.train.fail_at_step=3",
        "sample.prompts=['a wide picture', 'a tall picture']",
    ]
    # A bucket Stage A's autoencoder (f=4) cannot take: one line, before anything is written.
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"), *[f"--set={o}" for o in overrides],
                       "--set=data.buckets=[[32, 48], [46, 32]]"])
    assert str(e.value).startswith("error: a bucket of data.buckets=[46, 32]: every side must be a multiple") and "\n" not in str(e.value)
    assert not (tmp_path / "data").exists()
    # A side the reader cannot make (the non-square default shape's own check) likewise.
    with pytest.raises(SystemExit) as e:
        pipeline.main(["--config", str(REPO / "configs/quickstart.yaml"), *[f"--set={o}" for o in overrides],
                       "--set=data.resolution=[18, 32]", "--set=data.buckets=null"])
    assert str(e.value).startswith("error: data.resolution=[18, 32]: every side must be a multiple") and "\n" not in str(e.value)

    cfg = load_config(REPO / "configs/quickstart.yaml", overrides)
    result = pipeline.run_pipeline(cfg)
    assert [result[s].status for s in pipeline.STAGE_NAMES] == ["ran"] * len(pipeline.STAGE_NAMES)

    # The reader: every image at the nearest bucket of its own shape; batches hold one shape; nothing lost.
    ds, skips = build_dataset(cfg.data, split="all", storage=cfg.storage, shuffle=False)
    rows = 0
    for block in ds.iter_batches(batch_size=None, batch_format="numpy"):
        for key, image in zip(block["key"], block["image"]):
            with Image.open(tmp_path / "folder" / f"{key}.png") as source:
                w, h = source.size
            assert image.shape[1:] == nearest_bucket(h, w, cfg.data.shapes) == ((32, 48) if w > h else (48, 32))
        rows += len(block["key"])
    assert rows == 48 and skips.dropped() == 0
    shapes_seen = {tuple(b["image"].shape[2:]) for b in iter_shape_batches(ds, batch_size=5, device="cpu")}
    assert shapes_seen == {(32, 48), (48, 32)}

    client = MlflowClient()
    # Stage B's batches of latents in two shapes, restarted from its step-2 checkpoint (a crash at step 3). (Stage A
    # restarts through the same training loop: tests/test_stage_a.py.)
    history = client.get_metric_history(result["stage_b"].run_id, "train/resumed_from_step")
    assert [m.value for m in history] == [2], "stage_b did not resume from its step-2 checkpoint"

    # Encode: one latent shape per Parquet file, every shape counted in the manifest, the default shape first.
    latents_dir = Path(result["encode"].outputs["latents_uri"])
    manifest = json.loads((latents_dir / "manifest.json").read_text())
    assert manifest["latent_shape"] == [4, 8, 12]
    assert {tuple(e["shape"]): e["rows"] for e in manifest["latent_shapes"]} == {
        (4, 8, 12): 24, (4, 12, 8): 24}
    for entry in manifest["files"]:
        table = pq.read_table(latents_dir / entry["path"], columns=["latent_mean", "caption"])
        assert list(table.schema.field("latent_mean").type.shape) == entry["latent_shape"]
        assert set(table.column("caption").to_pylist()) == {"a wide picture" if entry["latent_shape"][2] == 12 else "a tall picture"}

    # Sample: the default (trained) shape, a grid of every trained shape, and any bucket on demand.
    out = Path(result["sample"].outputs["out_dir"])
    assert {Image.open(p).size for p in out.glob("p*.png")} == {(48, 32)}  # PIL: (width, height)
    with Image.open(out / "grid_shapes.png") as grid:
        assert grid.size[1] >= 32 + 48 and grid.size[0] >= 2 * 48  # a row per shape, a column per prompt
    assert "samples/grid_shapes.png" in [a.path for a in client.list_artifacts(result["sample"].run_id, "samples")]
    tall_cfg = cfg.model_copy(update={"sample": cfg.sample.model_copy(update={"height": 48, "width": 32,
                                                                              "out_dir": str(tmp_path / "tall")})})
    tall = run_sample(tall_cfg, log_to_mlflow=False)
    assert {Image.open(p).size for p in Path(tall.out_dir).glob("p*.png")} == {(32, 48)}

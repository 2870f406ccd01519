"""Sharded datasets: building them (bundled sources, folders), storing them on a real S3 API server
(moto_server on 127.0.0.1), streaming them back through Ray Data, and accounting for every bad sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipelines import prepare_data
from pipelines.data import DataConfig, DatasetError, build_dataset, check_cpu_budget, prepare_dataset, read_manifest
from pipelines.data.reader import in_split
from pipelines.settings import ScalingSection


def _stream(cfg: DataConfig, split: str = "all", counter=None):
    ds, counter = build_dataset(cfg, split=split, shuffle=False, seed=0, skip_counter=counter)
    rows = ds.take_all()
    return rows, counter


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_mnist_to_s3_and_back_through_ray_data(ray_local, s3_bucket, fmt):
    uri = f"s3://{s3_bucket}/datasets/mnist-{fmt}"
    manifest = prepare_data.main(["--source", "mnist", "--output", uri, "--format", fmt, "--shard-size", "16", "--limit", "40"])
    assert manifest["num_samples"] == 40 and len(manifest["shards"]) == 3
    assert read_manifest(uri)["digest"] == manifest["digest"]

    rows, counter = _stream(DataConfig(uri=uri, resolution=32, crop="center"))
    assert len(rows) == 40
    images = np.stack([r["image"] for r in rows])
    assert images.shape == (40, 3, 32, 32) and images.dtype == np.float32
    assert images.min() >= -1.0 and images.max() <= 1.0 and images.min() < -0.9 and images.max() > 0.9
    assert all(r["caption"].startswith("a handwritten digit ") for r in rows)
    assert len({r["key"] for r in rows}) == 40
    # MNIST is greyscale: every image was converted from L to RGB, and 28 px were upscaled to 32; nothing dropped.
    assert counter.snapshot() == {"converted_l": 40, "upscaled": 40}
    assert counter.dropped() == 0


def test_train_and_holdout_splits_are_disjoint_and_cover_the_data(ray_local, tmp_path):
    uri = str(tmp_path / "mnist")
    prepare_dataset("mnist", uri, shard_size=50, limit=100)
    cfg = DataConfig(uri=uri, resolution=28, holdout_fraction=0.25, crop="random", random_flip=True)
    train, _ = _stream(cfg, "train")
    holdout, _ = _stream(cfg, "holdout")
    train_keys, holdout_keys = {r["key"] for r in train}, {r["key"] for r in holdout}
    assert not train_keys & holdout_keys
    assert len(train_keys | holdout_keys) == 100
    assert 10 <= len(holdout_keys) <= 40  # about a quarter
    assert all(in_split(k, "holdout", 0.25) for k in holdout_keys)


def _png(array, mode=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", **save)
    return buf.getvalue()


def _plant_folder(folder: Path) -> dict[str, int]:
    """A folder with good images in every odd mode, plus bad ones. Returns the expected counts."""
    folder.mkdir()
    rng = np.random.default_rng(0)
    rgb = (rng.random((40, 48, 3)) * 255).astype(np.uint8)

    def put(name: str, data: bytes, caption: str | None = "a test image"):
        (folder / name).write_bytes(data)
        if caption is not None:
            (folder / name).with_suffix(".txt").write_text(caption)

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG")
    jpeg = buf.getvalue()
    put("good_rgb.jpg", jpeg)
    put("truncated.jpg", jpeg[: len(jpeg) // 2])
    put("garbage.png", b"this is not an image at all")
    put("empty.png", b"")
    put("grey.png", _png(rgb[..., 0]))
    put("grey_alpha.png", _png(np.dstack([rgb[..., 0], rgb[..., 1]]), "LA"))
    put("rgba.png", _png(np.dstack([rgb, rgb[..., :1]]), "RGBA"))
    palette = Image.fromarray(rgb).convert("P")
    palette.info["transparency"] = 0
    b = io.BytesIO()
    palette.save(b, format="PNG", transparency=0)
    put("palette.png", b.getvalue())
    b = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(b, format="JPEG")
    put("cmyk.jpg", b.getvalue())
    put("sixteen_bit.png", _png((rng.random((40, 48)) * 65535).astype(np.uint16)))
    put("tiny.png", _png(rgb[:8, :8]))  # below min_size: skipped
    put("small.png", _png(rgb[:24, :24]))  # above min_size, below resolution: upscaled
    put("no_caption.png", _png(rgb), caption=None)
    return {
        "corrupt_image": 2, "empty_image": 1, "too_small": 1,  # dropped
        "converted_l": 1, "converted_alpha": 3, "converted_cmyk": 1, "converted_16bit": 1,  # repaired
        "upscaled": 1, "missing_caption": 1,
    }


def _corrupt_tar_shard() -> bytes:
    """A tar with one good sample, a caption without an image, and a member cut short mid-file."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in (("ok.png", _png(np.full((40, 40, 3), 128, np.uint8))), ("ok.txt", b"fine"),
                              ("orphan.txt", b"a caption whose image is missing")):
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("cut.png")
        info.size = 10_000
        tar.addfile(info, io.BytesIO(b"\x89PNG" + b"\0" * 9_996))
    return buf.getvalue()[:-10_000 + 1000 - 1024]  # cut into the last member's data


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_bad_samples_are_skipped_and_counted_by_reason(ray_local, tmp_path, fmt):
    expected = _plant_folder(tmp_path / "images")
    uri = str(tmp_path / f"ds-{fmt}")
    manifest = prepare_dataset(str(tmp_path / "images"), uri, fmt=fmt, shard_size=5)
    assert manifest["num_samples"] == 13
    good = 13 - expected["corrupt_image"] - expected["empty_image"] - expected["too_small"]
    if fmt == "webdataset":
        (Path(uri) / "shard-99999.tar").write_bytes(_corrupt_tar_shard())
        manifest["shards"].append({"path": "shard-99999.tar", "num_samples": 3, "sha256": ""})
        (Path(uri) / "manifest.json").write_text(json.dumps(manifest))
        expected.update({"missing_image": 1, "corrupt_member": 1})
        good += 1  # ok.png

    rows, counter = _stream(DataConfig(uri=uri, resolution=32, min_size=16, crop="center"))
    assert len(rows) == good
    assert all(r["image"].shape == (3, 32, 32) for r in rows)
    assert counter.snapshot() == expected
    kept = {r["key"] for r in rows}
    assert "no_caption" in kept and "good_rgb" in kept and "truncated" not in kept
    assert next(r["caption"] for r in rows if r["key"] == "no_caption") == ""

    # Reading the same data again (a second epoch) does not count the same samples twice.
    _stream(DataConfig(uri=uri, resolution=32, min_size=16, crop="center"), counter=counter)
    assert counter.snapshot() == expected


@pytest.mark.parametrize("mapping", ["csv", "jsonl"])
def test_folder_captions_from_a_mapping_file(tmp_path, mapping):
    folder = tmp_path / "imgs"
    folder.mkdir()
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(_png(np.full((8, 8, 3), i * 40, np.uint8)))
    if mapping == "csv":
        captions = tmp_path / "captions.csv"
        captions.write_text("file,caption\n" + "".join(f"img{i}.png,caption number {i}\n" for i in range(3)))
    else:
        captions = tmp_path / "captions.jsonl"
        captions.write_text("".join(json.dumps({"key": f"img{i}", "caption": f"caption number {i}"}) + "\n" for i in range(3)))
    uri = str(tmp_path / "ds")
    prepare_dataset(str(folder), uri, fmt="webdataset", captions=str(captions))
    with tarfile.open(Path(uri) / "shard-00000.tar") as tar:
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    assert texts == {f"img{i}.txt": f"caption number {i}" for i in range(3)}


def test_missing_incomplete_and_empty_datasets_fail_before_anything_runs(tmp_path, s3_bucket):
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(f"s3://{s3_bucket}/no/such/prefix")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard-00000.tar").write_bytes(b"")
    with pytest.raises(DatasetError, match="no manifest.json"):
        build_dataset(DataConfig(uri=str(partial)))
    (partial / "manifest.json").write_text(json.dumps({"shards": [], "num_samples": 0, "digest": ""}))
    with pytest.raises(DatasetError, match="empty"):
        read_manifest(str(partial))
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(DatasetError, match="no samples"):
        prepare_dataset(str(empty_folder), str(tmp_path / "out"))
    # A complete dataset is never overwritten.
    prepare_dataset("mnist", str(tmp_path / "done"), limit=4)
    with pytest.raises(DatasetError, match="already holds"):
        prepare_dataset("mnist", str(tmp_path / "done"), limit=4)


def test_cpu_budget_error_names_the_fields(tmp_path):
    data = DataConfig(uri=str(tmp_path), reserved_cpus=0.5)
    with pytest.raises(ValueError) as e:
        check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=1.0), data)
    msg = str(e.value)
    assert "stage_a.scaling.cpus_per_worker" in msg and "data.reserved_cpus" in msg
    check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=0.5), data)  # 1 CPU left: fine
    check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=1.0), DataConfig(uri=str(tmp_path), reserved_cpus=0))

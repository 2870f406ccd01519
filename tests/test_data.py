"""Sharded datasets: building them (bundled sources, folders, existing shards), storing them on a real S3 API
server (moto_server on 127.0.0.1), streaming them back through Ray Data and Ray Train, and accounting for
every bad sample."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipelines import prepare_data
from pipelines.platform import storage
from pipelines.data import (
    DROP_REASONS,
    DataConfig,
    DatasetError,
    build_dataset,
    decode_sample,
    index_shards,
    prepare_dataset,
    read_manifest,
    to_model_range,
)
from pipelines.data.reader import in_split, source_of
from pipelines.platform.cluster import check_cpu_budget
from pipelines.data.sources import SKIMAGE_PHOTOS
from pipelines.config.sections import ScalingSection


def _stream(cfg: DataConfig, split: str = "all", counter=None):
    ds, counter = build_dataset(cfg, split=split, shuffle=False, seed=0, skip_counter=counter)
    return ds.take_all(), counter


def _dropped(counts: dict) -> int:
    return sum(n for reason, n in counts.items() if reason in DROP_REASONS)


def _tar(members: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, payload in members:
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    return buf.getvalue()


def _png(array, mode=None, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array, mode).save(buf, format="PNG", **save)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_mnist_to_s3_and_back_through_ray_data(ray_local, s3_bucket, fmt):
    uri = f"s3://{s3_bucket}/datasets/mnist-{fmt}"
    manifest = prepare_data.main(["--source", "mnist", "--output", uri, "--format", fmt, "--shard-size", "16", "--limit", "40"])
    assert manifest["num_samples"] == 40 and [s["num_samples"] for s in manifest["shards"]] == [16, 16, 8]
    assert read_manifest(uri)["digest"] == manifest["digest"]
    objects = {p.rsplit("/", 1)[-1] for p in storage.list_files(storage.resolve(uri))}
    assert objects == {"manifest.json", "shard-00000.tar" if fmt == "webdataset" else "shard-00000.parquet"} | {
        f"shard-0000{i}.{'tar' if fmt == 'webdataset' else 'parquet'}" for i in (1, 2)}

    cfg = DataConfig(uri=uri, resolution=32, crop="center")
    rows, counter = _stream(cfg)
    assert len(rows) == 40
    images = np.stack([r["image"] for r in rows])
    assert images.shape == (40, 3, 32, 32) and images.dtype == np.uint8
    assert images.min() < 25 and images.max() > 230  # black background, white strokes
    assert all(r["caption"].startswith("a handwritten digit ") for r in rows)
    assert len({r["key"] for r in rows}) == 40
    # MNIST is greyscale 28 px: every image was converted from L to RGB and upscaled to 32; nothing dropped.
    assert counter.snapshot() == {"converted_l": 40, "upscaled": 40}
    assert counter.dropped() == 0

    # The reader and the Ray-free decode_sample (used by the DataLoader benchmark) agree pixel for pixel.
    first = storage.read_bytes(storage.resolve(uri).join(manifest["shards"][0]["path"]))
    if fmt == "webdataset":
        with tarfile.open(fileobj=io.BytesIO(first)) as tar:
            key, data = "mnist-00003", tar.extractfile("mnist-00003.png").read()
    else:
        table = pq.read_table(io.BytesIO(first))
        key, data = table.column("key")[3].as_py(), table.column("image")[3].as_py()
    expected, notes = decode_sample(data, cfg, np.random.default_rng(0))
    assert notes == ["converted_l", "upscaled"]
    np.testing.assert_array_equal(next(r["image"] for r in rows if r["key"] == key), expected)


def test_skimage_photos_become_captioned_random_crops(ray_local, tmp_path):
    uri = str(tmp_path / "photos")
    manifest = prepare_dataset("skimage", uri, fmt="parquet", shard_size=64, resolution=48, limit=70, seed=3)
    assert manifest["num_samples"] == 70 and len(manifest["shards"]) == 2
    rows, counter = _stream(DataConfig(uri=uri, resolution=32, crop="random", random_flip=True))
    assert len(rows) == 70 and counter.snapshot() == {}  # RGB and large enough: nothing to repair
    assert {r["caption"] for r in rows} == {SKIMAGE_PHOTOS["astronaut"], SKIMAGE_PHOTOS["coffee"]}  # 64 crops each
    images = np.stack([r["image"] for r in rows])
    assert images.shape == (70, 3, 32, 32) and images.dtype == np.uint8 and images.min() < images.max()
    assert len({images[i].tobytes() for i in range(70)}) == 70  # distinct crops, not one photo repeated
    # The crops depend on the seed: a different seed gives a different dataset digest.
    other = prepare_dataset("skimage", str(tmp_path / "other"), fmt="parquet", shard_size=64, resolution=48, limit=70, seed=4)
    assert other["digest"] != manifest["digest"]


def test_holdout_by_source_keeps_every_crop_of_a_photograph_on_one_side(ray_local, tmp_path):
    # The first 150 crops: 3 photographs (astronaut, coffee, cat). Held out by sample, crops of one photo land on both sides (the model is then
    # scored on photos it trained on); held out by source, each photograph is wholly train or wholly held out.
    uri = str(tmp_path / "photos")
    prepare_dataset("skimage", uri, fmt="webdataset", shard_size=50, resolution=32, limit=150, seed=0)
    def photos(split: str, by: str) -> set[str]:
        rows, _ = _stream(DataConfig(uri=uri, resolution=32, holdout_fraction=0.2, holdout_by=by), split)
        return {r["caption"] for r in rows}

    assert photos("train", "sample") & photos("holdout", "sample")  # leaks: the same photographs on both sides
    # By source the split is decided per photograph (hash of "skimage-<photo>"): coffee and the cat held out.
    assert photos("train", "source") == {SKIMAGE_PHOTOS["astronaut"]}
    assert photos("holdout", "source") == {SKIMAGE_PHOTOS["coffee"], SKIMAGE_PHOTOS["chelsea"]}
    assert source_of("skimage-hubble_deep_field-017") == "skimage-hubble_deep_field" == source_of("skimage-hubble_deep_field")


def test_train_and_holdout_splits_are_disjoint_and_cover_the_data(ray_local, tmp_path):
    uri = str(tmp_path / "mnist")
    prepare_dataset("mnist", uri, shard_size=50, limit=100)
    cfg = DataConfig(uri=uri, resolution=28, holdout_fraction=0.25, crop="random", random_flip=True)
    train, counter = _stream(cfg, "train")
    holdout, _ = _stream(cfg, "holdout", counter)
    train_keys, holdout_keys = {r["key"] for r in train}, {r["key"] for r in holdout}
    assert not train_keys & holdout_keys
    assert len(train_keys | holdout_keys) == 100
    assert 10 <= len(holdout_keys) <= 40  # about a quarter
    assert all(in_split(k, "holdout", 0.25) for k in holdout_keys)
    assert counter.snapshot() == {"converted_l": 100}  # one counter for both splits: each sample once


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


def _damaged_tars() -> list[tuple[bytes, int, dict[str, int], int]]:
    """Damaged webdataset shards: (payload, samples it was written with, expected counts, good samples)."""
    ok = _png(np.full((40, 40, 3), 128, np.uint8))
    # Cut inside the last member's data: "cut" is lost; "orphan" has a caption but no image, which in a
    # damaged shard is put down to the damage too.
    cut = _tar([("ok.png", ok), ("ok.txt", b"fine"), ("orphan.txt", b"its image is missing"), ("cut.png", ok)])
    cut = cut[: cut.index(ok, cut.index(b"cut.png")) + 100]
    # A garbled header in the middle: its member is skipped, the samples after it are recovered.
    members = [(f"s{i}.{ext}", payload) for i in range(3) for ext, payload in (("png", ok), ("txt", f"sample {i}".encode()))]
    middle = bytearray(_tar(members))
    header = middle.index(b"s1.png")
    middle[header:header + 100] = b"\xff" * 100
    return [
        (cut, 3, {"corrupt_member": 2}, 1),
        (bytes(middle), 3, {"corrupt_member": 1}, 2),  # s1 kept its caption but lost its image
        (b"\x13\x37" * 700, 5, {"corrupt_shard": 5}, 0),  # not a tar at all: its 5 samples are lost
    ]


def _add_shard(uri: str, manifest: dict, name: str, payload: bytes, num_samples: int) -> None:
    root = storage.resolve(uri)
    storage.write_bytes(root.join(name), payload)
    manifest["shards"].append({"path": name, "num_samples": num_samples, "sha256": ""})
    manifest["num_samples"] += num_samples
    storage.write_json(root.join("manifest.json"), manifest)


@pytest.mark.parametrize("fmt", ["webdataset", "parquet"])
def test_bad_samples_are_skipped_and_counted_by_reason(ray_local, tmp_path, s3_bucket, fmt):
    expected = _plant_folder(tmp_path / "images")
    uri = str(tmp_path / "ds") if fmt == "webdataset" else f"s3://{s3_bucket}/planted"
    manifest = prepare_dataset(str(tmp_path / "images"), uri, fmt=fmt, shard_size=5)
    assert manifest["num_samples"] == 13
    good = 13 - expected["corrupt_image"] - expected["empty_image"] - expected["too_small"]
    if fmt == "webdataset":
        for i, (payload, n, counts, kept) in enumerate(_damaged_tars()):
            _add_shard(uri, manifest, f"damaged-{i}.tar", payload, n)
            expected = {k: expected.get(k, 0) + counts.get(k, 0) for k in expected.keys() | counts.keys()}
            good += kept
    else:
        rows = pa.table({"key": ["null_image", "fine"], "image": pa.array([None, _png(np.zeros((40, 40, 3), np.uint8))], pa.binary()),
                         "caption": ["no pixels", "black"]})
        buf = io.BytesIO()
        pq.write_table(rows, buf)
        _add_shard(uri, manifest, "extra.parquet", buf.getvalue(), 2)
        _add_shard(uri, manifest, "truncated.parquet", buf.getvalue()[:-40], 2)  # footer gone
        expected.update({"missing_image": 1, "corrupt_shard": 2})
        good += 1

    cfg = DataConfig(uri=uri, resolution=32, min_size=16, crop="center")
    rows, counter = _stream(cfg)
    assert len(rows) == good
    assert all(r["image"].shape == (3, 32, 32) and r["image"].dtype == np.uint8 for r in rows)
    assert counter.snapshot() == expected
    # Nothing silently lost: every sample the manifest promised was either kept or counted as dropped.
    assert len(rows) + _dropped(counter.snapshot()) == read_manifest(uri)["num_samples"]
    kept = {r["key"] for r in rows}
    assert {"no_caption", "good_rgb", "cmyk", "sixteen_bit"} <= kept and not kept & {"truncated", "garbage", "empty", "tiny"}
    assert next(r["caption"] for r in rows if r["key"] == "no_caption") == ""
    grey = next(r["image"] for r in rows if r["key"] == "grey")
    np.testing.assert_array_equal(grey[0], grey[1])  # L -> RGB repeats the channel

    # Reading the same data again (a second epoch, shuffled) does not count the same samples twice.
    ds, _ = build_dataset(cfg, split="all", shuffle=True, seed=1, skip_counter=counter)
    assert ds.count() == good and counter.snapshot() == expected


@pytest.mark.parametrize("mapping", ["csv", "jsonl"])
def test_folder_captions_from_a_mapping_file_then_sidecars(tmp_path, mapping):
    folder = tmp_path / "imgs"
    (folder / "sub").mkdir(parents=True)
    for i in range(3):
        (folder / f"img{i}.png").write_bytes(_png(np.full((8, 8, 3), i * 40, np.uint8)))
    (folder / "sub" / "photo.v2.png").write_bytes(_png(np.zeros((8, 8, 3), np.uint8)))
    (folder / "sub" / "photo.v2.txt").write_text("from the sidecar")
    (folder / "notes.md").write_text("not an image")
    if mapping == "csv":
        captions = tmp_path / "captions.csv"
        captions.write_text("file,caption\n" + "".join(f"img{i}.png,caption number {i}\n" for i in range(2)))
    else:
        captions = tmp_path / "captions.jsonl"
        captions.write_text("".join(json.dumps({"key": f"img{i}", "caption": f"caption number {i}"}) + "\n" for i in range(2)))
    uri = str(tmp_path / "ds")
    manifest = prepare_data.main(["--source", str(folder), "--output", uri, "--captions", str(captions)])
    assert manifest["num_samples"] == 4
    with tarfile.open(Path(uri) / "shard-00000.tar") as tar:
        names = set(tar.getnames())
        texts = {m.name: tar.extractfile(m).read().decode() for m in tar.getmembers() if m.name.endswith(".txt")}
    # No dots or slashes in keys (webdataset splits member names at the first dot); img2 has no caption.
    assert "sub__photo_v2.png" in names and "img2.png" in names and "img2.txt" not in names
    assert texts == {"img0.txt": "caption number 0", "img1.txt": "caption number 1", "sub__photo_v2.txt": "from the sidecar"}

    bad = tmp_path / f"bad.{mapping}"
    bad.write_text("name,text\nimg0.png,x\n" if mapping == "csv" else '{"name": "img0.png", "text": "x"}\n')
    with pytest.raises(SystemExit, match=f"bad.{mapping}, line 2" if mapping == "csv" else f"bad.{mapping}, line 1"):
        prepare_data.main(["--source", str(folder), "--output", str(tmp_path / "ds2"), "--captions", str(bad)])


def test_existing_shards_are_indexed_in_place_and_streamed(ray_local, s3_bucket, tmp_path):
    img = _png((np.random.default_rng(0).random((36, 36, 3)) * 255).astype(np.uint8))
    # img2dataset-style tars: numeric keys in a subfolder, .jpg/.txt/.json, plus a "seg.png" extra member.
    wds = f"s3://{s3_bucket}/img2dataset"
    root = storage.resolve(wds)
    for s in range(2):
        members = []
        for i in range(3):
            key = f"{s:05d}/{s:05d}{i:04d}"
            members += [(f"{key}.jpg", img), (f"{key}.txt", f"picture {s}-{i}".encode()), (f"{key}.json", b"{}"),
                        (f"{key}.seg.png", b"not used")]
        storage.write_bytes(root.join(f"{s:05d}.tar"), _tar(members))
    with pytest.raises(DatasetError, match="no manifest.json"):
        read_manifest(wds)
    manifest = prepare_data.main(["--index", "--output", wds])
    assert manifest["num_samples"] == 6 and manifest["format"] == "webdataset"
    rows, counter = _stream(DataConfig(uri=wds, resolution=32, crop="center"))
    assert sorted(r["caption"] for r in rows) == sorted(f"picture {s}-{i}" for s in range(2) for i in range(3))
    assert "00001/000010002" in {r["key"] for r in rows} and counter.snapshot() == {}

    # A Hugging Face style Parquet export: image structs {bytes, path}, captions under "text", no key column.
    hf = tmp_path / "hf"
    hf.mkdir()
    table = pa.table({"image": [{"bytes": img, "path": f"{i}.png"} for i in range(4)], "text": [f"caption {i}" for i in range(4)]})
    pq.write_table(table, hf / "train-00000-of-00001.parquet", row_group_size=2)
    with pytest.raises(DatasetError, match=r"no column\(s\) \['caption', 'key'\]"):
        index_shards(str(hf))
    manifest = index_shards(str(hf), caption_column="text", key_column=None)
    assert manifest["num_samples"] == 4 and manifest["columns"] == {"key": None, "image": "image", "caption": "text"}
    rows, _ = _stream(DataConfig(uri=str(hf), resolution=16))
    assert sorted(r["caption"] for r in rows) == [f"caption {i}" for i in range(4)]
    assert sorted(r["key"] for r in rows) == [f"train-00000-of-00001-{i:06d}" for i in range(4)]
    with pytest.raises(DatasetError, match="already holds a complete dataset"):
        index_shards(str(hf))


def test_missing_incomplete_and_empty_datasets_fail_before_anything_runs(tmp_path, s3_bucket):
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError, match="does not exist"):
        read_manifest(f"s3://{s3_bucket}/no/such/prefix")
    with pytest.raises(DatasetError, match="does not exist|cannot be reached"):
        read_manifest("s3://no-such-bucket-h3/x")
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "shard-00000.tar").write_bytes(b"")
    with pytest.raises(DatasetError, match="no manifest.json"):
        build_dataset(DataConfig(uri=str(partial)))  # before Ray is even needed
    (partial / "manifest.json").write_text(json.dumps({"shards": [], "num_samples": 0, "digest": "", "format": "webdataset"}))
    with pytest.raises(DatasetError, match="empty"):
        read_manifest(str(partial))
    (partial / "manifest.json").write_text("{not json")
    with pytest.raises(DatasetError, match="not valid JSON"):
        read_manifest(str(partial))
    empty_folder = tmp_path / "empty"
    empty_folder.mkdir()
    with pytest.raises(DatasetError, match="no samples"):
        prepare_dataset(str(empty_folder), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(ValueError, match="not a bundled dataset"):
        prepare_dataset("no-such-source", str(tmp_path / "out"))
    # A complete dataset is never overwritten.
    prepare_dataset("mnist", str(tmp_path / "done"), limit=4)
    with pytest.raises(DatasetError, match="already holds"):
        prepare_dataset("mnist", str(tmp_path / "done"), limit=4)


def test_uint8_images_reach_the_model_range_exactly():
    # The reader ships uint8; the model sees x / 127.5 - 1, computed where the batch is (the GPU in training).
    images = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16)
    x = to_model_range(images)
    assert x.dtype == torch.float32 and x.shape == images.shape
    assert x.min() == -1.0 and x.max() == 1.0
    torch.testing.assert_close(x, images.float() / 127.5 - 1.0, rtol=0, atol=0)
    with pytest.raises(TypeError, match="uint8"):
        to_model_range(x)  # converting twice would be a silent bug


def test_resolution_is_a_side_or_height_and_width():
    """An int stays an int (so configs and cache keys from before [H, W] hash as they did); [H, W] crops H x W:
    the image is scaled to cover it (a 2:1 image to exactly 32x64, nothing cut), then centre-cropped."""
    assert DataConfig(uri="x", resolution=32).model_dump(mode="json")["resolution"] == 32
    wide = DataConfig(uri="x", resolution=[32, 64], crop="center")
    assert wide.size == (32, 64) and wide.model_dump(mode="json")["resolution"] == [32, 64]
    with pytest.raises(ValueError, match="at least 8 px"):
        DataConfig(uri="x", resolution=[4, 64])
    rng = np.random.default_rng(0)
    stripes = np.zeros((50, 100, 3), np.uint8)
    stripes[:, 50:] = 255  # left half black, right half white
    image, notes = decode_sample(_png(stripes), wide, rng)
    assert image.shape == (3, 32, 64) and notes == []
    assert image[:, :, :30].max() == 0 and image[:, :, 34:].min() == 255  # the halves are where they were
    square = np.zeros((28, 28, 3), np.uint8)
    square[:14] = 255  # top half white: the centre crop of the 64x64 upscale keeps rows 16..47
    image, notes = decode_sample(_png(square), wide, rng)
    assert image.shape == (3, 32, 64) and notes == ["upscaled"]
    assert image[:, :14].min() == 255 and image[:, 18:].max() == 0


def test_crops_per_photo_sets_the_skimage_sources_size_and_is_refused_elsewhere():
    from pipelines.data.sources import open_source

    samples = list(open_source("skimage", resolution=16, crops_per_photo=2))
    assert len(samples) == 2 * len(SKIMAGE_PHOTOS) and samples[1].key == "skimage-astronaut-001"
    with pytest.raises(ValueError, match="crops_per_photo"):
        open_source("mnist", crops_per_photo=2)


def test_cpu_budget_error_names_the_fields(tmp_path):
    data = DataConfig(uri=str(tmp_path), reserved_cpus=0.5)
    with pytest.raises(ValueError) as e:
        check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=1.0), data)
    msg = str(e.value)
    assert "stage_a.scaling.cpus_per_worker" in msg and "data.reserved_cpus" in msg and "hang" in msg
    check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=0.5), data)  # 1 CPU left: fine
    check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=1.0), DataConfig(uri=str(tmp_path), reserved_cpus=0))
    with pytest.raises(ValueError, match="columns"):
        build_dataset(DataConfig(uri=str(tmp_path)), columns=["pixels"])
    with pytest.raises(ValueError, match="reserved_cpus .* cpus_per_task"):
        DataConfig(uri=str(tmp_path), reserved_cpus=0.25, cpus_per_task=0.5)


def test_unset_reader_cpus_are_chosen_from_the_cpus_the_workers_leave(tmp_path):
    """`data.cpus_per_task` / `reserved_cpus` unset: whole CPUs where data has at least 2 of its own, halves where
    Train workers share a small machine; what the user set is kept. Unset, they are keyed as their old default."""
    from pipelines.dag.executor import cache_key

    data = DataConfig(uri=str(tmp_path))
    assert (data.cpus_per_task, data.reserved_cpus) == (None, None)
    for free, expected in ((1.0, 0.5), (1.99, 0.5), (2.0, 1.0), (30.0, 1.0), (0.0, 0.5)):
        fitted = data.fit(free)
        assert (fitted.cpus_per_task, fitted.reserved_cpus) == (expected, expected), free
    assert DataConfig(uri=str(tmp_path), cpus_per_task=0.25).fit(30).model_dump(include={"cpus_per_task", "reserved_cpus"}) \
        == {"cpus_per_task": 0.25, "reserved_cpus": 0.25}
    assert DataConfig(uri=str(tmp_path), reserved_cpus=0.5).fit(30).cpus_per_task == 0.5  # capped by what is reserved
    off = DataConfig(uri=str(tmp_path), reserved_cpus=0).fit(30)
    assert (off.cpus_per_task, off.reserved_cpus) == (1.0, 0)
    # The quickstart on 2 CPUs: 2 x 0.5 leaves 1, enough for one half-CPU task; 2 x 1.0 leaves none
    check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=0.5), data)
    with pytest.raises(ValueError, match="leaving 0 < data.reserved_cpus = 0.5"):
        check_cpu_budget(2, ScalingSection(num_workers=2, cpus_per_worker=1.0), data)
    # Keyed as the 0.5 they were before they could be unset: stages cached then stay cached
    key = cache_key("stage_a", {"data": data.model_dump(mode="json")}, [], "digest")
    assert key == cache_key("stage_a", {"data": data.fit(1).model_dump(mode="json")}, [], "digest")
    assert key != cache_key("stage_a", {"data": data.fit(8).model_dump(mode="json")}, [], "digest")  # set to 1: another key


def test_ray_train_workers_get_disjoint_splits_and_read_the_skip_counter(ray_local, tmp_path):
    """The issue's hang: Train workers take all but data.reserved_cpus of the 2 CPUs (2 x 0.75), and the
    reader's 0.5-CPU tasks must still run in the 0.5 left. Each worker streams its own split."""
    import threading

    import ray.train
    from ray.train.torch import TorchTrainer

    uri = str(tmp_path / "mnist")
    prepare_dataset("mnist", uri, shard_size=8, limit=48)
    cfg = DataConfig(uri=uri, resolution=28, batch_size=4, shuffle_buffer=16, holdout_fraction=0,
                     cpus_per_task=0.5, reserved_cpus=0.5)
    scaling = ScalingSection(num_workers=2, cpus_per_worker=0.75)
    check_cpu_budget(ray_local.cluster_resources()["CPU"], scaling, cfg)
    ds, counter = build_dataset(cfg, split="train", shuffle=True, seed=0, columns=["image", "key"])
    out = tmp_path / "seen"
    out.mkdir()

    def loop(config: dict) -> None:
        from pipelines.data import open_skip_counter

        rank = ray.train.get_context().get_world_rank()
        keys, shapes = [], set()
        for batch in ray.train.get_dataset_shard("train").iter_batches(
                batch_size=config["batch_size"], local_shuffle_buffer_size=config["shuffle_buffer"]):
            keys += list(batch["key"])
            shapes.add(batch["image"].shape[1:])
        skips = open_skip_counter(config["counter"]).snapshot()
        Path(config["out"], f"rank{rank}.json").write_text(json.dumps({"keys": keys, "skips": skips, "shapes": [list(s) for s in shapes]}))
        ray.train.report({"n": len(keys)})

    trainer = TorchTrainer(
        loop, train_loop_config={"batch_size": 4, "shuffle_buffer": 16, "counter": counter.name, "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=scaling.num_workers, resources_per_worker=scaling.resources_per_worker()),
        run_config=ray.train.RunConfig(name="data-split", storage_path=str(tmp_path / "train")),
        datasets={"train": ds},
    )
    fit = threading.Thread(target=trainer.fit, daemon=True)  # a hang fails the test instead of the session
    fit.start()
    fit.join(timeout=300)
    assert not fit.is_alive(), "training hung: the reader got no CPU next to the Train workers"
    seen = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(s["keys"] and s["shapes"] == [[3, 28, 28]] for s in seen)
    assert not set(seen[0]["keys"]) & set(seen[1]["keys"])
    assert len(seen[0]["keys"]) + len(seen[1]["keys"]) == 48
    # Inside the workers the counter already held every shard's counts (each rank read after its last batch).
    assert max(s["skips"].get("converted_l", 0) for s in seen) == 48 and counter.snapshot() == {"converted_l": 48}

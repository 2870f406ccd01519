"""What indexing and planning ask of S3 as the shard count grows (issue 31): a few hundred tiny shards on the
tests' moto server, every request it serves counted from its access log. `benchmarks/scale.py` measures the
same steps at 1,000 to 10,000 shards."""

from __future__ import annotations

import hashlib
import pickle
from collections import Counter

import pytest

from pipelines.config import load_config
from pipelines.dag.plan import plan_pipeline
from pipelines.data import index_shards
from pipelines.data.reader import FileTable, s3_etag, shard_matches
from pipelines.platform import storage
from pipelines.run import stages
from tests.helpers import REPO, synthetic_shards

SHARDS = 300


def _object_requests(requests, suffix: str) -> Counter:
    return Counter(r.method for r in requests if r.path.endswith(suffix))


def test_index_and_plan_read_stats_files_not_tars(s3_bucket, s3_requests, tmp_path):
    """img2dataset output (NNNNN.tar, NNNNN_stats.json, NNNNN.parquet metadata): the manifest's counts come from
    the stats files, one small GET each, after one listing; no tar is opened or even HEADed."""
    uri = f"s3://{s3_bucket}/img2dataset"
    samples = synthetic_shards(uri, SHARDS, samples_per_shard=3)
    s3_requests.mark()
    manifest = index_shards(uri)
    requests = s3_requests.since()

    assert manifest["format"] == "webdataset" and len(manifest["shards"]) == SHARDS and manifest["num_samples"] == samples
    assert _object_requests(requests, ".tar") == Counter()  # the old index made a HEAD and a whole GET per tar
    assert _object_requests(requests, "_stats.json") == Counter({"GET": SHARDS})
    listings = [r for r in requests if r.method == "GET" and "list-type=2" in r.query]
    assert 1 <= len(listings) <= 3 * -(-SHARDS * 3 // 1000)  # a page per 1,000 objects (3 per shard)
    assert len(requests) <= SHARDS + len(listings) + 8  # + the manifest's existence checks and its PUT
    assert all("sha256" not in s and s["etag"] and s["size"] > 0 for s in manifest["shards"])

    # A listing-identified shard is still checked when read: its size, and its bytes against the ETag (the MD5 of an
    # object written in one PUT; pyarrow uploads in parts, here one).
    shard = manifest["shards"][0]
    payload = storage.read_bytes(storage.resolve(uri).join(shard["path"]))
    assert shard["etag"] == s3_etag(payload) and shard_matches(payload, shard)
    assert not shard_matches(payload[:-1] + b"x", shard) and not shard_matches(payload + b"\0", shard)
    multipart = {**shard, "etag": s3_etag(payload, 1, len(payload))}
    assert multipart["etag"].endswith("-1") and shard_matches(payload, multipart)
    assert not shard_matches(payload[:-1] + b"x", multipart)
    assert shard_matches(payload, {**shard, "etag": "0" * 32 + "-2"})  # parts of no common size: the size alone

    # Planning reads the manifest (and the MLflow store), never the shards: as many requests as at 5 shards.
    cfg = load_config(REPO / "configs" / "quickstart.yaml", [f"data.uri={uri}", f"run.output_uri={tmp_path / 'out'}",
                                                            f"mlflow.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}"])
    s3_requests.mark()
    steps = plan_pipeline(stages(), cfg)
    assert steps[0].action == "skip" and all(step.action == "run" for step in steps[1:])
    planned = s3_requests.since()
    assert len(planned) <= 8 and not [r for r in planned if r.path.endswith((".tar", "_stats.json", ".parquet"))]


def test_index_reads_parquet_footers_only(s3_bucket, s3_requests):
    """Parquet shards: one ranged GET of the footer each (206 Partial Content), no HEAD, no whole-object GET."""
    uri = f"s3://{s3_bucket}/parquet"
    samples = synthetic_shards(uri, SHARDS, fmt="parquet")
    s3_requests.mark()
    manifest = index_shards(uri)
    reads = [r for r in s3_requests.since() if r.path.endswith(".parquet")]
    assert manifest["num_samples"] == samples and len(manifest["shards"]) == SHARDS
    assert Counter((r.method, r.status) for r in reads) == Counter({("GET", 206): SHARDS})


@pytest.mark.parametrize("checksum", [False, True])
def test_index_without_stats_reads_each_tar_once(s3_bucket, s3_requests, checksum):
    """Tars without stats files are read whole (their headers are spread through them), once each and without a
    HEAD first, and get the sha256 that `prepare_dataset` records; so does any shard with `checksum=True`."""
    uri = f"s3://{s3_bucket}/tars-{checksum}"
    synthetic_shards(uri, 40, img2dataset_stats=checksum)
    s3_requests.mark()
    manifest = index_shards(uri, checksum=checksum)
    assert _object_requests(s3_requests.since(), ".tar") == Counter({"GET": 40})
    root = storage.resolve(uri)
    shard = manifest["shards"][7]
    assert shard["sha256"] == hashlib.sha256(storage.read_bytes(root.join(shard["path"]))).hexdigest()
    assert "etag" not in shard and manifest["num_samples"] == 80


@pytest.mark.slow  # a local Ray's start and two passes: ~35 s on the loaded 2-core box
def test_a_shard_indexed_by_its_etag_streams_and_a_changed_one_is_skipped(ray_local, s3_bucket):
    """Shards indexed from their listing (size + ETag, no sha256) stream through the reader; one rewritten with other
    bytes of the same size after indexing fails its ETag and is skipped whole, its samples counted."""
    from pipelines.data import DataConfig, build_dataset

    uri = f"s3://{s3_bucket}/etag"
    synthetic_shards(uri, 4)
    manifest = index_shards(uri)
    assert all("etag" in s and "sha256" not in s for s in manifest["shards"])
    cfg = DataConfig(uri=uri, resolution=8, crop="center")
    ds, counter = build_dataset(cfg, split="all", shuffle=False)
    assert len(ds.take_all()) == 8 and counter.snapshot() == {}

    root = storage.resolve(uri)
    changed = root.join(manifest["shards"][1]["path"])
    payload = storage.read_bytes(changed)
    storage.fsspec_filesystem(uri).pipe(changed.path, payload.replace(b"a grey square", b"a gray square"))
    ds, counter = build_dataset(cfg, split="all", shuffle=False)
    assert len(ds.take_all()) == 6 and counter.snapshot() == {"corrupt_shard": 2}


def _shard_facts(n: int) -> dict[str, dict]:
    facts = {f"shards/{i:05d}.tar": {"num_samples": 10_000 + i, "sha256": hashlib.sha256(str(i).encode()).hexdigest()}
             for i in range(n)}
    facts["shards/00003.tar"] = {"num_samples": 7, "size": 2**40, "etag": '"abc-3"'}  # indexed by ETag, no sha256
    facts["shards/00004.tar"] = {"num_samples": 0, "sha256": None, "size": 12}
    return facts


def test_file_table_reads_back_the_manifest_and_its_pickle_does_not_grow_with_it():
    """The per-shard facts every decode task receives: the same answers as the dict they come from, and a
    pickle whose in-band part (what a task unpickles entry by entry) stays the same size from 100 to 20,000
    shards, the rest travelling as buffers Ray maps from its object store."""
    fields = ("num_samples", "sha256", "size", "etag")
    sizes = {}
    for n in (100, 20_000):
        facts = _shard_facts(n)
        table = FileTable(facts, fields)
        assert len(table) == n
        for path in ("shards/00000.tar", "shards/00003.tar", "shards/00004.tar", f"shards/{n - 1:05d}.tar"):
            expected = {k: v for k, v in facts[path].items() if v is not None}
            assert table.get(path) == expected, path
        assert table.get("shards/99999.tar") is None and table.get("", {}) == {} and table.get("shards/") is None
        buffers: list = []
        in_band = pickle.dumps(table, protocol=5, buffer_callback=buffers.append)
        again = pickle.loads(in_band, buffers=buffers)
        assert again.get("shards/00003.tar") == facts["shards/00003.tar"]
        sizes[n] = len(in_band), sum(memoryview(b).nbytes for b in buffers)
    assert sizes[100][0] < 1_000 and sizes[20_000][0] < 1_000, sizes  # dtype widths only
    assert sizes[20_000][1] > 100 * sizes[100][1] // 2, sizes  # the facts themselves are all there, out of band
    assert len(FileTable({}, fields)) == 0 and FileTable({}, fields).get("x") is None

"""Safe under concurrency, re-runs and outages (issue 13): owner leases, encode never deleting what it did not
write, cache hits that check their outputs, checksums, vanished shards, the skip counter's loss, and bad input.

Leases are exercised across real processes (a holder subprocess, SIGKILLed for the dead-owner case) on local
disk and on a real moto S3 server; the data tests run on the session's real local Ray; two real `run.py`
drivers run at once on a tiny config.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import ray
from mlflow.tracking import MlflowClient

from pipelines.dag.executor import lost_outputs
from pipelines.data import latents
from pipelines.platform import lease, storage
from pipelines.data import build_dataset, prepare_dataset
from pipelines.config.data import DataConfig
from pipelines.data.reader import COUNTER_NAMESPACE
from pipelines.config.sections import LeaseSection
from tests.helpers import REPO, tiny_later_stages, tiny_overrides

FAST = LeaseSection(ttl_s=3, heartbeat_s=0.5, poll_s=0.2, settle_s=0.2)

HOLDER = """
import json, sys, time
from pipelines.platform import lease
from pipelines.config.sections import LeaseSection
uri, hold_s, notes, start_at = sys.argv[1], float(sys.argv[2]), json.loads(sys.argv[3]), float(sys.argv[4])
settle_s = float(sys.argv[5])
time.sleep(max(0.0, start_at - time.time()))
held = lease.acquire(uri, what="holder", settings=LeaseSection(ttl_s=3, heartbeat_s=0.5, poll_s=0.2, settle_s=settle_s))
if notes:
    held.note(**notes)
print("held", time.time(), flush=True)
time.sleep(hold_s)
lease.release(held)
print("released", time.time(), flush=True)
"""


def _holder(uri: str, hold_s: float, notes: dict | None = None, start_at: float = 0.0,
            settle_s: float = 0.2) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLDER, uri, str(hold_s), json.dumps(notes or {}), str(start_at),
                             str(settle_s)],
                            cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=subprocess.PIPE, text=True)


def _in_threads(work, count: int, timeout: float | None = None) -> list[BaseException]:
    """`work(n)` for n in range(count), each in a thread of its own, all joined: what any of them raised."""
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            work(n)
        except BaseException as e:  # noqa: BLE001 - returned to the test, which asserts on it
            errors.append(e)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=timeout)
    return errors


def _wait_line(proc: subprocess.Popen, word: str) -> float:
    line = proc.stdout.readline()
    while line.startswith("waiting for"):  # the lease says whom it waits for
        line = proc.stdout.readline()
    assert line.startswith(word), f"expected {word!r}, got {line!r} (exit {proc.poll()})"
    return float(line.split()[1])


@pytest.fixture(params=["local", "s3"])
def lease_uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out" / "stage.lease.json")
    bucket = request.getfixturevalue("s3_bucket")
    return f"s3://{bucket}/out/stage.lease.json"


# ---------------------------------------------------------------------------------------------------
# Leases (item 1)
# ---------------------------------------------------------------------------------------------------


def test_a_live_owner_makes_a_second_driver_wait_then_hands_over(lease_uri):
    holder = _holder(lease_uri, hold_s=4.5, notes={"parts": ["parts-holder"]})
    try:
        _wait_line(holder, "held")
        time.sleep(3.5)  # longer than ttl_s: only the heartbeats keep the owner alive now
        with pytest.raises(lease.LeaseHeld) as held:
            lease.acquire(lease_uri, what="second", settings=FAST.model_copy(update={"wait_s": 0}))
        message = str(held.value)
        assert f"pid {holder.pid}" in message and socket.gethostname() in message and "'holder'" in message
        assert "\n" not in message
        started = time.monotonic()
        with lease.hold(lease_uri, what="second", settings=FAST) as second:
            waited = time.monotonic() - started
            assert second.waited and second.previous["released"] and second.previous["pid"] == holder.pid
            assert second.previous["notes"] == {"parts": ["parts-holder"]}  # handed over with the lease
            assert lease.Lease(lease_uri, "probe", FAST, None).read()["owner"] == second.owner
        assert waited > 0.5
        _wait_line(holder, "released")
        assert holder.wait(timeout=30) == 0
    finally:
        holder.kill()
    assert lease.Lease(lease_uri, "probe", FAST, None).read()["released"]


def test_a_dead_owner_is_taken_over_with_its_notes(lease_uri):
    holder = _holder(lease_uri, hold_s=600, notes={"parts": ["parts-dead"]})
    try:
        _wait_line(holder, "held")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    # Its process on this host is gone: taken over at once, with no wait for the heartbeat to go stale (a ttl_s of
    # 10 minutes and wait_s=0 would otherwise refuse). (On another host, only the heartbeat counts: below.)
    with lease.hold(lease_uri, what="taker", settings=FAST.model_copy(update={"ttl_s": 600, "wait_s": 0})) as taker:
        assert taker.previous["pid"] == holder.pid and not taker.previous["released"]
        assert taker.previous["notes"] == {"parts": ["parts-dead"]}


def test_a_lease_on_another_host_counts_by_its_heartbeat(tmp_path):
    """A record written by a driver on another host: alive while its heartbeat is fresh, taken over once stale."""
    uri = str(tmp_path / "x.lease.json")
    loc = storage.resolve(uri)
    record = {"format": lease.FORMAT, "owner": "other-host:123:abcd", "host": "other-host", "pid": 123,
              "what": "stage_a elsewhere", "acquired_at": time.time(), "released": False, "notes": {}}
    storage.write_json(loc, {**record, "heartbeat_at": time.time()})
    with pytest.raises(lease.LeaseHeld, match="host other-host, pid 123"):
        lease.acquire(uri, what="here", settings=FAST.model_copy(update={"wait_s": 0.5}))
    storage.write_json(loc, {**record, "heartbeat_at": time.time() - FAST.ttl_s - 1})
    with lease.hold(uri, what="here", settings=FAST) as mine:
        assert not mine.waited and mine.previous["host"] == "other-host"


def test_a_record_overwritten_on_s3_while_it_is_read_is_never_read_torn(s3_bucket):
    """A lease's heartbeat overwrites its record while other drivers read it. pyarrow reads an S3 object with a HEAD
    (its size) and then a GET of that many bytes, so a read that straddles an overwrite of another length comes
    back torn; a torn lease record once read as "no record" let a second driver take a live lease (CI, 2026-12-07).
    Here a writer overwrites one record every 50 ms with records of two lengths while it is read 200 times."""
    loc = storage.resolve(f"s3://{s3_bucket}/torn.lease.json")
    records = [{"notes": "x"}, {"notes": "x" * 60}]
    storage.write_json(loc, records[0])
    stop = threading.Event()

    def overwrite() -> None:
        for i in range(100_000):
            if stop.wait(0.05):
                return
            storage.write_json(loc, records[i % 2])

    writer = threading.Thread(target=overwrite, daemon=True)
    writer.start()
    try:
        read = [storage.read_json(loc) for _ in range(200)]
    finally:
        stop.set()
        writer.join(timeout=30)
    assert all(r in records for r in read)
    assert {json.dumps(r) for r in read} == {json.dumps(r) for r in records}  # the reads did straddle overwrites


def test_a_driver_whose_lease_was_taken_over_may_not_publish(tmp_path):
    """fit_and_publish calls lease.check_held() right before publishing: a driver that stalled past ttl_s and
    was taken over (another owner's record in its place) learns it there, not at release."""
    uri = str(tmp_path / "x.lease.json")
    with lease.hold(uri, what="mine", settings=FAST):
        lease.check_held()  # still ours: nothing raised
        record = lease.Lease(uri, "probe", FAST, None).read()
        storage.write_json(storage.resolve(uri), {**record, "owner": "other-host:1:beef", "host": "other-host",
                                                  "heartbeat_at": time.time()})
        with pytest.raises(lease.LeaseLost, match="taken over .*other-host"):
            lease.check_held()
    assert lease.Lease(uri, "probe", FAST, None).read()["owner"] == "other-host:1:beef"  # release left it alone


def test_two_prepare_commands_into_one_folder_never_mix_their_shards(tmp_path):
    """Two `prepare_data.py` runs started together into the same folder with different contents: one writes the
    dataset, the other waits for it, then refuses in one line (the folder is complete); every shard the manifest
    lists is there with the checksum it records. Without the lease both wrote the same shard names at once."""
    import hashlib

    out = tmp_path / "images"
    cmd = [sys.executable, str(REPO / "pipelines/prepare_data.py"), "--source", "mnist", "--output", str(out),
           "--shard-size", "40", "--resolution", "16"]
    procs = [subprocess.Popen([*cmd, "--limit", str(limit)], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for limit in (400, 240)]
    results = [(p.wait(timeout=300), *p.communicate()) for p in procs]
    codes = sorted(code for code, _, _ in results)
    assert codes[0] == 0 and codes[1] != 0, results
    (err,) = [e for code, _, e in results if code != 0]
    assert err.strip().splitlines()[-1].startswith("error: ") and "already holds a complete dataset" in err
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] in (400, 240)
    for shard in manifest["shards"]:
        assert hashlib.sha256((out / shard["path"]).read_bytes()).hexdigest() == shard["sha256"], shard["path"]
    assert not list(out.glob("*.lease.json")) and json.loads((tmp_path / "images.lease.json").read_text())["released"]


def test_two_drivers_claiming_at_once_never_overlap(lease_uri):
    """On S3 the settle wait keeps two simultaneous claims apart; on a local path the folder lock does, with no wait
    at all (settle_s=0 there: without the lock both would read "free" and go on)."""
    settle_s = 0.0 if not lease_uri.startswith("s3://") else 0.2
    start_at = time.time() + 3.0
    procs = [_holder(lease_uri, hold_s=1.0, start_at=start_at, settle_s=settle_s) for _ in range(2)]
    try:
        spans = [(_wait_line(p, "held"), _wait_line(p, "released")) for p in procs]
        assert [p.wait(timeout=60) for p in procs] == [0, 0]
    finally:
        for p in procs:
            p.kill()
    (a0, a1), (b0, b1) = sorted(spans)
    assert a1 <= b0, f"both held the lease at once: {spans}"


def test_local_claims_are_atomic_without_a_settle_wait(tmp_path):
    """Four drivers (threads: each its own owner) claim one local lease 25 times each with settle_s=0: the folder
    lock alone must keep every holding apart (without it, a read-then-write race lets two hold it at once)."""
    uri = str(tmp_path / "busy.lease.json")
    settings = FAST.model_copy(update={"settle_s": 0.0, "poll_s": 0.001})
    holders: list[str] = []
    overlaps: list[tuple[str, list[str]]] = []
    guard = threading.Lock()

    def claim(n: int) -> None:
        for i in range(25):
            with lease.hold(uri, what=f"driver {n}", settings=settings):
                with guard:
                    if holders:
                        overlaps.append((f"{n}/{i}", list(holders)))
                    holders.append(f"{n}/{i}")
                time.sleep(0.001)
                with guard:
                    holders.remove(f"{n}/{i}")

    errors = _in_threads(claim, 4, timeout=120)
    assert not errors, errors
    assert not overlaps, f"held at once: {overlaps[:3]}"
    assert lease.Lease(uri, "probe", FAST, None).read()["released"]


def test_a_driver_taken_over_knows_it_lost_and_leaves_the_new_record(tmp_path):
    uri = str(tmp_path / "lost.lease.json")
    held = lease.acquire(uri, what="slow driver", settings=FAST)
    try:
        other = {"format": lease.FORMAT, "owner": "other-host:9:beef", "host": "other-host", "pid": 9, "what": "taker",
                 "acquired_at": time.time(), "heartbeat_at": time.time() + 60, "released": False, "notes": {}}
        storage.write_json(storage.resolve(uri), other)
        time.sleep(FAST.heartbeat_s * 3)
        assert held.lost
        with pytest.raises(lease.LeaseLost, match="taken over"):
            held.check()
    finally:
        lease.release(held)
    assert storage.read_json(storage.resolve(uri))["owner"] == "other-host:9:beef"


def test_concurrent_writers_of_one_file_never_share_a_temp_file(tmp_path):
    loc = storage.resolve(tmp_path / "shared.json")

    def write(n: int) -> None:
        for i in range(300):
            storage.write_bytes(loc, f"{n}-{i}".encode())

    assert _in_threads(write, 4) == []
    assert storage.read_bytes(loc).decode().endswith("-299")
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------
# Data: checksums (item 5), a shard gone mid-training (item 8), the skip counter's loss (item 9)
# ---------------------------------------------------------------------------------------------------


def _digits(tmp_path: Path, n: int = 64, shard_size: int = 16) -> tuple[str, dict]:
    uri = str(tmp_path / "digits")
    return uri, prepare_dataset("mnist", uri, shard_size=shard_size, limit=n)


def test_a_shard_whose_bytes_changed_is_a_counted_corrupt_shard(ray_local, tmp_path):
    uri, manifest = _digits(tmp_path)
    shard = Path(uri) / manifest["shards"][1]["path"]
    payload = bytearray(shard.read_bytes())
    payload[len(payload) // 2] ^= 0xFF  # one flipped byte: same size, different content
    shard.write_bytes(bytes(payload))
    cfg = DataConfig(uri=uri, resolution=28, crop="center")
    ds, counter = build_dataset(cfg, split="all", shuffle=False)
    keys = [r["key"] for r in ds.take_all()]
    assert len(keys) == 64 - 16
    assert counter.snapshot().get("corrupt_shard") == 16


def test_a_shard_that_vanishes_between_epochs_is_counted_and_reading_goes_on(ray_local, tmp_path):
    uri, manifest = _digits(tmp_path)
    cfg = DataConfig(uri=uri, resolution=28, crop="center")
    ds, counter = build_dataset(cfg, split="all", shuffle=True, seed=0)
    assert ds.count() == 64 and "corrupt_shard" not in counter.snapshot()
    (Path(uri) / manifest["shards"][2]["path"]).unlink()  # gone after the dataset was planned
    assert len(ds.take_all()) == 48  # the next epoch
    assert counter.snapshot()["corrupt_shard"] == 16


def test_losing_the_skip_counter_never_blocks_decoding(ray_local, tmp_path):
    uri, _ = _digits(tmp_path)
    cfg = DataConfig(uri=uri, resolution=32, crop="center")
    ds, counter = build_dataset(cfg, split="all", shuffle=False)
    actor = ray.get_actor(counter.name, namespace=COUNTER_NAMESPACE)
    # A crash of the counter's process: Ray restarts it under its name and counting starts again.
    ray.kill(actor, no_restart=False)
    assert ds.count() == 64
    assert counter.snapshot() == {"converted_l": 64, "upscaled": 64}
    # The counter gone for good: decoding goes on without it; the counts are lost, said in the log.
    ray.kill(actor, no_restart=True)
    started = time.monotonic()
    assert ds.count() == 64
    assert time.monotonic() - started < 120
    assert counter.snapshot() == {}


# ---------------------------------------------------------------------------------------------------
# Encode (items 1, 2, 5): concurrent encodes, nothing deleted that another wrote, part checksums
# ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_encodes_into_one_folder_at_once_and_a_foreign_folder_survives(ray_local, mlflow_uri, tmp_path):
    from tests.test_encode import NUM_IMAGES, digits_dataset, publish_tiny_autoencoder, tiny_config

    from pipelines.data import new_skip_counter
    from pipelines.encode_latents import run_encode

    cfg = tiny_config(tmp_path, digits_dataset(tmp_path), "run.lease.poll_s=0.5", "run.lease.settle_s=0.2")
    publish_tiny_autoencoder(cfg, tmp_path / "ae")
    out = tmp_path / "latents"
    cfg.encode.output_uri = str(out)
    foreign = out / "parts-someone-else" / "part-00000-000.parquet"  # not handed over by any lease: not ours
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"another writer's file")

    results, errors = [], []

    def encode() -> None:
        try:
            results.append(run_encode(cfg.model_copy(deep=True)))
        except BaseException as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=encode) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=900)
    assert errors == [] and len(results) == 2
    assert sorted(r.reused for r in results) == [False, True]  # the second waited, then reused the first's result
    loc = storage.resolve(out)
    manifest = latents.read_latents_manifest(str(out))
    listed = {loc.join(f["path"]).path for f in manifest["files"]}
    assert storage.missing_files(loc, [f["path"] for f in manifest["files"]]) == []
    assert set(storage.list_files(loc, ".parquet")) == listed | {str(foreign)}
    assert foreign.read_bytes() == b"another writer's file"
    client = MlflowClient()
    assert {client.get_run(r.run_id).info.status for r in results} == {"FINISHED"}

    # A part file whose bytes changed is skipped and counted, never read.
    part = loc.join(manifest["files"][0]["path"]).path
    payload = bytearray(Path(part).read_bytes())
    payload[len(payload) // 2] ^= 0xFF
    Path(part).write_bytes(bytes(payload))
    skips = new_skip_counter()
    ds, _ = latents.build_latent_dataset(str(out), split="all", shuffle=False, skip_counter=skips)
    assert ds.count() == NUM_IMAGES - manifest["files"][0]["num_rows"]
    assert skips.snapshot() == {"corrupt_shard": manifest["files"][0]["num_rows"]}


# ---------------------------------------------------------------------------------------------------
# The DAG (items 1, 4): two drivers at once, cache hits whose outputs are gone
# ---------------------------------------------------------------------------------------------------


def _dag_overrides(tmp_path: Path, mlflow_uri: str) -> list[str]:
    return [*tiny_overrides(tmp_path, str(tmp_path / "data" / "mnist")), "data.source=mnist", "data.limit=64",
            "data.shard_size=16", "run.name=twodrivers", *tiny_later_stages(), f"mlflow.tracking_uri={mlflow_uri}",
            "run.lease.poll_s=1", "run.lease.settle_s=0.5"]


@pytest.mark.slow
def test_two_drivers_with_one_config_at_once_then_lost_outputs_rerun(ray_local, mlflow_uri, tmp_path):
    """Two real run.py processes start together (a retried CI job): one runs each stage, the other waits for it
    and reuses the result; nothing is trained or encoded twice. Then outputs that vanish from the cache re-run."""
    from pipelines import run as pipeline
    from pipelines.config import load_config

    overrides = _dag_overrides(tmp_path, mlflow_uri)
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
           "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, str(REPO / "pipelines/run.py"), "--config", str(REPO / "configs/quickstart.yaml"),
           "--until", "encode", *[f"--set={o}" for o in overrides]]
    logs = [tmp_path / f"driver{i}.log" for i in range(2)]
    drivers = []
    for path in logs:
        with open(path, "wb") as log:
            drivers.append(subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT))
    try:
        codes = [d.wait(timeout=1200) for d in drivers]
    finally:
        for d in drivers:
            d.kill()
    texts = [p.read_text() for p in logs]
    assert codes == [0, 0], "\n\n".join(t[-3000:] for t in texts)
    both = "\n".join(texts)
    assert both.count("[stage_a] ran") == 1 and both.count("[stage_a] reused") == 1
    assert both.count("[encode] ran") == 1 and both.count("[encode] reused") == 1
    assert "waiting for owner" in both

    cfg = load_config(REPO / "configs/quickstart.yaml", overrides)
    client = MlflowClient()
    experiment_id = client.get_experiment_by_name(cfg.mlflow.experiment).experiment_id
    runs = {s: client.search_runs([experiment_id], f"tags.stage = '{s}'") for s in ("prepare", "stage_a", "encode")}
    assert {s: len(r) for s, r in runs.items()} == {"prepare": 1, "stage_a": 1, "encode": 1}
    assert all(r.info.status == "FINISHED" for rs in runs.values() for r in rs)
    assert len(client.search_model_versions(f"name = '{cfg.mlflow.autoencoder_model_name}'")) == 1
    latents_uri = runs["encode"][0].data.tags["latents_uri"]
    manifest = latents.read_latents_manifest(latents_uri)
    loc = storage.resolve(latents_uri)
    assert set(storage.list_files(loc, ".parquet")) == {loc.join(f["path"]).path for f in manifest["files"]}

    # Item 4: a shard and a latents part vanish: prepare rebuilds, Stage A is reused (same digest), encode re-runs.
    data_manifest = json.loads((tmp_path / "data" / "mnist" / "manifest.json").read_text())
    (tmp_path / "data" / "mnist" / data_manifest["shards"][0]["path"]).unlink()
    Path(loc.join(manifest["files"][0]["path"]).path).unlink()
    again = pipeline.run_pipeline(load_config(REPO / "configs/quickstart.yaml", overrides), until="encode")
    assert [again[s].status for s in ("prepare", "stage_a", "encode")] == ["ran", "reused", "ran"]
    assert again["stage_a"].run_id == runs["stage_a"][0].info.run_id
    rebuilt = json.loads((tmp_path / "data" / "mnist" / "manifest.json").read_text())
    assert rebuilt["digest"] == data_manifest["digest"]
    new_manifest = latents.read_latents_manifest(again["encode"].outputs["latents_uri"])
    assert storage.missing_files(storage.resolve(again["encode"].outputs["latents_uri"]),
                                 [f["path"] for f in new_manifest["files"]]) == []
    # A registered model version that was deleted makes the Stage A cache hit invalid.
    from pipelines.stage_a import STAGE as STAGE_A

    stage_a = client.get_run(runs["stage_a"][0].info.run_id)
    assert lost_outputs(STAGE_A, stage_a, cfg) == ""
    name, version = stage_a.data.tags["model_uri"][len("models:/"):].split("/")
    client.delete_model_version(name, version)
    assert "not found" in lost_outputs(STAGE_A, stage_a, cfg)


# ---------------------------------------------------------------------------------------------------
# Bad input: one line, non-zero exit, nothing half-written
# ---------------------------------------------------------------------------------------------------


def _error(main, *args: str) -> str:
    """An entry point's main() on bad input: it must exit with one "error: ..." line (SystemExit with a message
    is exit code 1 with the message on stderr). Returns the line."""
    with pytest.raises(SystemExit) as e:
        main(list(args))
    message = str(e.value)
    assert message.startswith("error: ") and "\n" not in message, message
    return message


def test_yaml_syntax_error_names_file_line_and_column(tmp_path):
    from pipelines.run import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  name: x\n  seed: [1, 2\ndata:\n  uri: somewhere\n")
    assert _error(main, "--config", str(bad)).startswith(f"error: {bad}:4:5: not valid YAML: ")
    assert "value is not valid YAML" in _error(main, "--config", str(REPO / "configs/quickstart.yaml"), "--set", "run.seed=[1")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yaml"]


@pytest.mark.slow
def test_run_without_manifest_or_source_exits_1_and_writes_nothing(tmp_path):
    """As a user runs it: a real process, its exit code and its stderr."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'cli.db'}", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(
        [sys.executable, str(REPO / "pipelines/run.py"), "--config", str(REPO / "configs/quickstart.yaml"),
         "--set", "data.source=null", "--set", f"data.uri={tmp_path / 'nothing'}", "--set", f"run.output_uri={tmp_path / 'out'}"],
        cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: data.uri={tmp_path / 'nothing'} has no manifest.json and data.source is not set, so there is nothing to prepare"]
    assert list(tmp_path.iterdir()) == []


def test_prepare_refuses_a_folder_of_mostly_undecodable_images(tmp_path):
    from PIL import Image

    from pipelines.prepare_data import main

    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * i, np.uint8)).save(folder / f"good{i}.png")
    for i in range(7):
        (folder / f"broken{i}.png").write_bytes(b"\x89PNG not really " + bytes([i]) * 50)
    out = tmp_path / "ds"
    line = _error(main, "--source", str(folder), "--output", str(out), "--shard-size", "4")
    assert "7 of 10 images (70%) cannot be decoded" in line and "50%" in line
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))
    # Below the limit it builds the dataset; the broken images are counted when streamed, as before.
    manifest = main(["--source", str(folder), "--output", str(out), "--max-undecodable-fraction", "0.8"])
    assert manifest["num_samples"] == 10 and (out / "manifest.json").is_file()


def test_unsupported_schemes_are_refused_wherever_a_uri_is_read(tmp_path, monkeypatch):
    from ldm_core.config import ConfigError
    from pipelines.config import load_config
    from pipelines.prepare_data import main

    for field in ("run.output_uri", "data.uri", "encode.output_uri", "stage_b.latents_uri", "sample.out_dir",
                  "run.storage_path"):
        with pytest.raises(ConfigError, match=f"{field}: unsupported storage URI 'ftp://host/x'"):
            load_config(REPO / "configs/quickstart.yaml", [f"{field}=ftp://host/x"])
    monkeypatch.chdir(tmp_path)
    assert "unsupported storage URI 'ftp://host/x'" in _error(main, "--source", "mnist", "--output", "ftp://host/x", "--limit", "4")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_run_py_runtime_errors_are_one_line(ray_local, mlflow_uri, tmp_path, capsys):
    from pipelines import run as pipeline

    data = tmp_path / "data"
    prepare_dataset("mnist", str(data), shard_size=16, limit=32)
    base = ["--config", str(REPO / "configs/quickstart.yaml"),
            *[f"--set={o}" for o in tiny_overrides(tmp_path, str(data))], "--set=run.name=badinput", *[f"--set={o}" for o in tiny_later_stages()]]

    # A CPU budget that would hang Stage A: refused before any stage (no MLflow run, nothing written).
    with pytest.raises(SystemExit) as e:
        pipeline.main([*base, "--set=stage_a.scaling.cpus_per_worker=1"])
    assert str(e.value).startswith("error: CPU budget: stage_a.scaling.num_workers") and "\n" not in str(e.value)
    assert mlflow.get_experiment_by_name("ldm-quickstart") is None and not (tmp_path / "out").exists()

    # --from with nothing cached: refused before anything starts, in one line naming the command that gets past it
    # (no --from: nothing before the missing stage can come from the cache).
    with pytest.raises(SystemExit) as e:
        pipeline.main([*base, "--from", "stage_b"])
    message = str(e.value.code)
    assert message.startswith("error: --from stage_b: stage stage_a has no finished run") and "\n" not in message
    suggested = message.split("; run from it: ")[1]
    assert "--from" not in suggested and "--config" in suggested
    experiment = mlflow.get_experiment_by_name("ldm-quickstart")
    assert experiment is None or MlflowClient().search_runs([experiment.experiment_id]) == []


@pytest.mark.slow
def test_encode_and_stage_b_bad_inputs_are_one_line(ray_local, mlflow_uri, tmp_path):
    from pipelines.encode_latents import main as encode_main
    from pipelines.stage_b import main as stage_b_main

    data = tmp_path / "data"
    prepare_dataset("mnist", str(data), shard_size=16, limit=32)
    base = ["--config", str(REPO / "configs/quickstart.yaml"), f"--set=run.output_uri={tmp_path / 'out'}",
            f"--set=data.uri={data}", f"--set=encode.output_uri={tmp_path / 'latents'}"]
    for uri, expected in (("models:/nope/1", "error: model models:/nope/1 cannot be loaded: "),
                          ("runs:/abc", "error: model URI 'runs:/abc' is malformed"),
                          ("runs:/", "error: model URI 'runs:/' is malformed")):
        with pytest.raises(SystemExit) as e:
            encode_main([*base, f"--set=encode.autoencoder_uri={uri}"])
        assert str(e.value).startswith(expected) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "latents").exists()
    experiment = mlflow.get_experiment_by_name("ldm-quickstart")
    assert MlflowClient().search_runs([experiment.experiment_id]) == []

    garbage = tmp_path / "garbage-latents"
    garbage.mkdir()
    (garbage / "manifest.json").write_text("{this is not json")
    with pytest.raises(SystemExit) as e:
        stage_b_main([*base, f"--set=stage_b.latents_uri={garbage}"])
    assert str(e.value).startswith(f"error: latents {garbage}: manifest.json is not valid JSON") and "\n" not in str(e.value)
    assert MlflowClient().search_runs([experiment.experiment_id]) == []
    assert sorted(p.name for p in garbage.iterdir()) == ["manifest.json"]


# ---------------------------------------------------------------------------------------------------
# S3 outage during Stage A (item 7)
# ---------------------------------------------------------------------------------------------------

S3_SERVER = """
import sys
from moto.server import ThreadedMotoServer
# The S3 API in a thread of this process: stopping it closes the port (connection refused), starting a new
# server on the same port serves the same objects (moto keeps them in this process's memory).
port, server = int(sys.argv[1]), None
def start():
    global server
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
start()
print("started", flush=True)
for line in sys.stdin:
    server.stop() if line.strip() == "stop" else start()
    print(line.strip() + "ped" if line.strip() == "stop" else "started", flush=True)
"""


class S3Switch:
    """A real S3 API (moto) that a test can take down and bring back with its objects intact."""

    def __init__(self, port: int):
        self.endpoint = f"http://127.0.0.1:{port}"
        self.proc = subprocess.Popen([sys.executable, "-c", S3_SERVER, str(port)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        assert self.proc.stdout.readline().strip() == "started"

    def _say(self, word: str, answer: str) -> None:
        self.proc.stdin.write(word + "\n")
        self.proc.stdin.flush()
        assert self.proc.stdout.readline().strip() == answer

    def stop(self) -> None:
        self._say("stop", "stopped")

    def start(self) -> None:
        self._say("start", "started")

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=30)


def _complete(s3, name: str) -> dict[str, dict]:
    """The checkpoints of Stage A run `name` under s3://outage/ckpt that have a meta.json: folder -> that meta,
    plus "files": the names of everything in the folder."""
    files: dict[str, set] = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="outage", Prefix=f"ckpt/{name}-stage_a/"):
        for obj in page.get("Contents", []):
            parts = obj["Key"].split("/")
            if len(parts) > 2 and parts[-2].startswith("checkpoint_"):
                files.setdefault(parts[-2], set()).add(parts[-1])
    return {folder: {**json.loads(s3.get_object(Bucket="outage", Key=f"ckpt/{name}-stage_a/{folder}/meta.json")["Body"].read()),
                     "files": names} for folder, names in files.items() if "meta.json" in names}


@pytest.mark.slow
def test_stage_a_rides_out_an_s3_outage_and_gives_up_cleanly_past_the_limit(ray_local, mlflow_uri, tmp_path):
    import boto3

    from tests.conftest import free_port

    switch = S3Switch(free_port())
    try:
        s3 = boto3.client("s3", endpoint_url=switch.endpoint)
        s3.create_bucket(Bucket="outage")
        data = "s3://outage/data"
        prepare_dataset("mnist", data, shard_size=8, limit=64, storage=storage.StorageConfig(s3_endpoint_url=switch.endpoint))
        env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "RAY_AUTH_MODE": "token",
               "MLFLOW_TRACKING_URI": mlflow_uri, "PYTHONPATH": str(REPO)}

        def stage_a(name: str, *extra: str) -> subprocess.Popen:
            overrides = [*tiny_overrides(tmp_path, data), f"storage.s3_endpoint_url={switch.endpoint}",
                         "run.storage_path=s3://outage/ckpt", f"run.name={name}", "stage_a.train.max_steps=8",
                         "stage_a.train.keep_checkpoints=4", *extra]
            with open(tmp_path / f"{name}.out", "wb") as out, open(tmp_path / f"{name}.err", "wb") as err:
                return subprocess.Popen([sys.executable, str(REPO / "pipelines/stage_a.py"), "--config",
                                         str(REPO / "configs/quickstart.yaml"), *[f"--set={o}" for o in overrides]],
                                        cwd=REPO, env=env, stdout=out, stderr=err)

        def logs(name: str) -> str:
            return ((tmp_path / f"{name}.out").read_text()[-2000:] + (tmp_path / f"{name}.err").read_text()[-3000:])

        def wait_for_checkpoint(proc: subprocess.Popen, name: str, files: set | None = None) -> None:
            """Until a checkpoint of `name` has its meta.json (and, given `files`, all of those files: Ray uploads a
            checkpoint's files in no particular order, so meta.json alone does not make it whole)."""
            deadline = time.monotonic() + 900
            while not any(files is None or m["files"] == files for m in _complete(s3, name).values()):
                assert proc.poll() is None, logs(name)
                assert time.monotonic() < deadline, "no checkpoint after 900 s"
                time.sleep(0.5)

        # 1. Down for 8 s just after the first checkpoint: uploads and reads retry, training completes.
        proc = stage_a("rides")
        wait_for_checkpoint(proc, "rides")
        switch.stop()
        time.sleep(8)
        assert proc.poll() is None  # still training while S3 was down
        switch.start()
        assert proc.wait(timeout=1200) == 0, logs("rides")
        run = MlflowClient().search_runs([mlflow.get_experiment_by_name("ldm-quickstart").experiment_id],
                                         "tags.ray_train_name = 'rides-stage_a'")[0]
        assert run.info.status == "FINISHED" and run.data.tags["model_uri"].startswith("models:/")
        assert max(meta["step"] for meta in _complete(s3, "rides").values()) == 8

        # 2. Down for good, with 2 attempts per request: one line, exit 1, the last good checkpoint intact.
        reference = next(m["files"] for m in _complete(s3, "rides").values() if m["step"] == 2)
        proc = stage_a("gives-up", "storage.s3_max_attempts=2")
        wait_for_checkpoint(proc, "gives-up", files=reference)  # a whole checkpoint exists before S3 goes away
        switch.stop()
        code = proc.wait(timeout=1200)
        switch.start()
        err = (tmp_path / "gives-up.err").read_text()
        assert code == 1, logs("gives-up")
        last = err.strip().splitlines()[-1]  # above it: Ray's copies of the workers' logs
        assert last.startswith("error: object storage unreachable") and "re-run to resume" in last, logs("gives-up")
        kept = [m for m in _complete(s3, "gives-up").values() if m["files"] == reference]  # whole checkpoints
        assert kept and max(m["step"] for m in kept) >= 2
    finally:
        switch.close()

"""Cost per shard of the data steps at 1,000 to 10,000+ shards, on a real S3 API (issue 31). Not a test.

    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --shards 1000 3000 10000 [--steps index plan ...]
    PYTHONPATH=. .venv/bin/python benchmarks/scale.py --plot benchmarks/results/scale_cpu_DATE.jsonl

For each N it starts a fresh `moto_server` (tests/helpers.py's), writes N img2dataset-style shards of tiny 8-px
images (`NNNNN.tar` with 2 samples and `NNNNN_stats.json`: tests/helpers.py's `synthetic_shards`; without
img2dataset's `NNNNN.parquet` metadata, which the index before the fix refused to index beside the tars), then runs each step in a fresh Python process and measures it there: wall time and driver CPU
(user + system) of the step alone, the process's peak RSS (its imports included, so the RSS before the step is
given too). The S3 requests each step makes are counted from moto's access log (by method, and by the object's
name with its numbers as N: `GET N.tar`, `PUT part-N-N.parquet`), and the bytes it reads from moto's request recorder
(each GET's Range header, or the object's size for a whole GET). Steps:

- `index`: `prepare_data.py --index` as it is now (`index_shards`);
- `index_old`: the same from the commit before issue 31's fix (`--old-tree`: a copy of that tree, e.g. made with
  `git archive 1a3be91 | tar -x -C /tmp/base`): a HEAD and a whole GET per shard, one after another;
- `prepare_skip`: the DAG's prepare node on a complete dataset (read the manifest, check no shard is missing);
- `plan`: `run.py --plan` (configs/quickstart.yaml on this dataset, an empty MLflow store);
- `reader`: the Ray Data reader (`build_dataset`, split all, no shuffle) on a local Ray of 2 CPUs: seconds from the
  call to the first batch (Ray already started), then the rate over the whole pass (or its first
  `--reader-seconds`);
- `mlflow_input`: `tracking.log_dataset_input` of the dataset into a run of a local SQLite store, and the
  lineage chain (`lineage_chain`) of a two-run chain that consumed it;
- `encode`: `run_encode` (configs/quickstart.yaml at 8 px, parts of `ENCODE_ROWS_PER_PART` rows) over the dataset
  into Parquet latents on the same moto, with a small random autoencoder registered first as Stage A would
  (tests/test_encode.py's `publish_tiny_autoencoder`, 4x4x4 latents) and the bundled all-MiniLM-L6-v2; on a local
  Ray of 2 CPUs started before the timing. Its row adds the rows, the Parquet part count and the latents
  manifest's size;
- `stage_b_first_batch`: what Stage B does before its first step, on those latents: read their manifest and null
  condition, build the latents reader (`build_latent_dataset`, train split, shuffled) and take the first batch
  through `batches_forever` (the quickstart's batch of 64 and shuffle buffer of 512), one consumer where Stage B
  splits it between its workers. Its requests and bytes are counted up to that first batch.

The steps after `index` need the dataset's manifest: when it is missing they get one from `index_shards` first,
unmeasured. Each row goes as a JSON line to `--out` (default benchmarks/results/scale_cpu_<date>.jsonl); `--plot`
draws the per-shard costs against N on log-log axes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, os.environ.get("LDM_SCALE_TREE") or str(REPO))  # index_old: the tree before the fix

STEPS = ("index_old", "index", "prepare_skip", "plan", "reader", "mlflow_input", "encode", "stage_b_first_batch")
BUCKET = "scale-bench"
ENCODE_ROWS_PER_PART = 256
"""`encode.rows_per_shard` here: the quickstart's 1,000 would make 2 to 20 parts at 2 samples per shard; 256 makes
enough (8 to 79) to show whether the part count follows the rows or the input files."""


# ---------------------------------------------------------------------------------------------------
# One step, in its own process
# ---------------------------------------------------------------------------------------------------


def _rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def run_step(step: str, uri: str, work: Path) -> dict:
    """Run one step here and return its measurements (the parent counts its S3 requests)."""
    extra: dict = {}
    prepare = None
    if step in ("index", "index_old"):
        from pipelines.data import index_shards

        def prepare():
            return index_shards(uri)
    elif step == "prepare_skip":
        from pipelines.data import read_manifest
        from pipelines.data.prepare import missing_shards

        def prepare():
            assert not missing_shards(uri, read_manifest(uri), None)
    elif step == "plan":
        from pipelines.config import load_config
        from pipelines.dag.plan import plan_pipeline
        from pipelines.run import stages

        cfg = load_config(REPO / "configs" / "quickstart.yaml", [
            f"data.uri={uri}", f"run.output_uri={work / 'out'}", f"mlflow.tracking_uri=sqlite:///{work / 'plan.db'}"])

        def prepare():
            return plan_pipeline(stages(), cfg)
    elif step == "reader":
        import ray

        from pipelines.data import DataConfig, build_dataset

        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
        cfg = DataConfig(uri=uri, resolution=8, crop="center", batch_size=64)

        def prepare():
            ds, counter = build_dataset(cfg, split="all", shuffle=False)
            started = time.perf_counter()
            rows, first = 0, None
            limit = float(os.environ.get("LDM_SCALE_READER_S") or "inf")
            for batch in ds.iter_batches(batch_size=64, batch_format="numpy"):
                first = first or time.perf_counter() - started
                rows += len(batch["key"])
                if time.perf_counter() - started > limit:
                    break
            extra.update(first_batch_s=round(first, 3), rows=rows, rows_per_s=round(rows / (time.perf_counter() - started), 1),
                         skipped=counter.dropped(), whole_pass=rows == 2 * int(uri.rsplit("-", 1)[-1]))
    elif step == "mlflow_input":
        import mlflow
        from mlflow.tracking import MlflowClient

        from pipelines.dag.lineage import lineage_chain
        from pipelines.data import read_manifest
        from pipelines.platform import tracking
        from pipelines.run import stages

        mlflow.set_tracking_uri(f"sqlite:///{work / 'inputs.db'}")
        manifest = read_manifest(uri)
        with mlflow.start_run() as first:  # (the store's tables are made here, outside the timing)
            mlflow.set_tags({tracking.TAG_STAGE: "prepare"})

        def prepare():
            with mlflow.start_run() as run:
                mlflow.set_tags({tracking.TAG_STAGE: "stage_a", tracking.TAG_UPSTREAM: first.info.run_id})
                tracking.log_dataset_input(uri, manifest.get("name", "images"), manifest["digest"], "stage_a")
            chain = lineage_chain(MlflowClient(), run.info.run_id, stages())
            extra["chain"] = len(chain)
    elif step == "encode":
        from pipelines.encode_latents import run_encode
        from pipelines.platform.cluster import connect
        from tests.test_encode import publish_tiny_autoencoder

        cfg = encode_config(uri, work)
        os.environ["MLFLOW_TRACKING_URI"] = cfg.mlflow.tracking_uri
        publish_tiny_autoencoder(cfg, work / "ae")
        connect(cfg)

        def prepare():
            result = run_encode(cfg)
            files = result.manifest["files"]
            extra.update(rows=result.num_rows, parts=len(files), latents_bytes=sum(f["num_bytes"] for f in files),
                         rows_per_s=round(result.metrics["perf/images_per_s"], 1))
    elif step == "stage_b_first_batch":
        import ray
        import torch

        from pipelines.data import latents
        from pipelines.data.reader import new_skip_counter
        from pipelines.train.rank import batches_forever

        cfg = encode_config(uri, work)
        sb = cfg.stage_b
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)

        def prepare():
            started = time.perf_counter()
            found = cfg.encode.output_uri
            manifest = latents.read_latents_manifest(found)
            latents.read_null_condition(found, manifest)
            ds, _ = latents.build_latent_dataset(found, split="train", shuffle=True, num_cpus=cfg.data.fit(1).cpus_per_task,
                                                 skip_counter=new_skip_counter())
            batches = batches_forever(ds, batch_size=sb.batch_size, shuffle_buffer=sb.shuffle_buffer, seed=cfg.run.seed,
                                      device=torch.device("cpu"))
            first = next(batches)
            # Where moto's log and recorder stood at the first batch: the reads ahead after it are not counted.
            extra.update(first_batch_s=round(time.perf_counter() - started, 3), batch_rows=len(first["latent_mean"]),
                         parts=len(manifest["files"]), log_cut=os.path.getsize(work / "moto.log"),
                         recording_cut=os.path.getsize(os.environ["MOTO_RECORDER_FILEPATH"]))
            batches.close()
    else:
        raise SystemExit(f"unknown step {step}")
    rss_before = _rss_mib()
    cpu, wall = time.process_time(), time.perf_counter()
    prepare()
    return {"wall_s": round(time.perf_counter() - wall, 3), "cpu_s": round(time.process_time() - cpu, 3),
            "rss_before_mib": round(rss_before, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1), **extra}


# ---------------------------------------------------------------------------------------------------
# The driver: datasets, S3 accounting, the table
# ---------------------------------------------------------------------------------------------------


def latents_uri(uri: str) -> str:
    """Where `encode` writes the latents of the dataset at `uri` (and `stage_b_first_batch` reads them)."""
    return uri.replace("/img2dataset-", "/latents-")


def encode_config(uri: str, work: Path):
    """configs/quickstart.yaml on the dataset at `uri` (8 px), its stores in `work`, its latents beside the shards."""
    from pipelines.config import load_config

    return load_config(REPO / "configs" / "quickstart.yaml", [
        f"data.uri={uri}", "data.resolution=8", f"run.output_uri={work / 'out'}", "ray.num_cpus=2",
        f"mlflow.tracking_uri=sqlite:///{work / 'encode.db'}", f"encode.output_uri={latents_uri(uri)}",
        f"encode.rows_per_shard={ENCODE_ROWS_PER_PART}"])


def _moto_api(endpoint: str, action: str) -> None:
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/recorder/{action}", method="POST")).read()


def bytes_read(recording: Path, sizes: dict[str, int], until: int | None = None) -> int:
    """Bytes of object data the recorded GETs asked for: a Range's length, or the object's size. `until`: only the
    requests recorded before that byte offset of the recording."""
    total = 0
    if not recording.exists():
        return 0
    with open(recording, "rb") as f:
        text = f.read(until if until is not None else -1).decode()
    for line in text.splitlines(keepends=True):
        if not line.endswith("\n"):  # a line the recorder was writing at `until`
            break
        entry = json.loads(line)
        if entry["method"] != "GET":
            continue
        path = entry["url"].split("://", 1)[-1].split("/", 1)[-1].split("?", 1)[0]
        rng = {k.lower(): v for k, v in entry["headers"].items()}.get("range")
        if rng and rng.startswith("bytes="):
            start, _, end = rng[len("bytes="):].partition("-")
            size = sizes.get(path, 0)
            total += min(int(end) if end else size - 1, size - 1) - int(start) + 1 if size else 0
        elif "?" not in entry["url"].split("/", 3)[-1]:  # a whole object (not a listing)
            total += sizes.get(path, 0)
    return total


def measure(step: str, n: int, uri: str, endpoint: str, work: Path, log, recording: Path, sizes: dict,
            old_tree: Path | None) -> dict:
    from collections import Counter

    tree = str(old_tree if step == "index_old" else REPO)
    env = {**os.environ, "PYTHONPATH": tree, "LDM_SCALE_TREE": tree}
    recording.unlink(missing_ok=True)
    _moto_api(endpoint, "start-recording")
    log.mark()
    proc = subprocess.run([sys.executable, __file__, "--worker", step, "--uri", uri, "--work", str(work)], env=env,
                          capture_output=True, text=True, cwd=tree)
    _moto_api(endpoint, "stop-recording")
    if proc.returncode:
        raise RuntimeError(f"{step} at {n} shards failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    requests = [r for r in log.since(until=row.pop("log_cut", None)) if not r.path.startswith("/moto-api/")]
    kinds = Counter(f"{r.method} {'list' if 'list-type' in r.query else 'object'}" for r in requests)
    # which objects: the key's last part with its numbers (3+ digits) as N (N.tar, part-N-N.parquet, manifest.json, ...)
    objects = Counter(f"{r.method} {'list' if 'list-type' in r.query else re.sub(r'[0-9]{3,}', 'N', r.path.rsplit('/', 1)[-1])}"
                      for r in requests)
    row.update(step=step, shards=n, requests=len(requests), requests_by_kind=dict(kinds),
               requests_by_object=dict(objects.most_common()),
               bytes_read=bytes_read(recording, sizes, until=row.pop("recording_cut", None)))
    from pipelines.platform import storage

    if step.startswith("index"):
        row["manifest_bytes"] = len(storage.read_bytes(storage.resolve(uri).join("manifest.json")))
    if step == "encode":
        row["latents_manifest_bytes"] = len(storage.read_bytes(storage.resolve(latents_uri(uri)).join("manifest.json")))
    for key in ("wall_s", "cpu_s", "requests", "bytes_read"):
        row[f"{key}_per_shard"] = row[key] / n
    return row


def run_scale(counts: list[int], steps: list[str], out: Path, old_tree: Path | None) -> None:
    from pipelines.data import index_shards
    from pipelines.platform import storage
    from tests.helpers import S3RequestLog, start_moto_server, synthetic_shards

    for n in counts:
        work = Path(tempfile.mkdtemp(prefix=f"scale-{n}-"))
        os.environ.update({"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                           "AWS_DEFAULT_REGION": "us-east-1", "AWS_REGION": "us-east-1",
                           "MOTO_RECORDER_FILEPATH": str(work / "recording.jsonl"), "RAY_USAGE_STATS_ENABLED": "0"})
        os.environ.pop("MOTO_ENABLE_RECORDING", None)  # off until a step starts it: the setup's PUTs are not kept
        proc, endpoint = start_moto_server(work / "moto.log")
        os.environ["AWS_ENDPOINT_URL"] = endpoint
        try:
            import boto3

            boto3.client("s3", endpoint_url=endpoint).create_bucket(Bucket=BUCKET)
            uri = f"s3://{BUCKET}/img2dataset-{n}"
            started = time.perf_counter()
            synthetic_shards(uri, n, img2dataset_parquet=False)  # the old index refuses img2dataset's metadata Parquet
            print(f"[{n} shards] written in {time.perf_counter() - started:.1f}s", flush=True)
            root = storage.resolve(uri)
            log = S3RequestLog(work / "moto.log")
            for step in steps:
                if step == "index_old" and old_tree is None:
                    continue
                indexed = storage.exists(root.join("manifest.json"))
                if step.startswith("index") and indexed:
                    root.filesystem.delete_file(root.join("manifest.json").path)
                elif not step.startswith("index") and not indexed:
                    index_shards(uri)  # the later steps' input, not measured
                # the whole bucket's: the latents beside the shards too
                sizes = {o.path: o.size for o in storage.list_objects(storage.resolve(f"s3://{BUCKET}"))}
                row = measure(step, n, uri, endpoint, work, log, work / "recording.jsonl", sizes, old_tree)
                row.update(machine=machine(), date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                           load_1min=os.getloadavg()[0])
                print(json.dumps(row), flush=True)
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
        finally:
            proc.terminate()
            proc.wait(timeout=30)
            shutil.rmtree(work, ignore_errors=True)


def latent_row_bytes(tokens: int, rows: int = 512) -> float:
    """Bytes per row of an encode Parquet part for configs/sd_f8.yaml (32x32x4 latents, 77 x 768 text states),
    zstd as encode writes them (`latents.COMPRESSION`), with Gaussian floats (their mantissas barely compress, as
    real activations' do) and `tokens` real caption tokens per row (the states are zero at padding positions)."""
    import io

    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.data.latents import COMPRESSION

    rng = np.random.default_rng(0)
    hidden = np.zeros((rows, 77, 768), np.float32)
    hidden[:, :tokens] = rng.standard_normal((rows, tokens, 768), dtype=np.float32)
    mask = np.zeros((rows, 77), bool)
    mask[:, :tokens] = True
    table = pa.table({
        "key": [f"{i:09d}" for i in range(rows)], "caption": ["a photo of something on a table, in daylight"] * rows,
        "latent_mean": pa.FixedShapeTensorArray.from_numpy_ndarray(rng.standard_normal((rows, 4, 32, 32), dtype=np.float32)),
        "latent_std": pa.FixedShapeTensorArray.from_numpy_ndarray(np.abs(rng.standard_normal((rows, 4, 32, 32), dtype=np.float32)) * 0.05),
        "text_hidden": pa.FixedShapeTensorArray.from_numpy_ndarray(hidden),
        "text_mask": pa.FixedShapeTensorArray.from_numpy_ndarray(mask),
        "caption_truncated": [False] * rows, "holdout": [False] * rows, "text_encoder": ["clip-vit-large-patch14"] * rows,
    })
    buf = io.BytesIO()
    pq.write_table(table, buf, compression=COMPRESSION)
    return len(buf.getvalue()) / rows


def jpeg_bytes(side: int = 256, quality: int = 95) -> dict:
    """Bytes of a `side`-px photo as img2dataset stores it by default (JPEG, quality 95): the bundled skimage crops
    (15 photographs, 8 random crops each), re-encoded."""
    import io

    import numpy as np
    from PIL import Image

    from pipelines.data.sources import skimage_photos

    sizes = []
    for sample in skimage_photos(resolution=side, crops_per_photo=8):
        buf = io.BytesIO()
        Image.open(io.BytesIO(sample.data)).convert("RGB").save(buf, format="JPEG", quality=quality)
        sizes.append(len(buf.getvalue()))
    return {"images": len(sizes), "side": side, "quality": quality, "mean_bytes": round(float(np.mean(sizes))),
            "median_bytes": round(float(np.median(sizes)))}


def machine() -> str:
    return f"{platform.machine()} {os.cpu_count()} CPUs, {platform.python_version()}"


def load_rows(rows_file: Path) -> list[dict]:
    """The results, with a reader pass cut short (`--reader-seconds`) costed per shard it read (2 samples each)."""
    rows = [json.loads(line) for line in rows_file.read_text().splitlines() if line.strip()]
    for r in rows:
        if r.get("whole_pass") is False:
            read = r["rows"] / 2
            for key in ("wall_s", "cpu_s", "requests", "bytes_read"):
                r[f"{key}_per_shard"] = r[key] / read
    return rows


def plot(rows_file: Path, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = load_rows(rows_file)
    metrics = [("wall_s_per_shard", "wall s / shard"), ("cpu_s_per_shard", "driver CPU s / shard"),
               ("requests_per_shard", "S3 requests / shard"), ("bytes_read_per_shard", "bytes read / shard")]
    fig, axes = plt.subplots(1, len(metrics), figsize=(4.2 * len(metrics), 3.6))
    for ax, (key, label) in zip(axes, metrics):
        for step in dict.fromkeys(r["step"] for r in rows):
            points = sorted((r["shards"], r[key]) for r in rows if r["step"] == step and r[key] > 0)
            if points:
                ax.plot(*zip(*points), marker="o", label=step)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("shards")
        ax.set_title(label)
        ax.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"Cost per shard against the shard count ({rows[0]['machine']}, {rows[0]['date'][:10]}, moto S3)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def table(rows_file: Path) -> str:
    """The results as a Markdown table, one row per (step, shard count)."""
    rows = load_rows(rows_file)
    out = ["| step | shards | wall s | ms / shard | driver CPU ms / shard | peak RSS MiB (before) | S3 requests | "
           "requests / shard | bytes read / shard | load (1 min) | notes |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (STEPS.index(r["step"]), r["shards"])):
        notes = []
        if "manifest_bytes" in r:
            notes.append(f"manifest {r['manifest_bytes'] / r['shards']:.0f} B/shard")
        if r["step"] == "reader":
            notes.append(f"first batch {r['first_batch_s']:.1f} s, {r['rows_per_s']:.1f} rows/s"
                         + ("" if r.get("whole_pass", True) else f" over the first {r['rows']:,} rows"))
        if r["step"] == "encode":
            notes.append(f"{r['rows']:,} rows at {r['rows_per_s']:.1f} rows/s; {r['parts']} parts "
                         f"({r['parts'] / r['shards']:.4f} / shard), {r['latents_bytes'] / r['rows']:,.0f} B/row; "
                         f"latents manifest {r['latents_manifest_bytes']:,} B ({r['latents_manifest_bytes'] / r['parts']:.0f} B/part)")
        if r["step"] == "stage_b_first_batch":
            notes.append(f"first batch of {r['batch_rows']} rows from {r['parts']} parts")
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r["requests_by_kind"].items()))
        out.append(f"| {r['step']} | {r['shards']:,} | {r['wall_s']:.1f} | {1000 * r['wall_s_per_shard']:.1f} | "
                   f"{1000 * r['cpu_s_per_shard']:.2f} | {r['peak_rss_mib']:.0f} ({r['rss_before_mib']:.0f}) | "
                   f"{r['requests']:,} ({kinds}) | {r['requests_per_shard']:.3f} | {r['bytes_read_per_shard']:,.0f} | "
                   f"{r['load_1min']:.0f} | {'; '.join(notes)} |")
    return "\n".join(out)


def task_payload(counts: list[int], tasks: int = 200) -> list[dict]:
    """What a read task pays for the per-shard facts every decode task receives (`decode_shards`' `shards`), as a
    dict with an entry per shard (before the fix) and as `FileTable` (after): the argument's pickled size in band,
    the time to unpickle it the way a Ray worker does (protocol 5, buffers out of band), and the wall time per task
    of a real Ray Data pass over `tasks` tiny local files carrying it (a local Ray with one CPU)."""
    import hashlib
    import pickle

    import numpy as np
    import pyarrow.fs as pafs
    import ray

    from pipelines.data.reader import FileTable, read_whole_files

    def facts(n: int) -> dict[str, dict]:
        return {f"shards/{i:06d}.tar": {"num_samples": 10_000, "sha256": hashlib.sha256(str(i).encode()).hexdigest(),
                                        "size": 500_000_000 + i, "etag": f'"{hashlib.md5(str(i).encode()).hexdigest()}-60"'}
                for i in range(n)}

    def probe(batch, *, shards):
        path = str(batch["path"][0])
        return {"found": np.array([shards.get(path) is not None])}

    folder = Path(tempfile.mkdtemp(prefix="task-payload-"))
    paths = []
    for i in range(tasks):
        (folder / f"{i:05d}.bin").write_bytes(b"x" * 100)
        paths.append(str(folder / f"{i:05d}.bin"))
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    rows = []
    try:
        for n in counts:
            entries = facts(n)
            for form, arg in (("dict", entries), ("table", FileTable(entries, ("num_samples", "sha256", "size", "etag")))):
                buffers: list = []
                in_band = pickle.dumps(arg, protocol=5, buffer_callback=buffers.append)
                started = time.perf_counter()
                for _ in range(5):
                    pickle.loads(in_band, buffers=buffers)
                unpickle_ms = (time.perf_counter() - started) / 5 * 1000
                ds = read_whole_files(paths, pafs.LocalFileSystem(), override_num_blocks=tasks, num_cpus=0.5)
                ds = ds.map_batches(probe, batch_size=None, num_cpus=0.5, fn_kwargs={"shards": arg})
                started = time.perf_counter()
                ds.take_all()
                wall = time.perf_counter() - started
                row = {"step": f"task_payload_{form}", "shards": n, "tasks": tasks, "in_band_bytes": len(in_band),
                       "out_of_band_bytes": sum(memoryview(b).nbytes for b in buffers),
                       "unpickle_ms": round(unpickle_ms, 3), "ms_per_task": round(wall / tasks * 1000, 1),
                       "load": round(os.getloadavg()[0], 1), "machine": machine(),
                       "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
                print(json.dumps(row), flush=True)
                rows.append(row)
    finally:
        ray.shutdown()
        shutil.rmtree(folder, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, nargs="+", default=[1000, 3000, 10000])
    parser.add_argument("--steps", nargs="+", choices=STEPS, default=list(STEPS))
    parser.add_argument("--reader-seconds", type=float, help="stop the reader's pass after this long (default: whole)")
    parser.add_argument("--old-tree", type=Path, help="a copy of the tree before the fix, for the index_old step")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / f"scale_cpu_{time.strftime('%Y-%m-%d')}.jsonl")
    parser.add_argument("--plot", type=Path, help="draw this results file (beside it, .png), print its table and exit")
    parser.add_argument("--latent-row-bytes", type=int, nargs="+", metavar="TOKENS",
                        help="print the bytes per encode Parquet row with this many caption tokens, and exit")
    parser.add_argument("--jpeg-bytes", action="store_true", help="print the bytes of a 256-px JPEG (quality 95), and exit")
    parser.add_argument("--task-payload", type=int, nargs="+", metavar="SHARDS",
                        help="measure what each read task pays for the per-shard facts at these shard counts "
                             "(a dict per shard against FileTable), append the rows to --payload-out, and exit")
    parser.add_argument("--payload-out", type=Path,
                        default=REPO / "benchmarks" / "results" / f"task_payload_cpu_{time.strftime('%Y-%m-%d')}.jsonl")
    parser.add_argument("--worker", choices=STEPS, help=argparse.SUPPRESS)
    parser.add_argument("--uri", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        import io
        import contextlib

        with contextlib.redirect_stdout(io.StringIO()):  # the steps' progress lines: only the JSON goes out
            row = run_step(args.worker, args.uri, args.work)
        print(json.dumps(row))
        return
    if args.jpeg_bytes:
        print(json.dumps(jpeg_bytes()))
        return
    if args.latent_row_bytes:
        for tokens in args.latent_row_bytes:
            print(json.dumps({"caption_tokens": tokens, "bytes_per_row": round(latent_row_bytes(tokens))}))
        return
    if args.task_payload:
        args.payload_out.parent.mkdir(parents=True, exist_ok=True)
        with args.payload_out.open("a") as f:
            for row in task_payload(args.task_payload):
                f.write(json.dumps(row) + "\n")
        return
    if args.plot:
        plot(args.plot, args.plot.with_suffix(".png"))
        print(table(args.plot))
        return
    if args.reader_seconds:
        os.environ["LDM_SCALE_READER_S"] = str(args.reader_seconds)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run_scale(args.shards, args.steps, args.out, args.old_tree)


if __name__ == "__main__":
    main()

"""Encode: images + captions -> Parquet latents for Stage B, as a Ray Data batch-inference job, tracked in MLflow.

    python pipelines/encode_latents.py --config configs/quickstart.yaml [--set encode.autoencoder_uri=models:/ldm-autoencoder/2]

The Stage A autoencoder (by MLflow URI or registered-model alias such as `champion`, default: the latest
registered version) and the text encoder run in a Ray Data actor pool (`map_batches` over the streamed image
dataset; a GPU per actor when configured). Each
row keeps the posterior's mean and std, already multiplied by the recorded scale factor, so Stage B draws a
fresh latent sample every time it sees an image. A datasink writes the Parquet files; the manifest goes last.

Reads top to bottom: the actor, finding the inputs (autoencoder, output folder), the job and its MLflow run.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
import hashlib
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import mlflow
import numpy as np
import ray
import torch
from mlflow.tracking import MlflowClient

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL, normalize_latents
from ldm_core.config import ConfigError
from pipelines.data import latents
from pipelines.platform import lease, storage, tracking
from pipelines.platform.cluster import ClusterError, cluster_resources, connect
from pipelines.config import PipelineConfig
from pipelines.dag.stage import Stage
from pipelines.platform.cli import parse_cli
from pipelines.data import DatasetError, build_dataset, read_manifest, to_model_range
from pipelines.data.buckets import check_shapes, split_by_shape
from pipelines.data.reader import in_split
from pipelines.models.registry import load_autoencoder, model_to_load, run_id_of
from pipelines.platform.progress import print_summary, run_with_progress
from pipelines.platform.runtime import exit_on, setup_logging
from pipelines.data.text_encoders import TextEncoderConfig, check_text_encoder, load_text_encoder, prompt_states

log = logging.getLogger("encode")
STAGE_NAME = latents.ENCODE_STAGE
TAG_LATENTS_URI = latents.TAG_LATENTS_URI
LEASE = ".lease.json"
"""The encode lease, inside the latents folder it guards."""


# ----------------------------------------------------------------------------------------------------
# Actor side: one per slot of the actor pool.
# ----------------------------------------------------------------------------------------------------


@ray.remote(num_cpus=0)
class EncodedCount:
    """Images encoded so far by the whole actor pool (what the driver's progress line shows), and the empty prompt's
    text states (the CFG null condition), which the first encoder actor up computes with the text encoder it holds:
    no process of its own loads the encoder once more for one prompt."""

    def __init__(self):
        self.images = 0
        self.null_states: dict | None = None

    def add(self, n: int) -> None:
        self.images += n

    def get(self) -> int:
        return self.images

    def set_null(self, states: dict) -> None:
        if self.null_states is None:
            self.null_states = states

    def null(self) -> dict | None:
        return self.null_states


class LatentEncoder:
    """Ray Data callable class: a batch of images + captions -> latent moments + text hidden states."""

    def __init__(self, autoencoder: list, text_encoder: dict, holdout_fraction: float, encoded: "ray.actor.ActorHandle",
                 holdout_by: str = "sample"):
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        weights = ray.get(autoencoder[0])  # {"config", "state", "normalization"} put in the object store by the driver
        self.autoencoder = AutoencoderKL(AutoencoderConfig.model_validate(weights["config"]))
        self.autoencoder.load_state_dict(weights["state"])
        self.autoencoder.to(self.device).eval().requires_grad_(False)
        self.normalization = weights["normalization"]  # `latent_normalization`'s scale_factor, latents_mean, latents_std
        self.text = load_text_encoder(TextEncoderConfig.model_validate(text_encoder), self.device)
        ray.get(encoded.set_null.remote(prompt_states(self.text, [""])))  # delivered before any batch is encoded
        self.holdout_fraction = holdout_fraction
        self.holdout_by = holdout_by  # the same split as Stage A's (DataConfig.holdout_by)
        self.encoded = encoded

    def __call__(self, batch: dict) -> Iterator[dict]:
        """One output block per image shape in the batch (several with aspect-ratio buckets): a block, and so a
        Parquet part file, holds latents of one shape."""
        for _, same_shape in split_by_shape(batch, "image"):
            yield self.encode(same_shape)

    @torch.no_grad()
    def encode(self, batch: dict) -> dict:
        # Ray Data's arrays are read-only: a copy (uint8, small), not a tensor over memory torch must not write.
        x = to_model_range(torch.tensor(batch["image"], device=self.device))  # (B, 3, H, W) in [-1, 1]
        posterior = self.autoencoder.encode(x)
        norm = self.normalization
        s = self.autoencoder.scale_factor if norm["latents_mean"] is None else norm["scale_factor"]
        # (B, C, h, w): normalised like the latents Stage B trains on; the std is only scaled (an affine map's)
        mean = normalize_latents(posterior.mean, s, norm["latents_mean"], norm["latents_std"]).float().cpu().numpy()
        std = normalize_latents(posterior.std, s, None, norm["latents_std"]).float().cpu().numpy()
        captions = [str(c) for c in batch["caption"]]
        # Captions repeat (MNIST has ten); encode each distinct one once.
        unique, inverse = np.unique(np.array(captions, dtype=object), return_inverse=True)
        hidden, mask, truncated = self.text.encode_numpy(list(unique))
        keys = [str(k) for k in batch["key"]]
        self.encoded.add.remote(len(keys))
        return {
            "key": np.array(keys, dtype=object),
            "caption": np.array(captions, dtype=object),
            "latent_mean": mean,
            "latent_std": std,
            "text_hidden": hidden[inverse],  # (B, L, D)
            "text_mask": mask[inverse],  # (B, L)
            "caption_truncated": truncated[inverse],
            "holdout": np.array([in_split(k, "holdout", self.holdout_fraction, self.holdout_by) for k in keys], dtype=bool),
            "text_encoder": np.array([self.text.name] * len(keys), dtype=object),
        }


# ----------------------------------------------------------------------------------------------------
# Driver side.
# ----------------------------------------------------------------------------------------------------


@dataclass
class EncodeResult:
    run_id: str
    latents_uri: str
    num_rows: int
    manifest: dict
    metrics: dict = field(default_factory=dict)
    reused: bool = False
    """The folder was already complete for the same inputs: nothing was encoded again."""

    @property
    def status(self) -> str:
        return "reused" if self.reused else "ran"

    @property
    def outputs(self) -> dict[str, str]:
        return {"latents_uri": self.latents_uri}


def latest_autoencoder_uri(cfg: PipelineConfig) -> str:
    """models:/<autoencoder_model_name>/<latest version>."""
    name = cfg.mlflow.autoencoder_model_name
    versions = MlflowClient().search_model_versions(f"name = '{name}'")
    if not versions:
        raise ConfigError(f"encode.autoencoder_uri is not set and the registered model {name!r} "
                          f"(mlflow.autoencoder_model_name) has no versions: run Stage A first")
    return f"models:/{name}/{max(int(v.version) for v in versions)}"


def autoencoder_to_load(cfg: PipelineConfig) -> str:
    """`encode.autoencoder_uri`, else the version `encode.autoencoder_alias` points to, else the latest version."""
    ec = cfg.encode
    return model_to_load(ec.autoencoder_uri, ec.autoencoder_alias, cfg.mlflow.autoencoder_model_name,
                         "encode.autoencoder_alias", lambda: latest_autoencoder_uri(cfg))


def encode_settings(cfg: PipelineConfig, autoencoder_uri: str, stage_a_run_id: str, dataset_digest: str) -> dict:
    """What determines the latents' content: an existing folder is reused only when all of it matches."""
    return {
        "autoencoder_uri": autoencoder_uri,
        "stage_a_run_id": stage_a_run_id,
        "dataset_uri": cfg.data.uri,
        "dataset_digest": dataset_digest,
        "resolution": cfg.data.resolution,
        **({"buckets": [list(s) for s in cfg.data.shapes]} if cfg.data.buckets is not None else {}),  # (absent: old names)
        "holdout_fraction": cfg.data.holdout_fraction,
        "holdout_by": cfg.data.holdout_by,
        "text_encoder": cfg.encode.text_encoder.name_or_path,
        "max_length": cfg.encode.text_encoder.max_length,
        **({"split_digits": True} if cfg.encode.text_encoder.split_digits else {}),  # (absent when off: old folder names)
        # only when not SD's scalar, so that the folders of scalar latents keep their names
        **({"latent_normalization": cfg.encode.latent_normalization} if cfg.encode.latent_normalization != "scalar" else {}),
    }


def latent_normalization(cfg: PipelineConfig, autoencoder: AutoencoderKL) -> dict:
    """`encode.latent_normalization` as diffusers' three numbers: {"scale_factor", "latents_mean", "latents_std"}
    (`ldm_core.autoencoder.normalize_latents`). Scalar: the autoencoder's scale, no statistics; per_channel: its
    measured per-channel statistics and scale 1."""
    if cfg.encode.latent_normalization == "scalar":
        return {"scale_factor": float(autoencoder.scale_factor), "latents_mean": None, "latents_std": None}
    if autoencoder.latents_mean is None:
        raise ConfigError("encode.latent_normalization=per_channel: the autoencoder has no measured per-channel latent "
                          "statistics (Stage A measures them since issue 33; retrain it, or use scalar)")
    return {"scale_factor": 1.0, "latents_mean": autoencoder.latents_mean, "latents_std": autoencoder.latents_std}


def latents_parent(cfg: PipelineConfig) -> str:
    """Where encode's default output folders live, one per execution."""
    return f"{cfg.run.output_uri.rstrip('/')}/latents"


def default_output_uri(cfg: PipelineConfig, settings: dict) -> str:
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    return f"{latents_parent(cfg)}/{settings['stage_a_run_id']}-{key}"


def check_resolution(cfg: PipelineConfig, autoencoder: AutoencoderKL) -> list[tuple[int, int, int]]:
    """The latent shapes (c, H / f, W / f) of `data.resolution` (first) and of every bucket through `autoencoder`; a
    side that is not a multiple of its downsampling factor f is refused."""
    return check_shapes(cfg.data, autoencoder.config.latent_channels, autoencoder.downsample_factor)


def check_encode(cfg: PipelineConfig) -> PipelineConfig:
    """Before any Ray work: the text encoder can be loaded on this machine (`check_text_encoder`)."""
    check_text_encoder(cfg.encode.text_encoder)
    return cfg


def run_encode(
    cfg: PipelineConfig, *, parent_run_id: str | None = None, upstream_run_ids: tuple[str, ...] = (),
    extra_tags: dict | None = None, checked: bool = False,
) -> EncodeResult:
    """Encode the dataset with the autoencoder and the text encoder into Parquet latents (or reuse a complete folder
    made from the same inputs). `checked`: Ray is already started or joined for `cfg` (the DAG does it first)."""
    if not checked:
        cfg = check_encode(cfg)
        connect(cfg)
    ec = cfg.encode
    experiment_id = tracking.setup(cfg.mlflow, cfg.run.output_uri)
    autoencoder_uri = autoencoder_to_load(cfg)
    stage_a_run_id = run_id_of(autoencoder_uri)
    data_manifest = read_manifest(cfg.data.uri, cfg.storage)  # fails clearly on a missing/empty dataset
    autoencoder = load_autoencoder(autoencoder_uri)
    latent_shape, *_ = check_resolution(cfg, autoencoder)
    settings = encode_settings(cfg, autoencoder_uri, stage_a_run_id, data_manifest["digest"])
    output_uri = ec.output_uri or default_output_uri(cfg, settings)
    root = storage.resolve(output_uri, cfg.storage)

    # One live encode per folder: a second driver waits for the first, then finds its manifest and reuses it.
    with lease.hold(root.join(LEASE).uri, what=f"encode into {root.uri}", settings=cfg.run.lease,
                    storage_cfg=cfg.storage) as held:
        existing = _complete_manifest(root, cfg)
        if existing is not None and existing["settings"] != settings:
            raise latents.LatentsError(
                f"encode.output_uri={output_uri!r} already holds complete latents made from other inputs "
                f"({_diff(existing['settings'], settings)}): choose another encode.output_uri or delete it"
            )

        tags = {"autoencoder_uri": autoencoder_uri, "dataset_uri": cfg.data.uri, "dataset_digest": data_manifest["digest"],
                "text_encoder": ec.text_encoder.name_or_path, **(extra_tags or {})}
        if ec.autoencoder_alias and not ec.autoencoder_uri:
            tags["autoencoder_alias"] = ec.autoencoder_alias
        with tracking.stage_run(
            experiment_id=experiment_id, stage=STAGE_NAME, run_name=f"{cfg.run.name}-{STAGE_NAME}",
            upstream_run_ids=tuple(upstream_run_ids) or (stage_a_run_id,), parent_run_id=parent_run_id, tags=tags,
        ) as run:
            run_id = run.info.run_id
            client = MlflowClient()
            tracking.log_params(client, run_id, tracking.flatten({"encode": ec.model_dump(mode="json"), "data": cfg.data.model_dump(mode="json")}))
            if existing is not None:
                log.info("latents at %s are already complete for these inputs: reusing them", root.uri)
                mlflow.set_tags({TAG_LATENTS_URI: root.uri, "reused": "true", "latents_digest": existing["digest"],
                                 "encode_run_id_of_latents": existing.get("encode_run_id", "")})
                metrics = {"encode/rows": existing["num_rows"]}
                mlflow.log_metrics(metrics)
                print_summary(STAGE_NAME, f"reused {existing['num_rows']} rows already at {root.uri}")
                return EncodeResult(run_id, root.uri, existing["num_rows"], existing, metrics, reused=True)

            manifest, metrics = _encode(cfg, root, autoencoder, autoencoder_uri, latent_shape, settings, run_id, held,
                                        num_images=data_manifest["num_samples"])
            tracking.log_metrics(client, run_id, metrics, 0)
            mlflow.set_tags({TAG_LATENTS_URI: root.uri, "latents_digest": manifest["digest"]})
            tracking.log_dataset_input(cfg.data.uri, data_manifest.get("name", "images"), data_manifest["digest"], "encode")
            print_summary(STAGE_NAME, f"{manifest['num_rows']} rows", seconds=metrics["perf/seconds"],
                          images_per_s=metrics["perf/images_per_s"], to=root.uri)
            return EncodeResult(run_id, root.uri, manifest["num_rows"], manifest, metrics)


def _encode(cfg: PipelineConfig, root: storage.Location, autoencoder: AutoencoderKL, autoencoder_uri: str,
            latent_shape: tuple[int, int, int], settings: dict, run_id: str, held: lease.Lease, *,
            num_images: int) -> tuple[dict, dict]:
    ec = cfg.encode
    sc = ec.scaling
    num_gpus = sc.gpus_per_actor if sc.use_gpu else 0
    started = time.monotonic()

    # Stage A's crops may be random; latents are computed once, so take the centre, unflipped.
    # Unset data.cpus_per_task: chosen for the CPUs the encoder actors leave free.
    free_cpus = cluster_resources().get("CPU", 0) - sc.num_actors * sc.cpus_per_actor
    data_cfg = cfg.data.fit(free_cpus).model_copy(update={"crop": "center", "random_flip": False})
    images, skip_counter = build_dataset(data_cfg, split="all", storage=cfg.storage, shuffle=False, seed=cfg.run.seed)
    normalization = latent_normalization(cfg, autoencoder)
    weights = ray.put({"config": autoencoder.config.model_dump(mode="json"), "state": autoencoder.state_dict(),
                       "normalization": normalization})
    counter = EncodedCount.remote()
    encoded = images.map_batches(
        LatentEncoder,
        batch_size=ec.batch_size,
        compute=ray.data.ActorPoolStrategy(size=sc.num_actors),
        num_cpus=sc.cpus_per_actor,
        num_gpus=num_gpus,
        fn_constructor_kwargs={"autoencoder": [weights], "text_encoder": ec.text_encoder.model_dump(mode="json"),
                               "holdout_fraction": cfg.data.holdout_fraction, "encoded": counter,
                               "holdout_by": cfg.data.holdout_by},
    )
    folder = f"{latents.PARTS_PREFIX}{run_id}"
    # Part folders of earlier executions that ended without a manifest, handed over through the lease (a failed
    # one released it, a dead one was taken over): no live encode writes them. Recorded before writing, with
    # ours, so that if this execution dies too the next owner cleans up both.
    leftovers = [f for f in ((held.previous or {}).get("notes", {}).get("parts") or []) if f != folder]
    held.note(parts=[*leftovers, folder])
    sink = latents.LatentParquetSink(root.uri, cfg.storage, folder, ec.rows_per_shard, fail_after_rows=ec.fail_after_rows)
    storage.makedirs(root)
    run_with_progress(STAGE_NAME, num_images, lambda: encoded.write_datasink(sink),
                      lambda: ray.get(counter.get.remote(), timeout=5))
    seconds = time.monotonic() - started
    if not sink.files:
        raise latents.LatentsError(f"encode wrote no rows to {root.uri}: every image of {cfg.data.uri} was skipped "
                                   f"({skip_counter.snapshot()})")
    null = ray.get(counter.null.remote())  # set by the first encoder actor up, before it encoded any batch
    if null is None:
        raise latents.LatentsError(f"encode into {root.uri}: no encoder actor reported the empty prompt's text states; "
                                   "no manifest written")

    null_payload = latents.null_condition_bytes(torch.tensor(null["hidden"][0]), torch.tensor(null["mask"][0]))
    storage.write_bytes(root.join(latents.NULL_CONDITION), null_payload)
    files = [vars(f) for f in sink.files]
    missing = storage.missing_files(root, [f["path"] for f in files] + [latents.NULL_CONDITION])
    if missing:
        raise latents.LatentsError(f"encode into {root.uri}: {len(missing)} file(s) it wrote are gone before its manifest "
                                   f"was written (e.g. {missing[0]}): something else deletes in this folder; no manifest written")
    totals = latents.summarize(sink.files)
    null_sha = hashlib.sha256(null_payload).hexdigest()
    manifest = {
        "format": latents.FORMAT,
        "format_version": latents.FORMAT_VERSION,
        "settings": settings,
        "files": files,
        "num_rows": totals["num_rows"],
        "num_holdout": totals["holdout"],
        "num_truncated": totals["truncated"],
        "latent_shape": list(latent_shape),
        "latent_shapes": latents.shape_counts(sink.files),
        "scale_factor": normalization["scale_factor"],
        **({"latents_mean": normalization["latents_mean"], "latents_std": normalization["latents_std"]}
           if normalization["latents_mean"] is not None else {}),
        "latent_kind": autoencoder.config.kind,
        "autoencoder_uri": autoencoder_uri,
        "stage_a_run_id": settings["stage_a_run_id"],
        "encode_run_id": run_id,
        "dataset_uri": cfg.data.uri,
        "dataset_digest": settings["dataset_digest"],
        "text_encoder": {"name_or_path": ec.text_encoder.name_or_path, "max_length": int(null["max_length"]),
                         "hidden_size": int(null["hidden_size"]), "model_type": null["model_type"],
                         **({"split_digits": True} if ec.text_encoder.split_digits else {})},
        "null_condition": {"path": latents.NULL_CONDITION, "sha256": null_sha,
                           "tokens": int(null["mask"][0].sum())},
        "columns": ["key", "caption", "latent_mean", "latent_std", "text_hidden", "text_mask", "caption_truncated",
                    "holdout", "text_encoder"],
        "created": latents.timestamp(),
    }
    manifest["digest"] = latents.manifest_digest(files, null_sha, settings)
    held.check()  # still the owner (not taken over as dead): only then may this manifest be published
    latents.write_manifest(root, manifest)  # last: its presence marks the folder complete
    stale = latents.remove_parts(root, leftovers)
    held.note(parts=[])
    if stale:
        log.info("removed %d Parquet file(s) left by interrupted encode attempts (%s)", stale, ", ".join(leftovers))

    skipped = skip_counter.snapshot()
    metrics = {
        "encode/rows": totals["num_rows"],
        "encode/holdout_rows": totals["holdout"],
        "encode/files": len(files),
        "encode/bytes": totals["num_bytes"],
        "encode/truncated_captions": totals["truncated"],
        "encode/stale_files_removed": stale,
        "perf/seconds": seconds,
        "perf/images_per_s": totals["num_rows"] / seconds if seconds > 0 else 0.0,
        **{f"data/skipped_{k}": v for k, v in skipped.items()},
    }
    return manifest, metrics


def _complete_manifest(root: storage.Location, cfg: PipelineConfig) -> dict | None:
    """The folder's manifest when it is complete and every file it lists is still there; None otherwise (then the
    folder is encoded again under a fresh manifest)."""
    try:
        manifest = latents.read_latents_manifest(root.uri, cfg.storage)
    except latents.LatentsError:
        return None
    gone = storage.missing_files(root, [f["path"] for f in manifest["files"]] + [manifest["null_condition"]["path"]])
    if gone:
        log.warning("latents at %s: %d file(s) its manifest lists are gone (e.g. %s): encoding again", root.uri,
                    len(gone), gone[0])
        return None
    return manifest


def _diff(old: dict, new: dict) -> str:
    return ", ".join(f"{k}: {old.get(k)!r} != {new.get(k)!r}" for k in sorted(new) if old.get(k) != new.get(k))


def latents_lost(run, cfg: PipelineConfig) -> str:
    """What a finished encode run's folder lacks ("" when its manifest, every part and the null condition are there)."""
    uri = run.data.tags.get(TAG_LATENTS_URI, "")
    try:
        manifest = latents.read_latents_manifest(uri, cfg.storage)
    except latents.LatentsError as e:
        return str(e).splitlines()[0]
    gone = storage.missing_files(storage.resolve(uri, cfg.storage),
                                 [f["path"] for f in manifest["files"]] + [manifest["null_condition"]["path"]])
    return f"{len(gone)} of the files of {uri}" if gone else ""


STAGE = Stage(
    name=STAGE_NAME,
    run=run_encode,
    inputs=("stage_a",),
    sections=("encode.text_encoder", "encode.output_uri", "encode.latent_normalization", "data.resolution",
              "data.buckets", "data.holdout_fraction", "data.holdout_by"),
    wiring={"encode.autoencoder_uri": ("stage_a", "model_uri")},
    consumes=("autoencoder_uri", "dataset_uri"),
    produces=(TAG_LATENTS_URI,),
    key_metrics=("encode/rows", "perf/images_per_s"),
    check=check_encode,
    lost_outputs=latents_lost,
    output_parent=latents_parent,
)


def main(argv: list[str] | None = None) -> EncodeResult:
    setup_logging()
    cfg, _ = parse_cli(argv, argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    with exit_on(ConfigError, DatasetError, latents.LatentsError, ClusterError):
        result = run_encode(cfg)
    verb = "reused" if result.reused else "wrote"
    print(f"encode finished: run {result.run_id}, {verb} {result.num_rows} rows at {result.latents_uri}")
    return result


if __name__ == "__main__":
    main()

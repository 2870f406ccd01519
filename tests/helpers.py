"""Small builders shared by the pipeline tests: tiny configs and tiny real datasets."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def mnist_dataset(tmp_path: Path, limit: int = 96, resolution: int | None = None, fmt: str = "webdataset") -> str:
    """A real (tiny) shard set of bundled MNIST digits in tmp_path. Returns its URI."""
    from pipelines.data import prepare_dataset

    uri = str(tmp_path / f"mnist-{fmt}-{limit}")
    prepare_dataset("mnist", uri, fmt=fmt, shard_size=32, resolution=resolution, limit=limit, seed=0)
    return uri


def tiny_overrides(tmp_path: Path, data_uri: str) -> list[str]:
    """--set overrides that shrink the quickstart to seconds: 32 px, 8-channel models, 4 steps."""
    return [
        f"run.output_uri={tmp_path / 'out'}",
        f"data.uri={data_uri}",
        "data.resolution=32",
        "data.batch_size=4",
        "data.shuffle_buffer=8",
        "data.holdout_fraction=0.2",
        "stage_a.model.base_channels=8",
        "stage_a.model.channel_mult=[1, 2, 2]",
        "stage_a.model.norm_groups=4",
        "stage_a.model.num_res_blocks=1",
        "stage_a.discriminator.base_channels=8",
        "stage_a.discriminator.norm_groups=4",
        "stage_a.discriminator.num_layers=2",
        "stage_a.lpips.net=squeeze",
        "stage_a.train.max_steps=4",
        "stage_a.train.log_every=1",
        "stage_a.train.image_every=2",
        "stage_a.train.checkpoint_every=2",
        "stage_a.eval.scale_batches=2",
        "stage_a.eval.max_batches=2",
        "stage_a.train.max_failures=0",
    ]


def tiny_later_stages() -> list[str]:
    """--set overrides that shrink encode, Stage B and sampling to seconds: a 2-level 8-channel U-Net, 4 steps,
    12-token prompts, two prompts, no digit classifier."""
    return [
        "encode.batch_size=16",
        "encode.rows_per_shard=16",
        "encode.scaling.cpus_per_actor=0.5",
        "encode.text_encoder.max_length=12",
        "stage_b.unet.model_channels=8",
        "stage_b.unet.channel_mult=[1, 2]",
        "stage_b.unet.num_res_blocks=1",
        "stage_b.unet.attention_levels=[1]",
        "stage_b.unet.num_heads=2",
        "stage_b.unet.norm_groups=4",
        "stage_b.unet.context_dim=384",
        "stage_b.unet.in_channels=4",
        "stage_b.unet.out_channels=4",
        "stage_b.diffusion.num_timesteps=100",
        "stage_b.batch_size=4",
        "stage_b.shuffle_buffer=8",
        "stage_b.train.max_steps=4",
        "stage_b.train.log_every=1",
        "stage_b.train.image_every=2",
        "stage_b.train.checkpoint_every=2",
        "stage_b.train.max_failures=0",
        "stage_b.sample_steps=3",
        "stage_b.sample_columns=2",
        "stage_b.eval_batches=1",
        "stage_b.scaling.num_workers=1",
        "sample.prompts=[a handwritten digit three, '']",
        "sample.num_per_prompt=2",
        "sample.steps=3",
        "sample.evaluate_digits=false",
    ]


def start_mlflow_server(port: int, root: Path, timeout: float = 120.0):
    """A real `mlflow server` on 127.0.0.1:port over a SQLite store and an artifact folder under `root` (the same
    `root` and port again bring the same server back after it was stopped). Returns the process."""
    import subprocess
    import sys

    from tests.conftest import wait_for_port

    root.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
         "--workers", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_for_port(port, timeout=timeout, proc=proc)
    except Exception:
        stop_process_group(proc)
        raise
    return proc


def stop_process_group(proc) -> None:
    """SIGKILL a process started with start_new_session=True and everything it started (an outage, not a shutdown)."""
    import os
    import signal

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=30)

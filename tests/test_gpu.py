"""GPU smoke test: Stage A and Stage B for a few steps on CUDA through the real entry points, with bf16 autocast and
torch.compile, two DDP ranks (NCCL) when the node has two GPUs, past `disc_start`, a worker killed mid-run and
resumed from its checkpoint, finite losses, and the peak GPU memory within 20% of the memory-budget estimate.

    .venv/bin/python -m pytest -m gpu tests/test_gpu.py

Skipped where CUDA is not available (the dev box). The peak is what the workers log as
`perf/gpu_peak_allocated_gib` (torch.cuda.max_memory_allocated, rank 0): the estimate's `peak_bytes` counts the
same thing, allocated tensors, without the allocator's overhead or the CUDA context.
"""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from pipelines.run import STAGES
from pipelines.train import memory as memory_budget

TRAINING = {stage.name: stage for stage in STAGES if stage.memory is not None}
"""The training stages, by name: what the memory budget estimates."""
from pipelines.config import load_config
from tests.helpers import REPO, mnist_dataset, tiny_later_stages, tiny_overrides

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.slow,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

PEAK_METRIC = "perf/gpu_peak_allocated_gib"
PEAK_TOLERANCE = 0.20


def gpu_overrides(stage: str) -> list[str]:
    """CUDA settings every GPU run here shares: one rank per GPU (two at most), bf16, torch.compile, the GPU's
    own memory for the budget check, a kill at step 3 and a restart from the step-2 checkpoint."""
    ranks = min(torch.cuda.device_count(), 2)
    memory_gib = torch.cuda.get_device_properties(0).total_memory / 2**30
    return [
        f"{stage}.scaling.use_gpu=true",
        f"{stage}.scaling.num_workers={ranks}",
        f"{stage}.scaling.cpus_per_worker=1",
        f"{stage}.scaling.gpu_memory_gib={memory_gib:.2f}",
        f"{stage}.train.mixed_precision=bf16",
        f"{stage}.train.compile=true",
        f"{stage}.optim.fused=true",
        f"{stage}.train.max_steps=6",
        f"{stage}.train.checkpoint_every=2",
        f"{stage}.train.fail_at_step=3",
        f"{stage}.train.max_failures=1",
    ]


def check_run(run_id: str, cfg, stage: str, loss_keys: tuple[str, ...]) -> None:
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    for key in loss_keys:
        history = client.get_metric_history(run_id, key)
        assert history and all(math.isfinite(m.value) for m in history), key
    assert run.data.metrics.get("train/nonfinite_skipped", 0) == 0
    resumed = client.get_metric_history(run_id, "train/resumed_from_step")
    assert [m.value for m in resumed] == [2], "the killed worker group restarts from the step-2 checkpoint"

    peaks = client.get_metric_history(run_id, PEAK_METRIC)
    assert peaks, f"the workers log {PEAK_METRIC} on CUDA"
    measured = max(m.value for m in peaks)
    estimated = memory_budget.estimate(cfg, TRAINING[stage]).peak_gib
    print(f"{stage}: peak allocated {measured:.3f} GiB, estimated {estimated:.3f} GiB on {torch.cuda.get_device_name(0)}")
    assert abs(measured - estimated) <= PEAK_TOLERANCE * estimated, (measured, estimated)


def test_stage_a_on_cuda_bf16_compiled_past_disc_start_resumes_and_stays_within_the_budget(ray_local, mlflow_uri, tmp_path):
    from pipelines.stage_a import run_stage_a

    data_uri = mnist_dataset(tmp_path, limit=256, resolution=128)
    cfg = load_config(REPO / "configs/quickstart.yaml", [
        *tiny_overrides(tmp_path, data_uri),
        # Large enough that activations, not the allocator's fixed costs, make the peak.
        "data.resolution=128", "data.batch_size=8",
        "stage_a.model.base_channels=64", "stage_a.model.norm_groups=32", "stage_a.model.channel_mult=[1, 2, 2]",
        "stage_a.model.gradient_checkpointing=true", "stage_a.loss.disc_start=2",
        *gpu_overrides("stage_a"),
    ])
    result = run_stage_a(cfg)
    check_run(result.run_id, cfg, "stage_a", ("train/rec", "train/g_adv", "train/disc_loss"))
    assert math.isfinite(result.metrics["eval/psnr"]) and result.metrics["scale_factor"] > 0


def test_stage_b_on_cuda_bf16_compiled_resumes_and_stays_within_the_budget(ray_local, mlflow_uri, tmp_path):
    from pipelines.encode_latents import run_encode
    from pipelines.stage_b import run_stage_b
    from tests.test_encode import RESOLUTION, digits_dataset, publish_tiny_autoencoder

    cfg = load_config(REPO / "configs/quickstart.yaml", [
        f"run.output_uri={tmp_path / 'out'}", f"data.uri={digits_dataset(tmp_path)}", f"data.resolution={RESOLUTION}",
        "data.holdout_fraction=0.2", *tiny_later_stages(),
        # Weights, gradients, Adam and EMA of a ~40M U-Net make the peak (the latents here are 8x8).
        "stage_b.unet.model_channels=128", "stage_b.unet.num_heads=4", "stage_b.unet.norm_groups=32",
        "stage_b.unet.gradient_checkpointing=true", "encode.scaling.use_gpu=true",
        *gpu_overrides("stage_b"),
    ])
    publish_tiny_autoencoder(cfg, tmp_path / "ae")
    run_encode(cfg)
    result = run_stage_b(cfg)
    check_run(result.run_id, cfg, "stage_b", ("train/loss",))
    assert math.isfinite(result.metrics["train/loss"])

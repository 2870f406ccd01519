"""pipelines/train/ddp.py on two real gloo ranks: the DDP arguments and the bf16 gradient-compression hook from the config."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from pipelines.config import load_config
from pipelines.train.ddp import configure_ddp, ddp_kwargs
from tests.conftest import REPO, free_port


def _rank(rank: int, port: int, compression: str, out: dict) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        scaling = load_config(REPO / "configs/quickstart.yaml", [f"stage_a.scaling.grad_compression={compression}"]).stage_a.scaling
        torch.manual_seed(0)
        net = torch.nn.Linear(64, 32)
        model = configure_ddp(torch.nn.parallel.DistributedDataParallel(net, **ddp_kwargs(scaling)), scaling)
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(1 + rank)) * (1 + 0.3 * rank)
        model(x).pow(2).sum().backward()
        # The rank's own gradient, for the test to average: the same loss on the plain module.
        own = torch.nn.Linear(64, 32)
        own.load_state_dict(net.state_dict())
        own(x).pow(2).sum().backward()
        out[rank] = {"ddp": net.weight.grad.clone(), "own": own.weight.grad.clone()}
    finally:
        dist.destroy_process_group()


def run_two_ranks(compression: str) -> dict:
    # A spawned manager, not a forked one: forking this process while it holds a Ray driver's threads (the suite's
    # session Ray) made the driver lose its raylet and exit the whole pytest session (2026-11-26, fresh clone).
    with mp.get_context("spawn").Manager() as manager:
        out = manager.dict()
        mp.spawn(_rank, args=(free_port(), compression, out), nprocs=2, join=True)
        return dict(out)


def test_bf16_compression_all_reduces_rounded_gradients_and_none_gives_the_exact_average():
    exact = run_two_ranks("none")
    mean = (exact[0]["own"] + exact[1]["own"]) / 2
    assert torch.allclose(exact[0]["ddp"], mean, rtol=1e-6, atol=1e-6) and torch.equal(exact[0]["ddp"], exact[1]["ddp"])

    compressed = run_two_ranks("bf16")
    grad = compressed[0]["ddp"]
    assert torch.equal(grad, compressed[1]["ddp"])  # every rank steps with the same gradient
    # Each rank's half, its bf16 sum: at most two roundings of 2^-8 relative to the terms (not to their mean,
    # which can cancel).
    assert ((grad - mean).abs() <= 2**-7 * (exact[0]["own"].abs() + exact[1]["own"].abs())).all()
    assert not torch.allclose(grad, mean, rtol=1e-5, atol=1e-6)  # and it was rounded: the hook ran
    assert torch.equal(grad, grad.bfloat16().float())  # the all-reduced bf16 values, widened back to fp32


def test_ddp_kwargs_carry_the_bucket_view_setting_and_the_stage_own_arguments():
    scaling = load_config(REPO / "configs/quickstart.yaml", ["stage_a.scaling.gradient_as_bucket_view=false"]).stage_a.scaling
    assert ddp_kwargs(scaling, forward_sync_buffers=False) == {"gradient_as_bucket_view": False, "forward_sync_buffers": False}
    plain = torch.nn.Linear(2, 2)
    assert configure_ddp(plain, scaling) is plain  # one worker: nothing to configure

"""The shared training loop without a Ray worker group: host syncs per step, the non-finite guard on losses
and gradients (in one process, and in two real gloo DDP processes where only one rank goes bad), the config
fingerprint, and the buffered MLflow logger against a real MLflow server that goes away and comes back."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import ray.train
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ldm_core.config import ConfigError
from pipelines.train.run_logger import RunLogger
from pipelines.config.sections import OptimSection, TrainLoopSection
from pipelines.models.checkpoints import save_checkpoint
from pipelines.train.loop import (TrainLoop, Update, Worker, check_resumable, fingerprint_fields, newest_intact,
                                  poison_nonfinite)
from tests.conftest import free_port

REPO = Path(__file__).resolve().parents[1]
PROJECT_DIRS = (str(REPO / "pipelines"), str(REPO / "ldm_core"))


def _loop(*, accum: int = 1, max_steps: int = 6, log_every: int = 3, clip: float | None = 1.0,
          rank: int = 0, world_size: int = 1) -> TrainLoop:
    train = TrainLoopSection(max_steps=max_steps, log_every=log_every, checkpoint_every=10_000, max_consecutive_nonfinite=3)
    optim = OptimSection(lr=1e-2, grad_accum_steps=accum, grad_clip=clip)
    return TrainLoop({}, train, optim, stage="toy", seed=0, worker=Worker(rank, world_size, torch.device("cpu")))


def _batches(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    while True:
        yield {"x": torch.randn(4, 3, generator=g), "y": torch.randn(4, 2, generator=g)}


def _toy(loop: TrainLoop, bad_step: int | None = None, bad: str = "loss"):
    """Two updates (like Stage A's autoencoder and discriminator) on two linear layers."""
    a, b = torch.nn.Linear(3, 2), torch.nn.Linear(2, 2)
    opt_a, opt_b = loop.adamw(a.parameters(), 1e-2), loop.adamw(b.parameters(), 1e-2)
    loop.resume(modules={"a": a, "b": b}, optimizers={"opt_a": opt_a, "opt_b": opt_b})
    fire = {"pending": bad_step is not None}  # goes bad once, on the first attempt at bad_step

    def loss_a(batch, step):
        out = a(batch["x"])
        batch["out"] = out.detach()
        loss = (out - batch["y"]).pow(2).mean()
        if step == bad_step and fire["pending"]:
            fire["pending"] = False
            if bad == "loss":  # a non-finite loss whose gradient alone would look finite
                loss = loss + float("nan")
            else:  # a finite loss whose gradient is not
                handle = a.weight.register_hook(lambda g: (handle.remove(), torch.full_like(g, float("nan")))[1])
        return loss, {"loss": loss.detach()}

    def loss_b(batch, step):
        loss = b(batch["out"]).pow(2).mean()
        return loss, {"loss_b": loss.detach()}

    return (a, b), [Update(a, opt_a, 1e-2, loss_a), Update(b, opt_b, 1e-2, loss_b, starts_at=2, name="b")]


class SyncCounter:
    """Counts the calls made from this project's code that read a tensor's value back to the host."""

    METHODS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__")

    def __init__(self):
        self.calls: list[str] = []
        self._saved = {}

    def __enter__(self):
        for name in self.METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original

            def wrapper(tensor, *args, _original=original, _name=name, **kwargs):
                caller = sys._getframe(1).f_code.co_filename
                if caller.startswith(PROJECT_DIRS):
                    self.calls.append(f"{_name} at {Path(caller).name}:{sys._getframe(1).f_lineno}")
                return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)


@pytest.mark.parametrize("accum", [1, 4])
def test_host_syncs_are_one_per_update_per_step_plus_one_per_logging_step(accum):
    loop = _loop(accum=accum, max_steps=6, log_every=3)
    _, updates = _toy(loop)
    with SyncCounter() as syncs:
        steps = list(loop.run(updates, _batches(), samples_per_batch=4))
    assert steps == [1, 2, 3, 4, 5, 6]
    # Update a runs at steps 0-5, update b from step 2 on: 6 + 4 skip decisions; logging at steps 3 and 6.
    guard_calls = [c for c in syncs.calls if "rank.py" in c]
    log_calls = [c for c in syncs.calls if "loop.py" in c]
    assert len(guard_calls) == 10, syncs.calls
    assert len(log_calls) == 2, syncs.calls
    assert len(syncs.calls) == 12, syncs.calls  # nothing else, however many micro-batches
    assert set(loop.metrics) >= {"train/loss", "train/loss_b", "train/grad_norm", "train/grad_norm_b", "perf/images_per_s"}


@pytest.mark.parametrize("bad", ["loss", "grad"])
def test_a_non_finite_loss_or_gradient_skips_the_step_without_touching_weights_or_adam(bad):
    loop = _loop(max_steps=5, log_every=1)
    (a, b), updates = _toy(loop, bad_step=2, bad=bad)
    snapshots = {}
    for step in loop.run(updates, _batches(), samples_per_batch=4):
        snapshots[step] = a.weight.detach().clone()
        assert all(torch.isfinite(p).all() for p in (*a.parameters(), *b.parameters()))
    assert loop.step == 5 and loop.guard.total == 1
    # The bad step was not counted: Adam took exactly 5 steps on each parameter of `a`, and `b` started at 2.
    assert {int(s["step"]) for s in updates[0].optimizer.state.values()} == {5}
    assert {int(s["step"]) for s in updates[1].optimizer.state.values()} == {3}
    assert loop.metrics["train/nonfinite_skipped"] == 1


def test_consecutive_non_finite_steps_stop_the_run():
    loop = _loop(max_steps=10)
    a = torch.nn.Linear(3, 2)
    opt = loop.adamw(a.parameters(), 1e-2)
    loop.resume(modules={"a": a}, optimizers={"opt": opt})
    update = Update(a, opt, 1e-2, lambda batch, step: (a(batch["x"]).sum() * float("inf"), {}))
    with pytest.raises(RuntimeError, match="max_consecutive_nonfinite=3"):
        list(loop.run([update], _batches(), samples_per_batch=4))
    assert all(torch.isfinite(p).all() for p in a.parameters())


def test_poisoned_loss_has_nan_gradients_and_leaves_finite_losses_alone():
    w = torch.ones(3, requires_grad=True)
    poison_nonfinite((w * 2).sum()).backward()
    assert torch.equal(w.grad, torch.full((3,), 2.0))
    w.grad = None
    poison_nonfinite((w * float("inf")).sum()).backward()
    assert torch.isnan(w.grad).all()


def _ddp_worker(rank: int, port: int, results):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    try:
        loop = _loop(max_steps=4, log_every=1, rank=rank, world_size=2)
        model = torch.nn.Linear(3, 2)
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = loop.adamw(model.parameters(), 1e-2)
        loop.resume(modules={"m": model}, optimizers={"opt": opt})
        fired: list[int] = []

        def loss(batch, step):
            value = (ddp(batch["x"]) - batch["y"]).pow(2).mean()
            if rank == 1 and step == 1 and not fired:  # only this rank goes bad, once
                fired.append(step)
                value = value + float("inf")  # its gradient alone would look finite
            return value, {"loss": value.detach()}

        list(loop.run([Update(ddp, opt, 1e-2, loss)], _batches(seed=rank), samples_per_batch=4))
        results[rank] = (loop.guard.total, loop.step, torch.cat([p.detach().flatten() for p in model.parameters()]))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_agree_to_skip_when_only_one_rank_is_non_finite():
    port = free_port()
    # A spawned manager, not a forked one: forking this process, which holds a Ray driver's threads, once made the
    # driver lose its raylet and exit the whole session (tests/test_ddp.py, 2026-11-26).
    with mp.get_context("spawn").Manager() as manager:
        results = manager.dict()
        mp.spawn(_ddp_worker, args=(port, results), nprocs=2, join=True)
        results = dict(results)
    (skipped0, step0, params0), (skipped1, step1, params1) = results[0], results[1]
    assert (skipped0, step0) == (1, 4) and (skipped1, step1) == (1, 4)
    assert torch.equal(params0, params1)  # no rank stepped alone: the replicas never diverged


def test_fingerprint_ignores_how_long_and_how_often_but_not_what_is_trained(tmp_path):
    base = {"stage_a": {"optim": {"lr": 1e-4}, "train": {"max_steps": 100, "log_every": 10}}, "run": {"seed": 0}}
    longer = {"stage_a": {"optim": {"lr": 1e-4}, "train": {"max_steps": 500, "log_every": 5}}, "run": {"seed": 0}}
    changed = {"stage_a": {"optim": {"lr": 2e-4}, "train": {"max_steps": 100, "log_every": 10}}, "run": {"seed": 0}}
    assert fingerprint_fields(base, "stage_a") == fingerprint_fields(longer, "stage_a")

    ckpt = tmp_path / "ckpts" / "run-stage_a" / "checkpoint_2026-11-25_10-00-00.000000"
    ckpt.mkdir(parents=True)
    (ckpt / "meta.json").write_text(__import__("json").dumps({"step": 40, "fingerprint": fingerprint_fields(base, "stage_a")}))
    assert check_resumable(str(tmp_path / "ckpts"), "run-stage_a", fingerprint_fields(longer, "stage_a"))["step"] == 40
    with pytest.raises(ConfigError, match=r"stage_a.optim.lr: 0.0001 -> 0.0002.*run.name.*resume_changed_config=true"):
        check_resumable(str(tmp_path / "ckpts"), "run-stage_a", fingerprint_fields(changed, "stage_a"))
    assert check_resumable(str(tmp_path / "ckpts"), "run-stage_a", fingerprint_fields(changed, "stage_a"),
                           allow_changed=True)["step"] == 40
    assert check_resumable(str(tmp_path / "ckpts"), "other-stage_a", fingerprint_fields(changed, "stage_a")) is None


def test_buffered_logger_memory_is_bounded(tmp_path):
    logger = RunLogger("http://127.0.0.1:9", "no-such-run", max_pending=5, max_pending_images=2, max_backoff_s=0.2)
    for step in range(50):
        logger.log_metrics({"m": float(step)}, step)
    for i in range(5):
        logger.log_image(torch.zeros(2, 2, 3, dtype=torch.uint8).numpy(), f"img{i}.png")
    assert logger.pending() <= 5 + 1  # the bound, plus the one call in flight
    assert logger.dropped >= 45


def test_a_truncated_checkpoint_falls_back_to_the_newest_intact_one_naming_the_damaged_file(tmp_path):
    model = torch.nn.Linear(4, 3)
    for i, step in enumerate((2, 4, 6)):
        save_checkpoint(tmp_path / f"checkpoint_00000{i}", modules={"model": model}, meta={"step": step})
    newest = tmp_path / "checkpoint_000002"
    intact = ray.train.Checkpoint(str(newest))
    assert newest_intact(intact) == (intact, "")

    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])  # a copy cut short
    chosen, why = newest_intact(ray.train.Checkpoint(str(newest)))
    assert chosen.path == str(tmp_path / "checkpoint_000001")
    assert why.startswith(f"checkpoint {newest} is damaged (model.safetensors: ") and why.endswith("(step 4)"), why

    for older in ("checkpoint_000000", "checkpoint_000001"):
        (tmp_path / older / "meta.json").write_text("{")
    chosen, why = newest_intact(ray.train.Checkpoint(str(newest)))
    assert chosen is None and why.endswith("no intact one is left: training from step 0")

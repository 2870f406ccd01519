"""How the training stages wrap their networks in DistributedDataParallel: construction arguments and the
gradient-communication hook, both from the stage's `scaling` section.

    model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs=ddp_kwargs(scaling))
    configure_ddp(model, scaling)

`gradient_as_bucket_view` makes each gradient a view into DDP's all-reduce bucket, so a GPU holds one fp32 copy
of the gradients instead of two. `grad_compression: bf16` registers PyTorch's `bf16_compress_hook`: each bucket
is cast to bfloat16, all-reduced (half the bytes on the wire) and divided by the world size, then written back
to the fp32 gradients; what the optimiser sees is the fp32 average of bf16-rounded gradients.
"""

from __future__ import annotations

from torch import nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import bf16_compress_hook

from pipelines.config.sections import ScalingSection

__all__ = ["ddp_kwargs", "configure_ddp"]


def ddp_kwargs(scaling: ScalingSection, **extra) -> dict:
    """DistributedDataParallel keyword arguments for this section (plus the stage's own, e.g. forward_sync_buffers)."""
    return {"gradient_as_bucket_view": scaling.gradient_as_bucket_view, **extra}


def configure_ddp(model: nn.Module, scaling: ScalingSection) -> nn.Module:
    """Register the configured gradient-communication hook on a DDP-wrapped model (call it once, right after
    prepare_model, before the first backward). A model that is not wrapped (one worker) is returned as it is."""
    if isinstance(model, nn.parallel.DistributedDataParallel) and scaling.grad_compression == "bf16":
        model.register_comm_hook(state=None, hook=bf16_compress_hook)
    return model

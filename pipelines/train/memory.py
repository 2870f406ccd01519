"""Memory-budget check: the estimated peak GPU memory of one training worker, against the GPU the config names.

    python pipelines/run.py --config configs/sd_f8.yaml --memory     # every training stage's breakdown

Each training stage's `check` calls `check_memory_budget(cfg, STAGE)` before any cluster work; a config whose estimate does
not fit its GPU fails with one line naming the estimate, the GPU and what to change.

What one rank holds at its peak (bytes, P = parameter count of a model):

* persistent: fp32 weights 4P of every model it runs (trainable and frozen: the autoencoder, the
  discriminator, LPIPS, the U-Net), fp32 gradients 4P and AdamW's two moments 8P of every trained model, the
  fp32 EMA 4P, and under DDP (more than one worker) the gradient buckets 4P, unless
  `scaling.gradient_as_bucket_view` makes the gradients views into them;
* activations: the tensors autograd keeps for the backward pass, measured once per estimate by running the
  stage's forward on fake tensors (`FakeTensorMode`: shapes and dtypes, no memory) with CUDA's own bf16 autocast
  rules when the stage uses them, each storage counted once. With gradient checkpointing on, that is the
  checkpointed blocks' inputs; the backward then recomputes one block at a time, when the inputs of the blocks
  after it are already freed: the worst block's own activations (measured in a second fake run without
  checkpointing) plus what was saved before it. Attention is counted as CUDA's fused kernels keep it (q, k, v,
  output, log-sum-exp), not as the math path's probabilities. Checked on an H200 (benchmarks/bench_gpu.py, no
  checkpointing): within 2% of the measured peak for Stage A and Stage B (tests/test_memory_budget.py);
* the backward's working set: two of the largest saved tensors (the gradient flowing in and the one flowing
  out);
* the optimiser step, after the activations are gone: foreach AdamW (`optim.fused=false`) allocates
  temporaries as large as the parameters of the model it steps (4P); fused AdamW none.

The peak is the larger of "persistent + activations + recompute + backward working set" and "persistent +
optimiser temporaries". The GPU must hold that peak plus `ALLOCATOR_OVERHEAD` of it (the caching allocator's
reserved-but-unallocated blocks) plus `CUDA_RESERVED_GIB` outside the allocator (CUDA context, cuBLAS/cuDNN
workspaces, NCCL buffers). Not counted: torch.compile's fusions (they lower the real activations, so the
eager estimate errs on the safe side), the data batch itself and other transient per-op buffers; the
gradient-clipping norms (one scalar per tensor); the bf16 gradient-compression copy of one 25 MB bucket.

tests/test_memory_budget.py checks the estimate against the real peak resident memory of a training step on
the CPU at small size, and runs the check on every config in configs/.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode

from ldm_core.autoencoder import AutoencoderKL
from ldm_core.config import ConfigError
from ldm_core.discriminator import NLayerDiscriminator
from ldm_core.unet import UNet
from pipelines.config import PipelineConfig
from pipelines.models import lora
from pipelines.platform.runtime import exit_on
from pipelines.config.sections import GPU_MEMORY_GIB, ScalingSection

if TYPE_CHECKING:
    from pipelines.dag.stage import Stage

__all__ = ["MemoryBudget", "estimate", "check_memory_budget", "ALLOCATOR_OVERHEAD", "CUDA_RESERVED_GIB"]

GIB = 2**30
FP32 = 4
ALLOCATOR_OVERHEAD = 0.10
"""Fraction of the allocated peak that PyTorch's caching allocator holds on top (reserved, fragmented blocks)."""
CUDA_RESERVED_GIB = 1.0
"""GPU memory outside the allocator: the CUDA context, cuBLAS/cuDNN workspaces and NCCL's buffers."""
TEXT_TOKENS = 77
"""Context length assumed for Stage B's text states (CLIP's 77; the MiniLM default pads to fewer)."""


@dataclass
class MemoryBudget:
    """The estimate for one stage's worker, every component in bytes."""

    stage: str
    components: dict[str, float]
    peak_bytes: float
    step_bytes: float
    """Peak of the optimiser step (persistent + optimiser temporaries), part of `peak_bytes`' max."""
    gpu: str | None = None
    capacity_gib: float | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def peak_gib(self) -> float:
        return self.peak_bytes / GIB

    @property
    def required_gib(self) -> float:
        """What the GPU must have: the peak, the allocator's overhead and the memory outside the allocator."""
        return self.peak_gib * (1 + ALLOCATOR_OVERHEAD) + CUDA_RESERVED_GIB

    @property
    def fits(self) -> bool | None:
        return None if self.capacity_gib is None else self.required_gib <= self.capacity_gib

    def table(self) -> str:
        lines = [f"{self.stage}: estimated peak {self.peak_gib:.2f} GiB per GPU "
                 f"(needs {self.required_gib:.2f} GiB with the allocator's {ALLOCATOR_OVERHEAD:.0%} and "
                 f"{CUDA_RESERVED_GIB:g} GiB outside it)"]
        lines += [f"  {name:28s} {value / GIB:8.2f} GiB" for name, value in self.components.items()]
        if self.capacity_gib is not None:
            verdict = "fits" if self.fits else "DOES NOT FIT"
            lines.append(f"  GPU {self.gpu or 'as configured'}: {self.capacity_gib:g} GiB -> {verdict}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------
# Measuring saved activations on fake tensors.
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cuda_autocast_rules(enabled: bool) -> Iterator[None]:
    """CUDA's bf16 autocast, set directly: `torch.autocast("cuda")` turns itself off on a machine without a GPU,
    but the dispatcher applies CUDA's op lists to (fake) CUDA tensors all the same."""
    if not enabled:
        yield
        return
    previous = torch.is_autocast_enabled("cuda"), torch.get_autocast_dtype("cuda")
    torch.set_autocast_enabled("cuda", True)
    torch.set_autocast_dtype("cuda", torch.bfloat16)
    torch.autocast_increment_nesting()
    try:
        yield
    finally:
        if torch.autocast_decrement_nesting() == 0:
            torch.clear_autocast_cache()
        torch.set_autocast_enabled("cuda", previous[0])
        torch.set_autocast_dtype("cuda", previous[1])


@dataclass
class _Activations:
    retained: float = 0.0
    """Bytes of the distinct storages autograd keeps after the forward."""
    largest: float = 0.0
    """Bytes of the largest such storage."""
    recompute_peak: float = 0.0
    """With checkpointing: the most that is alive while the backward recomputes one block, i.e. the retained bytes
    saved before that block (the later ones are freed by then) plus the block's own activations."""


class _SavedTensorProbe:
    """Records the storages saved for backward (each once) and which module's forward saved them.

    With `find_blocks`, a module whose forward starts under someone else's saved-tensor hooks (a checkpoint's)
    while its parent's did not is recorded as a checkpointed block. With `blocks` given, what a block saves
    beyond what existed when it started is attributed to it."""

    def __init__(self, names: dict[int, str], params: set[int], blocks: set[str] | None = None):
        self.names = names
        self.params = params
        self.blocks = blocks or set()
        self.found_blocks: set[str] = set()
        self.retained_at: dict[str, int] = {}
        self.saved: dict[int, int] = {}
        self.per_block: dict[str, dict[int, int]] = {}
        self._stack: list[tuple[str, bool, set[int]]] = []

    def pack(self, t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key, size = storage._cdata, storage.nbytes()
        if key in self.params:  # a weight itself (fp32, no autocast copy): counted with the weights
            return t
        for name, _, before in self._stack:
            if name in self.blocks and key not in before:
                self.per_block.setdefault(name, {})[key] = size
        self.saved[key] = size
        return t

    def _pre(self, module: nn.Module, args) -> None:
        name = self.names.get(id(module), "")
        top = torch._C._autograd._top_saved_tensors_default_hooks(False)
        inside = top is not None and top[0] != self.pack  # (bound methods: equal, never identical)
        if inside and name and not any(flag for _, flag, _ in self._stack):
            self.found_blocks.add(name)
            self.retained_at[name] = sum(self.saved.values())  # what is still alive when its recompute runs
        self._stack.append((name, inside, set(self.saved) if name in self.blocks else set()))

    def _post(self, module: nn.Module, args, output) -> None:
        self._stack.pop()

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        pre = nn.modules.module.register_module_forward_pre_hook(self._pre)
        post = nn.modules.module.register_module_forward_hook(self._post)
        try:
            with torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t):
                yield
        finally:
            pre.remove()
            post.remove()


def _fused_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
    """`F.scaled_dot_product_attention` as CUDA runs it: a fused kernel that keeps q, k, v, the output and one
    log-sum-exp per query row for the backward. A fake run would otherwise decompose it into the math path and
    count the (B, heads, Lq, Lk) probabilities (fp32 under autocast), which a GPU never holds: measured on an
    H200, that made the SD-2-sized U-Net's estimate 31% too high."""
    bias = attn_mask
    if attn_mask is not None and attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=q.dtype, device=q.device).masked_fill(~attn_mask, float("-inf"))
    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, dropout_p, is_causal, scale=scale)[0]


@contextlib.contextmanager
def _cuda_attention(enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _fused_attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


Builder = Callable[[bool, Callable[[], contextlib.AbstractContextManager]], tuple[list[tuple[str, nn.Module]], Callable[[], object]]]


def _measure(build: Builder, checkpointing: bool, device: str, bf16: bool) -> _Activations:
    """Run `build(checkpointing, autocast)` -> (named models, forward) on fake tensors and measure what the
    forward keeps; `autocast()` is the context the stage's forward runs its network under.

    With checkpointing a second fake run without it gives each checkpointed block's own activations."""
    amp = lambda: _cuda_autocast_rules(bf16 and device == "cuda")  # noqa: E731

    def run(ckpt: bool, blocks: set[str] | None) -> _SavedTensorProbe:
        with FakeTensorMode(), torch.device(device), _cuda_attention(device == "cuda"):
            models, forward = build(ckpt, amp)
            names = {id(m): f"{prefix}.{n}" for prefix, model in models for n, m in model.named_modules() if n}
            params = {p.untyped_storage()._cdata for _, model in models for p in model.parameters()}
            probe = _SavedTensorProbe(names, params, blocks)
            with probe.recording():
                keep = forward()  # noqa: F841 (the outputs keep the graph, and with it every saved storage, alive)
            return probe

    first = run(checkpointing, None)
    result = _Activations(retained=float(sum(first.saved.values())), largest=float(max(first.saved.values(), default=0)))
    if checkpointing and first.found_blocks:
        second = run(False, first.found_blocks)
        result.recompute_peak = max((first.retained_at[name] + float(sum(s.values()))
                                     for name, s in second.per_block.items()), default=0.0)
        result.largest = max(result.largest, float(max(second.saved.values(), default=0)))
    return result


# ----------------------------------------------------------------------------------------------------
# The stages.
# ----------------------------------------------------------------------------------------------------


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_params(make: Callable[[], nn.Module]) -> int:
    with FakeTensorMode(), torch.device("cpu"):
        return _params(make())


def _lpips_network(net: str, device: torch.device | None = None) -> nn.Module:
    """The LPIPS architecture (backbone and linear heads), nothing loaded: shapes are all the estimate needs."""
    import lpips

    module = lpips.LPIPS(net=net, pnet_rand=True, pretrained=False, verbose=False)
    if device is not None:  # its input-scaling buffers come from the legacy constructor, which ignores the default device
        scaling = module.scaling_layer
        scaling.shift, scaling.scale = scaling.shift.to(device), scaling.scale.to(device)
    return module.eval().requires_grad_(False)


def _trained(name: str, params: int, *, scaling: ScalingSection, ema: bool) -> dict[str, float]:
    """Persistent bytes of one trained model: weights, gradients (or DDP buckets), Adam moments, EMA."""
    ddp = scaling.num_workers > 1
    out = {f"{name} weights": FP32 * params, f"{name} grads": FP32 * params, f"{name} Adam moments": 2 * FP32 * params}
    if ddp and not scaling.gradient_as_bucket_view:
        out[f"{name} DDP buckets"] = FP32 * params
    if ema:
        out[f"{name} EMA"] = FP32 * params
    return out


def _assemble(stage: str, persistent: dict[str, float], act: _Activations, step_params: list[int],
              fused: bool, notes: list[str]) -> MemoryBudget:
    recompute = max(act.recompute_peak - act.retained, 0.0)
    working = 2 * act.largest
    optimizer_temp = 0.0 if fused else FP32 * max(step_params)
    components = dict(persistent)
    components["activations (saved for backward)"] = act.retained
    if recompute:
        components["checkpoint recompute (peak block)"] = recompute
    components["backward working set"] = working
    components["optimizer step temporaries"] = optimizer_temp
    base = sum(persistent.values())
    backward = base + act.retained + recompute + working
    step = base + optimizer_temp
    return MemoryBudget(stage=stage, components=components, peak_bytes=max(backward, step), step_bytes=step, notes=notes)


def estimate_stage_a(cfg: PipelineConfig, device: str = "cuda") -> MemoryBudget:
    """Stage A's autoencoder update after `disc_start` (its heaviest step): the autoencoder's forward (autocast),
    then LPIPS and the discriminator on the reconstruction (fp32). The discriminator's own update comes after the
    autoencoder's activations are freed and keeps far less (the discriminator's activations only)."""
    sa = cfg.stage_a
    batch, (height, width) = cfg.data.batch_size, cfg.data.largest  # the bucket of most pixels
    bf16 = sa.scaling.use_gpu and sa.train.mixed_precision == "bf16"
    use_lpips = sa.loss.perceptual_weight > 0
    use_disc = sa.loss.disc_weight > 0 and sa.train.max_steps > sa.loss.disc_start

    def build(ckpt: bool, amp):
        model = AutoencoderKL(sa.model.model_copy(update={"gradient_checkpointing": ckpt}))
        disc = NLayerDiscriminator(sa.discriminator)
        x = torch.randn(batch, sa.model.in_channels, height, width)
        lpips_net = _lpips_network(sa.lpips.net, x.device) if use_lpips else None

        def forward():
            with amp():
                recon, posterior = model(x)
            recon = recon.float()  # the losses run in fp32, outside autocast
            loss = (x - recon).abs().mean() + posterior.kl().mean()
            if lpips_net is not None:
                loss = loss + lpips_net(x, recon).mean()
            if use_disc:
                loss = loss - disc(recon).mean()
            return loss

        models = [("autoencoder", model), ("discriminator", disc)] + ([("lpips", lpips_net)] if lpips_net else [])
        return models, forward

    act = _measure(build, sa.model.gradient_checkpointing, device, bf16)
    p_ae = _count_params(lambda: AutoencoderKL(sa.model))
    p_disc = _count_params(lambda: NLayerDiscriminator(sa.discriminator))
    persistent = _trained("autoencoder", p_ae, scaling=sa.scaling, ema=bool(sa.train.ema_decay))
    if use_disc:
        persistent |= _trained("discriminator", p_disc, scaling=sa.scaling, ema=False)
    else:
        persistent["discriminator weights"] = FP32 * p_disc
    if use_lpips:
        persistent[f"LPIPS-{sa.lpips.net} weights (frozen)"] = FP32 * _count_params(lambda: _lpips_network(sa.lpips.net))
    notes = [f"batch {batch} x {height}x{width} px per worker, {'bf16 autocast' if bf16 else 'fp32'}, "
             f"gradient checkpointing {'on' if sa.model.gradient_checkpointing else 'off'}, "
             f"{'fused' if sa.optim.fused else 'foreach'} AdamW"]
    return _assemble("stage_a", persistent, act, [p_ae, p_disc], sa.optim.fused, notes)


@contextlib.contextmanager
def _adapters_made_in_place() -> Iterator[None]:
    """peft moves each new adapter to its base layer's device and dtype with `Module.to`, which fake parameters cannot
    take (torch 2.14: "_apply(): Couldn't swap"); in a fake build they are made on that device, in fp32, already, so
    `to` is the identity while they are attached."""
    original = nn.Module.to
    nn.Module.to = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        nn.Module.to = original


def estimate_stage_b(cfg: PipelineConfig, device: str = "cuda") -> MemoryBudget:
    """Stage B: the U-Net's forward (autocast) on a batch of latents with `TEXT_TOKENS` text states. With
    `stage_b.lora` the base is frozen (its weights only, bf16 on GPUs unless `lora.base_precision=fp32`) and the
    adapters alone carry gradients, Adam moments, EMA and DDP buckets; the fake forward runs the adapted U-Net, so
    the activations are what a frozen base keeps for the adapters' gradients."""
    sb = cfg.stage_b
    f = cfg.stage_a.model.downsample_factor
    lat_h, lat_w = cfg.data.largest[0] // f, cfg.data.largest[1] // f  # the bucket of most pixels
    bf16 = sb.scaling.use_gpu and sb.train.mixed_precision == "bf16"
    base_bf16 = bool(sb.lora) and sb.scaling.use_gpu and sb.lora.base_precision == "bf16"

    def make(ckpt: bool = False) -> nn.Module:
        model = UNet(sb.unet.model_copy(update={"gradient_checkpointing": ckpt}))
        if sb.lora:
            with _adapters_made_in_place():
                model = lora.attach(model, sb.lora)
            if base_bf16:
                lora.cast_base(model, torch.bfloat16)
        return model

    def build(ckpt: bool, amp):
        model = make(ckpt)
        x = torch.randn(sb.batch_size, sb.unet.in_channels, lat_h, lat_w)
        t = torch.zeros(sb.batch_size, dtype=torch.long)
        context = torch.randn(sb.batch_size, TEXT_TOKENS, sb.unet.context_dim)
        mask = torch.ones(sb.batch_size, TEXT_TOKENS, dtype=torch.bool)

        def forward():
            with amp():
                pred = model(x, t, context, mask)
            return (pred.float() - x).pow(2).mean()

        return [("unet", model)], forward

    act = _measure(build, sb.unet.gradient_checkpointing, device, bf16)
    notes = [f"batch {sb.batch_size} x {lat_h}x{lat_w} latents per worker, {'bf16 autocast' if bf16 else 'fp32'}, "
             f"gradient checkpointing {'on' if sb.unet.gradient_checkpointing else 'off'}, "
             f"{'fused' if sb.optim.fused else 'foreach'} AdamW"]
    if not sb.lora:
        p_unet = _count_params(lambda: UNet(sb.unet))
        persistent = _trained("unet", p_unet, scaling=sb.scaling, ema=bool(sb.train.ema_decay))
        return _assemble("stage_b", persistent, act, [p_unet], sb.optim.fused, notes)
    with FakeTensorMode(), torch.device("cpu"):
        params = list(make().parameters())
    p_base = sum(p.numel() for p in params if not p.requires_grad)
    p_adapters = sum(p.numel() for p in params if p.requires_grad)
    persistent = {f"unet base weights (frozen, {'bf16' if base_bf16 else 'fp32'})": (2 if base_bf16 else FP32) * p_base}
    persistent |= _trained("LoRA adapters", p_adapters, scaling=sb.scaling, ema=bool(sb.train.ema_decay))
    notes.append(f"LoRA rank {sb.lora.rank} on {', '.join(sb.lora.target_modules)}: {p_adapters / 1e6:.2f}M trained "
                 f"parameters of {(p_base + p_adapters) / 1e6:.1f}M")
    return _assemble("stage_b", persistent, act, [p_adapters], sb.optim.fused, notes)


def estimate(cfg: PipelineConfig, stage: "Stage", device: str = "cuda") -> MemoryBudget:
    """The estimate of a training stage (its `Stage.memory`), with the configured GPU's capacity filled in."""
    if stage.memory is None:
        raise ValueError(f"stage {stage.name!r} has no memory estimate (not a training stage)")
    budget = stage.memory(cfg, device)
    scaling: ScalingSection = getattr(cfg, stage.name).scaling
    budget.gpu = scaling.gpu_type
    budget.capacity_gib = scaling.gpu_capacity_gib()
    return budget


def check_memory_budget(cfg: PipelineConfig, stage: "Stage", budget: MemoryBudget | None = None) -> MemoryBudget | None:
    """Before any cluster work: the stage's estimated peak per GPU (`budget`, else estimated here) must fit the
    configured GPU. Raises ConfigError (one line) when it does not, or when a GPU stage names no GPU; None for CPU
    stages."""
    section = stage.name
    scaling: ScalingSection = getattr(cfg, section).scaling
    if not scaling.use_gpu:
        return None
    if scaling.gpu_capacity_gib() is None:
        raise ConfigError(f"{section}.scaling: use_gpu=true needs gpu_type (one of {', '.join(GPU_MEMORY_GIB)}) or "
                          f"gpu_memory_gib for the memory-budget check")
    budget = budget or estimate(cfg, stage)
    if not budget.fits:
        parts = sorted(budget.components.items(), key=lambda kv: -kv[1])[:3]
        top = ", ".join(f"{name} {value / GIB:.1f}" for name, value in parts)
        raise ConfigError(
            f"{section}: estimated peak {budget.peak_gib:.1f} GiB per GPU (needs {budget.required_gib:.1f} GiB) exceeds "
            f"the {budget.gpu or 'configured GPU'}'s {budget.capacity_gib:g} GiB (largest: {top} GiB); turn on gradient "
            f"checkpointing, lower the batch and raise optim.grad_accum_steps, set optim.fused=true, or pick a larger "
            f"{section}.scaling.gpu_type (python pipelines/run.py --memory shows the breakdown)"
        )
    return budget


def print_budgets(stages: "tuple[Stage, ...]", cfg: PipelineConfig) -> None:
    """`run.py --memory`: every training stage's estimate; exits with the check's one-line error if a GPU stage
    does not fit."""
    budgets = [(stage, estimate(cfg, stage)) for stage in stages if stage.memory is not None]
    for _, budget in budgets:
        print(budget.table())
    with exit_on(ConfigError):
        for stage, budget in budgets:
            check_memory_budget(cfg, stage, budget)

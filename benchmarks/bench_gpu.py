"""Training-step throughput on the CUDA device present: our networks next to diffusers' at the same configs.

    python benchmarks/bench_gpu.py                      # everything, a table at the end
    python benchmarks/bench_gpu.py --only unet --unet-batch 64 --json results.jsonl

(a) Stage A: the f=8 autoencoder of configs/sd_f8.yaml at 256 px, one whole Stage A step past `disc_start`:
    bf16 autocast forward, L1 + LPIPS-VGG + KL + PatchGAN generator loss with the adaptive weight (its two
    gradient norms), backward, fused AdamW, EMA, then the discriminator's own update. diffusers' `AutoencoderKL`
    of the same shape (ldm_core.convert) runs through the identical step.
(b) Stage B: an SD-2-base-sized U-Net (865M parameters: 320 channels, 1-2-4-4, head width 64, 1024-wide
    context) on 32x32x4 latents with 77x1024 text states: bf16 autocast, eps loss, backward, fused AdamW, EMA,
    with and without `torch.compile`; diffusers' `UNet2DConditionModel` of the same shape through the same step.

(c) Encode: what one encode actor of configs/sd_f8.yaml does per batch (pipelines/encode_latents.py's LatentEncoder,
    fp32 as it runs, TF32 on): the f=8 autoencoder's encoder (posterior mean and std) on 256-px images, and a CLIP
    ViT-L/14-shaped text tower (123M, randomly initialised: no download) on 77-token captions. Its images/s give
    benchmarks/SCALE.md's encode GPU-hours:

    python benchmarks/bench_gpu.py --only encode --encode-batch 64 --json results.jsonl

Inputs are random tensors made once on the GPU (the data path is measured by bench_data_reader.py): this is the
compute of one rank. LPIPS uses a randomly initialised VGG (the same FLOPs as the pretrained one; no weights
are downloaded). Each row: `--warmup` steps (compilation included), then `--steps` timed steps between two
`torch.cuda.synchronize()`; the peak is `torch.cuda.max_memory_allocated` over the timed steps, to compare with
`python pipelines/run.py --memory`. Configurations still waiting when `--deadline-s` has passed are skipped
and reported as such. Without a CUDA device it says so and exits with status 0.

Each training row also gives its FLOPs per step and its model FLOP utilisation (MFU): the FLOPs of one eager
step, forward and backward, as torch.utils.flop_counter.FlopCounterMode counts them on the meta device
(`step_flops`: no GPU, no memory, seconds), over (step time x the chip's dense bf16 peak, BF16_DENSE_PEAKS); a
chip not in that table gets no MFU, and says so. The compiled rows share the eager step's count. The counts
alone, without a GPU:

    python benchmarks/bench_gpu.py --count-flops [--only unet] [--unet-batch 64] [--json flops.jsonl]

`--profile` follows each GPU training row whose MFU is under 45% (issue 32's target for the compiled U-Net)
with 3 steps under torch.profiler and prints the kernels the step's GPU time went to:

    python benchmarks/bench_gpu.py --only unet --no-diffusers --profile --json results.jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import re
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, ContextManager

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL  # noqa: E402
from ldm_core.discriminator import DiscriminatorConfig, NLayerDiscriminator  # noqa: E402
from ldm_core.ema import EMA  # noqa: E402
from ldm_core.losses import AutoencoderLossConfig  # noqa: E402
from ldm_core.unet import UNet, UNetConfig  # noqa: E402
from pipelines.train.steps import autoencoder_loss, denoising_loss, discriminator_update_loss  # noqa: E402

# configs/sd_f8.yaml's autoencoder (without gradient checkpointing: one 80 GB GPU holds it) and loss.
SD_F8_AE = AutoencoderConfig(base_channels=128, channel_mult=[1, 2, 4, 4], num_res_blocks=2, norm_groups=32,
                             mid_attention=True, latent_channels=4, kind="kl")
SD_F8_LOSS = AutoencoderLossConfig(pixel_loss="l1", perceptual_weight=1.0, kl_weight=1e-6, disc_weight=0.5,
                                   disc_start=0, disc_loss="hinge")
# Stable Diffusion 2 base: 865M parameters.
SD2_UNET = UNetConfig(model_channels=320, channel_mult=[1, 2, 4, 4], num_res_blocks=2, attention_levels=[0, 1, 2],
                      head_dim=64, context_dim=1024, norm_groups=32, transformer_norm_eps=1e-6)
# CLIP ViT-L/14's text tower (openai/clip-vit-large-patch14, what configs/sd_f8.yaml encodes captions with).
CLIP_L_TEXT = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
               "max_position_embeddings": 77, "projection_dim": 768, "vocab_size": 49408}
CONTEXT_LEN = 77
IMAGE_SIZE, LATENT_SIZE = 256, 32
DEVICE = torch.device("cuda")  # --device cpu only checks that the script runs


@dataclass
class Row:
    bench: str
    impl: str
    compiled: bool
    batch: int
    params_m: float
    steps_per_s: float = float("nan")
    images_per_s: float = float("nan")
    peak_gib: float = float("nan")
    warmup_s: float = float("nan")
    gflop_per_step: float = float("nan")
    mfu: float = float("nan")
    note: str = ""


def params_m(*modules: torch.nn.Module) -> float:
    return sum(p.numel() for m in modules for p in m.parameters()) / 1e6


def timed(step: Callable[[], None], warmup: int, steps: int) -> tuple[float, float, float]:
    """(seconds per step, peak allocated GiB over the timed steps, seconds of warm-up)."""
    cuda = DEVICE.type == "cuda"
    start = time.perf_counter()
    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    warm = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if cuda:
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return (time.perf_counter() - start) / steps, peak, warm


def adamw(params, device: torch.device) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")


def bf16_autocast(device: torch.device) -> Callable[[], ContextManager]:
    """The training loop's bf16 autocast on `device`; none on the meta device, which has no autocast (the
    precision changes no FLOP count)."""
    if device.type == "meta":
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device.type, dtype=torch.bfloat16)


# --- (a) Stage A ---------------------------------------------------------------------------------------------


class DiffusersVAE(torch.nn.Module):
    """diffusers' AutoencoderKL behind our interface: forward(x) -> (reconstruction, posterior with .kl())."""

    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        from diffusers import AutoencoderKL as TheirVAE

        from ldm_core.convert import autoencoder_config_to_diffusers

        config = autoencoder_config_to_diffusers(cfg, scale_factor=1.0, sample_size=IMAGE_SIZE)
        self.vae = TheirVAE(**{k: v for k, v in config.items() if not k.startswith("_")})

    @property
    def last_layer(self) -> torch.nn.Parameter:
        return self.vae.decoder.conv_out.weight

    def forward(self, x: torch.Tensor):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.sample()).sample, posterior


def stage_a_step(model: torch.nn.Module, batch: int, compiled: bool,
                 device: torch.device) -> tuple[Callable[[], None], list[torch.nn.Module]]:
    from ldm_core.perceptual import LPIPSConfig, build_lpips

    model = model.to(device)
    disc = NLayerDiscriminator(DiscriminatorConfig(base_channels=64, num_layers=3)).to(device)
    lpips, _ = build_lpips(LPIPSConfig(net="vgg", backbone="random"))
    lpips = lpips.to(device)
    opt_g, opt_d = adamw(model.parameters(), device), adamw(disc.parameters(), device)
    ema = EMA(model, decay=0.9999)
    run_model = torch.compile(model) if compiled else model
    last_layer = model.last_layer
    x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device) * 2 - 1
    autocast = bf16_autocast(device)

    def step() -> None:
        batch = {"image": x}
        loss, _ = autoencoder_loss(run_model, disc, batch, 1, cfg=SD_F8_LOSS, lpips=lpips, last_layer=last_layer,
                                   autocast=autocast)
        opt_g.zero_grad(set_to_none=True)
        opt_d.zero_grad(set_to_none=True)  # the generator's adversarial term reached the discriminator too
        loss.backward()
        opt_g.step()
        ema.update(model)
        d_loss, _ = discriminator_update_loss(disc, batch, 1, cfg=SD_F8_LOSS)
        opt_d.zero_grad(set_to_none=True)
        d_loss.backward()
        opt_d.step()

    return step, [model, disc, lpips]


# --- (b) Stage B ---------------------------------------------------------------------------------------------


class DiffusersUNet(torch.nn.Module):
    """diffusers' UNet2DConditionModel behind our interface: forward(x_t, t, context) -> prediction."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        from diffusers import UNet2DConditionModel

        from ldm_core.convert import unet_config_to_diffusers

        config = unet_config_to_diffusers(cfg, sample_size=LATENT_SIZE)
        self.unet = UNet2DConditionModel(**{k: v for k, v in config.items() if not k.startswith("_")})

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, context_mask=None) -> torch.Tensor:
        return self.unet(x, t, encoder_hidden_states=context).sample


def stage_b_step(model: torch.nn.Module, batch: int, compiled: bool,
                 device: torch.device) -> tuple[Callable[[], None], list[torch.nn.Module]]:
    from ldm_core.diffusion import DiffusionConfig, NoiseSchedule

    model = model.to(device)
    opt = adamw(model.parameters(), device)
    ema = EMA(model, decay=0.9999)
    run_model = torch.compile(model) if compiled else model
    schedule = NoiseSchedule(DiffusionConfig(), device=device)
    # Meta tensors draw no numbers: no generator there (the draws change no FLOP count either).
    generator = None if device.type == "meta" else torch.Generator(device=device).manual_seed(0)
    rows = {  # a batch as the Parquet reader yields it: posterior mean and std, caption states and mask
        "latent_mean": torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, device=device),
        "latent_std": torch.full((batch, 4, LATENT_SIZE, LATENT_SIZE), 0.1, device=device),
        "text_hidden": torch.randn(batch, CONTEXT_LEN, SD2_UNET.context_dim, device=device),
        "text_mask": torch.ones(batch, CONTEXT_LEN, dtype=torch.bool, device=device),
    }
    null_context = torch.zeros(CONTEXT_LEN, SD2_UNET.context_dim, device=device)
    null_mask = torch.ones(CONTEXT_LEN, dtype=torch.bool, device=device)
    autocast = bf16_autocast(device)

    def step() -> None:
        loss, _ = denoising_loss(run_model, rows, schedule, null_context=null_context, null_mask=null_mask,
                                 cond_drop_prob=0.1, generator=generator, autocast=autocast, prediction="eps")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)

    return step, [model]


# --- (c) Encode ----------------------------------------------------------------------------------------------


class EncodeModels(torch.nn.Module):
    """The two networks an encode actor runs (held together for the parameter count)."""

    def __init__(self):
        super().__init__()
        from transformers import CLIPTextConfig, CLIPTextModel

        self.autoencoder = AutoencoderKL(SD_F8_AE).eval()
        self.text = CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)).eval()


def encode_step(models: EncodeModels, batch: int, compiled: bool) -> tuple[Callable[[], None], list[torch.nn.Module]]:
    models = models.to(DEVICE)
    encoder = torch.compile(models.autoencoder.encode) if compiled else models.autoencoder.encode
    x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=DEVICE) * 2 - 1
    ids = torch.randint(0, CLIP_L_TEXT["vocab_size"], (batch, CONTEXT_LEN), device=DEVICE)
    mask = torch.ones(batch, CONTEXT_LEN, dtype=torch.long, device=DEVICE)

    @torch.no_grad()
    def step() -> None:
        posterior = encoder(x)
        (posterior.mean + posterior.std).sum().item()  # as the actor, which copies both to the host
        models.text(input_ids=ids, attention_mask=mask).last_hidden_state.sum().item()

    return step, [models]


# --- FLOPs per step and MFU ----------------------------------------------------------------------------------

# Dense (without 2:4 sparsity) bf16 tensor-core peaks in FLOP/s, what MFU divides by, each with its source; the
# datasheets print the sparse figure, twice the dense one. The first name found as a whole word in
# torch.cuda.get_device_name() wins: the variants come before their family, and "L4" does not match an L40.
BF16_DENSE_PEAKS: list[tuple[str, float, str]] = [
    ("H100 NVL", 835.5e12, "NVIDIA H100 datasheet, NVL: 1,671 TFLOPS with sparsity"),
    ("H100 PCIe", 756.5e12, "NVIDIA H100 datasheet, PCIe: 1,513 TFLOPS with sparsity (756.5 dense, Hopper whitepaper)"),
    ("H100", 989.4e12, "NVIDIA H100 datasheet, SXM: 1,979 TFLOPS with sparsity (989.4 dense, Hopper whitepaper)"),
    ("H200 NVL", 835.5e12, "NVIDIA H200 datasheet, NVL: 1,671 TFLOPS with sparsity"),
    ("H200", 989.4e12, "NVIDIA H200 datasheet, SXM: 1,979 TFLOPS with sparsity, the H100 SXM's tensor cores"),
    ("A100", 312e12, "NVIDIA A100 datasheet: 312 TFLOPS dense (624 with sparsity), SXM and PCIe, 40 and 80 GB"),
    ("L40S", 362.05e12, "NVIDIA L40S datasheet: 362.05 TFLOPS dense (733 with sparsity)"),
    ("A10G", 70e12, "AWS's A10 variant (g5), no NVIDIA datasheet: 70 TFLOPS as commonly listed (e.g. Baseten's "
                    "'NVIDIA A10 vs A10G'), against the A10 datasheet's 125; not confirmed by NVIDIA"),
    ("L4", 121e12, "NVIDIA L4 datasheet: 242 TFLOPS with sparsity"),
]
MFU_TARGET = 0.45
"""Issue 32's bar for the compiled U-Net step; `--profile` lists the top kernels of a GPU row below it."""


def bf16_peak(device_name: str) -> tuple[float, str] | None:
    """(dense bf16 FLOP/s, its source) of the chip `device_name` names; None for a chip not in BF16_DENSE_PEAKS."""
    for key, flops, source in BF16_DENSE_PEAKS:
        if re.search(rf"\b{re.escape(key)}\b", device_name):
            return flops, source
    return None


def count_flops(step: Callable[[], None]) -> dict[str, int]:
    """The FLOPs of one call of `step` as torch.utils.flop_counter.FlopCounterMode counts them, in all ("Global")
    and by the top-level module they ran in (its class name): the matmuls, convolutions and attention of the
    forward and of the backward. Norms, activations, the losses' elementwise work and the optimiser are not
    counted (no tensor-core work; MFU by convention leaves them out). Attention runs on the math backend, so that
    it counts as its two matmuls forward and four backward on every device: FlopCounterMode does not count the
    CPU's fused attention at all, and its formula for the GPU's fused kernels adds the backward's recomputation
    of the scores, hardware FLOPs rather than the model's."""
    with FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        step()
    return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items() if "." not in name}


def training_step(bench: str, impl: str, batch: int, compiled: bool,
                  device: torch.device) -> tuple[Callable[[], None], list[torch.nn.Module]]:
    """Stage A's ("autoencoder") or Stage B's ("unet") step with our network or diffusers' (`impl`), its networks
    made on `device` itself (on the meta device: no weights initialised on the CPU first)."""
    with device:
        if bench == "autoencoder":
            model = AutoencoderKL(SD_F8_AE) if impl == "ours" else DiffusersVAE(SD_F8_AE)
            return stage_a_step(model, batch, compiled, device)
        model = UNet(SD2_UNET) if impl == "ours" else DiffusersUNet(SD2_UNET)
        return stage_b_step(model, batch, compiled, device)


@functools.cache
def step_flops(bench: str, impl: str, batch: int) -> tuple[int, int, str]:
    """(FLOPs of one eager training step of `bench` at `batch`, the part that ran in the trained network (the
    rest: Stage A's LPIPS and discriminator), where they were counted). On the meta device: shapes only, no
    memory and no arithmetic, so the SD-sized networks count in seconds on any CPU. Should a network fail there,
    the step runs for real on the CPU at batch 1 (weights, gradients, AdamW state and EMA in host memory: ~16 GiB
    for the U-Net) and the counts are scaled by `batch`, every counted op being per sample. The compiled step
    does the same model FLOPs (what it recomputes is not the model's), so both rows share this count."""
    meta = torch.device("meta")
    try:
        with warnings.catch_warnings():  # lpips loads its linear heads into meta parameters: a no-op, and harmless here
            warnings.filterwarnings("ignore", message=".*non-meta parameter in the checkpoint to a meta parameter")
            step, modules = training_step(bench, impl, batch, False, meta)
        with meta:
            counts = count_flops(step)
        scale, where = 1, "meta device"
    except (NotImplementedError, RuntimeError) as exc:
        print(f"bench_gpu: counting {bench}/{impl} on the meta device failed ({type(exc).__name__}: {exc}); "
              f"counting on the CPU at batch 1 instead", flush=True)
        step, modules = training_step(bench, impl, 1, False, torch.device("cpu"))
        counts = count_flops(step)
        scale, where = batch, f"CPU at batch 1, x {batch}"
    return counts["Global"] * scale, counts[type(modules[0]).__name__] * scale, where


def input_shape(bench: str) -> str:
    if bench == "unet":
        return f"4x{LATENT_SIZE}x{LATENT_SIZE} latents + {CONTEXT_LEN}x{SD2_UNET.context_dim} context"
    return f"3x{IMAGE_SIZE}x{IMAGE_SIZE} images"


def print_flop_counts(plan: list[tuple[str, str, int]], json_path: Path | None) -> None:
    """`--count-flops`: each step's FLOPs, counted without running it, as a table (and JSON lines)."""
    print(f"{'network':<12} {'impl':<10} {'input (per sample)':<38} {'batch':>5} {'GFLOP/step':>11} "
          f"{'GFLOP/sample':>13} {'in network':>10} {'count s':>8}  counted on")
    for bench, impl, batch in plan:
        start = time.perf_counter()
        flops, network, where = step_flops(bench, impl, batch)
        seconds = time.perf_counter() - start
        print(f"{bench:<12} {impl:<10} {input_shape(bench):<38} {batch:>5} {flops / 1e9:>11,.0f} "
              f"{flops / batch / 1e9:>13,.1f} {network / flops:>10.1%} {seconds:>8.1f}  {where}", flush=True)
        if json_path:
            with json_path.open("a") as f:
                f.write(json.dumps({"bench": bench, "impl": impl, "batch": batch, "input": input_shape(bench),
                                    "flop_per_step": flops, "network_flop_per_step": network, "counted_on": where,
                                    "count_s": seconds, "torch": torch.__version__}) + "\n")


def print_top_kernels(step: Callable[[], None], seconds_per_step: float, steps: int = 3, limit: int = 15) -> None:
    """Where a GPU step's time goes (`--profile`, for a row under MFU_TARGET): `steps` more steps under
    torch.profiler, the `limit` kernels with the most GPU time (per step, share of all kernel time, launches per
    step), and the kernels' total against the step time measured without the profiler: the rest of the step is
    the GPU waiting on the host (launches, Python, synchronisation)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels = sorted((e for e in prof.key_averages() if e.device_type == DeviceType.CUDA),
                     key=lambda e: e.self_device_time_total, reverse=True)
    total_us = sum(e.self_device_time_total for e in kernels)
    busy_ms = total_us / steps / 1e3
    print(f"  kernels: {busy_ms:.1f} ms of GPU time per step against {seconds_per_step * 1e3:.1f} ms per step "
          f"({busy_ms / (seconds_per_step * 1e3):.0%} busy); the top {limit}:")
    print(f"  {'ms/step':>8} {'share':>6} {'calls/step':>10}  kernel")
    for e in kernels[:limit]:
        print(f"  {e.self_device_time_total / steps / 1e3:>8.2f} {e.self_device_time_total / total_us:>6.1%} "
              f"{e.count / steps:>10.0f}  {e.key[:110]}")
    print(flush=True)


# --- driver --------------------------------------------------------------------------------------------------


def measure(bench: str, impl: str, compiled: bool, batch: int, args, peak_flops: float | None) -> Row:
    """One row: the step timed, and for the training steps its FLOPs (`step_flops`) and MFU against
    `peak_flops` (None: the chip's peak is unknown, MFU left out)."""
    torch.manual_seed(0)
    if bench == "encode":
        step, modules = encode_step(EncodeModels(), batch, compiled)
    else:
        step, modules = training_step(bench, impl, batch, compiled, DEVICE)
    row = Row(bench, impl, compiled, batch, round(params_m(modules[0]), 1))
    seconds, peak, warm = timed(step, args.warmup, args.steps)
    row.steps_per_s, row.images_per_s = 1 / seconds, batch / seconds
    row.peak_gib, row.warmup_s = peak, warm
    if bench == "encode":
        return row
    flops, _, where = step_flops(bench, impl, batch)
    row.gflop_per_step = flops / 1e9
    if where != "meta device":
        row.note = f"FLOPs counted on the {where}"
    if peak_flops:
        row.mfu = flops / seconds / peak_flops
    if args.profile and DEVICE.type == "cuda" and not row.mfu >= MFU_TARGET:  # NaN (chip unknown) included
        mfu = f"{row.mfu:.1%}" if row.mfu == row.mfu else "unknown"
        print(f"{bench} {impl}{' compiled' if compiled else ''}: MFU {mfu}, target {MFU_TARGET:.0%}; "
              f"3 more steps under torch.profiler", flush=True)
        print_top_kernels(step, seconds)
    return row


def release() -> None:
    import gc

    gc.collect()
    torch.cuda.empty_cache()
    if hasattr(torch, "_dynamo"):
        torch._dynamo.reset()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=["autoencoder", "unet", "encode"], help="run one of the benchmarks")
    parser.add_argument("--encode-batch", type=int, default=64, help="images per encode batch (default 64, as sd_f8)")
    parser.add_argument("--ae-batch", type=int, default=16, help="images per Stage A step (default 16)")
    parser.add_argument("--unet-batch", type=int, default=64, help="latents per Stage B step (default 64)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per row (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first, compilation included (default 5)")
    parser.add_argument("--no-diffusers", action="store_true", help="skip diffusers' networks")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    parser.add_argument("--deadline-s", type=float, default=float("inf"), help="start no row after this many seconds")
    parser.add_argument("--json", type=Path, help="append each row as a JSON line to this file")
    parser.add_argument("--device", default="cuda", help="cpu: check that the script runs (tiny sizes, no timings worth reading)")
    parser.add_argument("--count-flops", action="store_true",
                        help="only count each training step's FLOPs (on the meta device, no GPU needed) and print them")
    parser.add_argument("--profile", action="store_true",
                        help=f"after a GPU training row with MFU under {MFU_TARGET:.0%}: its top kernels (torch.profiler)")
    args = parser.parse_args(argv)

    impls = ["ours"] if args.no_diffusers else ["ours", "diffusers"]
    if args.count_flops:  # the configured sizes whatever --device says: the figures MFU divides
        counted = [(bench, impl, batch) for bench, batch in (("unet", args.unet_batch), ("autoencoder", args.ae_batch))
                   if args.only in (None, bench) for impl in impls]
        if not counted:
            print("bench_gpu: --count-flops counts the training steps (unet, autoencoder); encode is inference")
            return 0
        print(f"FLOPs of one eager training step, forward + backward (FlopCounterMode), torch {torch.__version__}",
              flush=True)
        print_flop_counts(counted, args.json)
        return 0

    global DEVICE
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here (torch.cuda.is_available() is False): nothing to measure")
        return 0
    if DEVICE.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True
        props = torch.cuda.get_device_properties(0)
        name = props.name
        print(f"device: {name}, {props.total_memory / 2**30:.0f} GiB, torch {torch.__version__}, CUDA {torch.version.cuda}",
              flush=True)
        peak = bf16_peak(name)
        if peak:
            print(f"MFU against a dense bf16 peak of {peak[0] / 1e12:,.1f} TFLOP/s: {peak[1]}", flush=True)
        else:
            print(f"MFU left out: no dense bf16 peak known for {name!r} (BF16_DENSE_PEAKS)", flush=True)
    else:
        peak = None
        print("MFU left out: a CPU run only checks that the script runs", flush=True)
        name = f"{DEVICE} (script check only)"
        global SD_F8_AE, SD2_UNET, IMAGE_SIZE, LATENT_SIZE, CONTEXT_LEN
        SD_F8_AE = SD_F8_AE.model_copy(update={"base_channels": 32, "norm_groups": 8})
        SD2_UNET = SD2_UNET.model_copy(update={"model_channels": 32, "norm_groups": 8, "head_dim": 16, "context_dim": 64})
        IMAGE_SIZE, LATENT_SIZE, CONTEXT_LEN = 64, 8, 8
        CLIP_L_TEXT.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           max_position_embeddings=8, projection_dim=32)

    plan: list[tuple[str, str, bool, int]] = []
    if args.only in (None, "unet"):
        plan += [("unet", impl, False, args.unet_batch) for impl in impls]
    if args.only in (None, "autoencoder"):
        plan += [("autoencoder", impl, False, args.ae_batch) for impl in impls]
    if args.only == "encode":  # ours only: the encode actor has no diffusers counterpart to compare
        plan += [("encode", "ours", False, args.encode_batch)]
    if not args.no_compile and args.only != "encode":  # the costly rows last, so that a deadline drops them first
        if args.only in (None, "unet"):
            plan += [("unet", impl, True, args.unet_batch) for impl in impls]
        if args.only in (None, "autoencoder"):
            plan += [("autoencoder", impl, True, args.ae_batch) for impl in impls]

    rows: list[Row] = []
    started = time.perf_counter()
    for bench, impl, compiled, batch in plan:
        if time.perf_counter() - started > args.deadline_s:
            row = Row(bench, impl, compiled, batch, float("nan"), note="skipped: past --deadline-s")
        else:
            try:
                row = measure(bench, impl, compiled, batch, args, peak[0] if peak else None)
            except torch.cuda.OutOfMemoryError:
                row = Row(bench, impl, compiled, batch, float("nan"), note="out of GPU memory at this batch")
            except ImportError as exc:
                row = Row(bench, impl, compiled, batch, float("nan"), note=f"not installed: {exc.name}")
            release()
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({**asdict(row), "device": name, "torch": torch.__version__,
                                    "bf16_peak_tflops": peak[0] / 1e12 if peak else None}) + "\n")

    print(f"\n{'bench':<12} {'impl':<10} {'compile':<8} {'batch':>5} {'params M':>9} {'steps/s':>8} "
          f"{'images/s':>9} {'peak GiB':>9} {'warm-up s':>9} {'GFLOP/step':>11} {'MFU':>6}  note")
    for r in rows:
        mfu = f"{r.mfu:.1%}" if r.mfu == r.mfu else "-"
        print(f"{r.bench:<12} {r.impl:<10} {str(r.compiled):<8} {r.batch:>5} {r.params_m:>9.1f} {r.steps_per_s:>8.2f} "
              f"{r.images_per_s:>9.1f} {r.peak_gib:>9.2f} {r.warmup_s:>9.1f} {r.gflop_per_step:>11,.0f} {mfu:>6}  "
              f"{r.note}")
    for bench in ("unet", "autoencoder"):
        for compiled in (False, True):
            pair = {r.impl: r for r in rows if r.bench == bench and r.compiled == compiled}
            if {"ours", "diffusers"} <= pair.keys() and pair["diffusers"].steps_per_s == pair["diffusers"].steps_per_s:
                ratio = pair["diffusers"].steps_per_s / pair["ours"].steps_per_s
                print(f"{bench}{' compiled' if compiled else ''}: our step time = {ratio:.2f}x diffusers'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

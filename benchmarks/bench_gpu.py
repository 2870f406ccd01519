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
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

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


def adamw(params) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=DEVICE.type == "cuda")


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


def stage_a_step(model: torch.nn.Module, batch: int, compiled: bool) -> tuple[Callable[[], None], list[torch.nn.Module]]:
    from ldm_core.perceptual import LPIPSConfig, build_lpips

    device = DEVICE
    model = model.to(device)
    disc = NLayerDiscriminator(DiscriminatorConfig(base_channels=64, num_layers=3)).to(device)
    lpips, _ = build_lpips(LPIPSConfig(net="vgg", backbone="random"))
    lpips = lpips.to(device)
    opt_g, opt_d = adamw(model.parameters()), adamw(disc.parameters())
    ema = EMA(model, decay=0.9999)
    run_model = torch.compile(model) if compiled else model
    last_layer = model.last_layer
    x = torch.rand(batch, 3, IMAGE_SIZE, IMAGE_SIZE, device=device) * 2 - 1

    autocast = functools.partial(torch.autocast, DEVICE.type, dtype=torch.bfloat16)

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


def stage_b_step(model: torch.nn.Module, batch: int, compiled: bool) -> tuple[Callable[[], None], list[torch.nn.Module]]:
    from ldm_core.diffusion import DiffusionConfig, NoiseSchedule

    device = DEVICE
    model = model.to(device)
    opt = adamw(model.parameters())
    ema = EMA(model, decay=0.9999)
    run_model = torch.compile(model) if compiled else model
    schedule = NoiseSchedule(DiffusionConfig(), device=device)
    generator = torch.Generator(device=device).manual_seed(0)
    rows = {  # a batch as the Parquet reader yields it: posterior mean and std, caption states and mask
        "latent_mean": torch.randn(batch, 4, LATENT_SIZE, LATENT_SIZE, device=device),
        "latent_std": torch.full((batch, 4, LATENT_SIZE, LATENT_SIZE), 0.1, device=device),
        "text_hidden": torch.randn(batch, CONTEXT_LEN, SD2_UNET.context_dim, device=device),
        "text_mask": torch.ones(batch, CONTEXT_LEN, dtype=torch.bool, device=device),
    }
    null_context = torch.zeros(CONTEXT_LEN, SD2_UNET.context_dim, device=device)
    null_mask = torch.ones(CONTEXT_LEN, dtype=torch.bool, device=device)
    autocast = functools.partial(torch.autocast, DEVICE.type, dtype=torch.bfloat16)

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


# --- driver --------------------------------------------------------------------------------------------------


def measure(bench: str, impl: str, compiled: bool, batch: int, args) -> Row:
    torch.manual_seed(0)
    if bench == "encode":
        step, modules = encode_step(EncodeModels(), batch, compiled)
    elif bench == "autoencoder":
        model = AutoencoderKL(SD_F8_AE) if impl == "ours" else DiffusersVAE(SD_F8_AE)
        step, modules = stage_a_step(model, batch, compiled)
    else:
        model = UNet(SD2_UNET) if impl == "ours" else DiffusersUNet(SD2_UNET)
        step, modules = stage_b_step(model, batch, compiled)
    row = Row(bench, impl, compiled, batch, round(params_m(modules[0]), 1))
    seconds, peak, warm = timed(step, args.warmup, args.steps)
    row.steps_per_s, row.images_per_s = 1 / seconds, batch / seconds
    row.peak_gib, row.warmup_s = peak, warm
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
    args = parser.parse_args(argv)

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
    else:
        name = f"{DEVICE} (script check only)"
        global SD_F8_AE, SD2_UNET, IMAGE_SIZE, LATENT_SIZE, CONTEXT_LEN
        SD_F8_AE = SD_F8_AE.model_copy(update={"base_channels": 32, "norm_groups": 8})
        SD2_UNET = SD2_UNET.model_copy(update={"model_channels": 32, "norm_groups": 8, "head_dim": 16, "context_dim": 64})
        IMAGE_SIZE, LATENT_SIZE, CONTEXT_LEN = 64, 8, 8
        CLIP_L_TEXT.update(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           max_position_embeddings=8, projection_dim=32)

    plan: list[tuple[str, str, bool, int]] = []
    impls = ["ours"] if args.no_diffusers else ["ours", "diffusers"]
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
                row = measure(bench, impl, compiled, batch, args)
            except torch.cuda.OutOfMemoryError:
                row = Row(bench, impl, compiled, batch, float("nan"), note="out of GPU memory at this batch")
            except ImportError as exc:
                row = Row(bench, impl, compiled, batch, float("nan"), note=f"not installed: {exc.name}")
            release()
        rows.append(row)
        print(json.dumps(asdict(row)), flush=True)
        if args.json:
            with args.json.open("a") as f:
                f.write(json.dumps({**asdict(row), "device": name, "torch": torch.__version__}) + "\n")

    print(f"\n{'bench':<12} {'impl':<10} {'compile':<8} {'batch':>5} {'params M':>9} {'steps/s':>8} "
          f"{'images/s':>9} {'peak GiB':>9} {'warm-up s':>9}  note")
    for r in rows:
        print(f"{r.bench:<12} {r.impl:<10} {str(r.compiled):<8} {r.batch:>5} {r.params_m:>9.1f} {r.steps_per_s:>8.2f} "
              f"{r.images_per_s:>9.1f} {r.peak_gib:>9.2f} {r.warmup_s:>9.1f}  {r.note}")
    for bench in ("unet", "autoencoder"):
        for compiled in (False, True):
            pair = {r.impl: r for r in rows if r.bench == bench and r.compiled == compiled}
            if {"ours", "diffusers"} <= pair.keys() and pair["diffusers"].steps_per_s == pair["diffusers"].steps_per_s:
                ratio = pair["diffusers"].steps_per_s / pair["ours"].steps_per_s
                print(f"{bench}{' compiled' if compiled else ''}: our step time = {ratio:.2f}x diffusers'")
    return 0


if __name__ == "__main__":
    sys.exit(main())

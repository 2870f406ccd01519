"""Parity with diffusers: max-abs differences of our import, export and DDIM against diffusers itself, as a table.

    .venv/bin/python benchmarks/parity_diffusers.py

The same comparisons the tests assert (tests/test_interop.py, tests/test_sampler_parity.py; the tiny configs, seeds
and helpers both use are in benchmarks/parity_cases.py), measured and printed in one place for benchmarks/README.md:

- import: randomly initialised (and perturbed) diffusers `AutoencoderKL` / `UNet2DConditionModel` of several
  configs, read by `pipelines/models/interop.py` from a diffusers folder or an SD single file; the encoder's posterior
  mean / logvar, the decoder output and the U-Net output against diffusers' own (float32, CPU);
- export: our models written by `pipelines/export.py` and read back by diffusers, `from_pretrained` for the
  diffusers layout, `from_single_file` (offline, with the config an SD reader builds: SD's conventions) for the
  single file;
- DDIM: our `ddim_sample` against StableDiffusionPipeline's loop over `DDIMScheduler` with SD's settings, and with
  trailing / linspace spacing (SD's schedule with eps, and zero terminal SNR with v), on the same deterministic
  stand-in network, the same x_T and classifier-free guidance 4; the final latents. Where diffusers' trailing
  spacing emits an extra timestep of -1 (61 steps), the row compares with its first `steps` steps, and a second row
  shows diffusers as is.

diffusers is optional: without it this prints why and exits 0. Float32 on the CPU; the tolerance the tests hold
the import / export to is 1e-5, the sampler to 1e-4.
"""

from __future__ import annotations

import platform
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _import_rows(tmp: Path) -> list[tuple[str, str, float]]:
    from pipelines.models import interop
    from safetensors.torch import save_file
    from benchmarks.parity_cases import (UNET_CONFIGS, VAE_CONFIGS, diffusers_unet, diffusers_vae, save_diffusers,
                                         sd_single_file, unet_gap, vae_gaps)

    rows = []
    for name in VAE_CONFIGS:
        ref = diffusers_vae(name)
        gaps = vae_gaps(ref, interop.import_autoencoder(str(save_diffusers(ref, tmp / f"vae-{name}"))))
        rows.append(("import diffusers AutoencoderKL (mean / logvar / decoder)", name, max(gaps.values())))
    for name in UNET_CONFIGS:
        ref = diffusers_unet(name)
        rows.append(("import diffusers UNet2DConditionModel", name,
                     unet_gap(ref, interop.import_unet(str(save_diffusers(ref, tmp / f"unet-{name}"))))))
    vae, unet = diffusers_vae("sd1-layout"), diffusers_unet("sd1-layout")
    save_file(sd_single_file(vae, unet), str(tmp / "v1.safetensors"))
    rows.append(("import SD single file: VAE", "sd1-layout", max(vae_gaps(vae, interop.import_autoencoder(str(tmp / "v1.safetensors"))).values())))
    rows.append(("import SD single file: U-Net", "sd1-layout", unet_gap(unet, interop.import_unet(str(tmp / "v1.safetensors")))))
    return rows


def _export_rows(tmp: Path) -> list[tuple[str, str, float]]:
    import json

    import diffusers
    import torch

    from ldm_core import convert
    from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL
    from ldm_core.unet import UNet, UNetConfig
    from pipelines.export import export_unet, write_diffusers_autoencoder, write_diffusers_unet
    from benchmarks.parity_cases import (SD_HEADS, SD_READER_UNET, UNET_LATENT, _bundle_on_tiny_clip, _perturbed,
                                         unet_gap, vae_gaps)

    rows = []
    torch.manual_seed(0)
    for grey in (False, True):
        ours = _perturbed(AutoencoderKL(AutoencoderConfig(base_channels=16, channel_mult=[1, 2, 2], num_res_blocks=1,
                                                           norm_groups=8, grey_output=grey)), 3)
        write_diffusers_autoencoder(ours, tmp / f"vae-{grey}")
        ref = diffusers.AutoencoderKL.from_pretrained(str(tmp / f"vae-{grey}")).eval()
        rows.append(("export diffusers AutoencoderKL -> from_pretrained", "grey output" if grey else "colour",
                     max(vae_gaps(ref, ours).values())))
    for head_dim in (None, 8):
        cfg = UNetConfig(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], num_heads=2,
                         head_dim=head_dim, norm_groups=8, context_dim=12, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS)
        ours = _perturbed(UNet(cfg), 4)
        write_diffusers_unet(ours, tmp / f"unet-{head_dim}", sample_size=UNET_LATENT)
        ref = diffusers.UNet2DConditionModel.from_pretrained(str(tmp / f"unet-{head_dim}")).eval()
        rows.append(("export diffusers UNet2DConditionModel -> from_pretrained",
                     "2 heads" if head_dim is None else "8-channel heads", unet_gap(ref, ours)))
    for convention in ("sd1", "sd2"):  # tests/test_interop.py::test_sd_single_file_export_is_read_by_diffusers_...
        work = tmp / f"single-{convention}"
        cfg = UNetConfig(model_channels=64, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[0, 1], norm_groups=32,
                         context_dim=32, transformer_norm_eps=convert.SD_TRANSFORMER_NORM_EPS, **SD_HEADS[convention])
        unet = _perturbed(UNet(cfg), 7)
        vae = _perturbed(AutoencoderKL(AutoencoderConfig(base_channels=32, channel_mult=[1, 2], num_res_blocks=1)), 8)
        export_unet(_bundle_on_tiny_clip(unet, work, convert.SD1_SCALE_FACTOR), vae, "sd-single-file", work / "out")
        write_diffusers_unet(unet, work / "unet-config", sample_size=UNET_LATENT)
        config = json.loads((work / "unet-config" / "config.json").read_text())
        (work / "unet-config" / "config.json").write_text(json.dumps(config | SD_READER_UNET[convention](config["block_out_channels"])))
        write_diffusers_autoencoder(vae, work / "vae-config")
        single = str(work / "out" / "model.safetensors")
        ref_unet = diffusers.UNet2DConditionModel.from_single_file(single, config=str(work / "unet-config"), local_files_only=True)
        ref_vae = diffusers.AutoencoderKL.from_single_file(single, config=str(work / "vae-config"), local_files_only=True)
        label = "SD 1.x conventions" if convention == "sd1" else "SD 2.x conventions"
        rows.append(("export SD single file -> from_single_file: U-Net", label, unet_gap(ref_unet.eval(), unet)))
        rows.append(("export SD single file -> from_single_file: VAE", label, max(vae_gaps(ref_vae.eval(), vae).values())))
    return rows


def _ddim_rows() -> list[tuple[str, str, float]]:
    import diffusers
    import torch

    from ldm_core.diffusion import DiffusionConfig, NoiseSchedule
    from ldm_core.sampling import Condition, ddim_sample, sampling_plan
    from benchmarks.parity_cases import GUIDANCE, SD_DDIM, SPACING_SETTINGS, diffusers_loop, model, spacing_gap

    def gap(diffusion: DiffusionConfig, scheduler, steps: int, seed: int, **ours_settings) -> float:
        g = torch.Generator().manual_seed(seed)
        x_T = torch.randn(3, 4, 8, 8, generator=g)
        context, null_context = torch.randn(3, 5, 16, generator=g), torch.zeros(5, 16)
        ours = ddim_sample(model, x_T, sampling_plan(NoiseSchedule(diffusion), steps, **ours_settings),
                           Condition(context, None, null_context, None, GUIDANCE))
        return (ours - diffusers_loop(scheduler, x_T, context, null_context, steps, eta=0.0)).abs().max().item()

    rows = []
    sd = dict(spacing="leading", steps_offset=1, set_alpha_to_one=False)
    for prediction, name in (("eps", "epsilon"), ("v", "v_prediction")):
        for steps in (50, 30, 7):
            scheduler = diffusers.DDIMScheduler(**SD_DDIM, prediction_type=name)
            rows.append(("DDIM vs DDIMScheduler, SD settings (leading, offset 1)", f"{prediction}, {steps} steps",
                         gap(DiffusionConfig(prediction=prediction), scheduler, steps, 0, **sd)))
    for steps in (50, 25):
        scheduler = diffusers.DDIMScheduler(**{**SD_DDIM, "timestep_spacing": "trailing", "steps_offset": 0,
                                               "set_alpha_to_one": True},
                                            prediction_type="v_prediction", rescale_betas_zero_snr=True)
        rows.append(("DDIM vs DDIMScheduler, zero terminal SNR (trailing)", f"v, {steps} steps",
                     gap(DiffusionConfig(prediction="v", zero_terminal_snr=True), scheduler, steps, 1)))
    for setting in sorted(SPACING_SETTINGS):
        for spacing in ("trailing", "linspace"):
            for steps in (7, 30, 48, 61):
                value, theirs_count = spacing_gap(spacing, setting, steps)
                bug = theirs_count != steps
                rows.append((f"DDIM vs DDIMScheduler, {spacing} spacing", f"{setting}, {steps} steps"
                             + (" (diffusers' first 61 of its 62 steps)" if bug else ""), value))
                if bug:
                    as_is, _ = spacing_gap(spacing, setting, steps, as_is=True)
                    rows.append((f"DDIM vs DDIMScheduler, {spacing} spacing", f"{setting}, {steps} steps, diffusers as is: "
                                 f"its extra t = -1 step (diffusers' own bug)", as_is))
    return rows


def main() -> None:
    try:
        import diffusers
    except ImportError:
        print("diffusers is not installed (an optional dependency: pip install -e '.[interop]'): nothing to compare")
        return
    import logging

    import torch

    logging.disable(logging.WARNING)  # export's notes about the tiny models' settings are not what this measures
    with tempfile.TemporaryDirectory(prefix="parity-") as tmp:
        rows = _import_rows(Path(tmp)) + _export_rows(Path(tmp)) + _ddim_rows()
    print(f"diffusers {diffusers.__version__}, torch {torch.__version__}, {platform.machine()} CPU, float32")
    print("| comparison | config | max-abs |\n|---|---|---|")
    for what, config, value in rows:
        print(f"| {what} | {config} | {value:.1e} |")


if __name__ == "__main__":
    main()

"""The models' configs, apart from the models: pydantic only, no torch.

Each class is the typed config of one `ldm_core` module (its model or loss imports it from here and re-exports it),
so a config file or a `--set` can be validated before torch is imported: a mistyped field is refused in a
second, not after the heavy imports (issue 30). Each field's docstring is its documentation.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from ldm_core.config import StrictConfig

__all__ = ["AutoencoderConfig", "AutoencoderLossConfig", "DiffusionConfig", "DiscriminatorConfig", "LPIPSConfig", "Prediction",
           "UNetConfig"]

Prediction = Literal["eps", "v"]
"""What the denoiser predicts: the noise eps, or v = alpha_t eps - sigma_t x0 (Salimans & Ho 2022)."""


class AutoencoderConfig(StrictConfig):
    """Shape of the autoencoder. Defaults are the LDM / Stable Diffusion kl-f8 layout (f = 8, c = 4)."""

    in_channels: int = Field(3, ge=1)
    """Channels of the input image."""
    out_channels: int = Field(3, ge=1)
    """Channels of the reconstructed image."""
    grey_output: bool = False
    """Grey-scale data: the decoder predicts one intensity per pixel and repeats it over the `out_channels`, so its
    images are grey by construction. (A colour head trained on grey images only learns R = G = B approximately;
    the channels drift apart, most where the loss looks least, and the grids come out tinted.)"""
    latent_channels: int = Field(4, ge=1)
    """Channels c of the latent z (the diffusion model's in_channels)."""
    base_channels: int = Field(128, ge=1)
    """Base width C; level i has C * channel_mult[i] channels."""
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 4, 4])
    """Width multiplier per resolution level; the downsampling factor is f = 2 ** (len(channel_mult) - 1)."""
    num_res_blocks: int = Field(2, ge=1)
    """ResnetBlocks per encoder level (the decoder has one more per level)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout inside every ResnetBlock."""
    norm_groups: int = Field(32, ge=1)
    """GroupNorm groups; every level's width must be divisible by it."""
    mid_attention: bool = True
    """Single-head self-attention in the encoder's and decoder's mid block (lowest resolution)."""
    kind: Literal["kl", "deterministic"] = "kl"
    """"kl": Gaussian posterior with a KL penalty (VAE); "deterministic": z = E(x), no sampling, KL 0."""
    logvar_min: float = -30.0
    """Lower clamp of the posterior log-variance (keeps exp(logvar) representable)."""
    logvar_max: float = 20.0
    """Upper clamp of the posterior log-variance."""
    gradient_checkpointing: bool = False
    """Recompute ResnetBlock / attention activations in the backward pass (less memory, ~30% more compute)."""
    bicubic_shortcut: bool = False
    """Learn the residual over bicubic resampling: the encoder's latent mean gets the image shrunk by f (antialiased
    bicubic) added to its first `in_channels` channels, the decoder's image gets those channels enlarged back
    (bicubic) added to its output, and both networks' output convs start at zero (the posterior's log-variance at
    `ldm_core.autoencoder.SHORTCUT_INIT_LOGVAR`), so training starts from the bicubic codec and the networks learn what it misses (the residual autoencoding of Chen et al. 2024, "Deep
    Compression Autoencoder", across the whole network). Much faster to beat bicubic on a small budget (issue 15);
    Stable Diffusion's and diffusers' autoencoders have no such path, so such a model does not export to them."""

    @model_validator(mode="after")
    def _check(self) -> AutoencoderConfig:
        if self.bicubic_shortcut and (self.grey_output or self.in_channels != self.out_channels
                                      or self.in_channels > self.latent_channels):
            raise ValueError(
                "bicubic_shortcut needs in_channels == out_channels <= latent_channels and grey_output false, got "
                f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"latent_channels={self.latent_channels}, grey_output={self.grey_output}"
            )
        if not self.channel_mult:
            raise ValueError("channel_mult must list at least one level")
        if any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult entries must be >= 1, got {self.channel_mult}")
        for m in self.channel_mult:
            if (self.base_channels * m) % self.norm_groups:
                raise ValueError(
                    f"base_channels * channel_mult = {self.base_channels} * {m} = {self.base_channels * m} "
                    f"is not divisible by norm_groups = {self.norm_groups}"
                )
        if self.logvar_min >= self.logvar_max:
            raise ValueError(f"logvar_min ({self.logvar_min}) must be < logvar_max ({self.logvar_max})")
        return self

    @property
    def downsample_factor(self) -> int:
        """f: the image side divided by the latent side."""
        return 2 ** (len(self.channel_mult) - 1)


class DiffusionConfig(StrictConfig):
    """Discrete-time diffusion process and what the network predicts."""

    num_timesteps: int = Field(1000, ge=2)
    """T, the number of discrete diffusion steps (t = 0 .. T-1)."""
    beta_schedule: Literal["linear", "scaled_linear", "cosine"] = "scaled_linear"
    """Name of the beta schedule in BETA_SCHEDULES (scaled_linear is Stable Diffusion's)."""
    beta_start: float = Field(0.00085, gt=0.0, lt=1.0)
    """beta_0 of the linear / scaled_linear schedules (ignored by cosine)."""
    beta_end: float = Field(0.012, gt=0.0, lt=1.0)
    """beta_{T-1} of the linear / scaled_linear schedules (ignored by cosine)."""
    prediction: Prediction = "eps"
    """Network target: "eps" (noise, Ho et al. 2020) or "v" (velocity, Salimans & Ho 2022)."""
    zero_terminal_snr: bool = False
    """Rescale the schedule so that alpha_bar_{T-1} = 0: the last timestep is pure noise, as at sampling time
    (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed", Alg. 1). Needs
    prediction="v" (at SNR 0 an eps prediction says nothing about x0) and a sampler spacing that starts at
    t = T-1 ("trailing", the default, or "linspace"). The rescaled schedule is what the bundle's config
    rebuilds, so training and sampling always agree."""
    snr_gamma: float | None = Field(None, gt=0)
    """Min-SNR-gamma loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting
    Strategy"): each sample's MSE is weighted by min(SNR_t, gamma) / SNR_t for eps and
    min(SNR_t, gamma) / (SNR_t + 1) for v, so the low-noise steps stop dominating. 5 is the paper's value.
    None: the unweighted loss (Ho et al. 2020). The held-out loss stays unweighted, so runs compare."""
    offset_noise: float = Field(0.0, ge=0)
    """Offset noise (Guttenberg 2023, "Diffusion with Offset Noise"): the training noise gets an extra
    per-sample, per-channel constant, eps = N(0, I) + offset_noise * N(0, 1) broadcast over the pixels, so
    the model learns to change an image's overall brightness. About 0.1 in practice; 0: off."""
    input_perturbation: float = Field(0.0, ge=0)
    """Input perturbation (Ning et al. 2023, "Input Perturbation Reduces Exposure Bias in Diffusion Models"):
    x_t is built from eps + gamma * xi, xi ~ N(0, I), while the target stays eps (or the v of eps), to
    simulate the sampler's own prediction errors. The paper uses gamma = 0.1; 0: off."""

    @model_validator(mode="after")
    def _check_betas(self) -> "DiffusionConfig":
        if self.beta_schedule != "cosine" and self.beta_start >= self.beta_end:
            raise ValueError(f"beta_start ({self.beta_start}) must be < beta_end ({self.beta_end}) "
                             f"for the {self.beta_schedule} schedule")
        if self.zero_terminal_snr and self.prediction != "v":
            raise ValueError(f"zero_terminal_snr needs prediction='v' (got {self.prediction!r}): at alpha_bar_T = 0 "
                             f"x0 cannot be recovered from an eps prediction (Lin et al. 2024, Sec. 3.2)")
        return self

    def loss_options(self) -> dict:
        """The keyword arguments of `training_loss` this config sets: the target and the training recipe."""
        return {"prediction": self.prediction, "snr_gamma": self.snr_gamma, "offset_noise": self.offset_noise,
                "input_perturbation": self.input_perturbation}


class DiscriminatorConfig(StrictConfig):
    """Shape of the PatchGAN discriminator."""

    in_channels: int = Field(3, ge=1)
    """Channels of the images it judges."""
    base_channels: int = Field(64, ge=1)
    """Width C of the first conv; later convs double it, capped at 8C."""
    num_layers: int = Field(3, ge=1)
    """Stride-2 convs (the receptive field: 3 layers see 70x70 patches)."""
    norm: Literal["group", "batch", "instance", "none"] = "group"
    """Normalisation after each inner conv. "group" (default) is safe under DDP and independent of the
    batch split; "batch" reproduces pix2pix/taming but needs broadcast_buffers=False under DDP."""
    norm_groups: int = Field(32, ge=1)
    """Groups of the GroupNorm (norm="group"); base_channels must be divisible by it."""

    @model_validator(mode="after")
    def _check(self) -> DiscriminatorConfig:
        if self.norm == "group" and self.base_channels % self.norm_groups:
            raise ValueError(
                f"base_channels ({self.base_channels}) must be divisible by norm_groups ({self.norm_groups}) "
                "when norm is 'group'"
            )
        return self


class AutoencoderLossConfig(StrictConfig):
    """Weights of the autoencoder loss terms and the discriminator schedule (defaults: LDM kl-f8)."""

    pixel_loss: Literal["l1", "l2"] = "l1"
    """Per-pixel reconstruction distance: |x - x_rec| ("l1") or (x - x_rec)^2 ("l2")."""
    pixel_weight: float = Field(1.0, ge=0.0)
    """Weight of the pixel term inside L_rec."""
    perceptual_weight: float = Field(1.0, ge=0.0)
    """Weight of LPIPS inside L_rec; 0 disables it (no LPIPS network is needed then)."""
    kl_weight: float = Field(1e-6, ge=0.0)
    """Weight of KL(q(z|x) || N(0, I)) (per-sample sum over latent dims). Ignored for deterministic models (KL 0)."""
    disc_weight: float = Field(0.5, ge=0.0)
    """Multiplier of the adaptive weight lambda (taming's discriminator_weight); 0 disables the GAN term."""
    disc_start: int = Field(50001, ge=0)
    """Optimiser step from which the adversarial terms are on (LDM kl-f8 uses 50001)."""
    disc_loss: Literal["hinge", "vanilla"] = "hinge"
    """Discriminator loss; the generator's adversarial term matches it (-D(x_rec) for hinge,
    softplus(-D(x_rec)), the non-saturating loss, for vanilla)."""
    disc_factor: float = Field(1.0, ge=0.0)
    """Factor on both adversarial terms from disc_start on (before it, 0)."""
    use_adaptive_weight: bool = True
    """Balance the GAN term by the gradient-norm ratio at the decoder's last layer (taming eq. 7). False:
    lambda = disc_weight."""
    adaptive_weight_max: float = Field(1e4, gt=0.0)
    """Upper clamp of the gradient-norm ratio (taming's 1e4). What to expect: L_rec is summed over the C*H*W
    pixels while the adversarial loss is a mean over patch logits, so the reconstruction gradient at the last
    layer is orders of magnitude larger and early in GAN training the ratio is often above the clamp; lambda
    then sits at disc_weight * adaptive_weight_max. On the quickstart (2026-11-25, 20-step interval means) the
    logged train/adaptive_ratio was 1.9e4 to 8.3e4 (train/rec_grad_norm 1.3e4 to 1.5e4, train/adv_grad_norm
    4.9 falling to 0.33), so lambda = 0.5 * 1e4 = 5,000 on most steps: the reference formula and clamp, working
    as designed on a 60-step GAN phase (the three metrics are logged on every step where lambda is computed)."""
    adaptive_weight_eps: float = Field(1e-4, gt=0.0)
    """Added to the adversarial gradient norm in the ratio's denominator."""


class LPIPSConfig(StrictConfig):
    """Which LPIPS network to build and where its backbone weights come from."""

    net: Literal["vgg", "alex", "squeeze"] = "vgg"
    """Backbone: "vgg" (VGG16, the LDM/taming training loss), "alex" (the LPIPS paper's metric), "squeeze"."""
    backbone: Literal["auto", "pretrained", "random"] = "auto"
    """"pretrained": ImageNet weights from the local cache, else an error; "random": randomly initialised
    backbone (not true LPIPS); "auto": pretrained when cached, else random with a warning."""
    weights_path: str | None = Field(default=None, min_length=1)
    """Local torchvision checkpoint of the backbone. None: `$TORCH_HOME/hub/checkpoints/<torchvision file>`."""
    random_seed: int = 0
    """Seed of a random backbone, so every rank, run and stage uses the same network (comparable values)."""


class UNetConfig(StrictConfig):
    """Shape of the conditional U-Net. Defaults are a small model for 32x32x4 latents."""

    in_channels: int = Field(4, ge=1)
    """Channels of the input latent (the autoencoder's z_channels)."""
    out_channels: int = Field(4, ge=1)
    """Channels of the prediction (eps or v), normally equal to in_channels."""
    model_channels: int = Field(128, ge=1)
    """Base width C; level i has C * channel_mult[i] channels."""
    channel_mult: list[int] = Field(default_factory=lambda: [1, 2, 4])
    """Width multiplier per resolution level; len(channel_mult) - 1 downsamplings by 2."""
    num_res_blocks: int = Field(2, ge=1)
    """ResBlocks per level on the way down (the way up has one more per level)."""
    attention_levels: list[int] = Field(default_factory=lambda: [1, 2])
    """Indices of the levels (0 = full resolution) whose ResBlocks are followed by a SpatialTransformer.
    The mid block always has one."""
    num_heads: int = Field(8, ge=1)
    """Attention heads per transformer; head dim = level channels / num_heads (LDM v1 convention)."""
    head_dim: int | None = Field(None, ge=1)
    """If set, every transformer has level channels / head_dim heads instead (the SD 2.x convention: a fixed
    head width, more heads at wider levels); None: `num_heads` heads everywhere."""
    transformer_norm_eps: float = Field(1e-5, gt=0)
    """Epsilon of the GroupNorm in front of each SpatialTransformer (Stable Diffusion and diffusers use 1e-6)."""
    transformer_depth: int = Field(1, ge=1)
    """Transformer blocks (self-attn, cross-attn, feed-forward) per SpatialTransformer."""
    context_dim: int = Field(384, ge=1)
    """Hidden size of the text encoder tokens used as cross-attention keys/values (384 MiniLM, 768 CLIP-L)."""
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    """Dropout probability inside ResBlocks (before their last conv)."""
    norm_groups: int = Field(32, ge=1)
    """Groups of every GroupNorm; must divide model_channels * m for every m in channel_mult."""
    ff_mult: int = Field(4, ge=1)
    """Hidden width of the GEGLU feed-forward, as a multiple of the level channels."""
    gradient_checkpointing: bool = False
    """Recompute ResBlock and transformer activations in the backward pass (less memory, ~30% slower)."""

    @model_validator(mode="after")
    def _check_shapes(self) -> "UNetConfig":
        n = len(self.channel_mult)
        if n == 0:
            raise ValueError("channel_mult: must list at least one level")
        if any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult: every multiplier must be >= 1 (got {self.channel_mult})")
        bad = [lvl for lvl in self.attention_levels if not 0 <= lvl < n]
        if bad:
            raise ValueError(f"attention_levels: {bad} out of range; valid levels are 0..{n - 1} "
                             f"(len(channel_mult) = {n})")
        if len(set(self.attention_levels)) != len(self.attention_levels):
            raise ValueError(f"attention_levels: duplicates in {self.attention_levels}")
        for m in [1, *self.channel_mult]:
            ch = self.model_channels * m
            if ch % self.norm_groups:
                raise ValueError(f"norm_groups: {self.norm_groups} does not divide {ch} channels "
                                 f"(model_channels={self.model_channels} x {m})")
        for lvl in sorted({*self.attention_levels, n - 1}):
            ch = self.model_channels * self.channel_mult[lvl]
            name, value = ("head_dim", self.head_dim) if self.head_dim else ("num_heads", self.num_heads)
            if ch % value:
                raise ValueError(f"{name}: {value} does not divide {ch} channels at level {lvl} "
                                 f"(transformers at attention_levels and the mid block need it)")
        return self

    def heads(self, channels: int) -> int:
        """Attention heads of a transformer over `channels` channels."""
        return channels // self.head_dim if self.head_dim else self.num_heads

"""Conditional U-Net and EMA: shapes, zero-init, masking, batching, checkpointing, overfitting, EMA math."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as dist
from pydantic import ValidationError
from safetensors.torch import load_file, save_file
from torch import nn

from ldm_core.diffusion import DiffusionConfig, NoiseSchedule, training_loss
from ldm_core.ema import EMA
from ldm_core.unet import UNet, UNetConfig, timestep_embedding

CTX_DIM = 8


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread, and on shared cores two threads per process thrash (40x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_config(**overrides) -> UNetConfig:
    fields = dict(model_channels=16, channel_mult=[1, 2], num_res_blocks=1, attention_levels=[1], num_heads=2,
                  context_dim=CTX_DIM, norm_groups=8)
    fields.update(overrides)
    return UNetConfig(**fields)


def randomized_unet(seed: int = 0, **overrides) -> UNet:
    """A tiny U-Net whose zero-initialised layers got random weights, so its output depends on everything."""
    torch.manual_seed(seed)
    model = UNet(tiny_config(**overrides))
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(std=0.1)
    return model.eval()


def inputs(batch: int = 2, size: tuple[int, int] = (8, 8), tokens: int = 5, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, *size, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g)
    context = torch.randn(batch, tokens, CTX_DIM, generator=g)
    return x, t, context


# ------------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        (dict(attention_levels=[2]), "attention_levels"),
        (dict(attention_levels=[-1]), "attention_levels"),
        (dict(num_heads=3), "num_heads"),
        (dict(norm_groups=5), "norm_groups"),
        (dict(channel_mult=[]), "channel_mult"),
        (dict(dropout=1.0), "dropout"),
        (dict(bogus=1), "bogus"),
    ],
)
def test_config_rejects_bad_shapes_naming_the_field(overrides, field):
    with pytest.raises(ValidationError, match=field):
        tiny_config(**overrides)


def test_timestep_embedding_matches_formula():
    t = torch.tensor([0, 1, 17, 999])
    dim = 10
    emb = timestep_embedding(t, dim).numpy()
    half = dim // 2
    freqs = np.exp(-math.log(10000.0) * np.arange(half) / half)
    args = t.numpy()[:, None].astype(np.float64) * freqs[None]
    expected = np.concatenate([np.cos(args), np.sin(args)], axis=1)
    np.testing.assert_allclose(emb, expected, atol=1e-4)
    odd = timestep_embedding(t, dim + 1)
    assert odd.shape == (4, dim + 1) and torch.all(odd[:, -1] == 0)
    assert torch.allclose(timestep_embedding(t.float(), dim), torch.from_numpy(emb))


# ------------------------------------------------------------------------------------------------ forward

def test_fresh_unet_outputs_zeros_and_keeps_shape():
    torch.manual_seed(0)
    model = UNet(tiny_config())
    for size in [(8, 8), (4, 4), (5, 6)]:
        x, t, context = inputs(size=size)
        out = model(x, t, context)
        assert out.shape == x.shape
        assert torch.count_nonzero(out) == 0
        assert randomized_unet()(x, t, context).abs().mean() > 1e-3


def test_three_levels_reach_1x1_and_float_timesteps_work():
    model = randomized_unet(channel_mult=[1, 2, 2], attention_levels=[0, 2])
    x, t, context = inputs(size=(4, 4))
    out = model(x, t.float(), context)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.allclose(out, model(x, t, context), atol=1e-6)


def test_forward_rejects_wrong_shapes():
    model = randomized_unet()
    x, t, context = inputs()
    with pytest.raises(ValueError, match="context"):
        model(x, t, context[..., :-1])
    with pytest.raises(ValueError, match="x"):
        model(x[:, :3], t, context)
    with pytest.raises(ValueError, match="t"):
        model(x, t[:1], context)
    with pytest.raises(ValueError, match="context_mask"):
        model(x, t, context, torch.ones(2, 3, dtype=torch.bool))


def test_masked_context_tokens_do_not_affect_output():
    model = randomized_unet()
    x, t, context = inputs(tokens=6)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 0, 0, 0, 0, 0]], dtype=torch.bool)
    changed = context.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), CTX_DIM) * 100
    with torch.no_grad():
        ref = model(x, t, context, mask)
        assert torch.allclose(model(x, t, changed, mask), ref, rtol=0, atol=1e-6)
        # 0/1 integer masks behave like bool masks.
        assert torch.allclose(model(x, t, changed, mask.long()), ref, rtol=0, atol=1e-6)
        # Visible tokens do matter, and without the mask the padding tokens would matter too.
        visible = context.clone()
        visible[0, 0] += 1.0
        assert (model(x, t, visible, mask) - ref)[0].abs().max() > 1e-4
        assert (model(x, t, changed, None) - ref).abs().max() > 1e-4


def test_fully_masked_condition_is_finite_and_ignores_context():
    model = randomized_unet().train()
    x, t, context = inputs()
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    out = model(x, t, context, mask)
    out.square().mean().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():
        other = model(x, t, torch.randn_like(context), mask)
    assert torch.allclose(other[1], out[1].detach(), atol=1e-6)
    assert (other[0] - out[0].detach()).abs().max() > 1e-4


def test_bf16_autocast_forward_and_backward_are_finite():
    """The mixed-precision path (CUDA uses the same autocast code) with a fully masked row."""
    model = randomized_unet().train()
    x, t, context = inputs()
    mask = torch.tensor([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t, context, mask)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    out.float().square().mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_samples_in_a_batch_are_independent():
    """GroupNorm has no batch statistics: a sample's output does not depend on its batch-mates
    (classifier-free guidance relies on this when it stacks [uncond; cond])."""
    model = randomized_unet()
    x, t, context = inputs(batch=3)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        batched = model(x, t, context, mask)
        single = torch.cat([model(x[i:i + 1], t[i:i + 1], context[i:i + 1], mask[i:i + 1]) for i in range(3)])
    assert torch.allclose(batched, single, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    x, t, context = inputs()
    grads = []
    for ckpt in (False, True):
        model = randomized_unet(gradient_checkpointing=ckpt).train()
        model(x, t, context).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_tiny_unet_overfits_one_batch(prediction):
    torch.manual_seed(0)
    model = UNet(tiny_config()).train()
    schedule = NoiseSchedule(DiffusionConfig())
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(4, 4, 8, 8, generator=g)
    context = torch.randn(4, 5, CTX_DIM, generator=g)
    mask = torch.ones(4, 5, dtype=torch.bool)
    t = torch.tensor([10, 300, 600, 900])
    eps = torch.randn(x0.shape, generator=g)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(100):
        loss, metrics = training_loss(model, x0, context, mask, schedule, prediction=prediction, t=t, eps=eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(metrics["loss"].item())
    print(f"overfit ({prediction}): loss {losses[0]:.4f} -> {losses[-1]:.2e} in 100 steps")
    if prediction == "eps":
        assert losses[0] == pytest.approx(eps.square().mean().item(), rel=1e-5)  # a fresh U-Net predicts 0
    assert losses[-1] < losses[0] / 100


# --------------------------------------------------------------------------------------------------- EMA

def _linear(value: float) -> nn.Linear:
    layer = nn.Linear(2, 1)
    with torch.no_grad():
        layer.weight.fill_(value)
        layer.bias.fill_(value)
    return layer


def test_ema_matches_hand_computed_average_with_warmup():
    model = _linear(0.0)
    ema = EMA(model, decay=0.9, warmup=True)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]):
        with torch.no_grad():
            model.weight.fill_(value)
            model.bias.fill_(-value)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        ema.update(model)
    assert ema.num_updates == 7
    assert ema.shadow["weight"][0, 0].item() == pytest.approx(expected, rel=1e-6)
    assert ema.shadow["bias"][0].item() == pytest.approx(-expected, rel=1e-6)
    # Warm-up reached the cap: (1 + 7) / (10 + 7) < 0.9 still, so the decay in use is the warm-up value.
    assert ema.current_decay() == pytest.approx(8 / 17)

    plain = EMA(_linear(0.0), decay=0.5, warmup=False)
    target = _linear(8.0)
    plain.update(target)
    plain.update(target)
    assert plain.shadow["weight"][0, 0].item() == pytest.approx(8.0 * (1 - 0.5**2))


def test_ema_copy_to_average_parameters_and_safetensors_roundtrip(tmp_path):
    model = _linear(1.0)
    ema = EMA(model, decay=0.5, warmup=False)
    with torch.no_grad():
        model.weight.fill_(3.0)
    ema.update(model)  # weight shadow: 0.5 * 1 + 0.5 * 3 = 2
    with ema.average_parameters(model):
        assert model.weight[0, 0].item() == pytest.approx(2.0)
    assert model.weight[0, 0].item() == pytest.approx(3.0)

    save_file(ema.state_dict(), tmp_path / "ema.safetensors")
    restored = EMA(_linear(0.0), decay=0.5, warmup=False)
    restored.load_state_dict(load_file(tmp_path / "ema.safetensors"))
    assert restored.num_updates == 1
    target = _linear(0.0)
    restored.copy_to(target)
    assert target.weight[0, 0].item() == pytest.approx(2.0) and target.bias[0].item() == pytest.approx(1.0)

    with pytest.raises(ValueError, match="missing"):
        EMA(nn.Linear(2, 1, bias=False)).load_state_dict(ema.state_dict())


def test_ema_unwraps_ddp(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        model = _linear(1.0)
        ddp = nn.parallel.DistributedDataParallel(model)
        ema = EMA(ddp, decay=0.5, warmup=False)
        assert set(ema.state_dict()) == {"weight", "bias", "_ema.num_updates"}
        with torch.no_grad():
            model.weight.fill_(5.0)
        ema.update(ddp)
        plain = _linear(0.0)
        ema.copy_to(plain)  # DDP-trained EMA loads into an unwrapped model by name
        assert plain.weight[0, 0].item() == pytest.approx(3.0)
    finally:
        dist.destroy_process_group()

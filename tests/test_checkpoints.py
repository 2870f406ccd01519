import torch
from safetensors.torch import load_file

from pipelines.models.checkpoints import load_meta, load_module, load_optimizer, save_checkpoint


def _model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def test_checkpoint_round_trip_restores_model_and_adam_state(tmp_path):
    model = _model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        model(torch.randn(5, 4)).pow(2).mean().backward()
        opt.step()
    save_checkpoint(tmp_path, modules={"model": model}, optimizers={"opt": opt}, meta={"step": 3})
    assert not any(p.suffix in {".pt", ".pkl", ".bin"} for p in tmp_path.iterdir())

    fresh = _model()
    torch.nn.init.zeros_(fresh[0].weight)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_module(tmp_path, "model", fresh)
    load_optimizer(tmp_path, "opt", fresh_opt)
    assert load_meta(tmp_path)["step"] == 3
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    sa, sb = opt.state_dict(), fresh_opt.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for pid in sa["state"]:
        for key in sa["state"][pid]:
            assert torch.equal(torch.as_tensor(sa["state"][pid][key]), torch.as_tensor(sb["state"][pid][key]))

    # Both continue identically after the restore.
    batch = torch.randn(5, 4)
    for m, o in ((model, opt), (fresh, fresh_opt)):
        o.zero_grad()
        m(batch).pow(2).mean().backward()
        o.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.allclose(a, b)


def test_checkpoints_of_compiled_modules_keep_plain_keys(tmp_path):
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    compiled = torch.compile(model)  # wrapping only: nothing is compiled until it is called
    assert all(k.startswith("_orig_mod.") for k in compiled.state_dict())
    save_checkpoint(tmp_path, modules={"model": compiled}, meta={"step": 1})
    assert set(load_file(str(tmp_path / "model.safetensors"))) == set(model.state_dict())
    fresh = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.ReLU(), torch.nn.Linear(3, 1))
    load_module(tmp_path, "model", torch.compile(fresh))  # and loads back into a compiled module
    assert all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))


def test_checkpoint_and_autoencoder_files_are_readable_like_any_new_file(tmp_path):
    """safetensors writes owner-only (0600); in a team's shared folder checkpoints, published autoencoders and
    exports must get the mode every other new file gets (umask 022 here: 0644)."""
    import os
    import stat

    from ldm_core.autoencoder import AutoencoderConfig, AutoencoderKL

    mask = os.umask(0o022)
    try:
        save_checkpoint(tmp_path / "ckpt", modules={"model": _model()}, optimizers={}, meta={"step": 0})
        AutoencoderKL(AutoencoderConfig(base_channels=8, channel_mult=[1], num_res_blocks=1, norm_groups=4)).save_pretrained(
            tmp_path / "ae")
    finally:
        os.umask(mask)
    files = [*(tmp_path / "ckpt").glob("*.safetensors"), *(tmp_path / "ae").glob("*.safetensors")]
    assert len(files) == 2 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o644}

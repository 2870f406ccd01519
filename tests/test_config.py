"""Every shipped config loads; bad configs fail early and name the field."""

from pathlib import Path

import pytest

from ldm_core.config import ConfigError
from pipelines.config import PipelineConfig, load_config, parse_override

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


def test_there_are_configs():
    assert {p.name for p in CONFIGS} >= {"quickstart.yaml", "photos.yaml", "sd_f8.yaml"}


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, PipelineConfig)
    assert path.read_text().startswith("#"), "each config opens with a comment header saying what it is for"
    assert Path(cfg.run.output_uri).is_absolute() or "://" in cfg.run.output_uri


def test_override_sets_typed_values():
    cfg = load_config(REPO / "configs/quickstart.yaml", ["stage_a.train.max_steps=7", "stage_a.optim.lr=1e-3", "stage_a.scaling.use_gpu=true"])
    assert cfg.stage_a.train.max_steps == 7
    assert cfg.stage_a.optim.lr == pytest.approx(1e-3)
    assert cfg.stage_a.scaling.use_gpu is True


def test_unknown_key_is_named():
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "configs/quickstart.yaml", ["stage_a.train.max_stepz=7"])
    assert "stage_a.train.max_stepz" in str(e.value) and "unknown key" in str(e.value)


def test_bad_value_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((REPO / "configs/quickstart.yaml").read_text() + "\nstorage:\n  s3_region: [1, 2]\n")
    with pytest.raises(ConfigError) as e:
        load_config(bad, ["stage_a.model.kind=diffusion"])
    msg = str(e.value)
    assert "stage_a.model.kind" in msg and "storage.s3_region" in msg


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_override("stage_a.train.max_steps")
    with pytest.raises(ConfigError, match="is a value, not a section"):
        load_config(REPO / "configs/quickstart.yaml", ["run.name.x=1"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(REPO / "configs/nope.yaml")


def test_stage_b_prompt_eval_follows_the_prompts_and_checks_them():
    quickstart = REPO / "configs/quickstart.yaml"
    cfg = load_config(quickstart)  # ten MNIST digit prompts: on by default
    assert cfg.stage_b.prompt_eval.active(cfg.sample.prompts)
    cats = load_config(quickstart, ["sample.prompts=[a cat, a handwritten digit one]"])
    assert not cats.stage_b.prompt_eval.active(cats.sample.prompts)
    assert not load_config(quickstart, ["stage_b.prompt_eval.enabled=false"]).stage_b.prompt_eval.active(cfg.sample.prompts)
    numbers = load_config(REPO / "configs/numbers.yaml")  # "the number N": judged half by half, on by default too
    assert numbers.stage_b.prompt_eval.active(numbers.sample.prompts) and numbers.data.size == (32, 64)
    mixed = load_config(quickstart, ["sample.prompts=[the number 42, a handwritten digit one]"])
    assert not mixed.stage_b.prompt_eval.active(mixed.sample.prompts)
    # Cross-section checks are one line each, naming the fields (not a dump of the whole config).
    for overrides, message in (
        (["sample.prompts=[a cat]", "stage_b.prompt_eval.enabled=true"], "stage_b.prompt_eval.enabled=true needs sample.prompts"),
        (["stage_b.diffusion.num_timesteps=10"], "stage_b.prompt_eval.steps=25: more than stage_b.diffusion.num_timesteps=10"),
    ):
        with pytest.raises(ConfigError) as e:
            load_config(quickstart, overrides)
        assert str(e.value).splitlines()[1:] == [str(e.value).splitlines()[1]] and message in str(e.value)
    with pytest.raises(ConfigError, match="stage_b.diffusion: .*zero_terminal_snr needs prediction='v'"):
        load_config(quickstart, ["stage_b.diffusion.zero_terminal_snr=true"])

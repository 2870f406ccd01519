"""The pipeline's configuration: typed sections, one YAML file, `--set` overrides. Imports no feature.

- `pipeline.py`: `PipelineConfig` (one section per stage) and `load_config`;
- `sections.py`: sections several stages share (run, Ray, MLflow, storage, scaling, optimiser, loop, ...);
- `data.py`: the `data` section (dataset location, reader, split);
- `prompts.py`: what the configs' prompts name (the MNIST digit words).
"""

from pipelines.config.pipeline import (
    EncodeConfig,
    PipelineConfig,
    SampleConfig,
    StageAConfig,
    StageBConfig,
    load_config,
    load_config_dict,
    parse_override,
)

__all__ = [
    "EncodeConfig",
    "PipelineConfig",
    "SampleConfig",
    "StageAConfig",
    "StageBConfig",
    "load_config",
    "load_config_dict",
    "parse_override",
]

"""Lineage on demand: the chain of MLflow runs from a sample run (or a registered model version) back to the dataset.

    python pipelines/lineage.py RUN_ID_OR_MODEL_URI [--config configs/quickstart.yaml] [--format text|json]

RUN_ID_OR_MODEL_URI: a run id, `runs:/<run id>/...`, `models:/<name>/<version>` or `models:/<name>@<alias>`.
For each run of the chain (newest first: sample -> stage_b -> encode -> stage_a -> prepare) it prints its stage,
id, status, key metrics, and the URIs it consumed and produced. The chain follows the `upstream_run_ids` tags
(README "Lineage in MLflow"); the store is MLFLOW_TRACKING_URI, else the config's `mlflow.tracking_uri`.
The DAG's parent run links the same chain in its `summary.md`.
"""

from __future__ import annotations

if __package__ in (None, ""):  # run as a script: make the repo root importable, not pipelines/
    import sys
    from pathlib import Path

    sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse
from pathlib import Path

import mlflow
from mlflow.tracking import MlflowClient

from ldm_core.config import ConfigError
from pipelines.dag.lineage import LineageEntry, LineageError, lineage_chain, to_json, to_text
from pipelines.platform import tracking
from pipelines.platform.cli import add_config_args, config_from_args
from pipelines.platform.runtime import exit_on, setup_logging
from pipelines.run import STAGES


def main(argv: list[str] | None = None) -> list[LineageEntry]:
    setup_logging()
    parser = add_config_args(argparse.ArgumentParser(description=__doc__.split("\n")[0]))
    parser.add_argument("ref", metavar="RUN_ID_OR_MODEL_URI", help="a run id, runs:/<id>/..., models:/<name>/<version> or models:/<name>@<alias>")
    parser.add_argument("--format", choices=("text", "json"), default="text", help="text for people, json for tools")
    args = parser.parse_args(argv)
    with exit_on(ConfigError, LineageError):
        cfg = config_from_args(args)
        uri = tracking.tracking_uri(cfg.mlflow)
        if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///"):]).is_file():
            raise LineageError(f"no MLflow store at {uri} (set MLFLOW_TRACKING_URI or mlflow.tracking_uri)")
        mlflow.set_tracking_uri(uri)
        chain = lineage_chain(MlflowClient(uri), args.ref, STAGES)
    print(to_json(chain) if args.format == "json" else to_text(chain))
    return chain


if __name__ == "__main__":
    main()

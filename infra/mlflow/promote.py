"""Promote a reviewed candidate version, as the promoter: its files (checked against the sha256 recorded when the
pipeline registered it) are copied into the promoter's experiment `ldm-promoted`, registered as a version of
`<name>-promoted` with the same digests, and the alias (default `champion`) is pointed at that version.

Run it from the repository root with the project installed, as the MLflow user `promoter` (infra/README.md):

    MLFLOW_TRACKING_URI=https://mlflow:5000 MLFLOW_TRACKING_SERVER_CERT_PATH=ca.pem \\
    MLFLOW_TRACKING_USERNAME=promoter MLFLOW_TRACKING_PASSWORD="$(cat promoter-password)" \\
        python infra/mlflow/promote.py ldm-unet 7 --alias champion

The pipeline's user cannot do this: it may read the promoted models and their experiment, and change nothing of
them (the admin hands them to the promoter with add_user.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, for `pipelines`


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", help="the candidate registered model, e.g. ldm-unet")
    parser.add_argument("version", help="the candidate version to promote")
    parser.add_argument("--alias", default="champion", help="alias to point at the promoted copy (default champion)")
    args = parser.parse_args(argv)

    from mlflow.exceptions import MlflowException

    from ldm_core.config import ConfigError
    from pipelines.models.provenance import promote

    try:
        uri = promote(args.model, args.version, args.alias)
    except ConfigError as err:
        raise SystemExit(f"error: {err}") from None
    except MlflowException as err:
        raise SystemExit(f"error: cannot promote models:/{args.model}/{args.version}: {err.message}") from None
    print(f"promoted models:/{args.model}/{args.version} to {uri} (@{args.alias})", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Create a user of the MLflow tracking server (basic auth), its password read from a file, never from argv; as the
admin, create the experiments and registered models that user is to own and grant it MANAGE on them.

An admin runs it once per user: `pipeline` for the jobs, `promoter` for the person who promotes models
(`--experiment ldm-promoted --model ldm-autoencoder-promoted --model ldm-unet-promoted`: infra/mlflow/promote.py),
and one user per person (they read everything, through the server's default READ permission, and write nothing of
the pipeline's or the promoter's). Any authenticated user may create an
experiment or registered model of a name nobody has taken, and owns what it creates; so the admin takes the
pipeline's names first (`--experiment`, `--model`) and hands them to `pipeline`, before anyone else can:

    MLFLOW_TRACKING_URI=https://mlflow:5000 MLFLOW_TRACKING_SERVER_CERT_PATH=ca.pem \\
    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="$(cat admin-password)" \\
        python infra/mlflow/add_user.py pipeline --password-file pipeline-password \\
        --experiment ldm-photos --experiment ldm-sd-f8 --model ldm-autoencoder --model ldm-unet

Without --password-file the user must exist already (to hand it more experiments or models later).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def add_user(tracking_uri: str, username: str, password: str) -> None:
    """Create `username` with `password` on the server at `tracking_uri`, as the admin of the environment."""
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    try:
        get_app_client("basic-auth", tracking_uri=tracking_uri).create_user(username=username, password=password)
    except MlflowException as err:  # the server's message names the cause (exists, weak password, not admin)
        raise SystemExit(f"cannot create MLflow user {username!r}: {err.message}") from None


def hand_over(tracking_uri: str, username: str, experiments: list[str], models: list[str]) -> list[str]:
    """Create each experiment and registered model as the admin unless it exists, and grant `username` MANAGE on
    it. Returns a warning for each that existed already: whoever created it keeps its own MANAGE."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException
    from mlflow.server import get_app_client

    client, auth = MlflowClient(tracking_uri), get_app_client("basic-auth", tracking_uri=tracking_uri)
    existed = "existed already: whoever created it may still write to it (check its permissions, or delete it " \
              "and run this again)"
    warnings, grants = [], []
    try:
        for name in experiments:
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                grants.append(("experiment", client.create_experiment(name)))
            else:
                warnings.append(f"experiment {name!r} {existed}")
                grants.append(("experiment", experiment.experiment_id))
        for name in models:
            try:
                client.create_registered_model(name)
            except MlflowException as err:
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                warnings.append(f"registered model {name!r} {existed}")
            grants.append(("registered_model", name))
        for resource_type, resource_id in grants:
            try:
                auth.grant_user_permission(username, resource_type, resource_id, "MANAGE")
            except MlflowException as err:  # an earlier grant, maybe a lesser one: replace it
                if err.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
                auth.revoke_user_permission(username, resource_type, resource_id)
                auth.grant_user_permission(username, resource_type, resource_id, "MANAGE")
    except MlflowException as err:
        raise SystemExit(f"cannot hand experiments and models to MLflow user {username!r}: {err.message}") from None
    return warnings


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("username")
    parser.add_argument("--password-file", type=Path,
                        help="file holding the new user's password (without it, the user must exist)")
    parser.add_argument("--experiment", action="append", default=[], metavar="NAME",
                        help="experiment the user owns: created by the admin if missing, the user granted MANAGE")
    parser.add_argument("--model", action="append", default=[], metavar="NAME",
                        help="registered model the user owns: created by the admin if missing, the user granted MANAGE")
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("https://", "http://127.", "http://localhost")):
        raise SystemExit("set MLFLOW_TRACKING_URI to the server (https://, or http:// on this host only)")
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise SystemExit("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an admin's credentials")
    if args.password_file is None and not (args.experiment or args.model):
        raise SystemExit("give --password-file to create the user, or --experiment/--model to hand it those")
    if args.password_file is not None:
        try:
            password = args.password_file.read_text().strip()
        except OSError as err:
            raise SystemExit(f"cannot read --password-file {args.password_file}: {err.strerror}") from None
        add_user(uri, args.username, password)
        print(f"created MLflow user {args.username!r}", file=sys.stderr)
    for warning in hand_over(uri, args.username, args.experiment, args.model):
        print(f"warning: {warning}", file=sys.stderr)
    for kind, names in (("experiments", args.experiment), ("registered models", args.model)):
        if names:
            print(f"{args.username!r} manages the {kind} {', '.join(names)}", file=sys.stderr)


if __name__ == "__main__":
    main()

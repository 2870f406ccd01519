"""Create a user of the MLflow tracking server (basic auth), its password read from a file, never from argv.

An admin runs it once per user: `pipeline` for the jobs (it creates the experiments and registered models
it logs to, so it manages them and nobody else may write there) and one user per person (they read
everything, through the server's default READ permission, and write nothing of the pipeline's).

    MLFLOW_TRACKING_URI=https://mlflow:5000 MLFLOW_TRACKING_SERVER_CERT_PATH=ca.pem \\
    MLFLOW_TRACKING_USERNAME=admin MLFLOW_TRACKING_PASSWORD="$(cat admin-password)" \\
        python infra/mlflow/add_user.py pipeline --password-file pipeline-password
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("username")
    parser.add_argument("--password-file", type=Path, required=True, help="file holding the new user's password")
    args = parser.parse_args(argv)
    uri = os.environ.get("MLFLOW_TRACKING_URI", "")
    if not uri.startswith(("https://", "http://127.", "http://localhost")):
        raise SystemExit("set MLFLOW_TRACKING_URI to the server (https://, or http:// on this host only)")
    if not os.environ.get("MLFLOW_TRACKING_USERNAME") or not os.environ.get("MLFLOW_TRACKING_PASSWORD"):
        raise SystemExit("set MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD to an admin's credentials")
    try:
        password = args.password_file.read_text().strip()
    except OSError as err:
        raise SystemExit(f"cannot read --password-file {args.password_file}: {err.strerror}") from None
    add_user(uri, args.username, password)
    print(f"created MLflow user {args.username!r}", file=sys.stderr)


if __name__ == "__main__":
    main()

"""Copy one AWS Secrets Manager secret into a file that only its owner can read, printing nothing of it.

Cluster nodes run this during setup with their IAM instance profile, so no key is ever written to a node, a
YAML file or a log: the Ray auth token goes to ~/.ray/auth_token (Ray reads it there when
RAY_AUTH_MODE=token), the MLflow database URI to the root-only file that systemd hands to the tracking server.

    python infra/aws/fetch_secret.py SECRET_ID DEST
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import boto3
from botocore.exceptions import BotoCoreError, ClientError


def fetch_secret(secret_id: str, dest: Path) -> None:
    """Write the string value of `secret_id` to `dest` (mode 0600), atomically.

    Errors name the secret and the AWS error code, never the value.
    """
    try:
        value = boto3.client("secretsmanager").get_secret_value(SecretId=secret_id).get("SecretString")
    except ClientError as err:
        raise SystemExit(f"cannot read secret {secret_id!r}: {err.response['Error']['Code']}") from None
    except BotoCoreError as err:
        raise SystemExit(f"cannot read secret {secret_id!r}: {type(err).__name__}") from None
    if not value:
        raise SystemExit(f"secret {secret_id!r} has no string value")
    dest = dest.expanduser()
    dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(value)
    os.chmod(tmp, 0o600)  # the file may have existed with wider permissions
    os.replace(tmp, dest)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("secret_id", help="Secrets Manager name or ARN")
    parser.add_argument("dest", type=Path, help="file to write (created 0600, parent 0700)")
    args = parser.parse_args(argv)
    fetch_secret(args.secret_id, args.dest)
    print(f"wrote secret {args.secret_id!r} to {args.dest}", file=sys.stderr)


if __name__ == "__main__":
    main()

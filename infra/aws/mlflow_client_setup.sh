#!/usr/bin/env bash
# MLflow client setup of every Ray node (setup_commands of infra/aws/cluster.yaml). The tracking server runs on
# a host of its own (infra/aws/mlflow_host_setup.sh); the jobs reach it over HTTPS as the MLflow user `pipeline`.
# With the node's instance role, this copies from Secrets Manager:
#
#   ~/.ldm/mlflow-ca.pem       the server's certificate: the one certificate the clients trust for it
#   ~/.ldm/mlflow-password     the password of the MLflow user (mode 0600)
#
# and writes ~/.ldm/mlflow.env (0600), which exports MLFLOW_TRACKING_URI, MLFLOW_TRACKING_SERVER_CERT_PATH,
# MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD (read from the file when sourced). `ray start` sources it
# (cluster.yaml), so every job driver and worker has the credentials in its environment and nowhere else: not in
# a config file, not on a command line.
#
#   LDM_MLFLOW_URI    https://<the server's name in its certificate>:<port>. https only.
#   LDM_MLFLOW_USER   the MLflow user of the jobs. Default pipeline.
set -euo pipefail

uri="${LDM_MLFLOW_URI:?set LDM_MLFLOW_URI (e.g. https://mlflow.ldm.internal:5000)}"
[[ "$uri" == https://* ]] || {
    echo "infra/aws/mlflow_client_setup.sh: LDM_MLFLOW_URI=$uri: credentials go over https only" >&2
    exit 2
}
user="${LDM_MLFLOW_USER:-pipeline}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="${LDM_PYTHON:-$repo/.venv/bin/python}"
dir="$HOME/.ldm"

install -d -m 0700 "$dir"
"$python" "$repo/infra/aws/fetch_secret.py" ldm/mlflow-ca-cert "$dir/mlflow-ca.pem"
"$python" "$repo/infra/aws/fetch_secret.py" ldm/mlflow-pipeline-password "$dir/mlflow-password"
(
    umask 077
    cat >"$dir/mlflow.env" <<ENV
export MLFLOW_TRACKING_URI=$uri
export MLFLOW_TRACKING_SERVER_CERT_PATH=$dir/mlflow-ca.pem
export MLFLOW_TRACKING_USERNAME=$user
export MLFLOW_TRACKING_PASSWORD="\$(cat $dir/mlflow-password)"
ENV
)
# Interactive shells on the node (`ray exec`, `ray attach`) get the same settings.
touch ~/.ldm_env
grep -qxF ". $dir/mlflow.env" ~/.ldm_env || echo ". $dir/mlflow.env" >>~/.ldm_env
echo "MLflow client settings for $user at $uri written to $dir/mlflow.env" >&2

#!/usr/bin/env bash
# Head-node setup, run by the head_setup_commands of infra/aws/cluster.yaml after the project is installed:
# starts the MLflow tracking server (systemd unit infra/mlflow/ldm-mlflow.service) on the head's private
# address and writes /etc/ldm/head.env, which `ray start --head` and interactive shells source, so that
# every job driver and worker gets MLFLOW_TRACKING_URI.
#
#   LDM_MLFLOW_DB_SECRET   Secrets Manager id of the MLflow database URI (a postgresql:// URI, password included)
#   LDM_MLFLOW_ARTIFACTS   s3:// destination of MLflow artifacts
#   LDM_MLFLOW_PORT        default 5000
set -euo pipefail

: "${LDM_MLFLOW_DB_SECRET:?set LDM_MLFLOW_DB_SECRET (Secrets Manager id of the MLflow database URI)}"
: "${LDM_MLFLOW_ARTIFACTS:?set LDM_MLFLOW_ARTIFACTS (s3:// destination of MLflow artifacts)}"
port="${LDM_MLFLOW_PORT:-5000}"
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
python="$repo/.venv/bin/python"

# The head's private address, from the instance metadata service (IMDSv2).
imds_token="$(curl -sf -X PUT http://169.254.169.254/latest/api/token \
    -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')"
head_ip="$(curl -sf -H "X-aws-ec2-metadata-token: $imds_token" \
    http://169.254.169.254/latest/meta-data/local-ipv4)"

sudo install -d -m 0755 /etc/ldm
# The database URI goes straight from Secrets Manager into a root-only file; systemd passes it to the
# service as a credential (LoadCredential), so it is in no unit file, environment file or log.
region="${AWS_DEFAULT_REGION:?set AWS_DEFAULT_REGION (cluster.yaml writes it to ~/.ldm_env)}"
sudo env AWS_DEFAULT_REGION="$region" \
    "$python" "$repo/infra/aws/fetch_secret.py" "$LDM_MLFLOW_DB_SECRET" /etc/ldm/mlflow-db-uri
sudo chown root:root /etc/ldm/mlflow-db-uri

sudo tee /etc/ldm/mlflow.env >/dev/null <<ENV
MLFLOW_HOST=$head_ip
MLFLOW_PORT=$port
MLFLOW_ARTIFACTS_DESTINATION=$LDM_MLFLOW_ARTIFACTS
AWS_DEFAULT_REGION=$region
ENV
sudo tee /etc/ldm/head.env >/dev/null <<ENV
export MLFLOW_TRACKING_URI=http://$head_ip:$port
ENV

# Interactive shells on the head (`ray exec`, `ray attach`) see the same tracking URI.
grep -qxF '. /etc/ldm/head.env' ~/.ldm_env || echo '. /etc/ldm/head.env' >> ~/.ldm_env

sudo install -m 0644 "$repo/infra/mlflow/ldm-mlflow.service" /etc/systemd/system/ldm-mlflow.service
sudo systemctl daemon-reload
sudo systemctl enable ldm-mlflow.service
sudo systemctl restart ldm-mlflow.service

for _ in $(seq 1 60); do
    if curl -sf "http://$head_ip:$port/health" >/dev/null; then
        echo "MLflow tracking server up at http://$head_ip:$port"
        exit 0
    fi
    sleep 2
done
sudo journalctl -u ldm-mlflow.service -n 50 --no-pager >&2
echo "infra/aws/head_setup.sh: MLflow did not answer on http://$head_ip:$port/health" >&2
exit 1

#!/usr/bin/env bash
# Setup of the MLflow host: an EC2 instance of its own (instance profile ldm-mlflow, infra/aws/iam/mlflow-policy.json)
# that is not a Ray node, so no job runs where the server's secrets are and no job's role can read them. Run it
# once, as root, from a copy of this repository on that instance (infra/README.md, "The MLflow host"):
#
#   sudo AWS_DEFAULT_REGION=us-east-1 LDM_MLFLOW_ARTIFACTS=s3://bucket/mlartifacts \
#       LDM_MLFLOW_HOSTNAME=mlflow.ldm.internal bash infra/aws/mlflow_host_setup.sh
#
# It installs MLflow into a root-owned virtual environment under /opt/ldm-mlflow (code its service user cannot
# change), creates the system user ldm-mlflow that runs the server, copies the server's secrets from Secrets
# Manager into root-only files under /etc/ldm-mlflow (systemd passes them to the service as credentials that only
# ldm-mlflow can read), and starts infra/mlflow/ldm-mlflow.service: HTTPS with basic authentication on the host's
# private address.
#
#   LDM_MLFLOW_ARTIFACTS   s3:// destination of MLflow artifacts
#   LDM_MLFLOW_HOSTNAME    the server's private DNS name, as in its certificate (the clients' MLFLOW_TRACKING_URI)
#   LDM_MLFLOW_PORT        default 5000
set -euo pipefail

: "${LDM_MLFLOW_ARTIFACTS:?set LDM_MLFLOW_ARTIFACTS (s3:// destination of MLflow artifacts)}"
: "${LDM_MLFLOW_HOSTNAME:?set LDM_MLFLOW_HOSTNAME (the server name in its certificate, e.g. mlflow.ldm.internal)}"
region="${AWS_DEFAULT_REGION:?set AWS_DEFAULT_REGION}"
port="${LDM_MLFLOW_PORT:-5000}"
[[ "$(id -u)" == 0 ]] || { echo "infra/aws/mlflow_host_setup.sh: run as root (sudo)" >&2; exit 2; }
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
opt=/opt/ldm-mlflow
etc=/etc/ldm-mlflow

id -u ldm-mlflow >/dev/null 2>&1 ||
    useradd --system --no-create-home --home-dir /nonexistent --shell /usr/sbin/nologin ldm-mlflow
install -d -m 0755 -o root -g root "$opt"
dpkg -s python3-venv >/dev/null 2>&1 || (apt-get update -qq && apt-get install -y -qq python3-venv)
test -x "$opt/venv/bin/python" || python3 -m venv "$opt/venv"
"$opt/venv/bin/pip" install -q --upgrade pip
# The mlflow range of pyproject.toml, with the basic-auth app's extra.
"$opt/venv/bin/pip" install -q 'mlflow[auth]>=3.17,<4' 'psycopg2-binary>=2.9' 'boto3>=1.34'
install -m 0755 -o root -g root "$repo/infra/mlflow/serve.sh" "$opt/serve.sh"
install -m 0644 -o root -g root "$repo/infra/aws/fetch_secret.py" "$opt/fetch_secret.py"

# Secrets Manager -> root-only files; the unit's LoadCredential= hands each to the service, readable by it alone.
install -d -m 0700 -o root -g root "$etc"
for name in mlflow-db-uri mlflow-auth-db-uri mlflow-admin-password mlflow-flask-secret-key mlflow-tls-key \
    mlflow-ca-cert; do
    AWS_DEFAULT_REGION="$region" "$opt/venv/bin/python" "$opt/fetch_secret.py" "ldm/$name" "$etc/$name"
done

# The host's private address, from the instance metadata service (IMDSv2).
imds_token="$(curl -sf -X PUT http://169.254.169.254/latest/api/token -H 'X-aws-ec2-metadata-token-ttl-seconds: 60')"
host_ip="$(curl -sf -H "X-aws-ec2-metadata-token: $imds_token" http://169.254.169.254/latest/meta-data/local-ipv4)"
cat >"$etc/mlflow.env" <<ENV
MLFLOW_HOST=$host_ip
MLFLOW_PORT=$port
MLFLOW_ARTIFACTS_DESTINATION=$LDM_MLFLOW_ARTIFACTS
MLFLOW_SERVER_ALLOWED_HOSTS=$LDM_MLFLOW_HOSTNAME:$port,localhost:$port
AWS_DEFAULT_REGION=$region
ENV

install -m 0644 "$repo/infra/mlflow/ldm-mlflow.service" /etc/systemd/system/ldm-mlflow.service
systemctl daemon-reload
systemctl enable ldm-mlflow.service
systemctl restart ldm-mlflow.service

url="https://$LDM_MLFLOW_HOSTNAME:$port"
for _ in $(seq 1 60); do
    if curl -sf --cacert "$etc/mlflow-ca-cert" --resolve "$LDM_MLFLOW_HOSTNAME:$port:$host_ip" "$url/health" >/dev/null; then
        echo "MLflow tracking server up at $url ($host_ip)"
        exit 0
    fi
    sleep 2
done
journalctl -u ldm-mlflow.service -n 50 --no-pager >&2
echo "infra/aws/mlflow_host_setup.sh: MLflow did not answer on $url/health" >&2
exit 1

#!/usr/bin/env bash
# Start the MLflow tracking server that every cluster job logs to (MLFLOW_TRACKING_URI points here).
#
# Metadata goes to a SQL database (Postgres in production, SQLite in the tests); artifacts are proxied by
# the server (--serve-artifacts) to an s3:// destination, so jobs need no S3 rights of their own for them.
# Every setting comes from the environment, and the database URI (it carries the password) never appears
# on a command line, in a unit file or in a manifest:
#
#   MLFLOW_BACKEND_STORE_URI       SQLAlchemy URI of the metadata database. mlflow reads it from the
#                                  environment itself; it is never passed as an argument (argv is public).
#   MLFLOW_BACKEND_STORE_URI_FILE  Alternative: a file holding that URI (a mounted Kubernetes Secret, a
#                                  systemd credential). Wins over MLFLOW_BACKEND_STORE_URI.
#   MLFLOW_ARTIFACTS_DESTINATION   Where the server stores artifacts, e.g. s3://bucket/mlartifacts. Required.
#   MLFLOW_HOST                    Address to bind: loopback or a private (RFC 1918 / ULA) address.
#                                  Default 127.0.0.1. 0.0.0.0 and :: are refused unless
#                                  MLFLOW_BIND_ALL_INTERFACES=true (see below).
#   MLFLOW_BIND_ALL_INTERFACES     "true" only inside a container's own network namespace (a Kubernetes
#                                  pod), whose interfaces are loopback and the private pod network.
#   MLFLOW_PORT                    Default 5000.
#   MLFLOW_WORKERS                 Server worker processes. Default 2.
#   MLFLOW_SERVER_ALLOWED_HOSTS    Host headers accepted (DNS-rebinding protection), comma-separated with
#                                  ports, e.g. "mlflow:5000". Default: mlflow's (localhost, private IPs).
#   MLFLOW_SERVER_ENABLE_JOB_EXECUTION
#                                  mlflow's background job runner (GenAI evaluation jobs). Default false
#                                  here: training runs do not use it, and it adds seven processes.
#   MLFLOW_DISABLE_TELEMETRY       Default true here: the server sends no usage data out of the network.
#   MLFLOW_BIN                     mlflow executable. Default: `mlflow` on PATH.
#
# S3 access uses the standard AWS credential chain (instance role, EKS pod identity); MLFLOW_S3_ENDPOINT_URL
# points it at another S3 API (the tests use a local moto server).
set -euo pipefail

die() {
    echo "infra/mlflow/serve.sh: $*" >&2
    exit 2
}

if [[ -n "${MLFLOW_BACKEND_STORE_URI_FILE:-}" ]]; then
    [[ -r "$MLFLOW_BACKEND_STORE_URI_FILE" ]] ||
        die "MLFLOW_BACKEND_STORE_URI_FILE=$MLFLOW_BACKEND_STORE_URI_FILE is not a readable file"
    MLFLOW_BACKEND_STORE_URI="$(<"$MLFLOW_BACKEND_STORE_URI_FILE")"
fi
[[ -n "${MLFLOW_BACKEND_STORE_URI:-}" ]] ||
    die "set MLFLOW_BACKEND_STORE_URI or MLFLOW_BACKEND_STORE_URI_FILE (the metadata database URI)"
export MLFLOW_BACKEND_STORE_URI

artifacts="${MLFLOW_ARTIFACTS_DESTINATION:-}"
[[ -n "$artifacts" ]] || die "set MLFLOW_ARTIFACTS_DESTINATION (e.g. s3://bucket/mlartifacts)"
unset MLFLOW_ARTIFACTS_DESTINATION  # passed explicitly below

host="${MLFLOW_HOST:-127.0.0.1}"
case "$host" in
    127.* | ::1 | 10.* | 192.168.* | 172.1[6-9].* | 172.2[0-9].* | 172.3[01].* | fd* | fc*) ;;
    0.0.0.0 | ::)
        [[ "${MLFLOW_BIND_ALL_INTERFACES:-}" == "true" ]] ||
            die "MLFLOW_HOST=$host binds every interface; use a loopback or private address, or set" \
                "MLFLOW_BIND_ALL_INTERFACES=true inside a container network namespace"
        ;;
    *) die "MLFLOW_HOST=$host is not a loopback or private IP address" ;;
esac

port="${MLFLOW_PORT:-5000}"
[[ "$port" =~ ^[0-9]+$ ]] || die "MLFLOW_PORT=$port is not a port number"
workers="${MLFLOW_WORKERS:-2}"
[[ "$workers" =~ ^[1-9][0-9]*$ ]] || die "MLFLOW_WORKERS=$workers is not a positive integer"

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

args=(server
    --host "$host"
    --port "$port"
    --workers "$workers"
    --serve-artifacts
    --artifacts-destination "$artifacts")
if [[ -n "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS")
fi

echo "infra/mlflow/serve.sh: mlflow ${args[*]} (backend store from the environment)" >&2
exec "${MLFLOW_BIN:-mlflow}" "${args[@]}"

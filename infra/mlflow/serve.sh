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
#
# Authentication is always on: the server runs MLflow's basic-auth app (`--app-name basic-auth`), every
# request but /health needs a user and password, and users get only the permissions granted to them. Its
# secrets come from files only (mounted Kubernetes Secrets, systemd credentials), never from a default:
#
#   MLFLOW_AUTH_DATABASE_URI_FILE  File holding the SQLAlchemy URI of the users-and-permissions database
#                                  (Postgres in production, may be the metadata database). Required.
#   MLFLOW_AUTH_ADMIN_PASSWORD_FILE
#                                  File holding the admin's password. Needed on the first start, which
#                                  creates the admin user (mlflow refuses to start without it); ignored
#                                  once the user exists.
#   MLFLOW_AUTH_ADMIN_USERNAME     The admin user. Default admin.
#   MLFLOW_FLASK_SERVER_SECRET_KEY_FILE
#                                  File holding the key that signs the UI's CSRF tokens. Required.
#   MLFLOW_AUTH_DEFAULT_PERMISSION What a user may do with experiments and models nobody granted them:
#                                  READ (default) or NO_PERMISSIONS. EDIT and MANAGE are refused (every
#                                  user could then overwrite every run and registered model).
#   MLFLOW_AUTH_CACHE_TTL_SECONDS  Seconds a server worker trusts a password it has checked. Default 60:
#                                  each check is a deliberately slow hash, and a training job sends many
#                                  requests; a changed or deleted password may work on for this long.
#
# Credentials must never cross a network in clear text, so the server itself terminates TLS:
#
#   MLFLOW_TLS_CERT_FILE, MLFLOW_TLS_KEY_FILE
#                                  PEM certificate (chain) and private key: serve HTTPS. Required unless
#                                  MLFLOW_HOST is a loopback address (clients on the same host only).
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

tls_cert="${MLFLOW_TLS_CERT_FILE:-}"
tls_key="${MLFLOW_TLS_KEY_FILE:-}"
if [[ -n "$tls_cert" || -n "$tls_key" ]]; then
    [[ -r "$tls_cert" ]] || die "MLFLOW_TLS_CERT_FILE=$tls_cert is not a readable file"
    [[ -r "$tls_key" ]] || die "MLFLOW_TLS_KEY_FILE=$tls_key is not a readable file"
else
    case "$host" in
        127.* | ::1) ;;
        *) die "MLFLOW_HOST=$host is reachable from other hosts: set MLFLOW_TLS_CERT_FILE and MLFLOW_TLS_KEY_FILE" \
            "(passwords must not cross the network in clear text)" ;;
    esac
fi

# Basic-auth settings. MLflow reads them from its environment and from an ini file; the ini holds the auth
# database URI, so it is written to a fresh directory only this user can read (mktemp -d: mode 0700).
read_secret() {  # VAR_FILE -> the file's content (trailing newline dropped)
    local var="$1" path="${!1:-}"
    [[ -n "$path" ]] || die "set $var (a file holding the secret; see the header of this script)"
    [[ -r "$path" ]] || die "$var=$path is not a readable file"
    local value
    value="$(<"$path")"
    [[ -n "$value" ]] || die "$var=$path is empty"
    printf '%s' "$value"
}
auth_db_uri="$(read_secret MLFLOW_AUTH_DATABASE_URI_FILE)"
MLFLOW_FLASK_SERVER_SECRET_KEY="$(read_secret MLFLOW_FLASK_SERVER_SECRET_KEY_FILE)"
export MLFLOW_FLASK_SERVER_SECRET_KEY
if [[ -n "${MLFLOW_AUTH_ADMIN_PASSWORD_FILE:-}" ]]; then
    MLFLOW_AUTH_ADMIN_PASSWORD="$(read_secret MLFLOW_AUTH_ADMIN_PASSWORD_FILE)"
    export MLFLOW_AUTH_ADMIN_PASSWORD
else
    unset MLFLOW_AUTH_ADMIN_PASSWORD  # only ever from a file
fi
export MLFLOW_AUTH_ADMIN_USERNAME="${MLFLOW_AUTH_ADMIN_USERNAME:-admin}"
default_permission="${MLFLOW_AUTH_DEFAULT_PERMISSION:-READ}"
case "$default_permission" in
    READ | NO_PERMISSIONS) ;;
    *) die "MLFLOW_AUTH_DEFAULT_PERMISSION=$default_permission: use READ or NO_PERMISSIONS (EDIT and MANAGE let every user write everything)" ;;
esac
cache_ttl="${MLFLOW_AUTH_CACHE_TTL_SECONDS:-60}"
[[ "$cache_ttl" =~ ^[0-9]+$ ]] || die "MLFLOW_AUTH_CACHE_TTL_SECONDS=$cache_ttl is not a number of seconds"
auth_dir="$(mktemp -d "${TMPDIR:-/tmp}/ldm-mlflow-auth.XXXXXX")"
(
    umask 077
    printf '[mlflow]\ndefault_permission = %s\ndatabase_uri = %s\nadmin_username = %s\nauth_cache_ttl_seconds = %s\n' \
        "$default_permission" "${auth_db_uri//%/%%}" "$MLFLOW_AUTH_ADMIN_USERNAME" "$cache_ttl" >"$auth_dir/basic_auth.ini"
)
export MLFLOW_AUTH_CONFIG_PATH="$auth_dir/basic_auth.ini"
unset auth_db_uri

export MLFLOW_SERVER_ENABLE_JOB_EXECUTION="${MLFLOW_SERVER_ENABLE_JOB_EXECUTION:-false}"
export MLFLOW_DISABLE_TELEMETRY="${MLFLOW_DISABLE_TELEMETRY:-true}"

args=(server
    --app-name basic-auth
    --host "$host"
    --port "$port"
    --workers "$workers"
    --serve-artifacts
    --artifacts-destination "$artifacts")
if [[ -n "$tls_cert" ]]; then
    args+=(--uvicorn-opts "--ssl-certfile $(printf '%q' "$tls_cert") --ssl-keyfile $(printf '%q' "$tls_key")")
fi
if [[ -n "${MLFLOW_SERVER_ALLOWED_HOSTS:-}" ]]; then
    args+=(--allowed-hosts "$MLFLOW_SERVER_ALLOWED_HOSTS")
fi

echo "infra/mlflow/serve.sh: mlflow ${args[*]} (backend store and auth secrets from the environment)" >&2
exec "${MLFLOW_BIN:-mlflow}" "${args[@]}"

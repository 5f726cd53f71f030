#!/usr/bin/env bash
# Point this repository's DVC project at the team's object store: the MinIO of infra/compose.yaml, or any S3.
#
#   infra/dvc-remote.sh [--endpoint URL] [--bucket NAME] [--prefix PATH] [--name NAME] [--local]
#
# Run it in the repository root (where .dvc/ is). It sets the remote NAME (default `storage`) to
# s3://BUCKET/PREFIX (defaults: $DVC_BUCKET or `dvc`, and `samerge`), makes it the default remote, and sets its
# endpoint (default: $DVC_S3_ENDPOINT_URL, else $MLFLOW_S3_ENDPOINT_URL, else http://localhost:9000).
# Without --local, all of it goes to .dvc/config: commit that, and the team shares the remote. With --local,
# the endpoint goes to .dvc/config.local (git-ignored) only: for a machine that reaches the store at another
# address, e.g. a worker container that sees MinIO as http://minio:9000.
# Credentials are never written: DVC reads AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY from the environment.
set -euo pipefail

usage="usage: infra/dvc-remote.sh [--endpoint URL] [--bucket NAME] [--prefix PATH] [--name NAME] [--local]"
fail() { echo "dvc-remote: error: $*" >&2; exit 2; }

name=storage
bucket=${DVC_BUCKET:-dvc}
prefix=samerge
endpoint=${DVC_S3_ENDPOINT_URL:-${MLFLOW_S3_ENDPOINT_URL:-http://localhost:9000}}
scope=()
while [ $# -gt 0 ]; do
  case "$1" in
    --endpoint) [ $# -ge 2 ] || fail "--endpoint needs a URL"; endpoint=$2; shift 2 ;;
    --bucket) [ $# -ge 2 ] || fail "--bucket needs a name"; bucket=$2; shift 2 ;;
    --prefix) [ $# -ge 2 ] || fail "--prefix needs a path"; prefix=$2; shift 2 ;;
    --name) [ $# -ge 2 ] || fail "--name needs a name"; name=$2; shift 2 ;;
    --local) scope=(--local); shift ;;
    -h|--help) echo "$usage"; exit 0 ;;
    *) fail "unknown argument '$1' (valid: --endpoint, --bucket, --prefix, --name, --local)" ;;
  esac
done
case "$endpoint" in
  http://*|https://*) ;;
  *) fail "--endpoint must be an http:// or https:// URL, got '$endpoint'" ;;
esac
command -v dvc >/dev/null 2>&1 || fail "dvc is not installed (pip install 'samerge[pipeline]')"
[ -d .dvc ] || fail "no .dvc/ in $(pwd): run this in the repository root of an initialised DVC project"

url="s3://${bucket}/${prefix#/}"
url=${url%/}
if [ ${#scope[@]} -eq 0 ]; then
  dvc remote add --default --force "$name" "$url"
fi
dvc remote modify "${scope[@]}" "$name" endpointurl "$endpoint"
echo "dvc remote '$name': $url via $endpoint${scope:+ (endpoint in .dvc/config.local)}"

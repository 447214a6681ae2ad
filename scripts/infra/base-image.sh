#!/usr/bin/env bash
# Import the cached base rootfs tarball (base-rootfs.sh) into the running engine
# and push it to the open local registry. Idempotent: skipped when the local
# image already carries the tarball's sha256 label and the registry has the tag.
#
#   scripts/infra/base-image.sh            # stdout: MMS_BASE_IMAGE=127.0.0.1:5000/mms/base:py3.11
#
# Needs docker-engine.sh and registry.sh to have run (it runs them if not).
# Env: MMS_BASE_REPO (default $MMS_REGISTRY/mms/base), MMS_BASE_TAG (default py<major.minor>),
#      DOCKER_HOST (default unix:///var/run/docker.sock), MMS_REGISTRY (default 127.0.0.1:5000).
# shellcheck disable=SC2163  # `export "$v"` with v="NAME=value" is intended
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
need_root

v="$("$HERE/docker-engine.sh")"; export "$v"
REGISTRY="${MMS_REGISTRY:-$("$HERE/registry.sh" | sed -n 's/^MMS_REGISTRY=//p')}"
TAR="$("$HERE/base-rootfs.sh")"
SUM="$(cat "$TAR.sha256")"
ROOTFS="${TAR%.tar}"
PYVER="$(sed -n 's/^MMS_BASE_PYTHON=//p' "$ROOTFS/etc/mms-base-release")"
PYMM="${PYVER%.*}"
IMAGE="${MMS_BASE_REPO:-$REGISTRY/mms/base}:${MMS_BASE_TAG:-py$PYMM}"

have="$(docker image inspect --format '{{index .Config.Labels "org.mms.rootfs.sha256"}}' "$IMAGE" 2>/dev/null || true)"
if [ "$have" != "$SUM" ]; then
    log "docker import $TAR -> $IMAGE"
    t0=$(date +%s)
    docker import \
        --change "LABEL org.mms.rootfs.sha256=$SUM org.mms.python=$PYVER" \
        --change 'ENV LANG=C.UTF-8 PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["python3"]' \
        "$TAR" "$IMAGE" >/dev/null
    log "imported in $(( $(date +%s) - t0 ))s"
fi

# Push when the registry lacks the tag or holds another manifest for it.
local_digest="$(docker image inspect --format '{{join .RepoDigests " "}}' "$IMAGE" 2>/dev/null | tr ' ' '\n' | grep -m1 "^${IMAGE%:*}@" | cut -d@ -f2 || true)"
repo_tag="${IMAGE#*/}"   # mms/base:py3.11 -> GET /v2/mms/base/manifests/py3.11
remote_digest="$(curl -s -I --max-time 5 \
    -H 'Accept: application/vnd.docker.distribution.manifest.v2+json' \
    "http://${IMAGE%%/*}/v2/${repo_tag%:*}/manifests/${repo_tag##*:}" 2>/dev/null | tr -d '\r' \
    | sed -n 's/^[Dd]ocker-[Cc]ontent-[Dd]igest: //p' || true)"
if [ -z "$local_digest" ] || [ "$local_digest" != "$remote_digest" ]; then
    log "docker push $IMAGE"
    t0=$(date +%s)
    docker push "$IMAGE" >/dev/null
    log "pushed in $(( $(date +%s) - t0 ))s"
else
    log "$IMAGE already in the registry ($remote_digest)"
fi
echo "MMS_BASE_IMAGE=$IMAGE"

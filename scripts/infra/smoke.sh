#!/usr/bin/env bash
# End-to-end check that the pieces fit: engine + registries + base image +
# a host-network container run + a `docker build` that pip-installs from PyPI
# through the TLS-inspecting proxy + the Docker SDK (streaming build, push with
# auth_config to the basic-auth registry). Prints a timing per step.
#
#   scripts/infra/smoke.sh            # everything (installs what is missing)
#   MMS_SMOKE_SKIP_SDK=1 scripts/infra/smoke.sh
#
# Python for the SDK part: $MMS_PYTHON, else <repo>/.venv/bin/python; `docker==7.1.0`
# is pip-installed into it when missing.
# shellcheck disable=SC2163  # `export "$v"` with v="NAME=value" is intended
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
need_root

T_ALL=$(date +%s)
step() { STEP="$1"; T_STEP=$(date +%s); log "== $1"; }
done_step() { log "   $STEP: $(( $(date +%s) - T_STEP ))s"; TIMES+=("$STEP: $(( $(date +%s) - T_STEP ))s"); }
TIMES=()

step engine;      v="$("$HERE/docker-engine.sh")"; export "$v"; done_step
step registries
regs="$("$HERE/registry.sh" --auth)"   # NAME=value lines; a failure stops us (set -e)
# shellcheck disable=SC2163  # exporting the NAME=value held in kv is the point
while IFS= read -r kv; do export "$kv"; done <<<"$regs"
done_step
step base-image;  v="$("$HERE/base-image.sh")"; export "$v"; done_step   # includes base-rootfs.sh

step run-host-network
out="$(docker run --rm --network host "$MMS_BASE_IMAGE" python3 -c 'import ssl; print(1)')"
[ "$out" = 1 ] || die "container printed '$out', expected 1"
done_step

step cli-build-pip
ctx="$(mktemp -d)"
trap 'rm -rf "$ctx"' EXIT
cp /etc/ssl/certs/ca-certificates.crt "$ctx/host-ca.crt"
cat >"$ctx/Dockerfile" <<EOF
FROM $MMS_BASE_IMAGE
# Debian's pip (and python's ssl) read the system bundle: replace it by the host's,
# which also holds the CA of the TLS-inspecting PyPI proxy.
COPY host-ca.crt /etc/ssl/certs/ca-certificates.crt
RUN pip install --no-cache-dir --break-system-packages six \\
 && python3 -c 'import six; print("six", six.__version__)'
EOF
tag="$MMS_REGISTRY/mms/smoke-six:latest"
# Legacy builder (no buildx on Debian 12); --network host is mandatory (no bridge).
DOCKER_BUILDKIT=0 docker build --network host --pull=false -q -t "$tag" "$ctx" >/dev/null
docker run --rm --network host "$tag" python3 -c 'import six; print("six", six.__version__)' >&2
docker push -q "$tag" >/dev/null
docker rmi -f "$tag" >/dev/null
done_step

if [ "${MMS_SMOKE_SKIP_SDK:-0}" != 1 ]; then
    step sdk-build-push-auth
    PY="${MMS_PYTHON:-$REPO/.venv/bin/python}"
    [ -x "$PY" ] || die "no python at $PY (set MMS_PYTHON or create $REPO/.venv)"
    if ! "$PY" -c 'import docker' 2>/dev/null; then
        log "installing docker==7.1.0 into $PY"
        "$PY" -m pip install -q 'docker==7.1.0' >&2
    fi
    "$PY" "$HERE/sdk_smoke.py" --base "$MMS_BASE_IMAGE" --auth-registry "$MMS_REGISTRY_AUTH" \
        --user "$MMS_REGISTRY_USER" --password "$MMS_REGISTRY_PASSWORD" >&2
    done_step
fi

log "timings: ${TIMES[*]}; total $(( $(date +%s) - T_ALL ))s"
echo "smoke OK"

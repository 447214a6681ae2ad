#!/usr/bin/env bash
# Install Debian's skopeo (if missing): the registry tests pull from the service with it.
#
#   scripts/infra/skopeo.sh      # stdout: SKOPEO=/usr/bin/skopeo
#
# Exits 0 at once when skopeo is already on PATH; otherwise needs root (apt-get).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

if ! command -v skopeo >/dev/null 2>&1; then
    need_root
    apt_install skopeo
    command -v skopeo >/dev/null 2>&1 || die "skopeo is not on PATH after installing it"
fi
log "$(skopeo --version)"
echo "SKOPEO=$(command -v skopeo)"

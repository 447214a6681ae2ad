# shellcheck shell=bash
# Shared helpers for scripts/infra/*.sh. Sourced, never executed.

MMS_CI_STATE="${MMS_CI_STATE:-/var/lib/mms-ci}"

log() { printf '[%s] %s\n' "$(basename "$0")" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

need_root() {
    [ "$(id -u)" = 0 ] || die "must run as root (apt-get, dockerd, mounts)"
}

# apt_install PKG...  — installs only the packages that are missing.
# Runs `apt-get update` at most once per 6 hours (marker under $MMS_CI_STATE).
apt_install() {
    local missing=() p
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
    done
    [ "${#missing[@]}" -eq 0 ] && return 0
    mkdir -p "$MMS_CI_STATE"
    local marker="$MMS_CI_STATE/.apt-updated"
    if [ -z "$(find "$marker" -mmin -360 2>/dev/null)" ]; then
        log "apt-get update"
        apt-get -o DPkg::Lock::Timeout=300 update >>"$MMS_CI_STATE/apt.log" 2>&1 \
            || { tail -n 20 "$MMS_CI_STATE/apt.log" >&2; die "apt-get update failed"; }
        touch "$marker"
    fi
    log "apt-get install ${missing[*]}"
    # policy-rc.d on these machines exits 101, so packaged services (docker,
    # containerd, docker-registry) are NOT started by the install; we start our own.
    DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=300 install -y \
        --no-install-recommends "${missing[@]}" >>"$MMS_CI_STATE/apt.log" 2>&1 \
        || { tail -n 20 "$MMS_CI_STATE/apt.log" >&2; die "apt-get install ${missing[*]} failed (log: $MMS_CI_STATE/apt.log)"; }
}

# wait_until SECONDS CMD...  — polls CMD every 0.5 s until it succeeds or time runs out.
wait_until() {
    local limit="$1"; shift
    local deadline=$(( $(date +%s) + limit ))
    until "$@" >/dev/null 2>&1; do
        [ "$(date +%s)" -ge "$deadline" ] && return 1
        sleep 0.5
    done
}

# pid_alive PIDFILE [COMM] — true if the pidfile names a live process (whose
# /proc/PID/comm is COMM, when given: pidfiles live under /var/lib and survive a
# reboot, so a recycled pid must not be mistaken for — or killed as — ours).
pid_alive() {
    local pid
    [ -s "$1" ] || return 1
    pid="$(cat "$1" 2>/dev/null)" || return 1
    [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
    [ -z "${2:-}" ] || [ "$(cat "/proc/$pid/comm" 2>/dev/null)" = "${2:0:15}" ]
}

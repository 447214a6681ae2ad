#!/usr/bin/env bash
# Install Debian's docker.io (if missing) and run a loopback-only dockerd.
#
#   scripts/infra/docker-engine.sh           # ensure running; stdout: DOCKER_HOST=unix:///...
#   export "$(scripts/infra/docker-engine.sh)"
#   scripts/infra/docker-engine.sh --stop    # stop the dockerd this script started
#   scripts/infra/docker-engine.sh --status
#
# The daemon has no default bridge, no iptables rules of its own and no masquerading.
# Image builds run their RUN steps in the build network that build-network.sh sets up
# beside it (an internal bridge whose only reachable destination is an egress proxy for
# the package indexes); this script runs build-network.sh every time, also when dockerd
# is already running (it never restarts dockerd), so an engine always comes with it.
# Web-service replicas run on bridges `mmss*` of their own (workers/deploy/local_network.py)
# under the host firewall of service-network.sh: applied before dockerd starts (its bridges
# come back with it) and again on every run, like the build network's.
# Other containers (tests, smoke checks) use host networking (`docker run --network host`).
#
# Env overrides:
#   MMS_DOCKER_DIR             state dir (data root, pid, log)  default /var/lib/mms-ci/docker
#   MMS_DOCKER_SOCK            API socket                        default /var/run/docker.sock
#   MMS_DOCKER_STORAGE_DRIVER  overlay2 | vfs | ...              default: overlay2 if an overlay
#                              mount works on the data root's filesystem, else vfs
#   MMS_DOCKER_WAIT            seconds to wait for the API       default 60
#   MMS_DOCKER_SECCOMP_PROFILE every container's seccomp profile  default docker/engine-seccomp.json
#                              (Docker's default, but fallocate only without KEEP_SIZE:
#                              docker/seccomp-profiles.py says why)
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

DIR="${MMS_DOCKER_DIR:-$MMS_CI_STATE/docker}"
SOCK="${MMS_DOCKER_SOCK:-/var/run/docker.sock}"
WAIT="${MMS_DOCKER_WAIT:-60}"
DATA="$DIR/data"
EXEC="$DIR/exec"            # dockerd --exec-root (its containerd lives in here too)
PIDFILE="$DIR/dockerd.pid"
SECCOMP_PROFILE="${MMS_DOCKER_SECCOMP_PROFILE:-$(cd "$HERE/../.." && pwd)/docker/engine-seccomp.json}"
LOGFILE="$DIR/dockerd.log"
HOST="unix://$SOCK"

answering() {
    # `docker version` needs the server part to succeed; any CLI version works
    # (the API version is negotiated down to the daemon's 1.41).
    DOCKER_HOST="$HOST" docker version --format '{{.Server.Version}}' >/dev/null 2>&1
}

# dockerd leaves mounts under $DIR behind (the data root's private bind mount,
# exec/netns/default) when it stops or fails to start; harmless, but they block `rm -rf $DIR`.
unmount_leftovers() {
    awk -v d="$DIR/" 'index($2 "/", d) == 1 {print $2}' /proc/mounts | sort -r \
        | while read -r m; do umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true; done
}

case "${1:-}" in
    --stop)
        if pid_alive "$PIDFILE" dockerd; then
            pid="$(cat "$PIDFILE")"
            log "stopping dockerd pid $pid"
            kill "$pid"
            for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
            kill -0 "$pid" 2>/dev/null && die "dockerd pid $pid did not stop"
            unmount_leftovers
        else
            log "no dockerd started by this script is running"
        fi
        "$HERE/build-network.sh" --stop
        exit 0 ;;
    --status)
        if answering; then echo "running: $(DOCKER_HOST=$HOST docker info --format '{{.ServerVersion}} {{.Driver}} {{.DockerRootDir}}')"; exit 0
        else echo "not running"; exit 1; fi ;;
    "") ;;
    *) die "usage: $0 [--stop|--status]" ;;
esac

need_root

# The build network, its firewall rules and its egress proxy (stdout: only DOCKER_HOST).
build_network() {
    MMS_DOCKER_SOCK="$SOCK" "$HERE/build-network.sh" >/dev/null 9>&- \
        || die "the build network could not be set up (scripts/infra/build-network.sh)"
}

# The service bridges' firewall (stdout discarded; also turns IPv6 off on the bridges there are).
service_network() {
    MMS_DOCKER_SOCK="$SOCK" "$HERE/service-network.sh" >/dev/null 9>&- \
        || die "the service networks' firewall could not be set up (scripts/infra/service-network.sh)"
}

if answering; then
    log "dockerd already answering on $HOST"
    service_network
    build_network
    echo "DOCKER_HOST=$HOST"
    exit 0
fi

# docker.io brings dockerd, containerd, runc, tini (docker-init) and iptables.
# A docker CLI may already be on PATH (/usr/local/bin/docker 28.x on these
# machines); Debian's 20.10 CLI lands in /usr/bin/docker. Either works.
apt_install docker.io

mkdir -p "$DIR" "$DATA"
exec 9>"$DIR/.lock"
flock -w 120 9 || die "timed out waiting for another docker-engine.sh run"

if ! pid_alive "$PIDFILE" dockerd; then
    driver="${MMS_DOCKER_STORAGE_DRIVER:-}"
    if [ -z "$driver" ]; then
        # overlay2 needs a kernel overlayfs that can stack on the data root's fs
        # (fails e.g. when the data root itself sits on overlayfs). Probe it.
        probe="$(mktemp -d "$DATA/.ovlprobe.XXXXXX")"
        mkdir -p "$probe"/{l,u,w,m}
        if mount -t overlay overlay -o "lowerdir=$probe/l,upperdir=$probe/u,workdir=$probe/w" "$probe/m" 2>/dev/null; then
            umount "$probe/m"; driver=overlay2
        else
            driver=vfs
        fi
        rm -rf "$probe"
    fi
    # The build network's firewall first: its bridge comes back with dockerd (after a reboot
    # the rules are gone), and no build may run on it before the rules are in place.
    "$HERE/build-network.sh" --firewall 9>&- || die "the build network's firewall failed"
    # The same for the web services' bridges, which the engine also brings back.
    "$HERE/service-network.sh" --firewall 9>&- || die "the service networks' firewall failed"
    log "starting dockerd (storage driver $driver, data root $DATA, log $LOGFILE)"
    rm -f "$PIDFILE"
    # setsid + nohup: survive the calling shell / CI step; stdin closed.
    setsid nohup dockerd \
        --host "$HOST" \
        --data-root "$DATA" \
        --exec-root "$EXEC" \
        --pidfile "$PIDFILE" \
        --storage-driver "$driver" \
        --seccomp-profile "$SECCOMP_PROFILE" \
        --bridge=none \
        --iptables=false \
        --ip6tables=false \
        --ip-masq=false \
        --ip-forward=false \
        --log-level=warn \
        >>"$LOGFILE" 2>&1 </dev/null 9>&- &
    started_pid=$!
else
    log "dockerd pid $(cat "$PIDFILE") exists but is not answering yet; waiting"
    started_pid="$(cat "$PIDFILE")"
fi

# Succeeds early when dockerd died, so a crash is reported at once, not after $WAIT s.
up_or_dead() { answering || ! kill -0 "$started_pid" 2>/dev/null; }
if ! wait_until "$WAIT" up_or_dead || ! answering; then
    tail -n 40 "$LOGFILE" >&2 || true
    if ! kill -0 "$started_pid" 2>/dev/null; then
        log "dockerd (pid $started_pid) has exited"; unmount_leftovers
    fi
    die "dockerd is not answering on $HOST (waited up to ${WAIT}s; log: $LOGFILE)"
fi
log "dockerd up: $(DOCKER_HOST=$HOST docker info --format 'server {{.ServerVersion}}, driver {{.Driver}}, cgroup v{{.CgroupVersion}}, root {{.DockerRootDir}}')"
exec 9>&-
service_network
build_network
echo "DOCKER_HOST=$HOST"

#!/usr/bin/env bash
# The compose stack's Docker engine for the docker builder (docker-compose.yml, service
# `docker`, profile docker-builder). Its container has a network namespace of its own, and:
#   * dockerd's API is only a unix socket, /var/run/dind/docker.sock, in the dind-socket
#     volume that only the workers mount (group MMS_DIND_SOCKET_GID, the workers' gid): no TCP
#     port at all, so no build, smoke test or other container can reach the engine;
#   * RUN steps run in the build network that scripts/infra/build-network.sh (bind-mounted)
#     sets up in this namespace, as on a CI host: an internal bridge whose only reachable
#     destination is an egress proxy (tinyproxy) for MMS_BUILD_ALLOW_HOSTS, by name;
#   * 127.0.0.1:5000 here is forwarded to the registry (socat, loopback only), so the engine
#     pushes and pulls localhost:5000/..., the names the workers and the Docker host use
#     (a loopback registry is plain HTTP for dockerd without --insecure-registry);
#   * no IPv4 forwarding in this namespace: nothing from the build bridge is routed on.
#   * web-service replicas' bridges (mmss*) are under scripts/infra/service-network.sh's
#     firewall, applied before dockerd starts; /var/run/dind/service-firewall attests it
#     (service-network.sh --attest, every 30 s) to the deploy worker, which shares this
#     namespace but, not being root, cannot read iptables (MMS_SERVICE_FIREWALL_ATTESTATION).
# Every 30 s build-network.sh and service-network.sh run again (idempotent): a proxy that died
# is restarted and rules that went missing are put back; the healthcheck is
# build-network.sh --status.
set -euo pipefail

infra=/usr/local/share/mms/infra
socket_dir=/var/run/dind
socket="$socket_dir/docker.sock"
attestation="$socket_dir/service-firewall"
registry="${MMS_DIND_REGISTRY:-registry:5000}"
export MMS_DOCKER_SOCK="$socket"
export MMS_BUILD_NET_DIR="${MMS_BUILD_NET_DIR:-/var/lib/mms-build-network}"

log() { printf '[dind-entrypoint] %s\n' "$*" >&2; }

mkdir -p "$socket_dir"
rm -f "$socket" "$attestation"
echo 0 >/proc/sys/net/ipv4/ip_forward

forward_registry() {
    socat "TCP-LISTEN:5000,bind=127.0.0.1,reuseaddr,fork" "TCP:$registry" &
    socat_pid=$!
}
forward_registry

# The build bridge's and the service bridges' firewalls before the engine exists: no build
# or web-service replica ever runs unguarded.
"$infra/build-network.sh" --firewall
"$infra/service-network.sh" --firewall
"$infra/service-network.sh" --attest "$attestation" >/dev/null || log "WARNING: the service firewall did not pass its check"

# The image's own entrypoint prepares cgroups for a nested engine; no TLS: there is no TCP.
DOCKER_TLS_CERTDIR='' dockerd-entrypoint.sh dockerd \
    --host="unix://$socket" --group="${MMS_DIND_SOCKET_GID:-10001}" \
    --seccomp-profile=/usr/local/share/mms/engine-seccomp.json \
    --bridge=none --iptables=false --ip6tables=false --ip-masq=false --ip-forward=false &
dockerd_pid=$!
stopping=
trap 'stopping=1; kill -TERM "$dockerd_pid" "$socat_pid" 2>/dev/null || true' TERM INT

for _ in $(seq 1 60); do
    docker -H "unix://$socket" version >/dev/null 2>&1 && break
    kill -0 "$dockerd_pid" 2>/dev/null || { log "dockerd exited"; exit 1; }
    sleep 1
done
# No engine without its build network: without it a build would have no containment.
if ! "$infra/build-network.sh" >/dev/null; then
    log "the build network could not be set up; stopping the engine"
    kill -TERM "$dockerd_pid" "$socat_pid" 2>/dev/null || true
    wait "$dockerd_pid" || true
    exit 1
fi
log "engine on unix://$socket; RUN steps in the build network; localhost:5000 -> $registry"

while [ -z "$stopping" ] && kill -0 "$dockerd_pid" 2>/dev/null; do
    sleep 30 &
    wait $! || true
    [ -z "$stopping" ] && kill -0 "$dockerd_pid" 2>/dev/null || break
    kill -0 "$socat_pid" 2>/dev/null || { log "registry forwarder exited; restarting it"; forward_registry; }
    "$infra/build-network.sh" >/dev/null || log "WARNING: build-network.sh failed; retrying in 30 s"
    "$infra/service-network.sh" >/dev/null || log "WARNING: service-network.sh failed; retrying in 30 s"
    "$infra/service-network.sh" --attest "$attestation" >/dev/null \
        || log "WARNING: the service firewall did not pass its check: no replica starts until it does"
done
# Until dockerd has stopped its containers and exited (a signal ends one wait early).
while kill -0 "$dockerd_pid" 2>/dev/null; do wait "$dockerd_pid" || true; done

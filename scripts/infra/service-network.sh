#!/usr/bin/env bash
# The host firewall that contains web-service replicas on the local engine (issue 16,
# docs/design/web-services.md, "1. Networking and containment").
#
#   scripts/infra/service-network.sh            # the rules, then IPv6 off on every service bridge
#                                               # present; stdout: MMS_SERVICE_FIREWALL=in-place
#   scripts/infra/service-network.sh --firewall # only the rules (no engine needed):
#                                               # docker-engine.sh, before it starts dockerd
#   scripts/infra/service-network.sh --status   # exit 0 when the rules are in place
#   scripts/infra/service-network.sh --attest FILE
#                                               # --status, and FILE rewritten when it passes
#                                               # (removed when it fails): what a deploy worker
#                                               # that cannot read iptables trusts, while fresh
#                                               # (MMS_SERVICE_FIREWALL_ATTESTATION)
#
# docker-engine.sh (and the compose stack's docker/dind-entrypoint.sh) runs --firewall before
# dockerd starts and every time it runs, so an engine the project starts never has a service
# bridge without the rules. Idempotent; never touches dockerd or a network.
#
# Each web service gets its own `--internal` bridge network from the workers
# (workers/deploy/local_network.py): bridge `mmss<10 hex of the service id>`, a /27 of
# MMS_SERVICE_SUBNET_POOL. The engine runs with --iptables=false and the host with
# ip_forward=0, so nothing is routed beyond the host, but the host itself is addressable
# from a bridge: without these rules a replica connected to every host service listening on
# 0.0.0.0 and on the host's other addresses (the build proxy, say). Here:
#   * MMS-SVC-IN, jumped to from `INPUT -i mmss+`: only packets of connections the host opened
#     (the scoring gateway's, the reconciler's readiness probe) are accepted; everything else
#     a replica sends the host is rejected at once (tcp-reset for tcp, icmp-admin-prohibited
#     otherwise), so a tenant's connect() fails fast instead of hanging;
#   * MMS-SVC-FWD, jumped to from `FORWARD -i mmss+` and `FORWARD -o mmss+`: rejects anything
#     routed from or to a service bridge, should ip_forward ever be on, and, with
#     br_netfilter's bridge-nf-call-iptables (turned on here), traffic bridged between two
#     replicas of one service;
#   * ip6tables drops everything from and to the bridges (the engine gives them no IPv6
#     address, but the kernel gives them link-local ones).
# iptables' `+` suffix matches every interface whose name starts with `mmss`: one rule set
# covers every present and future service bridge, so a bridge is never unguarded and rules
# never need to follow networks. A deploy fails naming this script when the INPUT or FORWARD
# jumps are missing (workers/deploy/local_network.py, require_service_firewall).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

export DOCKER_HOST="unix://${MMS_DOCKER_SOCK:-/var/run/docker.sock}"
BRIDGES="mmss+"            # the prefix workers/deploy/local_network.py names its bridges with
IN_CHAIN="MMS-SVC-IN"
FWD_CHAIN="MMS-SVC-FWD"

hooked() {
    iptables -C INPUT -i "$BRIDGES" -j "$IN_CHAIN" 2>/dev/null \
        && iptables -C FORWARD -i "$BRIDGES" -j "$FWD_CHAIN" 2>/dev/null \
        && iptables -C FORWARD -o "$BRIDGES" -j "$FWD_CHAIN" 2>/dev/null
}

# The chains are (re)written in one iptables-restore transaction, so a running replica never
# sees them empty; the jumps are added once, after the chains are filled.
firewall() {
    iptables-restore --noflush <<EOF
*filter
:$IN_CHAIN - [0:0]
:$FWD_CHAIN - [0:0]
-A $IN_CHAIN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A $IN_CHAIN -p tcp -j REJECT --reject-with tcp-reset
-A $IN_CHAIN -j REJECT --reject-with icmp-admin-prohibited
-A $FWD_CHAIN -p tcp -j REJECT --reject-with tcp-reset
-A $FWD_CHAIN -j REJECT --reject-with icmp-admin-prohibited
COMMIT
EOF
    iptables -C INPUT -i "$BRIDGES" -j "$IN_CHAIN" 2>/dev/null || iptables -I INPUT 1 -i "$BRIDGES" -j "$IN_CHAIN"
    for dir in -i -o; do
        iptables -C FORWARD "$dir" "$BRIDGES" -j "$FWD_CHAIN" 2>/dev/null \
            || iptables -I FORWARD 1 "$dir" "$BRIDGES" -j "$FWD_CHAIN"
    done
    if command -v ip6tables >/dev/null 2>&1; then
        ip6tables -C INPUT -i "$BRIDGES" -j DROP 2>/dev/null || ip6tables -I INPUT 1 -i "$BRIDGES" -j DROP
        for dir in -i -o; do
            ip6tables -C FORWARD "$dir" "$BRIDGES" -j DROP 2>/dev/null \
                || ip6tables -I FORWARD 1 "$dir" "$BRIDGES" -j DROP
        done
    fi
    # Traffic between two replicas on one bridge is bridged, not routed: it meets FORWARD only
    # with br_netfilter's call-iptables on. Per bridge (/sys/class/net/<bridge>/bridge/
    # nf_call_iptables) cannot be done here for bridges the workers make later, so the global
    # switch (what dockerd itself turns on when it manages iptables).
    [ -d /proc/sys/net/bridge ] || modprobe br_netfilter 2>/dev/null || true
    if ! { echo 1 >/proc/sys/net/bridge/bridge-nf-call-iptables; } 2>/dev/null \
        && [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" != 1 ]; then
        log "WARNING: traffic bridged on service bridges does not pass iptables (no br_netfilter," \
            "or /proc/sys read-only): two replicas of one service are not kept apart (everything else still is)"
    fi
    { echo 1 >/proc/sys/net/bridge/bridge-nf-call-ip6tables; } 2>/dev/null || true
}

# One writer at a time: two runs' `-C || -I` would each add the jumps.
lock() {
    mkdir -p "$MMS_CI_STATE"
    exec 8>"$MMS_CI_STATE/.service-network.lock"
    flock -w 60 8 || die "timed out waiting for another service-network.sh run"
}

status() {
    ok=0
    if hooked; then echo "firewall: in place ($IN_CHAIN on INPUT, $FWD_CHAIN on FORWARD, for $BRIDGES)"
    else echo "firewall: missing"; ok=1; fi
    if [ "$(cat /proc/sys/net/bridge/bridge-nf-call-iptables 2>/dev/null)" = 1 ]; then
        echo "bridged traffic: through iptables"
    else echo "bridged traffic: not through iptables (replicas of one service not kept apart)"; ok=1; fi
    return "$ok"
}

case "${1:-}" in
    --firewall)
        need_root; command -v iptables >/dev/null 2>&1 || apt_install iptables
        lock; firewall; exit 0 ;;
    --status)
        ok=0
        status || ok=1
        networks="$(docker network ls -q --filter label=org.mms.service 2>/dev/null | wc -l)" \
            && echo "service networks: $networks"
        exit "$ok" ;;
    --attest)
        # Written beside, then renamed: a reader never sees half a file. The worker checks
        # only that it is fresh; the writer must be the only one who can write its folder.
        file="${2:?usage: $0 --attest FILE}"
        if out="$(status)"; then
            printf '%s\nchecked: %s\n' "$out" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$file.tmp"
            mv -f "$file.tmp" "$file"
            exit 0
        fi
        rm -f "$file"
        echo "$out" >&2
        exit 1 ;;
    "") ;;
    *) die "usage: $0 [--firewall|--status|--attest FILE]" ;;
esac

need_root
command -v iptables >/dev/null 2>&1 || apt_install iptables
lock
firewall
# IPv6 off on the service bridges there are (the workers cannot: the engine's host is
# root's); ip6tables drops it anyway, this only takes the link-local addresses away.
for sysctl in /proc/sys/net/ipv6/conf/mmss*/disable_ipv6; do
    if [ -w "$sysctl" ]; then echo 1 >"$sysctl"; fi
done
hooked || die "the firewall's jumps are not in place after writing them"
echo "MMS_SERVICE_FIREWALL=in-place"

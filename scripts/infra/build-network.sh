#!/usr/bin/env bash
# The network image builds' RUN steps run in: a Docker bridge network whose only reachable
# destination is an egress proxy that lets through the configured package indexes by NAME.
#
#   scripts/infra/build-network.sh            # ensure; stdout: MMS_BUILD_NETWORK=… MMS_BUILD_PROXY=…
#   scripts/infra/build-network.sh --status
#   scripts/infra/build-network.sh --stop     # stop the proxy (network and firewall rules stay:
#                                             # builds then reach nothing at all)
#   scripts/infra/build-network.sh --firewall # only the firewall rules (no engine needed):
#                                             # docker-engine.sh, before it starts dockerd
#
# docker-engine.sh runs it every time (stdout discarded), so whoever has an engine has the
# network; tests and workers run it themselves for the two values. Idempotent, and it never
# restarts dockerd: safe while other people's builds use the engine.
#
# Why (scripts/infra/README.md, "Build network"): a RUN step is a tenant's code. On the
# host network it reached the engine's API, PostgreSQL, Redis, the registries and
# 169.254.169.254. Here:
#   * the network is a user-defined bridge (`--internal`, fixed subnet). The engine runs
#     without iptables/forwarding, and the host has ip_forward=0, so nothing routes beyond
#     the host; what a build can still address is the host itself through the bridge;
#   * host firewall (iptables, chain MMS-IN-<bridge>): from the bridge only the proxy's port on
#     the gateway address is accepted, everything else is rejected at once (tcp-reset, so
#     a tenant's script fails fast instead of hanging); MMS-FWD-<bridge> rejects anything routed
#     from or to the bridge should ip_forward ever be enabled, and with br_netfilter on for
#     the bridge it also separates two builds on the same bridge from each other. Packets
#     for other addresses (169.254.169.254, the LAN) are dropped by the kernel, which does
#     not forward: a connect() there times out. IPv6 is off on the bridge and dropped;
#   * the proxy is Debian's tinyproxy (1.11): listens on the gateway address only, `Allow`s
#     the build subnet only, no upstream, and `FilterDefaultDeny Yes` with `FilterURLs On`:
#     a request goes through only if its URL matches a pattern made from an exact host name
#     (below, "the filter"): CONNECT (https) to port 443 (`ConnectPort` as well), plain http
#     to port 80. It resolves names itself, so a deny-list of addresses is not needed (and
#     could not work: pypi.org resolves to a documentation-range address on these
#     machines), and builds need no DNS (the engine's resolver does not answer external
#     names on an internal network).
# The builder passes HTTP(S)_PROXY as build arguments (Docker's predefined ones: not kept in
# the image's history or config).
#
# The filter (tinyproxy 1.11 src/reqs.c, process_request): with `FilterURLs` the pattern is
# matched against a different string per kind of request, so each kind gets its own pattern:
#   * CONNECT: the request's target as sent, "host:port" -> ^pypi\.org:(443)$ (the ports of
#     MMS_BUILD_CONNECT_PORTS);
#   * plain http with an absolute URL: that URL as sent; tinyproxy connects to the text
#     between "//" and the next "/", less any "user@" and ":port" (80 when none)
#     -> ^http://pypi\.org(:80)?(/[^:]*)?$ ;
#   * any other request (a path, "*", a lower-case "connect"): tinyproxy's transparent-proxy
#     code, which Debian compiles in, takes host and port from the Host header (the host is
#     its text up to a colon) and filters "http://<host>:<port><target>". A Host of
#     "pypi.org/.evil.example:22" then reads "http://pypi.org/.evil.example:22/" and would
#     pass a pattern that only looks at what follows "http://pypi.org"; the colon tinyproxy
#     always writes before the port gives it away, hence no colon after the authority in
#     the pattern above (a plain-http URL with a colon in its path or query is refused).
# Plain http stays on port 80, not off: pip and uv need only https (PyPI serves nothing else),
# but apt's Debian mirrors are http:// in the base image (deb.debian.org is a documented
# entry for MMS_BUILD_ALLOW_HOSTS; apt checks the signed Release files). Port 80 of a listed
# name carries nothing its port 443 does not; other ports of it (ssh, a second service on
# the same host) stay out of reach.
#
# Env overrides:
#   MMS_BUILD_ALLOW_HOSTS   host names builds may reach, space or comma separated
#                           (https on port 443, plain http on port 80)
#                           default "pypi.org files.pythonhosted.org" (add a private index,
#                           deb.debian.org, conda.anaconda.org … as needed; exact names only)
#   MMS_BUILD_CONNECT_PORTS ports CONNECT (https) may use          default 443
#   MMS_BUILD_NETWORK       the engine network's name                default mms-build
#   MMS_BUILD_SUBNET        its IPv4 subnet; the gateway (network address + 1) is the
#                           proxy's address                         default 172.30.213.0/24
#   MMS_BUILD_BRIDGE        the bridge interface's name             default mms-build0
#   MMS_BUILD_PROXY_PORT    the proxy's port                        default 3128
#   MMS_BUILD_NET_DIR       state dir (proxy config, pid, log)      default /var/lib/mms-ci/build-network
#   MMS_DOCKER_SOCK         the engine's API socket                 default /var/run/docker.sock
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

NETWORK="${MMS_BUILD_NETWORK:-mms-build}"
SUBNET="${MMS_BUILD_SUBNET:-172.30.213.0/24}"
BRIDGE="${MMS_BUILD_BRIDGE:-mms-build0}"
PORT="${MMS_BUILD_PROXY_PORT:-3128}"
ALLOW="${MMS_BUILD_ALLOW_HOSTS:-pypi.org files.pythonhosted.org}"
CONNECT_PORTS="${MMS_BUILD_CONNECT_PORTS:-443}"
DIR="${MMS_BUILD_NET_DIR:-$MMS_CI_STATE/build-network}"
export DOCKER_HOST="unix://${MMS_DOCKER_SOCK:-/var/run/docker.sock}"
PIDFILE="$DIR/tinyproxy.pid"
LOGFILE="$DIR/tinyproxy.log"
CONF="$DIR/tinyproxy.conf"
HOSTS="$DIR/allow-hosts"    # the names, for --status and people
FILTER="$DIR/allow-urls"    # the proxy's filter: one pattern per name and kind of request
IN_CHAIN="MMS-IN-$BRIDGE"    # per bridge: another instance (other name, subnet) has its own
FWD_CHAIN="MMS-FWD-$BRIDGE"

ip2int() { local IFS=.; read -r a b c d <<<"$1"; echo $(( (a << 24) | (b << 16) | (c << 8) | d )); }
int2ip() { echo "$(( $1 >> 24 & 255 )).$(( $1 >> 16 & 255 )).$(( $1 >> 8 & 255 )).$(( $1 & 255 ))"; }

[[ "$SUBNET" =~ ^([0-9]+\.[0-9]+\.[0-9]+\.[0-9]+)/([0-9]+)$ ]] || die "MMS_BUILD_SUBNET: not an IPv4 CIDR: $SUBNET"
prefix="${BASH_REMATCH[2]}"
(( prefix >= 8 && prefix <= 29 )) || die "MMS_BUILD_SUBNET: prefix /$prefix out of range (/8 to /29)"
mask=$(( (0xffffffff << (32 - prefix)) & 0xffffffff ))
net=$(( $(ip2int "${BASH_REMATCH[1]}") & mask ))
SUBNET="$(int2ip "$net")/$prefix"
GATEWAY="$(int2ip $(( net + 1 )))"
PROXY="http://$GATEWAY:$PORT"
[[ "$NETWORK" =~ ^[A-Za-z0-9][A-Za-z0-9_.-]*$ && "$NETWORK" != host && "$NETWORK" != none \
   && "$NETWORK" != bridge ]] || die "MMS_BUILD_NETWORK: not a usable network name: $NETWORK"
[[ "$BRIDGE" =~ ^[A-Za-z0-9_.-]{1,15}$ ]] || die "MMS_BUILD_BRIDGE: not an interface name: $BRIDGE"
[[ "$PORT" =~ ^[0-9]+$ ]] || die "MMS_BUILD_PROXY_PORT: not a port: $PORT"

# The proxy's listening socket in /proc/net/tcp (state 0A), looked up rather than connected
# to: tinyproxy logs every probe connection as an ERROR. The address is printed in the
# machine's byte order, so both orders are accepted.
proxy_answers() {
    local a b c d
    IFS=. read -r a b c d <<<"$GATEWAY"
    awk -v le="$(printf '%02X%02X%02X%02X:%04X' "$d" "$c" "$b" "$a" "$PORT")" \
        -v be="$(printf '%02X%02X%02X%02X:%04X' "$a" "$b" "$c" "$d" "$PORT")" \
        '($2 == le || $2 == be) && $4 == "0A" {found = 1} END {exit !found}' /proc/net/tcp
}

stop_proxy() {
    if pid_alive "$PIDFILE" tinyproxy; then
        local pid; pid="$(cat "$PIDFILE")"
        log "stopping the build proxy (tinyproxy pid $pid)"
        kill "$pid"
        for _ in $(seq 1 20); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
        kill -0 "$pid" 2>/dev/null && die "tinyproxy pid $pid did not stop"
    fi
    rm -f "$PIDFILE" "$DIR/running.conf"
}

# --- the firewall -----------------------------------------------------------------------
# Rules name the bridge, which need not exist yet: applied before the network is made (and,
# by docker-engine.sh, before dockerd starts), so a build never runs on the bridge unguarded.
# The chains are (re)written in one iptables-restore transaction, so a running build never
# sees them empty; the jumps are added once, after the chains are filled.
firewall() {
    iptables-restore --noflush <<EOF
*filter
:$IN_CHAIN - [0:0]
:$FWD_CHAIN - [0:0]
-A $IN_CHAIN -d $GATEWAY/32 -p tcp -m tcp --dport $PORT -j ACCEPT
-A $IN_CHAIN -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT
-A $IN_CHAIN -p tcp -j REJECT --reject-with tcp-reset
-A $IN_CHAIN -j REJECT --reject-with icmp-admin-prohibited
-A $FWD_CHAIN -p tcp -j REJECT --reject-with tcp-reset
-A $FWD_CHAIN -j REJECT --reject-with icmp-admin-prohibited
COMMIT
EOF
    # The ESTABLISHED rule only lets through a build container's answers to connections the
    # host opened (e.g. a check of a server in a container); a build cannot open one itself.
    iptables -C INPUT -i "$BRIDGE" -j "$IN_CHAIN" 2>/dev/null || iptables -I INPUT 1 -i "$BRIDGE" -j "$IN_CHAIN"
    for dir in -i -o; do
        iptables -C FORWARD "$dir" "$BRIDGE" -j "$FWD_CHAIN" 2>/dev/null \
            || iptables -I FORWARD 1 "$dir" "$BRIDGE" -j "$FWD_CHAIN"
    done
    if command -v ip6tables >/dev/null 2>&1; then
        ip6tables -C INPUT -i "$BRIDGE" -j DROP 2>/dev/null || ip6tables -I INPUT 1 -i "$BRIDGE" -j DROP
        for dir in -i -o; do
            ip6tables -C FORWARD "$dir" "$BRIDGE" -j DROP 2>/dev/null \
                || ip6tables -I FORWARD 1 "$dir" "$BRIDGE" -j DROP
        done
    fi
}

case "${1:-}" in
    --stop)
        mkdir -p "$DIR"; stop_proxy; exit 0 ;;
    --firewall)
        need_root; command -v iptables >/dev/null 2>&1 || apt_install iptables
        firewall; exit 0 ;;
    --status)
        ok=0
        if docker network inspect "$NETWORK" >/dev/null 2>&1; then echo "network: $NETWORK ($SUBNET, bridge $BRIDGE)"
        else echo "network: $NETWORK missing"; ok=1; fi
        if pid_alive "$PIDFILE" tinyproxy && proxy_answers; then
            echo "proxy: $PROXY (pid $(cat "$PIDFILE")), allows: $(tr '\n' ' ' <"$HOSTS" 2>/dev/null)"
        else echo "proxy: not running"; ok=1; fi
        if iptables -C INPUT -i "$BRIDGE" -j "$IN_CHAIN" 2>/dev/null; then echo "firewall: in place"
        else echo "firewall: missing"; ok=1; fi
        exit "$ok" ;;
    "") ;;
    *) die "usage: $0 [--stop|--status|--firewall]" ;;
esac

need_root
docker version --format '{{.Server.Version}}' >/dev/null 2>&1 \
    || die "no Docker engine answers on $DOCKER_HOST (run docker-engine.sh first)"
# tinyproxy-bin: the binary without Debian's service (which would listen on :8888).
command -v tinyproxy >/dev/null 2>&1 || apt_install tinyproxy-bin
command -v iptables >/dev/null 2>&1 || apt_install iptables

mkdir -p "$DIR"
exec 8>"$DIR/.lock"
flock -w 120 8 || die "timed out waiting for another build-network.sh run"

firewall

# --- the network ------------------------------------------------------------------------
want="true $SUBNET $GATEWAY $BRIDGE"
have="$(docker network inspect -f '{{.Internal}} {{range .IPAM.Config}}{{.Subnet}} {{.Gateway}}{{end}} {{index .Options "com.docker.network.bridge.name"}}' "$NETWORK" 2>/dev/null || true)"
if [ -z "$have" ]; then
    log "creating the build network $NETWORK ($SUBNET, gateway $GATEWAY, bridge $BRIDGE, internal)"
    docker network create --driver bridge --internal --subnet "$SUBNET" --gateway "$GATEWAY" \
        --opt "com.docker.network.bridge.name=$BRIDGE" --label org.mms.build-network=true \
        "$NETWORK" >/dev/null
elif [ "$have" != "$want" ]; then
    # Made with other settings. Replaced only when no container uses it: a build may be
    # attached to it right now.
    if [ "$(docker network inspect -f '{{len .Containers}}' "$NETWORK")" != 0 ]; then
        die "network $NETWORK exists as '$have', expected '$want' (internal subnet gateway" \
            "bridge), and containers use it: retry when no build runs, or set MMS_BUILD_NETWORK"
    fi
    log "replacing the build network $NETWORK ('$have') with '$want'"
    docker network rm "$NETWORK" >/dev/null
    docker network create --driver bridge --internal --subnet "$SUBNET" --gateway "$GATEWAY" \
        --opt "com.docker.network.bridge.name=$BRIDGE" --label org.mms.build-network=true \
        "$NETWORK" >/dev/null
fi
[ -d "/sys/class/net/$BRIDGE" ] || die "the engine made no interface $BRIDGE for network $NETWORK"

# --- the bridge: no IPv6, and its bridged IPv4 traffic through iptables ---------------------
if [ -w "/proc/sys/net/ipv6/conf/$BRIDGE/disable_ipv6" ]; then
    echo 1 >"/proc/sys/net/ipv6/conf/$BRIDGE/disable_ipv6"
fi
[ -d /proc/sys/net/bridge ] || modprobe br_netfilter 2>/dev/null || true
if [ -d /proc/sys/net/bridge ] && { echo 1 >"/sys/class/net/$BRIDGE/bridge/nf_call_iptables"; } 2>/dev/null; then
    { echo 1 >"/sys/class/net/$BRIDGE/bridge/nf_call_ip6tables"; } 2>/dev/null || true
else
    log "WARNING: traffic bridged on $BRIDGE does not pass iptables (no br_netfilter, or" \
        "/sys read-only): two builds on it are not kept apart (everything else still is)"
fi

# --- the proxy --------------------------------------------------------------------------
hosts=()
for host in ${ALLOW//,/ }; do
    host="${host,,}"
    [[ "$host" =~ ^[a-z0-9]([a-z0-9.-]*[a-z0-9])?$ ]] \
        || die "MMS_BUILD_ALLOW_HOSTS: '$host' is not a host name (exact names only)"
    hosts+=("$host")
done
[ "${#hosts[@]}" -gt 0 ] || log "WARNING: MMS_BUILD_ALLOW_HOSTS is empty: builds reach nothing"
ports=()
for p in ${CONNECT_PORTS//,/ }; do
    [[ "$p" =~ ^[1-9][0-9]{0,4}$ ]] && (( p <= 65535 )) || die "MMS_BUILD_CONNECT_PORTS: not a port: $p"
    ports+=("$p")
done
[ "${#ports[@]}" -gt 0 ] || die "MMS_BUILD_CONNECT_PORTS: no port (https would reach nothing)"
connect_ports="$(IFS='|'; echo "${ports[*]}")"
# POSIX extended regexes (tinyproxy adds REG_ICASE), one line each; see "The filter" above.
: >"$FILTER.new"
for host in "${hosts[@]}"; do
    re="${host//./\\.}"
    printf '^%s:(%s)$\n^http://%s(:80)?(/[^:]*)?$\n' "$re" "$connect_ports" "$re" >>"$FILTER.new"
done
printf '%s\n' "${hosts[@]}" >"$HOSTS.new"
user=nobody
group="$(id -gn "$user")"
{
    echo "# Written by scripts/infra/build-network.sh: the egress proxy of image builds."
    echo "User $user"
    echo "Group $group"
    echo "Listen $GATEWAY"
    echo "Port $PORT"
    echo "Allow $SUBNET"
    echo "Timeout 600"
    echo "MaxClients 200"
    echo "LogLevel Notice"
    echo "DisableViaHeader Yes"
    for p in "${ports[@]}"; do echo "ConnectPort $p"; done
    # Default deny, over whole URLs: only what a pattern of the filter file matches; an
    # empty file allows nothing.
    echo "FilterDefaultDeny Yes"
    echo "FilterURLs On"
    echo "FilterType ere"
    echo "Filter \"$FILTER\""
} >"$CONF.new"
chmod 644 "$CONF.new" "$FILTER.new" "$HOSTS.new"
mv -f "$FILTER.new" "$FILTER"
mv -f "$HOSTS.new" "$HOSTS"
mv -f "$CONF.new" "$CONF"
cat "$CONF" "$FILTER" >"$DIR/wanted.conf"

if pid_alive "$PIDFILE" tinyproxy && cmp -s "$DIR/wanted.conf" "$DIR/running.conf" && proxy_answers; then
    log "build proxy already running: $PROXY (pid $(cat "$PIDFILE")) for ${hosts[*]}"
else
    stop_proxy
    log "starting the build proxy on $PROXY for ${hosts[*]} (log $LOGFILE)"
    # -d: stay in the foreground (our pidfile, our log); fds 8/9 (locks) are not inherited.
    setsid nohup tinyproxy -d -c "$CONF" >>"$LOGFILE" 2>&1 </dev/null 8>&- 9>&- &
    echo $! >"$PIDFILE"
    up_or_dead() { proxy_answers || ! kill -0 "$(cat "$PIDFILE")" 2>/dev/null; }
    if ! wait_until 15 up_or_dead || ! proxy_answers; then
        tail -n 20 "$LOGFILE" >&2 || true
        die "the build proxy is not answering on $GATEWAY:$PORT (log: $LOGFILE)"
    fi
    cp "$DIR/wanted.conf" "$DIR/running.conf"
fi
echo "MMS_BUILD_NETWORK=$NETWORK"
echo "MMS_BUILD_PROXY=$PROXY"

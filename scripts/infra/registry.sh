#!/usr/bin/env bash
# Run local CNCF Distribution registries (Debian's docker-registry 2.8) on 127.0.0.1.
#
#   scripts/infra/registry.sh                      # open registry on 127.0.0.1:5000
#   scripts/infra/registry.sh --auth [USER [PASS]] # + basic-auth registry on 127.0.0.1:5002
#   scripts/infra/registry.sh --stop               # stop both (only the ones this script started)
#   scripts/infra/registry.sh --status
#
# stdout (one line each, eval/export-friendly):
#   MMS_REGISTRY=127.0.0.1:5000
#   MMS_REGISTRY_AUTH=127.0.0.1:5002  MMS_REGISTRY_USER=...  MMS_REGISTRY_PASSWORD=...   (with --auth)
#
# Env overrides: MMS_REGISTRY_PORT (5000), MMS_REGISTRY_AUTH_PORT (5002),
#   MMS_REGISTRY_USER (mms), MMS_REGISTRY_PASSWORD (mms-ci-secret),
#   MMS_REGISTRY_DIR (state dir, default /var/lib/mms-ci/registry), MMS_REGISTRY_WAIT (30 s).
# Both registries have deletes enabled (DELETE /v2/<name>/manifests/<digest>).
# Docker treats 127.0.0.0/8 as an insecure (plain-HTTP) registry by default:
# no --insecure-registry flag is needed for 127.0.0.1:PORT.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"

BASE="${MMS_REGISTRY_DIR:-$MMS_CI_STATE/registry}"
OPEN_PORT="${MMS_REGISTRY_PORT:-5000}"
AUTH_PORT="${MMS_REGISTRY_AUTH_PORT:-5002}"
USER_NAME="${MMS_REGISTRY_USER:-mms}"
PASSWORD="${MMS_REGISTRY_PASSWORD:-mms-ci-secret}"
WAIT="${MMS_REGISTRY_WAIT:-30}"

WANT_AUTH=0
ACTION=start
while [ $# -gt 0 ]; do
    case "$1" in
        --auth)
            WANT_AUTH=1
            if [ $# -ge 2 ] && [ "${2#--}" = "$2" ]; then USER_NAME="$2"; shift; fi
            if [ $# -ge 2 ] && [ "${2#--}" = "$2" ]; then PASSWORD="$2"; shift; fi
            ;;
        --stop) ACTION=stop ;;
        --status) ACTION=status ;;
        *) die "usage: $0 [--auth [USER [PASSWORD]]] [--stop|--status]" ;;
    esac
    shift
done

http_code() { # URL [curl args...]
    local url="$1"; shift
    curl -s -o /dev/null --max-time 3 -w '%{http_code}' "$@" "$url" 2>/dev/null || true
}

port_in_use() { # PORT — something accepts TCP connections on 127.0.0.1:PORT
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

stop_instance() { # NAME
    local d="$BASE/$1" pid
    if pid_alive "$d/registry.pid" docker-registry; then
        pid="$(cat "$d/registry.pid")"
        log "stopping registry '$1' pid $pid"
        kill "$pid"
        for _ in $(seq 1 40); do kill -0 "$pid" 2>/dev/null || break; sleep 0.25; done
    fi
    rm -f "$d/registry.pid"
}

if [ "$ACTION" = stop ]; then
    stop_instance open; stop_instance auth; exit 0
fi
if [ "$ACTION" = status ]; then
    rc=0
    c="$(http_code "http://127.0.0.1:$OPEN_PORT/v2/")"; echo "open 127.0.0.1:$OPEN_PORT /v2/ -> ${c:-000}"; [ "$c" = 200 ] || rc=1
    c="$(http_code "http://127.0.0.1:$AUTH_PORT/v2/")"; echo "auth 127.0.0.1:$AUTH_PORT /v2/ -> ${c:-000}"
    exit $rc
fi

need_root
pkgs=(docker-registry)
command -v curl >/dev/null 2>&1 || pkgs+=(curl)
[ "$WANT_AUTH" = 1 ] && pkgs+=(apache2-utils)   # htpasswd (bcrypt: -B)
apt_install "${pkgs[@]}"

mkdir -p "$BASE"
exec 9>"$BASE/.lock"
flock -w 120 9 || die "timed out waiting for another registry.sh run"

write_config() { # NAME PORT AUTH(0|1)
    local d="$BASE/$1"
    mkdir -p "$d/storage"
    [ -s "$d/http-secret" ] || { head -c 32 /dev/urandom | base64 | tr -d '\n=/+' >"$d/http-secret"; chmod 600 "$d/http-secret"; }
    {
        cat <<EOF
# Written by scripts/infra/registry.sh — regenerated on every run.
version: 0.1
log:
  level: info
  fields:
    service: mms-registry-$1
storage:
  filesystem:
    rootdirectory: $d/storage
  delete:
    enabled: true
  cache:
    blobdescriptor: inmemory
  maintenance:
    uploadpurging:
      enabled: true
      age: 24h
      interval: 24h
      dryrun: false
http:
  addr: 127.0.0.1:$2
  secret: $(cat "$d/http-secret")
  headers:
    X-Content-Type-Options: [nosniff]
health:
  storagedriver:
    enabled: true
    interval: 10s
    threshold: 3
EOF
        if [ "$3" = 1 ]; then
            cat <<EOF
auth:
  htpasswd:
    realm: mms-registry
    path: $d/htpasswd
EOF
        fi
    } >"$d/config.yml.new"
    if ! cmp -s "$d/config.yml.new" "$d/config.yml"; then
        mv "$d/config.yml.new" "$d/config.yml"; return 0   # changed
    fi
    rm -f "$d/config.yml.new"; return 1                    # unchanged
}

ensure_instance() { # NAME PORT AUTH(0|1)
    local name="$1" port="$2" auth="$3" d="$BASE/$1" changed=0 expect=200 code
    write_config "$name" "$port" "$auth" && changed=1
    if [ "$auth" = 1 ]; then
        expect=401
        # Distribution 2.8 reads the htpasswd file once at start-up: rewrite + restart
        # when the wanted credentials don't verify against it.
        if ! { [ -s "$d/htpasswd" ] && htpasswd -vb "$d/htpasswd" "$USER_NAME" "$PASSWORD" >/dev/null 2>&1; }; then
            htpasswd -Bbc "$d/htpasswd" "$USER_NAME" "$PASSWORD" >/dev/null 2>&1 || die "htpasswd failed"
            chmod 600 "$d/htpasswd"
            changed=1
        fi
    fi

    if pid_alive "$d/registry.pid" docker-registry; then
        code="$(http_code "http://127.0.0.1:$port/v2/")"
        if [ "$changed" = 0 ] && [ "$code" = "$expect" ]; then
            log "registry '$name' already up on 127.0.0.1:$port"
            return 0
        fi
        log "registry '$name' config changed or unhealthy (/v2/ -> $code); restarting"
        stop_instance "$name"
    fi

    if port_in_use "$port"; then
        die "127.0.0.1:$port is already in use by a process this script did not start ($(ss -Hltnp "sport = :$port" 2>/dev/null | grep -o 'users:.*' | head -n1)); free it or set MMS_REGISTRY_PORT / MMS_REGISTRY_AUTH_PORT"
    fi

    log "starting registry '$name' on 127.0.0.1:$port (state $d)"
    setsid nohup docker-registry serve "$d/config.yml" >>"$d/registry.log" 2>&1 </dev/null 9>&- &
    echo $! >"$d/registry.pid"
    local pid; pid="$(cat "$d/registry.pid")"
    # Stops early (exit 0) when the process died, so the test below reports it at once.
    check() { ! kill -0 "$pid" 2>/dev/null || [ "$(http_code "http://127.0.0.1:$port/v2/")" = "$expect" ]; }
    if ! wait_until "$WAIT" check || ! kill -0 "$pid" 2>/dev/null; then
        tail -n 5 "$d/registry.log" >&2 || true
        rm -f "$d/registry.pid"
        die "registry '$name' did not answer $expect on http://127.0.0.1:$port/v2/ within ${WAIT}s"
    fi
    if [ "$auth" = 1 ]; then
        code="$(http_code "http://127.0.0.1:$port/v2/" -u "$USER_NAME:$PASSWORD")"
        [ "$code" = 200 ] || die "registry '$name': credentials rejected (/v2/ -> $code)"
    fi
    log "registry '$name' up on 127.0.0.1:$port"
}

ensure_instance open "$OPEN_PORT" 0
echo "MMS_REGISTRY=127.0.0.1:$OPEN_PORT"
if [ "$WANT_AUTH" = 1 ]; then
    ensure_instance auth "$AUTH_PORT" 1
    echo "MMS_REGISTRY_AUTH=127.0.0.1:$AUTH_PORT"
    echo "MMS_REGISTRY_USER=$USER_NAME"
    echo "MMS_REGISTRY_PASSWORD=$PASSWORD"
fi

#!/usr/bin/env bash
# Build (once, cached outside the clone) a minimal Debian rootfs with Python + pip + venv,
# and a tarball of it for `docker import`: bookworm (Python 3.11) by default, or bullseye
# (3.9) or trixie (3.13), each cached under its own name.
#
#   scripts/infra/base-rootfs.sh            # build if missing, print tarball path
#   scripts/infra/base-rootfs.sh --force    # rebuild even if the stamp is valid
#
# Env overrides:
#   MMS_ROOTFS_CACHE   cache dir              (default /var/cache/mms/rootfs)
#   MMS_ROOTFS_SUITE   Debian release         (default bookworm; bullseye, bookworm or trixie)
#   MMS_ROOTFS_NAME    rootfs name            (default <suite>-py3)
#   MMS_DEBIAN_MIRROR  Debian mirror URL      (default: the one apt uses here)
#   MMS_ROOTFS_EXTRA   extra packages, comma-separated, appended to the include list
#   MMS_ROOTFS_COMPONENTS  archive components debootstrap reads (default main; the image's
#                      own sources.list names main only)
#
# Outputs (in $MMS_ROOTFS_CACHE):
#   $NAME/            the rootfs directory
#   $NAME.tar         tarball of it (numeric owners, sorted names) for `docker import`
#   $NAME.tar.sha256  its sha256 (base-image.sh labels the imported image with it)
#   $NAME.packages    `dpkg-query -W` of the rootfs
#   $NAME.stamp       written last, only on success; holds the config hash
# stdout: the tarball path (only line printed on stdout).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source-path=SCRIPTDIR source=lib.sh
. "$HERE/lib.sh"
need_root

FORCE=0
[ "${1:-}" = "--force" ] && FORCE=1

CACHE="${MMS_ROOTFS_CACHE:-/var/cache/mms/rootfs}"
SUITE="${MMS_ROOTFS_SUITE:-bookworm}"
case "$SUITE" in
    bullseye|bookworm|trixie) ;;
    *) die "MMS_ROOTFS_SUITE must be bullseye, bookworm or trixie, not '$SUITE'" ;;
esac
NAME="${MMS_ROOTFS_NAME:-$SUITE-py3}"
# python3/pip/venv + CA store are what the brief asks for; the rest is what a
# Python inference base commonly needs at run time:
#   libgomp1  OpenMP runtime (LightGBM, some sklearn/xgboost wheels dlopen it)
#   netbase   /etc/protocols, /etc/services (socket.getservbyname, grpc, ...)
#   tini      PID-1 init that reaps zombies and forwards signals
INCLUDE="python3,python3-pip,python3-venv,ca-certificates,libgomp1,netbase,tini"
[ -n "${MMS_ROOTFS_EXTRA:-}" ] && INCLUDE="$INCLUDE,$MMS_ROOTFS_EXTRA"
COMPONENTS="${MMS_ROOTFS_COMPONENTS:-main}"

detect_mirror() {
    # The first non-security Debian URI apt is configured with (deb822 or one-line).
    local u
    u="$( { grep -hE '^[[:space:]]*URIs:' /etc/apt/sources.list.d/*.sources 2>/dev/null | awk '{print $2}';
            grep -hE '^[[:space:]]*deb[[:space:]]' /etc/apt/sources.list /etc/apt/sources.list.d/*.list 2>/dev/null \
              | sed -E 's/\[[^]]*\]//' | awk '{print $2}'; } \
          | grep -v -- '-security' | grep -E '/debian/?$' | head -n1 )"
    echo "${u:-http://deb.debian.org/debian}"
}
MIRROR="${MMS_DEBIAN_MIRROR:-$(detect_mirror)}"

DIR="$CACHE/$NAME"
TAR="$CACHE/$NAME.tar"
STAMP="$CACHE/$NAME.stamp"
PKGS="$CACHE/$NAME.packages"
# Bump CONFIG_VERSION when the clean-up steps below change.
CONFIG_VERSION=3
# The components join the hash only when not main, so the plain and spark caches stay valid.
HASHED=("$CONFIG_VERSION" "$SUITE" "$INCLUDE" "$MIRROR" "$(dpkg --print-architecture)")
[ "$COMPONENTS" = main ] || HASHED+=("$COMPONENTS")
CONFIG_HASH="$(printf '%s\n' "${HASHED[@]}" | sha256sum | cut -c1-16)"

mkdir -p "$CACHE"
exec 9>"$CACHE/.$NAME.lock"
flock -w 3600 9 || die "timed out waiting for another base-rootfs.sh run"

if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$CONFIG_HASH" ] \
   && [ -d "$DIR" ] && [ -s "$TAR" ] && [ -s "$TAR.sha256" ]; then
    log "cached: $TAR (stamp $CONFIG_HASH)"
    echo "$TAR"
    exit 0
fi

apt_install debootstrap debian-archive-keyring

START=$(date +%s)
rm -f "$STAMP"
TMP="$(mktemp -d "$CACHE/.$NAME.tmp.XXXXXX")"
cleanup() {
    # debootstrap may leave proc/sys mounted inside the target on failure.
    awk -v d="$TMP" 'index($2, d) == 1 {print $2}' /proc/mounts | sort -r \
        | while read -r m; do umount -l "$m" 2>/dev/null || true; done
    rm -rf "$TMP" "$TMP.tar" "$TAR.sha256.tmp" "$PKGS.tmp"
}
trap cleanup EXIT
chmod 755 "$TMP"

log "debootstrap --variant=minbase --components=$COMPONENTS --include=$INCLUDE $SUITE <tmp> $MIRROR"
if ! debootstrap --variant=minbase --components="$COMPONENTS" --include="$INCLUDE" \
        "$SUITE" "$TMP" "$MIRROR" >"$CACHE/$NAME.debootstrap.log" 2>&1; then
    tail -n 30 "$CACHE/$NAME.debootstrap.log" >&2
    [ -f "$TMP/debootstrap/debootstrap.log" ] && tail -n 30 "$TMP/debootstrap/debootstrap.log" >&2
    die "debootstrap failed (log: $CACHE/$NAME.debootstrap.log)"
fi
log "debootstrap done in $(( $(date +%s) - START ))s"

# --- sanity check before trimming --------------------------------------------
chroot "$TMP" /usr/bin/python3 -c 'import ssl, venv, ensurepip, pip, sqlite3, zlib, ctypes; print("python ok")' >&2 \
    || die "python3 sanity check failed inside the rootfs"

# --- make it small and image-like (what debian:*-slim does) -------------------
cat >"$TMP/etc/dpkg/dpkg.cfg.d/mms-slim" <<'EOF'
# Keep images small: no docs, man pages or translations for later installs.
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/linda/*
path-exclude /usr/share/locale/*
path-include /usr/share/locale/locale.alias
EOF
cat >"$TMP/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
cat >"$TMP/etc/apt/apt.conf.d/docker-no-recommends" <<'EOF'
APT::Install-Recommends "false";
APT::Install-Suggests "false";
EOF
# Debian's pip refuses system installs (PEP 668); images may opt out with
# --break-system-packages or PIP_BREAK_SYSTEM_PACKAGES=1, or use a venv.

find "$TMP/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete 2>/dev/null || true
find "$TMP/usr/share/doc" -mindepth 1 -type d -empty -delete 2>/dev/null || true
rm -rf "$TMP"/usr/share/man/* "$TMP"/usr/share/info/* "$TMP"/usr/share/groff/* \
       "$TMP"/usr/share/lintian/* "$TMP"/usr/share/linda/*
find "$TMP/usr/share/locale" -mindepth 1 -maxdepth 1 -not -name locale.alias -exec rm -rf {} + 2>/dev/null || true
rm -rf "$TMP"/var/lib/apt/lists/* "$TMP"/var/cache/apt/* "$TMP"/var/cache/debconf/*-old \
       "$TMP"/var/cache/ldconfig/aux-cache "$TMP"/var/lib/dpkg/*-old \
       "$TMP"/debootstrap "$TMP"/tmp/* "$TMP"/var/tmp/* "$TMP"/root/.cache
find "$TMP/var/log" -type f -delete
# The pip wheel's pyc caches are rebuilt on demand; the stdlib's are kept (startup time).
# Host-specific files debootstrap copies in; docker bind-mounts its own at run time.
: >"$TMP/etc/resolv.conf"
printf '127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n' >"$TMP/etc/hosts"
echo localhost >"$TMP/etc/hostname"
[ -e "$TMP/etc/machine-id" ] && : >"$TMP/etc/machine-id"
# A fresh sources file pointing at the same mirror (apt-get update works in images).
printf 'deb %s %s main\ndeb %s %s-updates main\n' "$MIRROR" "$SUITE" "$MIRROR" "$SUITE" >"$TMP/etc/apt/sources.list"

# shellcheck disable=SC2016  # dpkg-query's own ${field} syntax
chroot "$TMP" dpkg-query -W -f='${Package}\t${Version}\n' >"$PKGS.tmp"
PYVER="$(chroot "$TMP" /usr/bin/python3 -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])')"
printf 'MMS_BASE_SUITE=%s\nMMS_BASE_PYTHON=%s\nMMS_BASE_BUILT=%s\n' \
    "$SUITE" "$PYVER" "$(date -u +%Y-%m-%dT%H:%M:%SZ)" >"$TMP/etc/mms-base-release"

# --- tarball (root-owned entries stay root, numeric ids, stable order) --------
tar --numeric-owner --sort=name --xattrs --one-file-system -C "$TMP" -cf "$TMP.tar" .

# --- atomic swap into place -----------------------------------------------------
if [ -d "$DIR" ]; then mv "$DIR" "$DIR.old.$$"; fi
mv "$TMP" "$DIR"
sha256sum "$TMP.tar" | cut -d' ' -f1 >"$TAR.sha256.tmp"
mv "$TMP.tar" "$TAR"
mv "$TAR.sha256.tmp" "$TAR.sha256"
mv "$PKGS.tmp" "$PKGS"
rm -rf "$DIR.old.$$"
trap - EXIT
echo "$CONFIG_HASH" >"$STAMP"

log "built $DIR ($(du -sh "$DIR" | cut -f1)), tarball $TAR ($(du -h "$TAR" | cut -f1)), python $PYVER, total $(( $(date +%s) - START ))s"
echo "$TAR"

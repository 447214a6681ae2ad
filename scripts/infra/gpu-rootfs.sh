#!/usr/bin/env bash
# The GPU variant of the base rootfs: base-rootfs.sh's minimal bookworm Python plus the CUDA
# runtime library from Debian's non-free component (libcudart11.0, CUDA 11.8), cached beside
# the plain one. non-free is read by this debootstrap only; the image's sources.list names main.
# The NVIDIA driver (libcuda) comes from the host at run time (the NVIDIA container toolkit).
#
#   scripts/infra/gpu-rootfs.sh [--force]   # stdout: the tarball path
#
# Env: as base-rootfs.sh; MMS_GPU_ROOTFS_NAME (default bookworm-py3-gpu).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MMS_ROOTFS_NAME="${MMS_GPU_ROOTFS_NAME:-bookworm-py3-gpu}" \
MMS_ROOTFS_EXTRA="libcudart11.0" \
MMS_ROOTFS_COMPONENTS="main,non-free" \
    exec "$HERE/base-rootfs.sh" "$@"

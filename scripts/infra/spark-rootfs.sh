#!/usr/bin/env bash
# The Spark variant of the base rootfs: base-rootfs.sh's minimal bookworm Python plus
# Debian's headless Java 17 runtime (what pyspark's JVM needs), cached beside the plain one.
# Bookworm only: the release whose Java 17 the Spark tests run on.
#
#   scripts/infra/spark-rootfs.sh [--force]   # stdout: the tarball path
#
# Env: as base-rootfs.sh; MMS_SPARK_ROOTFS_NAME (default bookworm-py3-spark).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
MMS_ROOTFS_SUITE=bookworm \
MMS_ROOTFS_NAME="${MMS_SPARK_ROOTFS_NAME:-bookworm-py3-spark}" \
MMS_ROOTFS_EXTRA="openjdk-17-jre-headless" \
    exec "$HERE/base-rootfs.sh" "$@"

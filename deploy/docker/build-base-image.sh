#!/usr/bin/env bash
# Build a local Python base image WITHOUT any registry: a Debian bookworm root
# file system made by mmdebstrap from Debian's package mirrors, then
# `docker import`ed. Use it where no image can be pulled:
#
#   deploy/docker/build-base-image.sh                 # -> pviommu-base:bookworm
#   docker-compose build --build-arg BASE_IMAGE=pviommu-base:bookworm
#
# Ordinary users skip this: the Dockerfile defaults to the official
# python:3.11-slim image. Re-running is a no-op when the image exists (FORCE=1 rebuilds).
set -euo pipefail
TAG=${1:-pviommu-base:bookworm}
SUITE=${SUITE:-bookworm}
if docker image inspect "$TAG" >/dev/null 2>&1 && [ -z "${FORCE:-}" ]; then
    echo "base image $TAG exists (FORCE=1 rebuilds it)"
    exit 0
fi
if ! command -v mmdebstrap >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq mmdebstrap >/dev/null
    else
        echo "mmdebstrap is needed (apt-get install mmdebstrap)" >&2
        exit 1
    fi
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
# A runtime base: no documentation, manual pages or translations, no apt lists or caches.
mmdebstrap --quiet --variant=apt --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/doc/*' --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/info/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' --dpkgopt='path-include=/usr/share/locale/locale.alias' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*.bin' \
    "$SUITE" "$tmp/rootfs.tar"
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["python3"]' \
    "$tmp/rootfs.tar" "$TAG" >/dev/null
echo "built base image $TAG ($(docker image inspect -f '{{.Size}}' "$TAG") bytes)"

#!/usr/bin/env bash
# Put every wheel the image needs into deploy/docker/wheels/ (run on the host,
# where PyPI is reachable): the pinned runtime requirements for CPython 3.11 on
# manylinux x86_64, and the pviommu wheel itself (built here, so it carries
# the gRPC stubs generated from protos/). The Dockerfile installs from this
# folder with --no-index, so the same Dockerfile builds with or without a
# network inside the build. Sets up .venv first when it is not there yet
# (building the pviommu wheel needs grpcio-tools).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-${PVIOMMU_VENV:-.venv}/bin/python}
if [ ! -x "$PY" ]; then
    echo "fetch-wheels: no $PY yet: running ./dev.sh setup first" >&2
    ./dev.sh setup
fi
OUT=deploy/docker/wheels
rm -rf "$OUT"
mkdir -p "$OUT"
"$PY" -m pip download -q --disable-pip-version-check --only-binary=:all: \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    --python-version 3.11 --implementation cp -d "$OUT" -r requirements/runtime.txt
"$PY" -m pip wheel -q --disable-pip-version-check --no-deps --no-build-isolation -w "$OUT" .
echo "$(ls "$OUT" | wc -l) wheels in $OUT"

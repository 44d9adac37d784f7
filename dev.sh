#!/usr/bin/env bash
# pviommu developer entry point: set-up, the main job, and the test suite.
#
#   ./dev.sh run  [pviommu run options]   set up .venv, then run a local virtual system + dmatest
#   ./dev.sh test [pytest options]        set up .venv, then lint, type-check and run the tests
#   ./dev.sh setup                        only (re)create .venv and regenerate the gRPC stubs
#
# Needs only Python 3.11+ with venv/pip. Everything is installed from the pinned
# files in requirements/; the stubs are generated from protos/ by setup.py.
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
VENV=${PVIOMMU_VENV:-.venv}

setup() {
    if [ ! -x "$VENV/bin/python" ]; then
        "$PY" -m venv "$VENV"
    fi
    local stamp="$VENV/.pviommu-reqs"
    local want
    want=$(cat requirements/dev.txt pyproject.toml | sha256sum | cut -d' ' -f1)
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
        "$VENV/bin/python" -m pip install -q --disable-pip-version-check -r requirements/dev.txt
        echo "$want" > "$stamp"
    fi
    # Build without isolation: the pinned grpcio-tools/mypy-protobuf in the venv generate the stubs.
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
    # The optional compiled core (native/): built when cargo is present, else the Python one runs alone.
    "$VENV/bin/python" native/build.py --quiet || true
}

cmd=${1:-help}
shift || true
case "$cmd" in
    setup) setup ;;
    run) setup; exec "$VENV/bin/pviommu" run "$@" ;;
    test)
        setup
        echo "== ruff"; "$VENV/bin/ruff" check .
        echo "== mypy --strict (core, services, command)"; "$VENV/bin/mypy"
        echo "== pytest"; exec "$VENV/bin/python" -m pytest "$@"
        ;;
    *) sed -n '2,10p' "$0"; exit 2 ;;
esac

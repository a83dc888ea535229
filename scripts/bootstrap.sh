#!/usr/bin/env bash
# Sets up everything swapper needs on a fresh machine, idempotently (fast when already done):
# a virtualenv in .venv with swapper and its dev/demo extras, then the real upstreams for the
# default models.yaml (llama-server, whisper-server, tiny generated models) under .demo/.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -U pip
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,demo]'
.venv/bin/python -m swapper.demo setup

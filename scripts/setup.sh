#!/usr/bin/env bash
# Creates .venv (if missing), installs the pinned dependencies and builds matnet with its
# C++ extension. Idempotent: a second run only re-checks.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -r requirements.txt
# build isolation would not see torch; the extension compiles against the installed one
.venv/bin/python -m pip install -q -e . --no-build-isolation
.venv/bin/python -c "import matnet, matnet.ops._dispatch as d; print('matnet', matnet.__version__, '| C++ extension:', d.extension_loaded())"

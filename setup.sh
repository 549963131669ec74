#!/usr/bin/env bash
# One-command setup: a virtual environment in .venv with every dependency pinned by constraints.txt.
# Usage: ./setup.sh            (then: .venv/bin/mimic demo)
set -euo pipefail
cd "$(dirname "$0")"
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
# torch first, from the exact pin (pip takes the local wheel; uv/poetry would download GBs)
.venv/bin/python -m pip install -q -c constraints.txt torch==2.14.1 torchvision==0.29.1
.venv/bin/python -m pip install -q -c constraints.txt -e ".[test]"
.venv/bin/python -c "import mimic, torch; print(f'mimic {mimic.__version__} ready (torch {torch.__version__})')"

#!/usr/bin/env bash
# The README's second command: set up, then run the test suite (GPU tests skip without CUDA).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
.venv/bin/python -m ruff check .   # style first: pyproject.toml [tool.ruff]
exec .venv/bin/python -m pytest -ra "$@"

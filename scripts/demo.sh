#!/usr/bin/env bash
# The README's first command: set up, then fine-tune SmolLM2-135M-Instruct with LoRA on 2 CPU workers.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/distrib-ft train examples/demo.yaml "$@"

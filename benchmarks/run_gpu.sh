#!/usr/bin/env bash
# For a GPU session: run the fused-kernel tests compiled on CUDA (TRITON_INTERPRET=0), then the
# kernel benchmark (the paper's rule, and as rich_* columns the default preset l2l-blend's (as l2l-random's)
# momentum and rms inputs), then `learnedopt meta-train --device cuda` against the CPU run for
# every algorithm. Logs and results go under $OUT:
#   $OUT/nvidia-smi.txt (with the install's output), $OUT/test_kernel_cuda.log, $OUT/failures.log,
#   $OUT/kernel_bench.log, $OUT/results/kernel_bench.{json,md}, $OUT/test_meta_train_cuda.log,
#   $OUT/summary.txt (8 files: the device tool brings back at most 8)
# Needs a CUDA build of torch and triton in $PYTHON (default: .venv/bin/python if present, else
# python3). BENCH_ARGS replaces the benchmark options (default "--no-compile --tune": no
# torch.compile columns, whose compilation costs minutes, and the block x warps sweep).
# The kernel tests run on PYTEST_WORKERS processes (default 12) where pytest-xdist is installed:
# they are dominated by Triton's compilations (a backward kernel takes tens of seconds).
# TEST_TIMEOUT, BENCH_TIMEOUT, META_TIMEOUT (seconds) bound the three parts, so that the whole
# script fits a short GPU lease (default 200 + 220 + 90).
# Exit status: nonzero if the tests or the benchmark failed.
set -uo pipefail
: "${OUT:?set OUT to a writable folder}"
cd "$(dirname "$0")/.."
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
mkdir -p "$OUT/results"
export TRITON_INTERPRET=0
# each failing test's report as it happens (tests/conftest.py), kept if a time limit kills pytest
export LEARNEDOPT_FAILURE_LOG="$OUT/failures.log"

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('triton', triton.__version__)"; } \
    > "$OUT/nvidia-smi.txt" 2>&1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch in $PY sees no CUDA device: see $OUT/nvidia-smi.txt" | tee "$OUT/summary.txt"
    exit 2
fi
if ! "$PY" -c "import learnedopt.kernels.coordinate_lstm_step" 2>/dev/null; then
    # learnedopt.kernels maps to kernels/ only through the (editable) install; offline is fine
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . >> "$OUT/nvidia-smi.txt" 2>&1
fi

workers=()
if "$PY" -c "import xdist" 2>/dev/null; then workers=(-n "${PYTEST_WORKERS:-12}"); fi

timeout "${TEST_TIMEOUT:-200}" "$PY" -m pytest "${workers[@]}" -p no:benchmark tests/test_kernel_coordinate_lstm.py tests/test_kernel_coordinate_lstm_backward.py tests/test_kernel_meta_lstm.py tests/test_kernel_meta_lstm_backward.py -q -ra --durations=10 2>&1 | tee "$OUT/test_kernel_cuda.log"
test_rc=${PIPESTATUS[0]}

(cd benchmarks && timeout "${BENCH_TIMEOUT:-220}" "$PY" kernel_bench.py --results-dir "$OUT/results" ${BENCH_ARGS:---no-compile --tune}) 2>&1 | tee "$OUT/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}

timeout "${META_TIMEOUT:-90}" "$PY" -m pytest tests/test_meta_train_device.py -q -ra --durations=5 2>&1 | tee "$OUT/test_meta_train_cuda.log"
meta_rc=${PIPESTATUS[0]}

echo "kernel tests rc=$test_rc, benchmark rc=$bench_rc, meta-train on CUDA tests rc=$meta_rc" | tee "$OUT/summary.txt"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$meta_rc" -eq 0 ]

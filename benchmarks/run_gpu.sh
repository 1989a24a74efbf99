#!/usr/bin/env bash
# For a GPU session: run the fused-kernel tests compiled on CUDA (TRITON_INTERPRET=0), then the
# kernel benchmark (the paper's rule, and as rich_* columns the default preset l2l-random's
# momentum and rms inputs), then `learnedopt meta-train --device cuda` against the CPU run for
# every algorithm. Logs and results go under $OUT:
#   $OUT/nvidia-smi.txt, $OUT/test_kernel_cuda.log, $OUT/kernel_bench.log,
#   $OUT/results/kernel_bench.{json,md}, $OUT/test_meta_train_cuda.log, $OUT/summary.txt
# Needs a CUDA build of torch and triton in $PYTHON (default: .venv/bin/python if present, else
# python3). BENCH_ARGS adds benchmark options, e.g. BENCH_ARGS="--tune --sizes 1000000 10000000".
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

{ nvidia-smi; "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available()); print('triton', triton.__version__)"; } \
    > "$OUT/nvidia-smi.txt" 2>&1
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "torch in $PY sees no CUDA device: see $OUT/nvidia-smi.txt" | tee "$OUT/summary.txt"
    exit 2
fi
if ! "$PY" -c "import learnedopt.kernels.coordinate_lstm_step" 2>/dev/null; then
    # learnedopt.kernels maps to kernels/ only through the (editable) install; offline is fine
    "$PY" -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/install.log" 2>&1
fi

timeout 420 "$PY" -m pytest tests/test_kernel_coordinate_lstm.py tests/test_kernel_coordinate_lstm_backward.py tests/test_kernel_meta_lstm.py tests/test_kernel_meta_lstm_backward.py -q -ra --durations=10 2>&1 | tee "$OUT/test_kernel_cuda.log"
test_rc=${PIPESTATUS[0]}

(cd benchmarks && timeout 900 "$PY" kernel_bench.py --results-dir "$OUT/results" ${BENCH_ARGS:-}) 2>&1 | tee "$OUT/kernel_bench.log"
bench_rc=${PIPESTATUS[0]}

timeout 300 "$PY" -m pytest tests/test_meta_train_device.py -q -ra --durations=5 2>&1 | tee "$OUT/test_meta_train_cuda.log"
meta_rc=${PIPESTATUS[0]}

echo "kernel tests rc=$test_rc, benchmark rc=$bench_rc, meta-train on CUDA tests rc=$meta_rc" | tee "$OUT/summary.txt"
[ "$test_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$meta_rc" -eq 0 ]

#!/usr/bin/env bash
# The GPU check as run on a lent, offline GPU machine (CuPy, PyTorch, pytest and
# Hypothesis installed there; no network), from the repository root:
#
#   python3 -m pip wheel --no-deps -w .whl .        # here, on a machine with the network
#   bash asv_bench/gpu_session.sh                    # there; logs and JSON go to $OUT
#
# Installs this checkout's wheel into a private folder (no build there; PYTHONSAFEPATH keeps
# the repository's top-level fisheropt/ folder from shadowing the installed package), runs
# every GPU-marked test, the optax golden vectors on XLA:GPU, then asv_bench/gpu_validate.py's
# benchmarks.
set -u
OUT=${OUT:-/tmp/fisheropt-gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem,temperature.gpu,utilization.gpu \
    --format=csv || true
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/fo-site .whl/fisheropt-*.whl || exit 3
export PYTHONPATH=/tmp/fo-site PYTHONSAFEPATH=1
python3 -c "import fisheropt as fo; print('available:', fo.backends.available(), 'unavailable:', fo.backends.unavailable())"
# a hung kernel must not eat the lease: a per-test limit where pytest-timeout is installed
timeout_arg=$(python3 -c "import pytest_timeout" 2>/dev/null && echo "--timeout 120")
python3 -m pytest -m gpu tests -q -rs -p no:cacheprovider $timeout_arg --continue-on-collection-errors \
    ${FO_PYTEST_ARGS:-} 2>&1 | tee "$OUT/tests.log"
echo "pytest exit: ${PIPESTATUS[0]}"
# fisheropt.optax on XLA:GPU, where subnormals are kept (XLA:CPU flushes them): every golden-vector
# case must pass there, the "subnormal" ones included (test_optax_vectors.py xfails nothing on a GPU)
if python3 -c "import jax, optax, sys; sys.exit(jax.default_backend() != 'gpu')" 2>/dev/null; then
    python3 -m pytest tests/test_optax_vectors.py -q -rxs -p no:cacheprovider $timeout_arg 2>&1 | tee -a "$OUT/tests.log"
    echo "optax pytest exit: ${PIPESTATUS[0]}"
else
    echo "optax: no JAX with a GPU backend here; skipped"
fi
# the cupy backend's NVRTC checks (PTX of every kernel: no FMA contraction, no ftz, vector
# loads; the launcher's compile and disk cache) need CuPy's NVRTC but no GPU, so they carry
# no gpu mark and skip on machines without CuPy: run them here, where CuPy is
python3 -m pytest tests/backends/test_cupy_internals.py -q -rs -p no:cacheprovider $timeout_arg -k "nvrtc or cupy_launcher" \
    2>&1 | tee -a "$OUT/tests.log"
echo "nvrtc pytest exit: ${PIPESTATUS[0]}"
timeout "${FO_BENCH_TIMEOUT:-300}" python3 asv_bench/gpu_validate.py --no-tests ${FO_BENCH_ARGS:---quick} \
    --json "$OUT/gpu.json" 2>&1 | tee "$OUT/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"

#!/usr/bin/env bash
# The whole GPU check in one call of a lent machine (see .library/device): build the CUDA
# kernels for sm_90, run every test that needs a GPU, then time every GPU backend against eager
# PyTorch, torch.compile and Liger-Kernel. Logs go to $OUT (or ./gpu-logs).
#   bash bench/gpu_run.sh          (Liger from .whl/*.whl when present: pip download liger-kernel)
set -uo pipefail
export PYTHONUNBUFFERED=1 CMAKE_BUILD_PARALLEL_LEVEL=16
out=${OUT:-$PWD/gpu-logs}
mkdir -p "$out"
root=$PWD
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
start=$SECONDS
python3 -m pip install -q --no-build-isolation --no-deps --no-index \
  -Ccmake.define.CMAKE_CUDA_ARCHITECTURES=90 -Cbuild-dir=/tmp/kd-build . >"$out/build.log" 2>&1 ||
  { tail -40 "$out/build.log"; exit 1; }
echo "build: $((SECONDS - start)) s"
cd /tmp || exit 1
python3 -c "import kdkernels as kd; print(kd.backends())"
start=$SECONDS
# PYTEST_PATHS and PYTEST_K narrow the GPU tests (default: every test that runs the CUDA
# backend, and the hidden-state loss on every backend).
paths=()
for p in ${PYTEST_PATHS:-tests}; do paths+=("$root/$p"); done
timeout "${CUDA_TEST_S:-120}" python3 -m pytest -q -p no:cacheprovider --maxfail=20 \
  --rootdir "$root" -c "$root/pyproject.toml" "${paths[@]}" \
  -k "${PYTEST_K:-(cuda and not emulated) or linear}" 2>&1 | tee "$out/pytest-cuda.log" | tail -15
echo "cuda tests: $((SECONDS - start)) s"
start=$SECONDS
if [ "${TRITON_TEST_S:-90}" -gt 0 ]; then
  timeout "${TRITON_TEST_S:-90}" python3 -m pytest -q -p no:cacheprovider --rootdir "$root" \
    -c "$root/pyproject.toml" "$root/tests" -k "triton and not aot and not static" 2>&1 |
    tee "$out/pytest-triton.log" | tail -15
fi
echo "triton tests: $((SECONDS - start)) s"
cd "$root" || exit 1
timeout "${BENCH_S:-150}" python3 bench/gpu_check.py --repeats 10 --linear ${GPU_CHECK_ARGS:-} 2>&1 |
  tee "$out/gpu_check.log"

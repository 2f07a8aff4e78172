#!/usr/bin/env bash
# The checks that need an NVIDIA GPU, in one go. Run on a machine with CUDA (nvcc) and CMake, with a Python
# that already has this project installed (`pip install -e '.[all]'`, or its dependencies and torch):
#
#   bash bench/gpu.sh [PYTHON]          (default python3; logs in bench/out/gpu/)
#
#   build     the fixed backend with CUDA into PYTHON (backend/build.sh), or, with
#             LLAVA_BACKEND_TARBALL=.gpu/llama_cpp_cuda90.tar.xz, the one bench/cuda_wheel.sh built elsewhere
#   diagnose  bench/gpu_diagnose.py: which of stock llama-cpp-python and our engine load and run on the GPU;
#             where ours crash, what triggers it, and a workaround the steps after it then run with
#   tests     the fidelity, backend, cache and demo-model tests, every layer and the vision encoder on the GPU
#   offload   bench/offload.py: one `llava ask` on the LLaVA-1.5-shaped pair, CPU only against full offload
#   compare   (only when named in STEPS; RUNS=N, default 5) bench/compare.py --gpu-layers 99 against a CUDA llama-mtmd-cli:
#             the one bench/mtmd_cli_shared.sh built into .gpu/mtmd (run on the backend's CUDA libraries),
#             else one already at bench/out/llama-mtmd-cli
#
# A step that passed leaves bench/out/gpu/STEP.done and is skipped the next time, so a run cut short
# resumes; the build resumes too (backend/build.sh). STEPS="tests offload" runs only those.
set -uo pipefail
cd "$(dirname "$0")/.."

py=${1:-python3}
logs=bench/out/gpu
mkdir -p "$logs"

build() {
    if [ -n "${LLAVA_BACKEND_TARBALL:-}" ]; then  # built elsewhere by bench/cuda_wheel.sh
        site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        rm -rf "$site"/llama_cpp "$site"/llama_cpp_python-*.dist-info
        tar -xJf "$LLAVA_BACKEND_TARBALL" -C "$site" || return 1
        # The tarball holds no bytecode for this Python: without it every process compiles llama_cpp's
        # sources again (the H200 image writes no bytecode of its own), half a second per `llava` call.
        "$py" -m compileall -q "$site/llama_cpp" && "$py" -c "import llama_cpp; print(llama_cpp.__version__)"
    else
        CMAKE_ARGS="-DGGML_CUDA=on ${CMAKE_ARGS:-}" bash backend/build.sh "$py"
    fi
}

diagnose() { "$py" bench/gpu_diagnose.py; }

tests() {
    "$py" -m pytest -q -p no:cacheprovider --durations=8 \
        tests/test_fidelity.py tests/test_backend.py tests/test_cache.py tests/test_miniature_demo.py
}

offload() { "$py" bench/offload.py --runs 3; }

compare() {
    if [ -e .gpu/mtmd/llama-mtmd-cli ]; then  # bench/mtmd_cli_shared.sh: runs on the backend's CUDA libraries
        site=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
        export LD_LIBRARY_PATH=$PWD/.gpu/mtmd:$site/llama_cpp/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
        mkdir -p bench/out && cp .gpu/mtmd/llama-mtmd-cli bench/out/llama-mtmd-cli
    fi
    "$py" bench/compare.py --gpu-layers 99 --runs "${RUNS:-5}"
}

{
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    nvcc --version | tail -n 1
    grep -m1 "model name" /proc/cpuinfo
    echo "CPU extensions: $(grep -m1 ^flags /proc/cpuinfo | grep -o -w -E 'avx2|avx512[a-z0-9_]*|amx[a-z0-9_]*' | tr '\n' ' ')"
    echo "backend: ${LLAVA_BACKEND_TARBALL:-built here with CMAKE_ARGS=-DGGML_CUDA=on ${CMAKE_ARGS:-}}"
} 2>&1 |
    tee "$logs/machine.log"

failed=0
for step in ${STEPS:-build diagnose tests offload}; do
    if [ -e "$logs/$step.done" ]; then
        echo "== $step: passed before, skipped"
        continue
    fi
    if [ -e "$logs/site/sitecustomize.py" ] && [ -z "${workaround:-}" ]; then  # bench/gpu_diagnose.py found one
        workaround=1
        export PYTHONPATH="$PWD/$logs/site${PYTHONPATH:+:$PYTHONPATH}"
        echo "== with the workaround in $logs/site/sitecustomize.py"
    fi
    echo "== $step"
    start=$SECONDS
    if "$step" 2>&1 | tee "$logs/$step.log"; then
        echo "== $step: passed in $((SECONDS - start)) s" | tee -a "$logs/$step.log"
        touch "$logs/$step.done"
    else
        echo "== $step: FAILED after $((SECONDS - start)) s" | tee -a "$logs/$step.log"
        failed=1
        [ "$step" = build ] && break  # nothing after it can run without the backend
    fi
done
exit $failed

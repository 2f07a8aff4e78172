#!/usr/bin/env bash
# Builds the fixed backend with CUDA on a machine without a GPU, and packs it small enough to carry to one
# that has no compiler time to spare:
#
#   bash bench/cuda_wheel.sh [ARCH]          (default 90: Hopper, the H100 and H200)
#
# writes .gpu/llama_cpp_cuda<ARCH>.tar.xz (about 21 MB: the llama_cpp package and its dist-info, each
# shared library once). There, `LLAVA_BACKEND_TARBALL=$PWD/.gpu/llama_cpp_cuda90.tar.xz bash bench/gpu.sh`
# unpacks it in place of the build step.
#
# Needs nvcc and cuBLAS (the toolkit's, or the `nvidia-cublas` wheel's headers and libraries copied into
# it), and a Python able to build llama-cpp-python; about 25 minutes on 2 cores. Built for one architecture,
# for the CPU's AVX2 baseline rather than this machine's (-DGGML_NATIVE=OFF), and without CUDA's virtual
# memory pool (GGML_CUDA_NO_VMM: no libcuda to link against here). A wheel built like this on the
# project's Debian box (gcc 12, CUDA 13.0) ran every GPU check on an H200, where wheels built on that
# machine itself crashed in our processes (README, "GPUs").
set -euo pipefail
cd "$(dirname "$0")/.."

arch=${1:-90}
out=.gpu/llama_cpp_cuda$arch.tar.xz
command -v nvcc >/dev/null || { echo "cuda_wheel: nvcc not found" >&2; exit 1; }
cuda=${CUDA_HOME:-/usr/local/cuda}
[ -e "$cuda/include/cublas_v2.h" ] || {
    echo "cuda_wheel: cuBLAS is missing from $cuda (set CUDA_HOME to the toolkit); copy in the headers and libraries of the" \
        "nvidia-cublas wheel (nvidia/cu13/include, nvidia/cu13/lib, with libcublas.so links)" >&2
    exit 1
}

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
CMAKE_ARGS="-DGGML_CUDA=on -DGGML_NATIVE=OFF -DCMAKE_CUDA_ARCHITECTURES=$arch-real -DGGML_CUDA_NO_VMM=ON" \
    bash backend/build.sh "$work/venv/bin/python"

site=$("$work/venv/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
lib=$site/llama_cpp/lib
for name in "$lib"/*.so; do  # pip turned the library links into copies; one copy of each is enough
    base=$(basename "$name" .so)
    real=$(cd "$lib" && ls "$base".so.*.* | head -n 1)
    ln -sf "$real" "$lib/$base.so.0" && ln -sf "$base.so.0" "$name"
done
mkdir -p .gpu
grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >>.git/info/exclude
tar -cJf "$out" -C "$site" llama_cpp $(cd "$site" && ls -d llama_cpp_python-*.dist-info)
du -sh "$out"

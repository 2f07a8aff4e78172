#!/usr/bin/env bash
# Builds llama-mtmd-cli for the GPU comparison (bench/gpu.sh, step compare) on a machine without a GPU:
# linked against llama.cpp's shared libraries rather than its own static copy, so that on the GPU machine
# it runs on the very CUDA libraries bench/cuda_wheel.sh packed for our engine (same source, same patch,
# same ABI), and no CUDA compile is needed for it at all.
#
#   bash bench/mtmd_cli_shared.sh          (about 6 minutes on 2 cores; needs .gpu/llama_cpp_python-*.tar.gz
#                                           from bench/offline_bundle.sh)
#
# writes .gpu/mtmd/llama-mtmd-cli and the one library it needs that the backend lacks (libllama-common);
# bench/gpu.sh puts both and the backend's lib/ on LD_LIBRARY_PATH.
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.3.36
sdist=.gpu/llama_cpp_python-$version.tar.gz
[ -e "$sdist" ] || { echo "mtmd_cli_shared: $sdist is missing; run bench/offline_bundle.sh first" >&2; exit 1; }
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
tar -xzf "$sdist" -C "$work"
src="$work/llama_cpp_python-$version"
for p in "$PWD"/backend/*.patch; do patch --quiet -p1 -d "$src" -i "$p"; done
llama="$src/vendor/llama.cpp"
# The trimmed sdist keeps only tools/mtmd; build that tool alone.
sed -i '/^if (EMSCRIPTEN)/,$d' "$llama/tools/CMakeLists.txt" && echo "add_subdirectory(mtmd)" >>"$llama/tools/CMakeLists.txt"
cmake -S "$llama" -B "$work/build" -G Ninja -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DCMAKE_SKIP_RPATH=ON \
    -DGGML_NATIVE=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
    -DLLAMA_BUILD_SERVER=OFF -DLLAMA_CURL=OFF >/dev/null
cmake --build "$work/build" --target llama-mtmd-cli -j "$(nproc)" >/dev/null
mkdir -p .gpu/mtmd
cp -L "$work/build/bin/llama-mtmd-cli" "$work/build/bin/libllama-common.so.0" .gpu/mtmd/
ls -la .gpu/mtmd

#!/usr/bin/env bash
# Packs what bench/gpu.sh needs on a CUDA machine with no package index, in two git-ignored folders:
#   .gpu/llama_cpp_python-<version>.tar.gz   the pinned sdist without what a Linux CUDA build never reads
#                                             (models, docs, tests, other backends' sources, git history):
#                                             about 5 MB instead of 77
#   .whl/                                     wheels of the runtime's pure-Python dependencies that a
#                                             PyTorch image usually lacks (gguf, prompt_toolkit, ...)
#
#   bash bench/offline_bundle.sh [PYTHON_VERSION]     (default 3.12: the Python of the machine it is for)
#
# There, from the repository root:
#   export PIP_NO_BUILD_ISOLATION=0 LLAVA_BACKEND_SDIST=$PWD/.gpu/llama_cpp_python-0.3.36.tar.gz
#   python3 -m pip install --no-index --no-deps .whl/*.whl && python3 -m pip install --no-index --no-deps .
#   bash bench/gpu.sh python3
# To skip the 4-minute CUDA build there, also run bench/cuda_wheel.sh here and set LLAVA_BACKEND_TARBALL
# there (bench/gpu.sh); that is how the H200 run in the README went.
set -euo pipefail
cd "$(dirname "$0")/.."

py_version=${1:-3.12}
version=0.3.36
wheels=(gguf==0.19.0 prompt_toolkit==3.0.53 wcwidth==0.9.4 diskcache==5.6.3 pexpect==4.9.0 ptyprocess==0.7.0 typer==0.28.0)

for dir in .gpu .whl; do
    grep -qx "/$dir/" .git/info/exclude 2>/dev/null || echo "/$dir/" >>.git/info/exclude
done
mkdir -p .gpu .whl
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
tar -xzf "$work/llama_cpp_python-$version.tar.gz" -C "$work"
src="$work/llama_cpp_python-$version"
rm -rf "$src"/{.git,.github,docs,examples,tests,docker}
llama="$src/vendor/llama.cpp"
rm -rf "$llama"/{models,docs,media,benches,tests,examples,gguf-py,conversion,pocs,ci,skills,requirements}
find "$llama/tools" -mindepth 1 -maxdepth 1 ! -name mtmd ! -name CMakeLists.txt -exec rm -rf {} +
find "$llama/ggml/src" -mindepth 1 -maxdepth 1 -type d -name 'ggml-*' ! -name ggml-cpu ! -name ggml-cuda ! -name ggml-blas -exec rm -rf {} +
tar -czf ".gpu/llama_cpp_python-$version.tar.gz" -C "$work" "llama_cpp_python-$version"

python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version "$py_version" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "${wheels[@]}"
du -sh .gpu .whl

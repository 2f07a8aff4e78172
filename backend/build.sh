#!/usr/bin/env bash
# Installs llama-cpp-python with the LLaVA CLS-order fix into the Python given as $1.
#
# The wheel is built once from the pinned sdist with backend/*.patch applied (llava-cls-first.patch: the fix;
# repack-threads.patch: with GGML_REPACK_THREADS=N, weights repacked on N threads at load; gqa-decode.patch:
# a decoding step on the CPU reads each K/V row once for the query heads that share it) and kept in
# ~/.cache/llava-cli/backend/<key>/, where <key> hashes the version, the patches and CMAKE_ARGS, so a
# CUDA build (CMAKE_ARGS=-DGGML_CUDA=on) and a CPU build live side by side and a rebuild costs nothing.
#
# Offline: LLAVA_BACKEND_SDIST=path/to/llama_cpp_python-<version>.tar.gz builds from that file instead of
# downloading it, and PIP_NO_BUILD_ISOLATION=0 builds with the scikit-build-core already installed.
# An interrupted build resumes: its sources and CMake build folder stay in <key>.work/ until it succeeds.
set -euo pipefail

python=${1:?usage: backend/build.sh PYTHON}
version=0.3.36
here=$(cd "$(dirname "$0")" && pwd)
patches=("$here"/*.patch)
cmake_args=${CMAKE_ARGS:-}

key=$( { echo "$version"; echo "$cmake_args"; cat "${patches[@]}"; } | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/llava-cli/backend/$key"

if ! compgen -G "$cache/*.whl" >/dev/null; then
    work="$cache.work"
    src="$work/src"
    mkdir -p "$work"
    echo "backend: building llama-cpp-python $version with the LLaVA fix (CMAKE_ARGS='$cmake_args'); this takes several minutes" >&2
    if [ ! -d "$src" ]; then
        rm -rf "$work/sdist" "$src.partial" && mkdir -p "$work/sdist" "$src.partial"
        if [ -n "${LLAVA_BACKEND_SDIST:-}" ]; then
            cp "$LLAVA_BACKEND_SDIST" "$work/sdist/"
        else
            "$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work/sdist"
        fi
        tar -xzf "$work"/sdist/*.tar.gz -C "$src.partial" --strip-components=1
        for p in "${patches[@]}"; do patch --quiet -p1 -d "$src.partial" < "$p"; done
        # A local version label lets `llava info` tell the patched build from a stock one at a glance.
        sed -i "s/^__version__ = \"$version\"/__version__ = \"$version+llava.clsfix\"/" "$src.partial/llama_cpp/__init__.py"
        mv "$src.partial" "$src"
    fi
    rm -rf "$work/wheel"
    CMAKE_ARGS="$cmake_args" SKBUILD_BUILD_DIR="$work/build" \
        "$python" -m pip wheel --quiet --no-deps -w "$work/wheel" "$src"
    rm -rf "$cache" && mv "$work/wheel" "$cache" && rm -rf "$work"
fi
"$python" -m pip install --quiet --no-deps --force-reinstall "$cache"/*.whl

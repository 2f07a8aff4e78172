#!/usr/bin/env bash
# Installs llama-cpp-python with the LLaVA CLS-order fix into the Python given as $1.
#
# The wheel is built once from the pinned sdist with backend/llava-cls-first.patch applied and kept in
# ~/.cache/llava-cli/backend/<key>/, where <key> hashes the version, the patch and CMAKE_ARGS, so a
# CUDA build (CMAKE_ARGS=-DGGML_CUDA=on) and a CPU build live side by side and a rebuild costs nothing.
set -euo pipefail

python=${1:?usage: backend/build.sh PYTHON}
version=0.3.36
here=$(cd "$(dirname "$0")" && pwd)
patch_file="$here/llava-cls-first.patch"
cmake_args=${CMAKE_ARGS:-}

key=$( { echo "$version"; echo "$cmake_args"; cat "$patch_file"; } | sha256sum | cut -c1-16)
cache="${XDG_CACHE_HOME:-$HOME/.cache}/llava-cli/backend/$key"

if ! compgen -G "$cache/*.whl" >/dev/null; then
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    echo "backend: building llama-cpp-python $version with the LLaVA fix (CMAKE_ARGS='$cmake_args'); this takes several minutes" >&2
    "$python" -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
    tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
    src="$work/llama_cpp_python-$version"
    patch --quiet -p1 -d "$src" < "$patch_file"
    # A local version label lets `llava info` tell the patched build from a stock one at a glance.
    sed -i "s/^__version__ = \"$version\"/__version__ = \"$version+llava.clsfix\"/" "$src/llama_cpp/__init__.py"
    CMAKE_ARGS="$cmake_args" "$python" -m pip wheel --quiet --no-deps -w "$work/wheel" "$src"
    mkdir -p "$(dirname "$cache")"
    rm -rf "$cache.partial" && mv "$work/wheel" "$cache.partial" && mv "$cache.partial" "$cache"
fi
"$python" -m pip install --quiet --no-deps --force-reinstall "$cache"/*.whl

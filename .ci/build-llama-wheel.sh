#!/usr/bin/env bash
# Builds llama-cpp-python's wheel once per version with GGML_NATIVE=OFF into a cache outside the checkout,
# and installs it into the active environment. Why: pip's own build uses -march=native, and on virtual
# machines whose CPUID advertises AMX that the hypervisor does not actually run (Firecracker guests on
# Sapphire Rapids hosts, for one), ggml's AMX kernels die with SIGILL ("tileloadd"/"tilezero", invalid
# opcode) the first time llama.cpp evaluates a model. A portable build (AVX2/FMA/F16C, no AMX) runs
# everywhere the tests run. Idempotent: reuses the cached wheel.
#   CORRAL_TOOLS_CACHE   cache root (default ~/.cache/corral-tools)
#   LLAMA_CPP_VERSION    llama-cpp-python version (default 0.3.36, the version pyproject.toml pins)
set -euo pipefail

py="${PYTHON:-python}"
version="${LLAMA_CPP_VERSION:-0.3.36}"
cache="${CORRAL_TOOLS_CACHE:-$HOME/.cache/corral-tools}"
wheels="$cache/llama-cpp-python-$version-portable"
if ! ls "$wheels"/llama_cpp_python-"$version"-*.whl >/dev/null 2>&1; then
    mkdir -p "$cache"
    staging="$(mktemp -d "$cache/.wheel.XXXXXX")"
    trap 'rm -rf "$staging"' EXIT
    CMAKE_ARGS="-DGGML_NATIVE=OFF -DLLAMA_CURL=OFF" CMAKE_BUILD_PARALLEL_LEVEL=2 nice -n 10 \
        "$py" -m pip wheel -q --no-deps --no-cache-dir --no-binary llama-cpp-python \
        "llama-cpp-python==$version" -w "$staging"
    rm -rf "$wheels"
    mv "$staging" "$wheels"
    trap - EXIT
fi
whl=("$wheels"/llama_cpp_python-"$version"-*.whl)
"$py" -m pip install -q --no-deps --force-reinstall "${whl[0]}"  # replaces a native build already there
"$py" -m pip install -q "${whl[0]}"  # its dependencies

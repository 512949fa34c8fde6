#!/usr/bin/env bash
# Builds llama.cpp's own llama-quantize and llama-imatrix from the llama.cpp tree inside
# llama-cpp-python's source distribution (the same version the venv runs), once, into a cache
# outside the checkout keyed by version. The imatrix tests compare corral's output with these
# tools byte for byte. Idempotent: exits at once when the cached binaries exist.
#   CORRAL_TOOLS_CACHE   cache root (default ~/.cache/corral-tools)
#   LLAMA_CPP_VERSION    llama-cpp-python version (default: the installed one, else 0.3.36)
#   LLAMA_CPP_SDIST_DIR  an already unpacked sdist to build from (skips the download)
set -euo pipefail

py="${PYTHON:-python3}"
version="${LLAMA_CPP_VERSION:-$("$py" -c 'import importlib.metadata as m; print(m.version("llama-cpp-python"))' 2>/dev/null || echo 0.3.36)}"
cache="${CORRAL_TOOLS_CACHE:-$HOME/.cache/corral-tools}"
bin="$cache/llama.cpp-$version/bin"
if [[ -x "$bin/llama-quantize" && -x "$bin/llama-imatrix" ]]; then
    exit 0
fi

if ! command -v cmake >/dev/null; then  # llama-cpp-python builds with a pip-installed cmake; so can this
    "$py" -m pip install -q 'cmake>=3.21,<5'
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/corral-llama-tools.XXXXXX")"
trap 'rm -rf "$work"' EXIT
src="${LLAMA_CPP_SDIST_DIR:-}"
if [[ -z "$src" ]]; then
    "$py" -m pip download -q --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$work"
    tar -xzf "$work"/llama_cpp_python-"$version".tar.gz -C "$work"
    src="$work/llama_cpp_python-$version"
fi
tree="$src/vendor/llama.cpp"
[[ -f "$tree/CMakeLists.txt" ]] || { echo "no llama.cpp tree under $src" >&2; exit 1; }

# Static, portable, CPU only: the binaries are self-contained and can be copied into the cache.
nice -n 10 cmake -S "$tree" -B "$work/build" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF \
    -DLLAMA_BUILD_APP=OFF >"$work/cmake.log" 2>&1 || { tail -n 40 "$work/cmake.log" >&2; exit 1; }
nice -n 10 cmake --build "$work/build" --target llama-quantize llama-imatrix -j2 >"$work/build.log" 2>&1 \
    || { tail -n 40 "$work/build.log" >&2; exit 1; }

mkdir -p "$cache/llama.cpp-$version"
staging="$(mktemp -d "$cache/llama.cpp-$version/.bin.XXXXXX")"
cp "$work/build/bin/llama-quantize" "$work/build/bin/llama-imatrix" "$staging/"
rm -rf "$bin"
mv "$staging" "$bin"
echo "built $bin/llama-quantize and $bin/llama-imatrix"

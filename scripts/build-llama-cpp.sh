#!/usr/bin/env bash
# Build only the llama.cpp targets lorapipe runs, once, into the cache (outside git).
# Idempotent: a finished build leaves .built and is reused; cmake itself rebuilds nothing unchanged.
#
# GGML_NATIVE=OFF on purpose: -march=native also turns on ggml's AMX kernels wherever the CPU
# advertises AMX, and on VMs that advertise it without enabling it (this project's machines) every
# quantized model dies with "Illegal instruction". The portable build (AVX, AVX2, FMA, F16C) runs on
# any x86-64 machine of the last decade.
set -euo pipefail
src="$1/vendor/llama.cpp"; build="$1/build-portable"
[ -f "$build/.built" ] && exit 0
for tool in cmake c++ cc; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' not found; install cmake and a C/C++ compiler (Debian: apt-get install cmake build-essential)" >&2; exit 1; }
done
targets="llama-quantize llama-perplexity llama-imatrix llama-completion llama-tokenize llama-server llama-bench"
echo "building llama.cpp ($targets) in $build; about 8 minutes on 2 cores"
start=$(date +%s)
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF >"$1/cmake-configure.log"
cmake --build "$build" -j"$(nproc)" --target $targets >"$1/cmake-build.log" \
  || { tail -30 "$1/cmake-build.log" >&2; exit 1; }
echo "llama.cpp built in $(( $(date +%s) - start )) s"
touch "$build/.built"

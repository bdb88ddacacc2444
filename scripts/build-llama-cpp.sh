#!/usr/bin/env bash
# Build only the llama.cpp targets lorapipe runs, once, into the cache (outside git).
# Idempotent: a finished build leaves .built (holding the instruction-set options it was built
# with) and is reused; cmake itself rebuilds nothing unchanged.
#
# Not -march=native (GGML_NATIVE=OFF) on purpose: it also turns on ggml's AMX kernels wherever the
# CPU advertises AMX, and on VMs that advertise it without enabling it (this project's machines)
# every quantized model dies with "Illegal instruction". Instead the baseline (AVX, AVX2, FMA,
# F16C) is extended by the AVX-512 / VNNI extensions this CPU lists in /proc/cpuinfo, one by one,
# never AMX. That makes prompt processing markedly faster than the baseline build (docs/benchmarks.md has the
# figures; benchmarks/inference.py measures the decode rate).
set -euo pipefail
src="$1/vendor/llama.cpp"; build="$1/build-cpu"

flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
has() { [[ "$flags" == *" $1 "* ]]; }
isa=()
if has avx512f && has avx512cd && has avx512vl && has avx512dq && has avx512bw; then
  isa+=(-DGGML_AVX512=ON)
  has avx512vbmi && isa+=(-DGGML_AVX512_VBMI=ON)
  has avx512_vnni && isa+=(-DGGML_AVX512_VNNI=ON)
  has avx512_bf16 && isa+=(-DGGML_AVX512_BF16=ON)
fi
has avx_vnni && isa+=(-DGGML_AVX_VNNI=ON)
want="isa: ${isa[*]:-baseline}"
[ -f "$build/.built" ] && [ "$(cat "$build/.built")" == "$want" ] && exit 0
for tool in cmake c++ cc; do
  command -v "$tool" >/dev/null || { echo "error: '$tool' not found; install cmake and a C/C++ compiler (Debian: apt-get install cmake build-essential)" >&2; exit 1; }
done
rm -f "$build/.built"
targets="llama-quantize llama-perplexity llama-imatrix llama-completion llama-tokenize llama-server llama-bench"
echo "building llama.cpp ($targets; $want) in $build; about 10 minutes on 2 cores"
start=$(date +%s)
cmake -S "$src" -B "$build" -DCMAKE_BUILD_TYPE=Release -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_SERVER=ON -DBUILD_SHARED_LIBS=ON \
  -DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF "${isa[@]}" >"$1/cmake-configure.log"
cmake --build "$build" -j"$(nproc)" --target $targets >"$1/cmake-build.log" \
  || { tail -30 "$1/cmake-build.log" >&2; exit 1; }
echo "llama.cpp built in $(( $(date +%s) - start )) s"
echo "$want" > "$build/.built"

#!/usr/bin/env bash
# Fetch the pinned llama-cpp-python sdist (it carries the full vendor/llama.cpp tree: converter,
# gguf-py, quantizer, perplexity, server) into the cache, check its hash and unpack it.
# Idempotent: does nothing when the unpacked tree is already there.
set -euo pipefail
version="$1"; sha256="$2"; dest="$3"
[ -f "$dest/.fetched" ] && exit 0
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
python3 -m pip download --quiet --no-deps --no-binary :all: "llama-cpp-python==$version" -d "$tmp"
archive="$tmp/llama_cpp_python-$version.tar.gz"
echo "$sha256  $archive" | sha256sum -c --quiet - \
  || { echo "error: llama-cpp-python $version sdist hash mismatch (expected $sha256)" >&2; exit 1; }
rm -rf "$dest.partial" "$dest"
mkdir -p "$dest.partial"
tar xzf "$archive" -C "$dest.partial" --strip-components=1
touch "$dest.partial/.fetched"
mv "$dest.partial" "$dest"
echo "llama.cpp sources (llama-cpp-python $version) in $dest"

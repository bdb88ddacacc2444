"""Locate the pinned llama.cpp build (tools, converter, shared libraries).

`make setup` builds it into $LORAPIPE_LLAMA_CPP (default ~/.cache/lorapipe/llama-cpp-python-<ver>):
the unpacked llama-cpp-python sdist with vendor/llama.cpp and a `build-cpu/` of the tools we run.
"""

from __future__ import annotations

import os
from pathlib import Path

# The pinned llama.cpp: the llama-cpp-python sdist that vendors it, and that sdist's sha256. This is
# the one place they are written; the Makefile reads both lines from here (`make setup` fetches and
# checks the sdist before any virtualenv exists, so it reads them with sed, not by importing this).
LLAMA_CPP_PYTHON_VERSION = "0.3.36"
LLAMA_CPP_PYTHON_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


class LlamaCppMissing(RuntimeError):
    pass


def home() -> Path:
    env = os.environ.get("LORAPIPE_LLAMA_CPP")
    path = Path(env) if env else Path.home() / ".cache" / "lorapipe" / f"llama-cpp-python-{LLAMA_CPP_PYTHON_VERSION}"
    if not (path / "vendor" / "llama.cpp").is_dir():
        raise LlamaCppMissing(f"llama.cpp sources not found in {path}; run `make setup` (or set LORAPIPE_LLAMA_CPP)")
    return path


def source_dir() -> Path:
    return home() / "vendor" / "llama.cpp"


def bin_dir() -> Path:
    # build-cpu: this CPU's extensions named one by one, never -march=native (scripts/build-llama-cpp.sh says why)
    return home() / "build-cpu" / "bin"


def tool(name: str) -> Path:
    """Path of a built llama.cpp binary, e.g. tool('llama-quantize')."""
    path = bin_dir() / name
    if not path.is_file():
        raise LlamaCppMissing(f"{name} not found in {bin_dir()}; run `make setup` to build the pinned llama.cpp")
    return path


def converter() -> Path:
    return source_dir() / "convert_hf_to_gguf.py"


def use_shared_libs() -> None:
    """Point llama-cpp-python's bindings at our build's shared libraries (call before importing llama_cpp)."""
    os.environ.setdefault("LLAMA_CPP_LIB_PATH", str(bin_dir()))

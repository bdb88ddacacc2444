"""Check that a path is a GGUF file before handing it to llama.cpp.

llama.cpp's own message for a wrong file is a log line buried in its load output (and llama-server
may only say it failed to load the model); four bytes of magic tell the user plainly what is wrong.
"""

from __future__ import annotations

from pathlib import Path

from lorapipe.core.errors import LorapipeError

GGUF_MAGIC = b"GGUF"


def check_gguf(path: str | Path, hint: str = "") -> Path:
    """Return `path` if it is a GGUF file; else raise LorapipeError naming the path (and `hint`)."""
    path = Path(path)
    suffix = f"; {hint}" if hint else ""
    if not path.exists():
        raise LorapipeError(f"{path}: GGUF file not found{suffix}")
    if path.is_dir():
        raise LorapipeError(f"{path}: is a folder, not a GGUF file (for a merged HF folder use --backend hf){suffix}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise LorapipeError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r}){suffix}")
    return path

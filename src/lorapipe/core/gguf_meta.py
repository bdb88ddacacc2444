"""Read a GGUF file's metadata and tensor types with gguf-py's GGUFReader (the pinned tree's gguf).

Large arrays (the vocabulary, merges, token types) are skipped by `metadata()`: the stages need the
scalar keys (chat template, special token ids, general.name) and the tensor-type histogram.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from lorapipe.core.errors import LorapipeError

ARRAY_KEYS_SKIPPED = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.token_type", "tokenizer.ggml.scores")


def reader(path: str | Path):
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise LorapipeError(f"{path}: GGUF file not found")
    try:
        return GGUFReader(path)
    except Exception as exc:  # a truncated or foreign file fails in many ways inside numpy memmap
        raise LorapipeError(f"{path}: not a readable GGUF file ({type(exc).__name__}: {exc})") from None


def metadata(path_or_reader) -> dict:
    """Scalar and short-array metadata as plain Python values, keyed by GGUF key."""
    r = reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    out = {}
    for name, field in r.fields.items():
        if name in ARRAY_KEYS_SKIPPED or name.startswith("GGUF."):
            continue
        out[name] = field.contents()
    return out


def tensor_types(path_or_reader) -> dict[str, int]:
    """Count of tensors per GGML type, e.g. {'F32': 9, 'Q4_K': 10, 'Q6_K': 2} (shows K-quant fallbacks)."""
    r = reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    return dict(sorted(Counter(t.tensor_type.name for t in r.tensors).items()))


def n_weights(path_or_reader) -> int:
    r = reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    return int(sum(int(t.n_elements) for t in r.tensors))


def tensor_bytes(path_or_reader) -> int:
    r = reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    return int(sum(int(t.n_bytes) for t in r.tensors))



def file_type(path_or_reader) -> str:
    """The file's quantization type as llama-quantize names it (general.file_type): Q4_K_M, Q8_0, F16, ..."""
    from gguf import LlamaFileType

    r = reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    field = r.fields.get("general.file_type")
    if field is None:
        raise LorapipeError(f"{path_or_reader}: no general.file_type in the GGUF metadata")
    try:
        name = LlamaFileType(int(field.contents())).name
    except ValueError:
        raise LorapipeError(f"{path_or_reader}: general.file_type {field.contents()} is not a type this gguf-py knows") from None
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")

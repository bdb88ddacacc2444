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


def sentencepiece_model(path_or_reader, out: str | Path) -> Path | None:
    """Write the SentencePiece `tokenizer.model` that a GGUF's vocabulary came from, when it came from
    one (tokenizer.ggml.model "llama": Llama-2, Gemma, MiniCPM); else write nothing and return None.

    Why: transformers loads a GGUF's tokenizer as a fast tokenizer and re-saves only tokenizer.json,
    so llama.cpp's converter would take its BPE route and identify the vocabulary by a hash that
    only matches by coincidence (docs/toolchain.md#gguf-source). The GGUF holds every piece with its score and
    type (GGUF token types are SentencePiece's enum); the normaliser settings follow its
    add_space_prefix key. Byte fallback and BPE merging by score are what llama.cpp's SPM tokenizer
    implements, so the rebuilt model tokenizes as the GGUF does.
    """
    from sentencepiece import sentencepiece_model_pb2 as pb

    r = reader(path_or_reader) if isinstance(path_or_reader, (str, Path)) else path_or_reader
    fields = r.fields
    if "tokenizer.ggml.model" not in fields or fields["tokenizer.ggml.model"].contents() != "llama":
        return None
    proto = pb.ModelProto()
    for piece, score, kind in zip(fields["tokenizer.ggml.tokens"].contents(), fields["tokenizer.ggml.scores"].contents(),
                                  fields["tokenizer.ggml.token_type"].contents()):
        p = proto.pieces.add()
        p.piece, p.score, p.type = piece, float(score), int(kind)

    def token_id(key: str, default: int) -> int:
        field = fields.get(f"tokenizer.ggml.{key}_token_id")
        return int(field.contents()) if field is not None else default

    spec = proto.trainer_spec
    spec.model_type, spec.vocab_size, spec.byte_fallback = pb.TrainerSpec.BPE, len(proto.pieces), True
    spec.unk_id, spec.bos_id, spec.eos_id, spec.pad_id = (token_id("unknown", 0), token_id("bos", 1), token_id("eos", 2),
                                                          token_id("padding", -1))
    space_prefix = fields.get("tokenizer.ggml.add_space_prefix")
    norm = proto.normalizer_spec
    norm.name, norm.remove_extra_whitespaces, norm.escape_whitespaces = "identity", False, True
    norm.add_dummy_prefix = True if space_prefix is None else bool(space_prefix.contents())
    out = Path(out)
    out.write_bytes(proto.SerializeToString())
    return out

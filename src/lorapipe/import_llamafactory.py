"""`lorapipe import-llamafactory`: a LLaMA-Factory train YAML (+ merge YAML, dataset_info.json) ->
the equivalent params.yaml sections (model, data.sources, train, lora, merge).

    lorapipe import-llamafactory examples/train_lora/qwen2_5_1_5b_lora_sft.yaml \\
        --merge-yaml examples/merge_lora/qwen2_5_1_5b_lora_sft.yaml --dataset-info data/dataset_info.json
    # prints the sections as YAML; --out FILE writes them to a file; --write updates params.yaml in place

Every key of the input is accounted for on stderr: mapped (to which params key), ignored on purpose
(with the reason: lorapipe fixes that itself, e.g. output_dir), not supported (a LLaMA-Factory
feature lorapipe has no equivalent for), or unknown (not a LLaMA-Factory argument: a warning naming it,
most likely a typo). Keys the YAML leaves out take LLaMA-Factory's defaults where those differ from
lorapipe's (lora_dropout 0, lora_alpha = 2 x rank, scheduler linear, ...), so the run is the same.
"""

from __future__ import annotations

import argparse
import difflib
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from lorapipe.core.errors import LorapipeError
from lorapipe.core.yamlfile import read_yaml

HELP = "convert a LLaMA-Factory train YAML (+ merge YAML, dataset_info.json) into params.yaml sections"

# LLaMA-Factory chat template -> lorapipe model.chat_template (core/templates.py TEMPLATES).
TEMPLATE_MAP = {"qwen": "qwen", "qwen2": "qwen", "qwen2_5": "qwen", "chatml": "chatml", "gemma": "gemma", "gemma3": "gemma"}

# Keys ignored on purpose: lorapipe decides these itself (paths, workers, logging plumbing).
IGNORED = {
    "stage": "lorapipe runs supervised fine-tuning (sft) only",
    "do_train": "the train stage always trains",
    "do_eval": "the train stage evaluates on data/clean/eval.jsonl",
    "do_predict": "no prediction run in lorapipe",
    "output_dir": "the adapter goes to models/adapter/ (checkpoints to models/checkpoints/)",
    "overwrite_output_dir": "DVC owns the outputs",
    "overwrite_cache": "no preprocessing cache: DVC caches the stage outputs",
    "preprocessing_num_workers": "tokenization is done in process",
    "dataloader_num_workers": "data loading is done in process",
    "ddp_timeout": "left to the Trainer's default (multi-process runs: torchrun or accelerate launch, stages/train.py)",
    "plot_loss": "loss curves come from dvclive (`dvc plots show`)",
    "report_to": "metrics are logged with dvclive",
    "logging_dir": "dvclive writes dvclive/",
    "save_only_model": "lorapipe saves the adapter only",
    "resume_from_checkpoint": "the train stage resumes from models/checkpoints/ by itself (same data and params)",
    "dataset_dir": "used to locate dataset_info.json (see --dataset-info)",
    "adapter_name_or_path": "the merge stage merges the pipeline's own adapter (models/adapter/)",
    "export_dir": "the merged model goes to models/merged/",
    "export_device": "the merge runs on the CPU",
    "export_size": "safetensors shard size is left to transformers",
    "export_legacy_format": "lorapipe always writes safetensors",
    "infer_backend": "`lorapipe chat --backend gguf|hf` chooses",
    "flash_attn": "attention implementation is left to transformers (CPU)",
    "ddp_find_unused_parameters": "left to the Trainer's default (multi-process runs: torchrun or accelerate launch, stages/train.py)",
    "save_total_limit": "checkpoints are pruned by the train stage",
    "save_strategy": "checkpoints every train.save_steps",
    "eval_strategy": "train.eval_steps decides (0 = at the end)",
    "evaluation_strategy": "train.eval_steps decides (0 = at the end)",
    "per_device_eval_batch_size": "evaluation uses train.batch_size",
    "tokenized_path": "no tokenized cache",
    "streaming": "datasets are small enough to load",
    "packing": "the train stage always packs samples into padding-free rows, each attending only to itself (core/sft.py)",
    "neat_packing": "the train stage always packs samples into padding-free rows, each attending only to itself (core/sft.py)",
}

# LLaMA-Factory / HF TrainingArguments keys lorapipe has no equivalent for (listed, not silently dropped).
UNSUPPORTED = {
    "warmup_steps": "lorapipe has train.warmup_ratio only; set it from warmup_steps / total steps",
    "eval_dataset": "lorapipe splits eval off the cleaned data (data.split.eval_fraction)",
    "max_samples": "no per-dataset sample cap; use a source's max_conversations where it has one",
    "neftune_noise_alpha": "no NEFTune",
    "use_dora": "plain LoRA only",
    "use_rslora": "plain LoRA only",
    "pissa_init": "plain LoRA only",
    "loraplus_lr_ratio": "plain LoRA only",
    "additional_target": "LoRA targets only (lora.target)",
    "lora_bf16_mode": "precision is train.precision",
    "rope_scaling": "the base model's rope settings are kept",
    "use_unsloth": "plain transformers + peft",
    "enable_liger_kernel": "plain transformers + peft",
    "deepspeed": "give DeepSpeed to accelerate instead: `accelerate launch --config_file cfg.yaml -m lorapipe train`",
    "optim": "the Trainer's default optimizer",
    "max_grad_norm": "the Trainer's default (1.0)",
    "gradient_checkpointing": "decided by the train stage",
    "mix_strategy": "sources are concatenated",
    "interleave_probs": "sources are concatenated",
    "default_system": "set data.clean.system_prompt for training rows, chat.system for chat",
    "export_quantization_bit": "quantization is the GGUF quantize stage (export.quant)",
    "export_hub_model_id": "lorapipe never uploads",
    "push_to_hub": "lorapipe never uploads",
    "val_size_absolute": "data.split.eval_fraction is a fraction",
    "max_new_tokens": "a chat setting: chat.max_new_tokens",
    "temperature": "a chat setting: chat.temperature",
    "top_p": "a chat setting: chat.top_p",
    "repetition_penalty": "a chat setting: chat.repetition_penalty",
}

# Other LLaMA-Factory argument names (model/data/finetuning/generating args and the HF
# TrainingArguments people put in these YAMLs), so an unknown key can be told from a typo.
OTHER_LF_KEYS = {
    "adapter_folder", "cache_dir", "use_fast_tokenizer", "resize_vocab", "split_special_tokens", "new_special_tokens",
    "low_cpu_mem_usage", "shift_attn", "mixture_of_depths", "moe_aux_loss_coef", "disable_gradient_checkpointing",
    "upcast_layernorm", "upcast_lmhead_output", "train_from_scratch", "offload_folder", "use_cache", "infer_dtype",
    "hf_hub_token", "ms_hub_token", "om_hub_token", "print_param_status", "quantization_type",
    "double_quantization", "quantization_device_map", "image_max_pixels", "video_max_pixels", "vllm_maxlen",
    "vllm_gpu_util", "vllm_enforce_eager", "vllm_max_lora_rank", "compute_dtype", "device_map", "model_max_length",
    "block_diag_attn", "buffer_size", "ignore_pad_token_for_loss", "train_on_prompt", "mask_history", "eval_num_beams",
    "tool_format", "freeze_trainable_layers", "freeze_trainable_modules", "freeze_extra_modules", "lora_alpha",
    "create_new_adapter", "pref_beta", "pref_ftx", "pref_loss", "dpo_label_smoothing", "simpo_gamma", "ppo_buffer_size",
    "ppo_epochs", "ppo_score_norm", "ppo_target", "ppo_whiten_rewards", "ref_model", "reward_model",
    "reward_model_type", "use_galore", "use_badam", "use_apollo", "freeze_vision_tower", "freeze_language_model",
    "train_mm_proj_only", "compute_accuracy", "disable_shuffling", "include_effective_tokens_per_second",
    "do_sample", "top_k", "num_beams", "length_penalty", "skip_special_tokens", "enable_thinking",
    "adam_beta1", "adam_beta2", "adam_epsilon", "lr_scheduler_kwargs", "logging_strategy", "logging_first_step",
    "eval_accumulation_steps", "eval_on_start", "run_name", "disable_tqdm", "remove_unused_columns",
    "label_names", "load_best_model_at_end", "metric_for_best_model", "greater_is_better", "group_by_length",
    "torch_compile", "tf32", "data_seed", "full_determinism", "local_rank", "hub_model_id",
}

# The keys that map (see LFImport.map_train / map_merge); the report names their target.
MAPPED = {
    "model_name_or_path": "model.source", "template": "model.chat_template", "trust_remote_code": "model.trust_remote_code",
    "model_revision": "model.revision", "finetuning_type": "(lora)", "lora_rank": "lora.rank", "lora_alpha": "lora.alpha",
    "lora_dropout": "lora.dropout", "lora_target": "lora.target", "cutoff_len": "train.cutoff_len",
    "per_device_train_batch_size": "train.batch_size", "gradient_accumulation_steps": "train.grad_accum",
    "learning_rate": "train.lr", "num_train_epochs": "train.epochs", "max_steps": "train.max_steps",
    "lr_scheduler_type": "train.scheduler", "warmup_ratio": "train.warmup_ratio", "weight_decay": "train.weight_decay",
    "bf16": "train.precision", "fp16": "train.precision", "pure_bf16": "train.precision",
    "quantization_bit": "train.quantization_bit", "quantization_method": "(bnb)", "seed": "train.seed",
    "logging_steps": "train.logging_steps", "save_steps": "train.save_steps", "eval_steps": "train.eval_steps",
    "dataset": "data.sources", "val_size": "data.split.eval_fraction", "infer_dtype": "merge.dtype",
}

# LLaMA-Factory's (and HF TrainingArguments') defaults where they differ from lorapipe's, so a key
# the YAML leaves out still means what it meant in LLaMA-Factory.
LF_DEFAULTS = {
    "lora_rank": 8, "lora_dropout": 0.0, "lora_target": "all", "cutoff_len": 2048, "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 1, "learning_rate": 5e-5, "num_train_epochs": 3.0, "max_steps": -1,
    "lr_scheduler_type": "linear", "warmup_ratio": 0.0, "weight_decay": 0.0, "seed": 42,
}

PRECISION_NOTE = "on a CPU-only machine use train.precision: auto (bf16 on CPU is slow or unsupported)"


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


def read_arguments(path: str | Path, what: str) -> dict:
    data = read_yaml(path, what)
    if not isinstance(data, dict):
        raise LorapipeError(f"{path}: {what} must be a mapping of LLaMA-Factory arguments")
    return data


def _float(value, key: str, file: str) -> float:
    # PyYAML reads `1e-4` (no dot) as a string: accept what LLaMA-Factory's argument parser accepts.
    try:
        return float(value)
    except (TypeError, ValueError):
        raise LorapipeError(f"{file}: {key}: {value!r} is not a number") from None


def _int(value, key: str, file: str) -> int:
    number = _float(value, key, file)
    if number != int(number):
        raise LorapipeError(f"{file}: {key}: {value!r} is not a whole number")
    return int(number)


def _bool(value) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("true", "1", "yes")


class LFImport:
    def __init__(self):
        self.report = Report()
        self.model: dict = {}
        self.train: dict = {}
        self.lora: dict = {}
        self.merge: dict = {}
        self.sources: list[dict] | None = None
        self.split: dict = {}

    # --------------------------------------------------------------------------- classification
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

    # ----------------------------------------------------------------------------------- train
    def map_train(self, cfg: dict, file: str, dataset_info: str | None) -> None:
        r = self.report
        get = lambda k: cfg[k] if k in cfg else LF_DEFAULTS.get(k)  # noqa: E731
        if "model_name_or_path" not in cfg:
            raise LorapipeError(f"{file}: model_name_or_path is missing (the base model)")
        if cfg.get("stage", "sft") != "sft":
            raise LorapipeError(f"{file}: stage: {cfg['stage']!r}; lorapipe runs supervised fine-tuning (sft) only")
        ft = cfg.get("finetuning_type", "lora")
        if ft != "lora":
            raise LorapipeError(f"{file}: finetuning_type: {ft!r}; lorapipe fine-tunes with LoRA only")
        self.model["source"] = str(cfg["model_name_or_path"])
        self._template(cfg, file)
        if "trust_remote_code" in cfg:
            self.model["trust_remote_code"] = _bool(cfg["trust_remote_code"])
        if cfg.get("model_revision") not in (None, "main"):
            self.model["revision"] = str(cfg["model_revision"])

        rank = _int(get("lora_rank"), "lora_rank", file)
        self.lora["rank"] = rank
        # LLaMA-Factory: lora_alpha defaults to 2 x lora_rank.
        self.lora["alpha"] = _int(cfg["lora_alpha"], "lora_alpha", file) if cfg.get("lora_alpha") is not None else 2 * rank
        self.lora["dropout"] = _float(get("lora_dropout"), "lora_dropout", file)
        target = get("lora_target")
        targets = [t.strip() for t in str(target).split(",") if t.strip()] if not isinstance(target, list) else target
        self.lora["target"] = "all" if targets == ["all"] else targets

        t = self.train
        t["cutoff_len"] = _int(get("cutoff_len"), "cutoff_len", file)
        t["batch_size"] = _int(get("per_device_train_batch_size"), "per_device_train_batch_size", file)
        t["grad_accum"] = _int(get("gradient_accumulation_steps"), "gradient_accumulation_steps", file)
        t["lr"] = _float(get("learning_rate"), "learning_rate", file)
        t["epochs"] = _float(get("num_train_epochs"), "num_train_epochs", file)
        t["max_steps"] = _int(get("max_steps"), "max_steps", file)
        t["scheduler"] = str(get("lr_scheduler_type"))
        t["warmup_ratio"] = _float(get("warmup_ratio"), "warmup_ratio", file)
        t["weight_decay"] = _float(get("weight_decay"), "weight_decay", file)
        t["seed"] = _int(get("seed"), "seed", file)
        for lf_key, key in (("logging_steps", "logging_steps"), ("save_steps", "save_steps"), ("eval_steps", "eval_steps")):
            if cfg.get(lf_key) is not None:
                t[key] = _int(cfg[lf_key], lf_key, file)
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
        if cfg.get("val_size") not in (None, 0, 0.0):
            size = _float(cfg["val_size"], "val_size", file)
            if not 0 < size < 1:
                raise LorapipeError(f"{file}: val_size: {size}; lorapipe's data.split.eval_fraction is a fraction below 1")
            self.split["eval_fraction"] = size
        if "dataset" in cfg:
            self.sources = self._sources(cfg, file, dataset_info)

        for key in cfg:
            if key in MAPPED:
                detail = MAPPED[key]
                if key == "template":
                    detail = f"model.chat_template = {self.model.get('chat_template')}"
                elif key == "dataset":
                    detail = f"data.sources ({len(self.sources or [])} sources)"
                elif key in ("bf16", "fp16", "pure_bf16"):
                    detail = f"train.precision = {t['precision']} ({PRECISION_NOTE})"
                r.add(file, key, "mapped", detail)
            else:
                self._other(file, key)
        defaulted = [k for k in LF_DEFAULTS if k not in cfg]
        if cfg.get("lora_alpha") is None:
            defaulted.append("lora_alpha")
        for k in defaulted:
            value = LF_DEFAULTS.get(k, f"2 x lora_rank = {self.lora['alpha']}")
            r.add(file, k, "default", f"not in the YAML: LLaMA-Factory's default {value} -> {MAPPED[k]}")

    def _template(self, cfg: dict, file: str) -> None:
        name = cfg.get("template")
        if name is None:
            self.model["preset"] = None
            self.model["chat_template"] = None
            return
        if name in TEMPLATE_MAP:
            # The checkpoint's own template applies unless the preset/override says otherwise; the
            # LLaMA-Factory template is what the model was trained with, so it becomes the override.
            self.model["preset"] = None
            self.model["chat_template"] = TEMPLATE_MAP[name]
            return
        self.model["preset"] = None
        self.model["chat_template"] = None
        self.report.warnings.append(
            f"{file}: template: {name!r} has no lorapipe equivalent (lorapipe knows qwen/chatml and gemma); "
            "model.chat_template left null, so the checkpoint's own chat template (chat_template.jinja) is used. "
            "For a plain-text MiniCPM, `template: qwen` (ChatML) is what the seed's runs used; llama2-style "
            "[INST] prompts would need a template added to core/templates.py")

    def _sources(self, cfg: dict, file: str, dataset_info: str | None) -> list[dict]:
        names = [n.strip() for n in (cfg["dataset"] if isinstance(cfg["dataset"], list) else str(cfg["dataset"]).split(",")) if n.strip()]
        if not names:
            raise LorapipeError(f"{file}: dataset is empty")
        info_path = Path(dataset_info) if dataset_info else Path(cfg.get("dataset_dir", "data")) / "dataset_info.json"
        if info_path.is_file():
            try:
                info = json.loads(info_path.read_text(encoding="utf-8"))
            except json.JSONDecodeError as exc:
                raise LorapipeError(f"{info_path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
            missing = [n for n in names if n not in info]
            if missing:
                raise LorapipeError(f"{file}: dataset {', '.join(missing)} not registered in {info_path} "
                                    f"(it has: {', '.join(info) or 'nothing'})")
        elif dataset_info:
            raise LorapipeError(f"{info_path}: dataset_info.json not found")
        else:
            self.report.warnings.append(f"{file}: {info_path} not found; the sources point at it anyway "
                                        "(pass --dataset-info to check the dataset names now)")
        return [{"name": n, "type": "llamafactory", "dataset_info": info_path.as_posix(), "datasets": [n]} for n in names]

    # ----------------------------------------------------------------------------------- merge
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
                dtype = {"float16": "float16", "fp16": "float16", "bfloat16": "bfloat16", "bf16": "bfloat16",
                         "float32": "float32", "fp32": "float32"}.get(str(value))
                if dtype is None:
                    raise LorapipeError(f"{file}: infer_dtype: {value!r} is not one of float16, bfloat16, float32, auto")
                self.merge["dtype"] = dtype
                self.report.add(file, key, "mapped", f"merge.dtype = {dtype}")
            elif key in ("model_name_or_path", "template", "trust_remote_code"):
                detail = {"model_name_or_path": "must match the train YAML's (warned if not)",
                          "template": "must match the train YAML's (warned if not)"}.get(key, "model.trust_remote_code")
                self.report.add(file, key, "checked", detail)
                if key == "trust_remote_code" and "trust_remote_code" not in self.model:
                    self.model["trust_remote_code"] = _bool(value)
            else:
                self._other(file, key)

    # ---------------------------------------------------------------------------------- output
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


def dump(sections: dict) -> str:
    return yaml.safe_dump(sections, sort_keys=False, allow_unicode=True, default_flow_style=False)


def update_params_file(path: Path, sections: dict) -> None:
    """Merge `sections` into an existing params.yaml keeping its comments, order and other sections
    (ruamel.yaml's round trip; DVC itself edits params.yaml with it)."""
    from ruamel.yaml import YAML

    from lorapipe.core.io import write_text

    ry = YAML()  # round-trip mode
    ry.preserve_quotes = True
    try:
        doc = ry.load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except Exception as exc:  # ruamel raises several parser error types
        raise LorapipeError(f"{path}: not valid YAML: {exc}") from None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()

    def merge(dst, src):
        for key, value in src.items():
            if isinstance(value, dict) and key in dst and hasattr(dst[key], "items") and key != "sources":
                merge(dst[key], value)
            else:
                dst[key] = value

    merge(doc, sections)
    buf = io.StringIO()
    ry.dump(doc, buf)
    write_text(path, buf.getvalue())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_yaml", help="LLaMA-Factory train YAML (examples/train_lora/*.yaml)")
    parser.add_argument("--merge-yaml", default=None, help="its merge/export YAML (examples/merge_lora/*.yaml)")
    parser.add_argument("--dataset-info", default=None,
                        help="dataset_info.json the `dataset` names are registered in (default: <dataset_dir>/dataset_info.json)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="write the sections to this YAML file (default: print them)")
    where.add_argument("--write", action="store_true",
                       help="update the params file (--params) in place, keeping its other sections and comments")
    parser.add_argument("--strict", action="store_true", help="unknown keys are an error instead of a warning")


def convert(train_yaml: str | Path, merge_yaml: str | Path | None = None, dataset_info: str | None = None) -> LFImport:
    imp = LFImport()
    imp.map_train(read_arguments(train_yaml, "train YAML"), str(train_yaml), dataset_info)
    if merge_yaml:
        imp.map_merge(read_arguments(merge_yaml, "merge YAML"), str(merge_yaml))
    return imp


def main(args: argparse.Namespace) -> int:
    from lorapipe import params as params_mod

    imp = convert(args.train_yaml, args.merge_yaml, args.dataset_info)
    sections = imp.sections()
    print(imp.report.text(), file=sys.stderr)
    if args.strict and imp.report.warnings:
        raise LorapipeError("unknown keys (--strict): " + "; ".join(imp.report.warnings))
    # What we write must load: validate the sections as lorapipe params before writing anything.
    params_mod.parse(sections, f"sections imported from {args.train_yaml}")
    if args.write:
        target = Path(args.params)
        update_params_file(target, sections)
        params_mod.load(target)
        print(f"updated {target}: {', '.join(sections)}", file=sys.stderr)
    elif args.out:
        from lorapipe.core.io import write_text

        header = f"# imported from {args.train_yaml}" + (f" and {args.merge_yaml}" if args.merge_yaml else "") + "\n"
        write_text(args.out, header + dump(sections))
        params_mod.load(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(dump(sections))
    return 0

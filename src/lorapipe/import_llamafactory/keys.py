"""The tables of `lorapipe import-llamafactory`: what each LLaMA-Factory argument becomes.

Every key of an input YAML falls in exactly one of them: MAPPED (to which params key), IGNORED (on
purpose, with the reason: lorapipe decides it itself), UNSUPPORTED (a LLaMA-Factory feature lorapipe
has no equivalent for, with what to do instead) or OTHER_LF_KEYS (other real arguments, so that a key
in none of the tables can be reported as unknown, most likely a typo).
"""

from __future__ import annotations


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

# The keys that map (see mapping.py); the report names their target.
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

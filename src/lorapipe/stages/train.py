"""Stage `train`: LoRA (or QLoRA) fine-tune of models/base/ on data/clean/ -> models/adapter/.

transformers' Trainer drives the loop (optimizer, scheduler, gradient accumulation, checkpoints with
RNG state, DDP/FSDP/DeepSpeed through accelerate); peft adds the LoRA layers. What lorapipe adds:
- assistant-only labels from the model's chat template and packed, padding-free batches whose loss
  projects only assistant positions onto the vocabulary (core/sft.py): on a CPU that is the speed;
- the base model's eval loss measured before training on the same split with the same masking, so
  metrics/train.json says whether the fine-tune helped (eval_loss < eval_loss_base);
- checkpoints in models/checkpoints/ (a DVC `persist` out) tagged with a hash of the params, the
  data and the base model: a rerun after kill -9 resumes, a changed param starts fresh;
- per-step loss/lr logged with dvclive (dvclive/plots/metrics, drawn by `dvc plots show`).

Scale-out: `torchrun --nproc_per_node N -m lorapipe train` runs the same code under DDP (gloo on a
CPU; on a CPU-only machine `accelerate launch --num_processes N` starts ONE process, its MULTI_CPU mode
goes through mpirun). On GPUs `accelerate launch --config_file cfg.yaml -m lorapipe train` works the
same way, and an accelerate config with FSDP or DeepSpeed passes through unchanged (Trainer reads it).
Only the main process writes the adapter, metrics and dvclive logs.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import re
import shutil
import time
from pathlib import Path

from lorapipe.core import hfmodel, paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import atomic_path, write_json
from lorapipe.core.log import info

RUN_MARKER = "lorapipe-run.json"
DVCLIVE_DIR = Path("dvclive")
# train.* keys that do not change the trained weights: changing them must not discard checkpoints.
_NOT_HASHED = {"logging_steps", "eval_steps", "save_steps", "max_eval_samples", "on_empty_eval"}


# ------------------------------------------------------------------------------------ checks
def check_quantization(train) -> None:
    """QLoRA needs bitsandbytes on CUDA: fail before anything is loaded when that is missing."""
    if train.quantization_bit is None:
        return
    import torch

    if not torch.cuda.is_available():
        raise LorapipeError(
            f"train.quantization_bit: {train.quantization_bit} (QLoRA) loads the base model with bitsandbytes, which needs "
            "a CUDA GPU, and this machine has none; set train.quantization_bit: null to train LoRA in full precision"
        )
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise LorapipeError(
            f"train.quantization_bit: {train.quantization_bit} needs the bitsandbytes package (pip install bitsandbytes)"
        ) from None


def resolve_precision(precision: str) -> str:
    """auto = bf16 where the GPU has it, else fp16 on a GPU, fp32 on a CPU."""
    import torch

    if precision != "auto":
        return precision
    if torch.cuda.is_available():
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def lora_targets(model, target: str | list[str]) -> str | list[str]:
    """peft target_modules for lora.target: 'all' = every nn.Linear but the output head.

    A named module that the model does not have is an error listing the names it does have
    (peft's own error does not list them).
    """
    import torch

    head = model.get_output_embeddings()
    linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules()
                     if isinstance(m, torch.nn.Linear) and m is not head})
    if target == "all":
        return "all-linear"  # peft's spelling of the same rule (it skips the output layer)
    names = [t.strip() for t in target.split(",")] if isinstance(target, str) else list(target)
    missing = [n for n in names if n not in linear]
    if missing or not names:
        raise LorapipeError(
            f"lora.target: {', '.join(missing) or '(empty)'} matches no linear module of the base model; "
            f"its linear modules are: {', '.join(linear)} (or use 'all')"
        )
    return names


def sort_target_modules(config_file: Path) -> None:
    """Write the adapter config's target_modules sorted.

    peft keeps them as a Python set and saves the set's iteration order, which changes with each
    process's string hash seed. The same run would then give a different adapter_config.json (and
    DVC hash) each time. Sorted, the same params and data give a byte-identical adapter folder.
    The file keeps peft's own format (indent 2, sorted keys).
    """
    config = json.loads(config_file.read_text(encoding="utf-8"))
    if isinstance(config.get("target_modules"), list):
        config["target_modules"] = sorted(config["target_modules"])
        config_file.write_text(json.dumps(config, indent=2, sort_keys=True), encoding="utf-8")


def _sha256_file(path: Path, h) -> None:
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)


def run_hash(params, base_dir: Path, train_path: Path) -> str:
    """Hash of everything that decides the trained weights: train+lora params, train data, base model."""
    h = hashlib.sha256()
    train = {k: v for k, v in params.train.model_dump().items() if k not in _NOT_HASHED}
    h.update(json.dumps({"train": train, "lora": params.lora.model_dump()}, sort_keys=True).encode())
    _sha256_file(train_path, h)
    for f in sorted(base_dir.iterdir()):
        if f.is_file():
            h.update(f.name.encode())
            _sha256_file(f, h)
    return h.hexdigest()


def prepare_checkpoints(ckpt_dir: Path, digest: str) -> None:
    """Drop checkpoints written for another config; leave this config's for resuming."""
    marker = ckpt_dir / RUN_MARKER
    stale = False
    if ckpt_dir.exists():
        try:
            stale = json.loads(marker.read_text())["hash"] != digest
        except (OSError, ValueError, KeyError):
            stale = any(ckpt_dir.iterdir())
    if stale:
        info(f"[train] {ckpt_dir}: checkpoints of a different config (params, data or base changed): removed")
        shutil.rmtree(ckpt_dir)
    ckpt_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(json.dumps({"hash": digest}) + "\n")


def last_checkpoint(ckpt_dir: Path) -> Path | None:
    """The newest complete checkpoint (trainer_state.json is written last); None if there is none."""
    found = []
    for d in ckpt_dir.glob("checkpoint-*") if ckpt_dir.exists() else []:
        m = re.fullmatch(r"checkpoint-(\d+)", d.name)
        if m and d.is_dir() and (d / "trainer_state.json").exists():
            found.append((int(m.group(1)), d))
    return max(found)[1] if found else None


# ------------------------------------------------------------------------------------ trainer
def _make_trainer_class():
    from transformers import Trainer

    from lorapipe.core.sft import loss_sum

    class SFTLossTrainer(Trainer):
        """Trainer with our loss: summed CE over assistant tokens / tokens in the accumulated batch."""

        loss_is_scaled_for_ga = True  # normalised by num_items_in_batch (all micro-batches of a step)

        def __init__(self, *args, supports_keep: bool = True, **kwargs):
            super().__init__(*args, **kwargs)
            self.supports_keep = supports_keep
            self.model_accepts_loss_kwargs = True  # makes Trainer count label tokens per optimizer step
            self.tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            loss, n = loss_sum(model, inputs, self.supports_keep)
            loss = loss / (num_items_in_batch if num_items_in_batch is not None else max(n, 1))
            if num_items_in_batch is not None and self.args.average_tokens_across_devices:
                # num_items_in_batch counts all processes' tokens; DDP averages gradients over processes
                loss = loss * self.accelerator.num_processes
            return (loss, None) if return_outputs else loss

    return SFTLossTrainer


def _dvclive_callback(live):
    from transformers import TrainerCallback

    class DvcLiveLogger(TrainerCallback):
        """Per-step loss / lr to dvclive with the optimizer step as x axis.

        Our own few lines instead of transformers' DVCLiveCallback: that one creates Live() with
        defaults that write a dvc.yaml of their own; dvc.yaml declares these plots instead.
        """

        def on_log(self, args, state, control, logs=None, **kwargs):
            if not state.is_world_process_zero or not logs:
                return
            live.step = state.global_step
            for key, name in (("loss", "train/loss"), ("learning_rate", "train/learning_rate"),
                              ("grad_norm", "train/grad_norm"), ("eval_loss", "eval/loss")):
                if key in logs and isinstance(logs[key], (int, float)):
                    live.log_metric(name, float(logs[key]))
            live.next_step()

    return DvcLiveLogger()


def _eval_callback(evaluate, every: int, live):
    from transformers import TrainerCallback

    class PeriodicEval(TrainerCallback):
        """Eval loss every `every` steps, straight to dvclive and the log history.

        Not through Trainer.log: a log call inside on_step_end cancels that step's own loss log.
        """

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step % every or state.global_step >= state.max_steps:
                return
            loss = evaluate()
            state.log_history.append({"eval_loss": loss, "step": state.global_step})
            if live is not None:
                live.step = state.global_step
                live.log_metric("eval/loss", loss)
                info(f"[train] step {state.global_step}: eval loss {loss:.4f}")

    return PeriodicEval()


# ------------------------------------------------------------------------------------ stage
def run(params, *, callbacks=(), base_dir: Path | None = None) -> dict:
    """Train; write models/adapter/ and metrics/train.json. `callbacks` are extra TrainerCallbacks."""
    t0 = time.perf_counter()
    tp, lp = params.train, params.lora
    base_dir = Path(base_dir or paths.BASE_DIR)
    check_quantization(tp)  # before loading anything
    if not (base_dir / "config.json").exists():
        raise LorapipeError(f"{base_dir}: no base model (config.json missing); run `lorapipe base` first")
    for split in (paths.TRAIN_JSONL, paths.EVAL_JSONL):
        if not split.exists():
            raise LorapipeError(f"{split}: missing; run `lorapipe clean` first")

    import torch
    from transformers import GenerationConfig, TrainingArguments, set_seed
    from transformers.trainer_utils import SchedulerType

    from lorapipe.core import sft

    if tp.scheduler not in {s.value for s in SchedulerType}:
        raise LorapipeError(f"train.scheduler: unknown scheduler {tp.scheduler!r}; known: "
                            + ", ".join(s.value for s in SchedulerType))

    # ---- data: tokenise with the chat template, assistant-only labels
    trust = params.model.trust_remote_code
    tokenizer = hfmodel.load_tokenizer(base_dir, trust)
    sft.resolve_chat_template(tokenizer, base_dir, tp.chat_template)
    try:
        gen_cfg = GenerationConfig.from_pretrained(base_dir)
    except OSError:
        gen_cfg = None
    stops = sft.stop_strings(tokenizer, gen_cfg, tp.chat_template)
    train_ex, train_rep = sft.encode_file(paths.TRAIN_JSONL, tokenizer, tp.cutoff_len, stops)
    if train_rep.rows == 0:
        raise LorapipeError(f"{paths.TRAIN_JSONL}: the train split is empty; nothing to train on")
    if not train_ex:
        raise LorapipeError(
            f"{paths.TRAIN_JSONL}: none of its {train_rep.rows} rows keeps an assistant token within "
            f"train.cutoff_len={tp.cutoff_len} (system prompt + first user turn are longer); raise train.cutoff_len"
        )
    if train_rep.untrainable:
        info(f"[train] {paths.TRAIN_JSONL}: {train_rep.untrainable} of {train_rep.rows} rows keep no assistant token "
             f"within train.cutoff_len={tp.cutoff_len} and are not trained on (lines {train_rep.untrainable_lines[:10]})")
    eval_ex, eval_rep = sft.encode_file(paths.EVAL_JSONL, tokenizer, tp.cutoff_len, stops, limit=tp.max_eval_samples)
    if not eval_ex:
        msg = f"{paths.EVAL_JSONL}: the eval split has no usable rows ({eval_rep.rows} rows)"
        if tp.on_empty_eval == "fail":
            raise LorapipeError(msg + " and train.on_empty_eval is 'fail'")
        info(f"[train] {msg}: evaluation skipped (eval_loss is null)")

    # ---- precision, distributed set-up (TrainingArguments initialises the process group)
    precision = resolve_precision(tp.precision)
    cuda = torch.cuda.is_available()
    if precision == "fp16" and not cuda:
        raise LorapipeError("train.precision: fp16 needs a GPU; use fp32 (or bf16) on a CPU")
    digest = run_hash(params, base_dir, paths.TRAIN_JSONL)
    args = TrainingArguments(
        output_dir=str(paths.CHECKPOINTS_DIR),
        num_train_epochs=tp.epochs,
        max_steps=tp.max_steps if tp.max_steps > 0 else -1,
        per_device_train_batch_size=tp.batch_size,
        gradient_accumulation_steps=tp.grad_accum,
        learning_rate=tp.lr,
        lr_scheduler_type=tp.scheduler,
        warmup_steps=tp.warmup_ratio,  # a float < 1 is a ratio of the total steps in transformers 5
        weight_decay=tp.weight_decay,
        seed=tp.seed,
        data_seed=tp.seed,
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        use_cpu=not cuda,
        logging_steps=tp.logging_steps,
        save_strategy="steps",
        save_steps=tp.save_steps,
        save_total_limit=2,
        eval_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        ddp_find_unused_parameters=False,
        disable_tqdm=False,
        # recompute activations in the backward pass: less memory for more compute (docs/gpu.md)
        # (transformers 5 calls gradient checkpointing "activation checkpointing"; our param keeps the
        # name LLaMA-Factory and peft users know.) Non-reentrant: works with a frozen base whose inputs
        # need no grad (LoRA), and replays dropout's RNG.
        activation_checkpointing=tp.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if tp.gradient_checkpointing else None,
    )
    state = args.distributed_state
    main = state.is_main_process
    if main:
        prepare_checkpoints(paths.CHECKPOINTS_DIR, digest)
    state.wait_for_everyone()
    resume = last_checkpoint(paths.CHECKPOINTS_DIR)
    if resume and main:
        info(f"[train] resuming from {resume}")

    # ---- model
    load_kwargs: dict = {}
    if tp.quantization_bit:
        from peft import prepare_model_for_kbit_training
        from transformers import BitsAndBytesConfig

        compute = torch.bfloat16 if precision == "bf16" else torch.float16 if precision == "fp16" else torch.float32
        load_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
            if tp.quantization_bit == 4 else BitsAndBytesConfig(load_in_8bit=True)
        )
        load_kwargs["device_map"] = {"": state.local_process_index}
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32) if cuda else torch.float32
    model = hfmodel.load_causal_lm(base_dir, trust, dtype=dtype, **load_kwargs)
    if tp.quantization_bit:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tp.gradient_checkpointing)
    target_modules = lora_targets(model, lp.target)
    native = type(model).__module__.startswith("transformers.")
    supports_keep = native and "logits_to_keep" in inspect.signature(model.forward).parameters
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    # Packed rows need the attention to read sample boundaries from position_ids: transformers' own
    # model classes do (sdpa/eager/flash); remote-code models get dynamically padded batches instead.
    collator = (sft.PackedCollator(tp.cutoff_len, tokenizer.pad_token_id) if native
                else sft.PaddedCollator(tokenizer.pad_token_id))
    device = args.device
    if not tp.quantization_bit:  # bitsandbytes placed it already (device_map)
        model.to(device)

    def evaluate(m) -> float | None:
        if not eval_ex:
            return None
        return sft.eval_loss(m, eval_ex, collator, tp.batch_size, supports_keep, device)

    eval_loss_base = evaluate(model)
    if main and eval_loss_base is not None:
        info(f"[train] base model eval loss {eval_loss_base:.4f} on {len(eval_ex)} rows")

    # ---- LoRA
    from peft import LoraConfig, get_peft_model

    set_seed(tp.seed)  # LoRA A matrices are initialised randomly: same seed, same start
    lora_cfg = LoraConfig(r=lp.rank, lora_alpha=lp.alpha, lora_dropout=lp.dropout, target_modules=target_modules,
                          bias="none", task_type="CAUSAL_LM")
    model = get_peft_model(model, lora_cfg)
    trainable, total = model.get_nb_trainable_parameters()

    live = None
    cbs = list(callbacks)
    if main:
        from dvclive import Live

        live = Live(dir=str(DVCLIVE_DIR), save_dvc_exp=False, dvcyaml=None, report=None)
        cbs.append(_dvclive_callback(live))
    if tp.eval_steps and eval_ex:
        cbs.append(_eval_callback(lambda: evaluate(model), tp.eval_steps, live))
    trainer = _make_trainer_class()(model=model, args=args, train_dataset=train_ex, data_collator=collator,
                                    processing_class=tokenizer, callbacks=cbs, supports_keep=supports_keep)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    train_seconds = float(result.metrics.get("train_runtime", 0.0))

    eval_loss_final = evaluate(model)
    if live is not None:
        if eval_loss_final is not None:
            live.step = trainer.state.global_step
            live.log_metric("eval/loss", eval_loss_final)
        live.end()

    # tokens seen on this process; the others saw as many on average
    tokens = trainer.tokens_seen * state.num_processes
    metrics = {
        "train_loss": round(float(result.training_loss), 6),
        "eval_loss": None if eval_loss_final is None else round(eval_loss_final, 6),
        "eval_ppl": None if eval_loss_final is None else round(math.exp(eval_loss_final), 4),
        "eval_loss_base": None if eval_loss_base is None else round(eval_loss_base, 6),
        "eval_ppl_base": None if eval_loss_base is None else round(math.exp(eval_loss_base), 4),
        "train_tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None,
        "train_tokens": tokens,
        "runtime_s": round(train_seconds, 2),
        "stage_s": round(time.perf_counter() - t0, 2),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "steps": int(trainer.state.global_step),
        "resumed_from_step": int(resume.name.split("-")[1]) if resume else 0,
        "train_rows": len(train_ex),
        "train_rows_truncated": train_rep.truncated,
        "train_rows_untrainable": train_rep.untrainable,
        "eval_rows": len(eval_ex),
        "eval_rows_truncated": eval_rep.truncated,
        "eval_rows_untrainable": eval_rep.untrainable,
        "precision": precision,
        "processes": state.num_processes,
    }
    if main:
        with atomic_path(paths.ADAPTER_DIR, is_dir=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            sort_target_modules(tmp / "adapter_config.json")
            tokenizer.save_pretrained(tmp)  # carries the chat template: the folder describes itself
        write_json(paths.METRICS_DIR / "train.json", metrics)
        # The run finished: its checkpoints only served resuming it.
        shutil.rmtree(paths.CHECKPOINTS_DIR, ignore_errors=True)
        paths.CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    return {k: metrics[k] for k in ("train_loss", "eval_loss", "eval_loss_base", "train_tokens_per_s", "steps", "train_rows")}

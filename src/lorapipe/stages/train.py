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
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lorapipe.core import hfmodel, lora, paths, precision
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


def run_hash(params, base_dir: Path, train_path: Path, precision_used: str) -> str:
    """Hash of everything that decides the trained weights: train+lora params, train data, base model,
    and the precision in use (train.precision: auto may resolve otherwise on the next run: a checkpoint
    trained in one precision is not resumed in the other)."""
    h = hashlib.sha256()
    train = {k: v for k, v in params.train.model_dump().items() if k not in _NOT_HASHED}
    train["precision"] = precision_used
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
    import torch
    from transformers import Trainer

    from lorapipe.core.sft import loss_sum

    class SFTLossTrainer(Trainer):
        """Trainer with our loss: summed CE over assistant tokens / tokens in the accumulated batch."""

        loss_is_scaled_for_ga = True  # normalised by num_items_in_batch (all micro-batches of a step)

        def __init__(self, *args, supports_keep: bool = True, cpu_bf16: bool = False, **kwargs):
            super().__init__(*args, **kwargs)
            self.supports_keep = supports_keep
            self.cpu_bf16 = cpu_bf16
            self.model_accepts_loss_kwargs = True  # makes Trainer count label tokens per optimizer step
            self.tokens_seen = 0

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            if model.training:
                mask = inputs.get("attention_mask")
                self.tokens_seen += int(mask.sum()) if mask is not None else int(inputs["input_ids"].numel())
            # bf16 on a CPU: autocast around the training loss only, so weights, LoRA, optimizer state
            # and every eval loss stay fp32 (TrainingArguments(bf16=True) would wrap model.forward itself)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.cpu_bf16 and model.training):
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
@dataclass
class _Data:
    tokenizer: Any
    train: list
    train_rep: Any
    eval: list
    eval_rep: Any


@dataclass
class _Model:
    model: Any
    collator: Any
    supports_keep: bool
    eval_loss_base: float | None


def run(params, *, callbacks=(), base_dir: Path | None = None) -> dict:
    """Train; write models/adapter/ and metrics/train.json. `callbacks` are extra TrainerCallbacks."""
    t0 = time.perf_counter()
    base_dir = Path(base_dir or paths.BASE_DIR)
    _check_inputs(params.train, base_dir)
    data = _setup_data(params, base_dir)
    choice = _setup_precision(params, base_dir)
    args = _training_args(params.train, choice.precision)
    resume = _setup_checkpoints(params, base_dir, args, choice.precision)
    m = _setup_model(params, base_dir, data, args, choice.precision)
    trainer, live = _setup_trainer(params, data, m, args, callbacks, choice.precision)
    result = trainer.train(resume_from_checkpoint=str(resume) if resume else None)
    eval_loss = _evaluate(m, data, params.train, args.device)
    _end_live(live, trainer, eval_loss)
    metrics = _metrics(data, m, trainer, result, eval_loss, choice, resume, args, t0)
    _save(args, m.model, data.tokenizer, metrics)
    return {k: metrics[k] for k in ("train_loss", "eval_loss", "eval_loss_base", "train_tokens_per_s", "steps",
                                    "train_rows", "precision")}


def _check_inputs(tp, base_dir: Path) -> None:
    """Fail on a missing input or a bad param before anything heavy is loaded."""
    check_quantization(tp)
    if not (base_dir / "config.json").exists():
        raise LorapipeError(f"{base_dir}: no base model (config.json missing); run `lorapipe base` first")
    for split in (paths.TRAIN_JSONL, paths.EVAL_JSONL):
        if not split.exists():
            raise LorapipeError(f"{split}: missing; run `lorapipe clean` first")
    from transformers.trainer_utils import SchedulerType

    if tp.scheduler not in {s.value for s in SchedulerType}:
        raise LorapipeError(f"train.scheduler: unknown scheduler {tp.scheduler!r}; known: "
                            + ", ".join(s.value for s in SchedulerType))


def _setup_data(params, base_dir: Path) -> _Data:
    """Tokenise both splits with the chat template; labels on assistant tokens only."""
    from transformers import GenerationConfig

    from lorapipe.core import sft

    tp = params.train
    tokenizer = hfmodel.load_tokenizer(base_dir, params.model.trust_remote_code)
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
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return _Data(tokenizer, train_ex, train_rep, eval_ex, eval_rep)


def _setup_precision(params, base_dir: Path) -> precision.Choice:
    """train.precision resolved: explicit values win; auto measures on a CPU (core/precision.py)."""
    import torch

    tp = params.train
    if tp.precision == "fp16" and not torch.cuda.is_available():
        raise LorapipeError("train.precision: fp16 needs a GPU; use fp32 (or bf16) on a CPU")
    # torchrun sets WORLD_SIZE before the process group exists, and the choice is needed before it
    choice = precision.choose(tp.precision, base_dir, cutoff_len=tp.cutoff_len,
                              rank=params.lora.rank, alpha=params.lora.alpha, target=params.lora.target,
                              processes=int(os.environ.get("WORLD_SIZE", "1")))
    info(f"[train] precision {choice.reason}")
    return choice


def _training_args(tp, precision_used: str):
    """TrainingArguments (which also initialises the process group under torchrun/accelerate)."""
    import torch
    from transformers import TrainingArguments

    return TrainingArguments(
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
        # bf16 on a GPU; on a CPU it is the trainer's own autocast (_make_trainer_class)
        bf16=precision_used == "bf16" and torch.cuda.is_available(),
        fp16=precision_used == "fp16",
        use_cpu=not torch.cuda.is_available(),
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


def _setup_checkpoints(params, base_dir: Path, args, precision_used: str) -> Path | None:
    """Keep this config's checkpoints (same params, data, base and precision), drop others; the newest or None."""
    state = args.distributed_state
    if state.is_main_process:
        prepare_checkpoints(paths.CHECKPOINTS_DIR, run_hash(params, base_dir, paths.TRAIN_JSONL, precision_used))
    state.wait_for_everyone()
    resume = last_checkpoint(paths.CHECKPOINTS_DIR)
    if resume and state.is_main_process:
        info(f"[train] resuming from {resume}")
    return resume


def _setup_model(params, base_dir: Path, data: _Data, args, precision_used: str) -> _Model:
    """Base model on its device, its eval loss, then the LoRA layers (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import set_seed

    from lorapipe.core import sft

    tp, lp = params.train, params.lora
    cuda = torch.cuda.is_available()
    load_kwargs: dict = {}
    if tp.quantization_bit:
        from transformers import BitsAndBytesConfig

        compute = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_used, torch.float32)
        load_kwargs["quantization_config"] = (
            BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
            if tp.quantization_bit == 4 else BitsAndBytesConfig(load_in_8bit=True)
        )
        load_kwargs["device_map"] = {"": args.distributed_state.local_process_index}
    # On a CPU the base stays fp32 under bf16 autocast: a bf16-held frozen base measured slower there
    # (docs/benchmarks.md), and the base model's eval loss is a full-precision reference.
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision_used, torch.float32) if cuda else torch.float32
    model = hfmodel.load_causal_lm(base_dir, params.model.trust_remote_code, dtype=dtype, **load_kwargs)
    if tp.quantization_bit:
        from peft import prepare_model_for_kbit_training

        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=tp.gradient_checkpointing)
    target_modules = lora.target_modules(model, lp.target)
    native = type(model).__module__.startswith("transformers.")
    supports_keep = native and "logits_to_keep" in inspect.signature(model.forward).parameters
    pad = data.tokenizer.pad_token_id
    # Packed rows need the attention to read sample boundaries from position_ids: transformers' own
    # model classes do (sdpa/eager/flash); remote-code models get dynamically padded batches instead.
    collator = sft.PackedCollator(tp.cutoff_len, pad) if native else sft.PaddedCollator(pad)
    if not tp.quantization_bit:  # bitsandbytes placed it already (device_map)
        model.to(args.device)
    m = _Model(model, collator, supports_keep, None)
    m.eval_loss_base = _evaluate(m, data, tp, args.device)
    if args.distributed_state.is_main_process and m.eval_loss_base is not None:
        info(f"[train] base model eval loss {m.eval_loss_base:.4f} on {len(data.eval)} rows")
    set_seed(tp.seed)  # LoRA A matrices are initialised randomly: same seed, same start
    m.model = get_peft_model(model, LoraConfig(r=lp.rank, lora_alpha=lp.alpha, lora_dropout=lp.dropout,
                                               target_modules=target_modules, bias="none", task_type="CAUSAL_LM"))
    return m


def _evaluate(m: _Model, data: _Data, tp, device) -> float | None:
    """Eval loss over assistant tokens of the eval split, in full precision (no autocast)."""
    from lorapipe.core import sft

    if not data.eval:
        return None
    return sft.eval_loss(m.model, data.eval, m.collator, tp.batch_size, m.supports_keep, device)


def _setup_trainer(params, data: _Data, m: _Model, args, callbacks, precision_used: str):
    """The Trainer with our loss, dvclive logging (main process) and periodic eval."""
    import torch

    tp = params.train
    live = None
    cbs = list(callbacks)
    if args.distributed_state.is_main_process:
        from dvclive import Live

        live = Live(dir=str(DVCLIVE_DIR), save_dvc_exp=False, dvcyaml=None, report=None)
        cbs.append(_dvclive_callback(live))
    if tp.eval_steps and data.eval:
        cbs.append(_eval_callback(lambda: _evaluate(m, data, tp, args.device), tp.eval_steps, live))
    trainer = _make_trainer_class()(model=m.model, args=args, train_dataset=data.train, data_collator=m.collator,
                                    processing_class=data.tokenizer, callbacks=cbs, supports_keep=m.supports_keep,
                                    cpu_bf16=precision_used == "bf16" and not torch.cuda.is_available())
    return trainer, live


def _end_live(live, trainer, eval_loss: float | None) -> None:
    if live is None:
        return
    if eval_loss is not None:
        live.step = trainer.state.global_step
        live.log_metric("eval/loss", eval_loss)
    live.end()


def run_train_loss(log_history: list[dict], this_process_loss: float, resumed_from: int, last_step: int) -> float:
    """Mean training loss over every step of the run.

    The trainer's own figure covers only the steps this process ran; after a resume the steps before
    the checkpoint come from its log history (one entry per train.logging_steps steps, each the mean
    over its steps). Steps after the checkpoint's last log entry were never logged: they are left out
    of the mean.
    """
    if not resumed_from:
        return this_process_loss
    earlier, logged = 0.0, 0
    for entry in log_history:
        if "loss" in entry and logged < entry["step"] <= resumed_from:
            earlier += entry["loss"] * (entry["step"] - logged)
            logged = entry["step"]
    ran = last_step - resumed_from
    return (earlier + this_process_loss * ran) / (logged + ran)


def _metrics(data: _Data, m: _Model, trainer, result, eval_loss, choice, resume, args, t0: float) -> dict:
    train_seconds = float(result.metrics.get("train_runtime", 0.0))
    resumed_from = int(resume.name.split("-")[1]) if resume else 0
    processes = args.distributed_state.num_processes
    tokens = trainer.tokens_seen * processes  # tokens seen on this process; the others saw as many on average
    trainable, total = m.model.get_nb_trainable_parameters()
    base = m.eval_loss_base
    return {
        "train_loss": round(run_train_loss(trainer.state.log_history, float(result.training_loss), resumed_from,
                                           trainer.state.global_step), 6),
        "eval_loss": None if eval_loss is None else round(eval_loss, 6),
        "eval_ppl": None if eval_loss is None else round(math.exp(eval_loss), 4),
        "eval_loss_base": None if base is None else round(base, 6),
        "eval_ppl_base": None if base is None else round(math.exp(base), 4),
        "train_tokens_per_s": round(tokens / train_seconds, 1) if train_seconds else None,
        "train_tokens": tokens,
        "runtime_s": round(train_seconds, 2),
        "stage_s": round(time.perf_counter() - t0, 2),
        "trainable_params": int(trainable),
        "total_params": int(total),
        "steps": int(trainer.state.global_step),
        "resumed_from_step": resumed_from,
        "train_rows": len(data.train),
        "train_rows_truncated": data.train_rep.truncated,
        "train_rows_untrainable": data.train_rep.untrainable,
        "eval_rows": len(data.eval),
        "eval_rows_truncated": data.eval_rep.truncated,
        "eval_rows_untrainable": data.eval_rep.untrainable,
        "precision": choice.precision,
        "precision_reason": choice.reason,
        "precision_probe_ratio": choice.ratio,
        "processes": processes,
    }


def _save(args, model, tokenizer, metrics: dict) -> None:
    """Main process: the adapter (fp32, sorted config), metrics; then the finished run's checkpoints go."""
    state = args.distributed_state
    if state.is_main_process:
        with atomic_path(paths.ADAPTER_DIR, is_dir=True) as tmp:
            model.save_pretrained(tmp, safe_serialization=True)
            sort_target_modules(tmp / "adapter_config.json")
            tokenizer.save_pretrained(tmp)  # carries the chat template: the folder describes itself
        write_json(paths.METRICS_DIR / "train.json", metrics)
        # The run finished: its checkpoints only served resuming it.
        shutil.rmtree(paths.CHECKPOINTS_DIR, ignore_errors=True)
        paths.CHECKPOINTS_DIR.mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()

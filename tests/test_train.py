"""Stage `train`: assistant-only labels, packing without cross-sample attention, the stage end to end on
a tiny model (adapter, metrics, dvclive plots, determinism), its bad-input errors, and (slow) resume
after kill -9 and a 2-process DDP run."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import CHILD_ENV, free_port
from lorapipe.core.errors import LorapipeError
from lorapipe.params import ParamsError, parse

REPO = Path(__file__).resolve().parents[1]
TWO_TURNS = [
    {"role": "system", "content": "Be kind."},
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How are you?"},
    {"role": "user", "content": "Sad today."},
    {"role": "assistant", "content": "I'm sorry to hear that."},
]


def _rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        rows.append({"messages": [{"role": "user", "content": f"I feel low today, number {i}."},
                                  {"role": "assistant", "content": f"I'm here with you. Tell me more about it ({i})."}],
                     "source": "test", "origin": f"t:{i}"})
    return rows


def _workdir(root: Path, model_dir: Path, train_rows: list[dict], eval_rows: list[dict]) -> Path:
    (root / "data/clean").mkdir(parents=True)
    (root / "models").mkdir()
    shutil.copytree(model_dir, root / "models/base")
    for name, rows in (("train", train_rows), ("eval", eval_rows)):
        with open(root / f"data/clean/{name}.jsonl", "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return root


def _params(**train):
    # fp32 unless a test asks otherwise: auto picks by measuring this CPU (tested on its own below)
    base = {"max_steps": 4, "batch_size": 4, "save_steps": 2, "logging_steps": 1, "lr": 1e-3, "warmup_ratio": 0.0,
            "precision": "fp32"}
    base.update(train)
    return parse({"train": base, "lora": {"rank": 4, "alpha": 8, "target": "all"}})


# ------------------------------------------------------------------------------------ labels
def test_two_turn_labels_cover_exactly_assistant_content_and_end_of_turn(smollm2_tokenizer_dir):
    from transformers import AutoTokenizer

    from lorapipe.core import sft

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    sft.resolve_chat_template(tok, smollm2_tokenizer_dir)
    example, truncated = sft.encode(tok, TWO_TURNS, 512, sft.stop_strings(tok))
    assert not truncated
    assert example.input_ids == tok(tok.apply_chat_template(TWO_TURNS, tokenize=False), add_special_tokens=False)["input_ids"]
    labelled = [i for i, lab in enumerate(example.labels) if lab != sft.IGNORE_INDEX]
    # labels equal the token ids where set
    assert all(example.labels[i] == example.input_ids[i] for i in labelled)
    # the labelled positions are exactly the two assistant turns' content + <|im_end|>, found independently
    end = tok.convert_tokens_to_ids("<|im_end|>")
    ids = example.input_ids
    expected = []
    for content in ("Hello! How are you?", "I'm sorry to hear that."):
        piece = tok(content, add_special_tokens=False)["input_ids"] + [end]
        starts = [s for s in range(len(ids)) if ids[s:s + len(piece)] == piece]
        assert len(starts) == 1
        expected += list(range(starts[0], starts[0] + len(piece)))
    assert labelled == expected
    assert tok.decode([ids[i] for i in labelled]) == "Hello! How are you?<|im_end|>I'm sorry to hear that.<|im_end|>"
    # everything else (system, user, role headers, newline after each turn) is masked
    assert tok.decode([ids[i] for i in range(len(ids)) if i not in labelled]).count("Hi there") == 1


def test_gemma_template_labels_end_of_turn(smollm2_tokenizer_dir, tmp_path):
    """A template whose turn end is not the EOS token (Gemma's <end_of_turn>): still labelled."""
    from transformers import AutoTokenizer

    from lorapipe.core import sft

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<start_of_turn>", "<end_of_turn>"]})
    tok.chat_template = None
    sft.resolve_chat_template(tok, tmp_path, "gemma")
    example, _ = sft.encode(tok, TWO_TURNS, 512, sft.stop_strings(tok, None, "gemma"))
    text = tok.decode([t for t, lab in zip(example.input_ids, example.labels) if lab != sft.IGNORE_INDEX])
    assert text == "Hello! How are you?<end_of_turn>I'm sorry to hear that.<end_of_turn>"


def test_cutoff_truncates_and_counts_rows_without_assistant_tokens(smollm2_tokenizer_dir, tmp_path):
    from transformers import AutoTokenizer

    from lorapipe.core import sft

    tok = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    path = tmp_path / "train.jsonl"
    long_system = {"role": "system", "content": "You are a kind listener. " * 20}
    rows = [{"messages": [long_system] + TWO_TURNS[1:]}, {"messages": TWO_TURNS}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    examples, report = sft.encode_file(path, tok, 40, sft.stop_strings(tok))
    assert report.rows == 2 and report.untrainable == 1 and report.untrainable_lines == [1]
    assert report.truncated == 2 and len(examples) == 1 and len(examples[0].input_ids) == 40


def test_packed_batch_has_no_cross_sample_attention(tiny_model):
    """Logits of a sample are the same alone and packed behind another sample (block-diagonal mask)."""
    import torch
    from transformers import AutoModelForCausalLM

    from lorapipe.core import sft

    model = AutoModelForCausalLM.from_pretrained(tiny_model("llama")).eval()
    a = sft.Example(list(range(5, 17)), [-100] * 6 + list(range(11, 17)))
    b = sft.Example(list(range(100, 109)), [-100] * 4 + list(range(104, 109)))
    batch = sft.PackedCollator(64)([a, b])
    assert batch["position_ids"].tolist() == [list(range(12)) + list(range(9))]
    # rows are capped at max_len: a second row, padded with a label-free block of its own
    split = sft.PackedCollator(15, pad_id=0)([b, a])
    assert split["position_ids"].tolist() == [list(range(12)), list(range(9)) + [0, 1, 2]]
    assert split["labels"][1, 9:].tolist() == [-100] * 3 and not split["logits_to_keep"][1, 8:].any()
    with torch.no_grad():
        # use_cache=False as in training: transformers reads packing from position_ids only without a cache
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0, 12:]
        alone = model(input_ids=torch.tensor([b.input_ids])).logits[0]
    assert torch.allclose(packed, alone, atol=1e-5)
    # and the loss over the kept logits equals the loss of each sample computed alone
    loss, n = sft.loss_sum(model, batch)
    ref = 0.0
    for ex in (a, b):
        one = sft.PaddedCollator(0)([ex])
        ref += float(sft.loss_sum(model, one, supports_keep=False)[0])
    assert n == 6 + 5 and abs(float(loss) - ref) < 1e-3


# ------------------------------------------------------------------------------------ stage
@pytest.fixture(scope="module")
def trained(tiny_model, tmp_path_factory):
    """Two identical runs of the stage in-process (determinism), one tiny model, 24 rows."""
    from lorapipe.stages import train

    model = tiny_model("llama")
    runs = []
    for k in range(2):
        root = _workdir(tmp_path_factory.mktemp(f"train-run{k}"), model, _rows(24), _rows(4))
        with contextlib.chdir(root):
            summary = train.run(_params(eval_steps=2))
        runs.append((root, summary))
    return runs


def test_stage_writes_adapter_metrics_and_plots(trained):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root, summary = trained[0]
    metrics = json.loads((root / "metrics/train.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_ppl", "eval_loss_base", "train_tokens_per_s", "runtime_s",
                "trainable_params", "total_params", "steps", "train_rows", "eval_rows"):
        value = metrics[key]  # each a measured figure: a finite positive number, not a placeholder
        assert isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0, (key, value)
    assert metrics["steps"] == 4 and metrics["train_rows"] == 24 and metrics["eval_rows"] == 4
    assert abs(metrics["eval_ppl"] - math.exp(metrics["eval_loss"])) < 1e-2 * metrics["eval_ppl"]
    assert 0 < metrics["trainable_params"] < metrics["total_params"]
    # lr 1e-3 on a repeated pattern: the tiny model does learn
    assert metrics["eval_loss"] < metrics["eval_loss_base"]
    adapter = root / "models/adapter"
    for f in ("adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (adapter / f).exists(), f
    base = AutoModelForCausalLM.from_pretrained(root / "models/base")
    peft_model = PeftModel.from_pretrained(base, adapter)
    assert any("lora_A" in n for n, _ in peft_model.named_parameters())
    with torch.no_grad():
        peft_model(input_ids=torch.tensor([[1, 2, 3]]))
    # dvclive: per-step loss and lr, one row per step
    loss_tsv = (root / "dvclive/plots/metrics/train/loss.tsv").read_text().splitlines()
    lr_tsv = (root / "dvclive/plots/metrics/train/learning_rate.tsv").read_text().splitlines()
    assert loss_tsv[0].split("\t") == ["step", "loss"] and len(loss_tsv) == 1 + 4
    assert len(lr_tsv) == 1 + 4
    # train.eval_steps=2: eval loss at step 2 and after the last step
    eval_tsv = (root / "dvclive/plots/metrics/eval/loss.tsv").read_text().splitlines()
    assert [line.split("\t")[0] for line in eval_tsv] == ["step", "2", "4"]
    # checkpoints served resuming only: gone after a finished run, folder kept (persist out)
    assert (root / "models/checkpoints").is_dir() and not list((root / "models/checkpoints").glob("checkpoint-*"))


def test_same_params_and_data_give_byte_identical_adapter(trained):
    (a, _), (b, _) = trained
    files = sorted(p.name for p in (a / "models/adapter").iterdir())
    assert "adapter_model.safetensors" in files and files == sorted(p.name for p in (b / "models/adapter").iterdir())
    for name in files:
        assert (a / "models/adapter" / name).read_bytes() == (b / "models/adapter" / name).read_bytes(), name
    # peft saves target_modules in set order, which changes with the process's hash seed (both runs
    # above share one): the stage sorts them, so separate processes write the same bytes too.
    targets = json.loads((a / "models/adapter/adapter_config.json").read_text())["target_modules"]
    assert len(targets) >= 7 and targets == sorted(targets)


def test_gradient_checkpointing_trains_the_same_adapter(trained, tiny_model, tmp_path):
    """train.gradient_checkpointing recomputes activations instead of keeping them: same run, same
    losses (dropout's RNG is replayed by non-reentrant checkpointing)."""
    from lorapipe.stages import train

    from transformers import TrainerCallback

    seen = []

    class Record(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            seen.append(model.get_base_model().is_activation_checkpointing)

    root = _workdir(tmp_path, tiny_model("llama"), _rows(24), _rows(4))
    with contextlib.chdir(root):
        train.run(_params(eval_steps=2, gradient_checkpointing=True), callbacks=[Record()])
    assert seen == [True] * 4
    plain = json.loads((trained[0][0] / "metrics/train.json").read_text())
    checkpointed = json.loads((root / "metrics/train.json").read_text())
    for key in ("train_loss", "eval_loss", "eval_loss_base"):
        assert checkpointed[key] == pytest.approx(plain[key], rel=1e-5), key


def test_train_loss_after_a_resume_covers_the_whole_run():
    from lorapipe.stages.train import run_train_loss

    # logged every 2 steps; checkpoint at step 5, so step 5 was never logged; this process ran 6..8
    history = [{"loss": 4.0, "step": 2}, {"loss": 3.0, "step": 4}, {"eval_loss": 9.0, "step": 4},
               {"loss": 2.5, "step": 6}, {"loss": 1.0, "step": 8}]
    assert run_train_loss(history, 2.0, 5, 8) == pytest.approx((4.0 * 2 + 3.0 * 2 + 2.0 * 3) / 7)
    assert run_train_loss(history, 2.0, 0, 8) == 2.0  # not resumed: the trainer's own mean


def test_changed_config_discards_stale_checkpoints(tmp_path):
    from lorapipe.stages.train import last_checkpoint, prepare_checkpoints

    ckpt = tmp_path / "checkpoints"
    prepare_checkpoints(ckpt, "hash-a")
    (ckpt / "checkpoint-2").mkdir()
    (ckpt / "checkpoint-2/trainer_state.json").write_text("{}")
    (ckpt / "checkpoint-4").mkdir()  # interrupted mid-save: no trainer_state.json
    prepare_checkpoints(ckpt, "hash-a")
    assert last_checkpoint(ckpt) == ckpt / "checkpoint-2"
    prepare_checkpoints(ckpt, "hash-b")
    assert last_checkpoint(ckpt) is None and not (ckpt / "checkpoint-2").exists()


def test_run_hash_changes_with_params_and_data(tiny_model, tmp_path):
    from lorapipe.stages.train import run_hash

    root = _workdir(tmp_path, tiny_model("llama"), _rows(3), _rows(1))
    train = root / "data/clean/train.jsonl"
    h = run_hash(_params(), root / "models/base", train, "fp32")
    assert h == run_hash(_params(logging_steps=3), root / "models/base", train, "fp32")  # does not change the weights
    assert h != run_hash(_params(lr=2e-3), root / "models/base", train, "fp32")
    # the precision in use, not the param: auto resolving to bf16 does not resume an fp32 checkpoint
    assert run_hash(_params(precision="auto"), root / "models/base", train, "bf16") != run_hash(
        _params(precision="auto"), root / "models/base", train, "fp32")
    assert h == run_hash(_params(precision="auto"), root / "models/base", train, "fp32")
    train.write_text(train.read_text() + json.dumps(_rows(1)[0]) + "\n")
    assert h != run_hash(_params(), root / "models/base", train, "fp32")


# ------------------------------------------------------------------------------------ precision
def test_bf16_trains_with_fp32_lora_weights_and_measures_eval_loss_in_fp32(trained, tiny_model, tmp_path):
    """bf16 on a CPU is autocast: LoRA weights, the saved adapter and the eval losses stay fp32."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorapipe.core import sft
    from lorapipe.stages import train

    root = _workdir(tmp_path, tiny_model("llama"), _rows(24), _rows(4))
    with contextlib.chdir(root):
        summary = train.run(_params(precision="bf16"))
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert summary["precision"] == metrics["precision"] == "bf16"
    assert metrics["precision_reason"] == "bf16: train.precision" and metrics["precision_probe_ratio"] is None
    weights = load_file(root / "models/adapter/adapter_model.safetensors")
    assert weights and {t.dtype for t in weights.values()} == {torch.float32}
    fp32 = json.loads((trained[0][0] / "metrics/train.json").read_text())
    assert metrics["eval_loss_base"] == fp32["eval_loss_base"]  # the base measured before training, in fp32
    assert metrics["eval_loss"] == pytest.approx(fp32["eval_loss"], abs=0.05) and metrics["eval_loss"] != fp32["eval_loss"]
    # the final eval loss is the fp32 one of the trained adapter, not an autocast figure
    tok = AutoTokenizer.from_pretrained(root / "models/base")
    eval_ex, _ = sft.encode_file(root / "data/clean/eval.jsonl", tok, 256, sft.stop_strings(tok))
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "models/base"), root / "models/adapter")
    assert sft.eval_loss(model, eval_ex, sft.PackedCollator(256, tok.pad_token_id), 4) == pytest.approx(
        metrics["eval_loss"], abs=1e-5)


def test_auto_precision_probes_in_a_child_once_and_reuses_the_answer(tiny_model, tmp_path, monkeypatch):
    from lorapipe.core import precision

    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    model = tiny_model("llama")
    shape = dict(cutoff_len=64, rank=4, alpha=8, target="all")
    first = precision.choose("auto", model, **shape)
    assert first.precision in ("fp32", "bf16") and first.ratio > 0
    assert first.precision == ("bf16" if first.ratio >= precision.BF16_MIN_RATIO else "fp32")
    assert first.reason.startswith(f"auto: {first.precision}, ") and "(probe: 3 steps of 1x64 tokens" in first.reason
    assert precision.cpu_info()[0] in first.reason
    [cached] = (tmp_path / "cache/precision").glob("*.json")
    measured = json.loads(cached.read_text())
    assert measured["fp32_s"] > 0 and measured["bf16_s"] > 0
    second = precision.choose("auto", model, **shape)
    assert (second.precision, second.ratio) == (first.precision, first.ratio) and "(cached probe: " in second.reason
    # the second answer comes from that file: what it says is what is chosen
    cached.write_text(json.dumps({**measured, "fp32_s": 2.0, "bf16_s": 1.0}))
    forced = precision.choose("auto", model, **shape)
    assert (forced.precision, forced.ratio) == ("bf16", 2.0) and "1/2.00 of fp32's (cached probe" in forced.reason
    cached.write_text(json.dumps({**measured, "fp32_s": 1.0, "bf16_s": 1.0}))
    assert precision.choose("auto", model, **shape).precision == "fp32"
    # another rank reuses the answer (a rank sweep trains in one precision); other LoRA layers are another probe
    assert "(cached probe: " in precision.choose("auto", model, **{**shape, "rank": 8}).reason
    assert precision.choose("auto", model, **{**shape, "target": "q_proj,v_proj"}).reason.count("cached") == 0


def test_explicit_precision_and_several_processes_are_not_probed(tmp_path, monkeypatch):
    from lorapipe.core import precision

    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    nothing = tmp_path / "no-model"  # a probe would fail on it: these answers come without one
    shape = dict(cutoff_len=256, rank=16, alpha=32, target="all")
    assert precision.choose("fp32", nothing, **shape) == precision.Choice("fp32", "fp32: train.precision")
    assert precision.choose("bf16", nothing, **shape) == precision.Choice("bf16", "bf16: train.precision")
    two = precision.choose("auto", nothing, processes=2, **shape)
    assert two.precision == "fp32" and "not probed with 2 processes" in two.reason
    assert not (tmp_path / "cache").exists()


def test_a_failed_probe_means_fp32_with_its_reason_and_is_not_cached(tiny_model, tmp_path, monkeypatch):
    from lorapipe.core import precision

    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model("llama"), broken)
    (broken / "model.safetensors").write_bytes(b"not a safetensors file")
    choice = precision.choose("auto", broken, cutoff_len=64, rank=4, alpha=8, target="all")
    assert choice.precision == "fp32" and choice.ratio is None
    assert choice.reason.startswith("auto: fp32, the bf16 probe failed (") and "safetensors" in choice.reason.lower()
    assert not list((tmp_path / "cache").rglob("*.json"))


def test_auto_precision_in_the_stage_is_recorded(workdir, tmp_path, monkeypatch):
    from lorapipe.stages import train

    monkeypatch.setenv("LORAPIPE_CACHE", str(tmp_path / "cache"))
    root = workdir()
    summary = train.run(_params(precision="auto", max_steps=1))
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert summary["precision"] == metrics["precision"] in ("fp32", "bf16")
    assert metrics["precision_reason"].startswith(f"auto: {metrics['precision']}, a bf16 step takes 1/")
    assert metrics["precision_probe_ratio"] > 0


# ------------------------------------------------------------------------------------ bad input
@pytest.fixture()
def workdir(tiny_model, tmp_path, monkeypatch):
    def make(train_rows=None, eval_rows=None, model=None):
        root = _workdir(tmp_path / "w", model or tiny_model("llama"), _rows(8) if train_rows is None else train_rows,
                        _rows(2) if eval_rows is None else eval_rows)
        monkeypatch.chdir(root)
        return root
    return make


def test_empty_train_split_is_an_error(workdir):
    from lorapipe.stages import train

    workdir(train_rows=[])
    with pytest.raises(LorapipeError, match="train.jsonl: the train split is empty"):
        train.run(_params())
    assert not Path("models/adapter").exists() and not Path("metrics/train.json").exists()


def test_all_rows_beyond_cutoff_is_an_error(workdir):
    from lorapipe.stages import train

    workdir()
    with pytest.raises(LorapipeError, match=r"none of its 8 rows keeps an assistant token within train.cutoff_len=8"):
        train.run(_params(cutoff_len=8))


def test_empty_eval_split_fails_when_asked(workdir):
    from lorapipe.stages import train

    workdir(eval_rows=[])
    with pytest.raises(LorapipeError, match="eval split has no usable rows.*on_empty_eval is 'fail'"):
        train.run(_params(on_empty_eval="fail"))


def test_empty_eval_split_is_skipped_by_default(workdir):
    from lorapipe.stages import train

    root = workdir(eval_rows=[])
    summary = train.run(_params(max_steps=1))
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert summary["eval_loss"] is None and metrics["eval_loss"] is None and metrics["eval_rows"] == 0
    assert (root / "models/adapter/adapter_model.safetensors").exists()


def test_base_without_chat_template_is_an_error(workdir, tiny_model, tmp_path):
    from lorapipe.stages import train

    model = tmp_path / "no-template"
    shutil.copytree(tiny_model("llama"), model)
    (model / "chat_template.jinja").unlink()
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    workdir(model=model)
    with pytest.raises(LorapipeError, match="models/base: the base model has no chat template"):
        train.run(_params())


def test_lora_target_naming_no_module_lists_the_linear_modules(workdir):
    from lorapipe.stages import train

    workdir()
    with pytest.raises(LorapipeError) as err:
        train.run(parse({"train": {"max_steps": 1}, "lora": {"target": ["q_proj", "query_key_value"]}}))
    msg = str(err.value)
    assert "lora.target: query_key_value matches no linear module" in msg
    for name in ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"):
        assert name in msg
    assert "lm_head" not in msg


@pytest.mark.parametrize("rank", [0, -4])
def test_lora_rank_must_be_positive(rank):
    with pytest.raises(ParamsError, match="lora.rank"):
        parse({"lora": {"rank": rank}})


def test_qlora_without_cuda_fails_before_loading_anything(tmp_path, monkeypatch):
    import torch

    from lorapipe.stages import train

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.chdir(tmp_path)  # nothing here: no base model, no data -- the check comes first
    with pytest.raises(LorapipeError, match=r"quantization_bit: 4 \(QLoRA\).*needs a CUDA GPU.*has none"):
        train.run(parse({"train": {"quantization_bit": 4}}))


def test_unknown_scheduler_is_an_error(workdir):
    from lorapipe.stages import train

    workdir()
    with pytest.raises(LorapipeError, match="train.scheduler: unknown scheduler 'cosinus'"):
        train.run(_params(scheduler="cosinus"))


# ------------------------------------------------------------------------------------ slow
_RUN = textwrap.dedent("""
    import os, signal, sys
    from transformers import TrainerCallback
    from lorapipe.params import parse
    from lorapipe.stages import train

    class KillAfterSave(TrainerCallback):
        # a real SIGKILL right after the checkpoint of step `at` is on disk
        def __init__(self, at): self.at = at
        def on_save(self, args, state, control, **kw):
            if state.global_step == self.at:
                os.kill(os.getpid(), signal.SIGKILL)

    kill_at = int(sys.argv[1])
    params = parse({"train": {"max_steps": 6, "batch_size": 4, "save_steps": 2, "logging_steps": 1, "lr": 1e-3,
                              "warmup_ratio": 0.0, "seed": 7},
                    "lora": {"rank": 4, "alpha": 8, "dropout": 0.1}})
    train.run(params, callbacks=[KillAfterSave(kill_at)] if kill_at else [])
""")


@pytest.mark.slow
def test_resume_after_kill_9_ends_with_the_same_adapter(tiny_model, tmp_path):
    env = CHILD_ENV
    script = tmp_path / "run.py"
    script.write_text(_RUN)
    model = tiny_model("llama")
    straight = _workdir(tmp_path / "straight", model, _rows(40), _rows(4))
    subprocess.run([sys.executable, script, "0"], cwd=straight, env=env, check=True, capture_output=True)
    resumed = _workdir(tmp_path / "resumed", model, _rows(40), _rows(4))
    killed = subprocess.run([sys.executable, script, "4"], cwd=resumed, env=env, capture_output=True)
    assert killed.returncode == -9
    assert (resumed / "models/checkpoints/checkpoint-4/trainer_state.json").exists()
    assert not (resumed / "models/adapter").exists()
    done = subprocess.run([sys.executable, script, "0"], cwd=resumed, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from models/checkpoints/checkpoint-4" in done.stderr
    metrics = json.loads((resumed / "metrics/train.json").read_text())
    assert metrics["resumed_from_step"] == 4 and metrics["steps"] == 6
    # the loss of the whole run, not of the two steps after the resume
    assert metrics["train_loss"] == pytest.approx(json.loads((straight / "metrics/train.json").read_text())["train_loss"],
                                                  abs=1e-5)
    a = (straight / "models/adapter/adapter_model.safetensors").read_bytes()
    b = (resumed / "models/adapter/adapter_model.safetensors").read_bytes()
    assert a == b


@pytest.mark.slow
def test_two_process_ddp_run_writes_a_loadable_adapter(tiny_model, tmp_path):
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    root = _workdir(tmp_path / "ddp", tiny_model("llama"), _rows(16), _rows(4))
    (root / "params.yaml").write_text("train:\n  max_steps: 3\n  batch_size: 2\n  save_steps: 2\n  logging_steps: 1\n")
    env = CHILD_ENV
    # torchrun: on a CPU-only machine `accelerate launch --num_processes 2` starts one process (its
    # MULTI_CPU mode goes through mpirun); torchrun starts two, and Trainer picks gloo for them.
    launcher = Path(sys.executable).with_name("torchrun")
    proc = subprocess.run([str(launcher), "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "lorapipe", "train"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    metrics = json.loads((root / "metrics/train.json").read_text())
    assert metrics["processes"] == 2 and metrics["steps"] == 3
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(root / "models/base"), root / "models/adapter")
    with torch.no_grad():
        assert torch.isfinite(model(input_ids=torch.tensor([[1, 2, 3]])).logits).all()

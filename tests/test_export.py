"""Stages `convert` and `quantize` on a tiny merged Llama (hidden 64): the pinned llama.cpp converter,
llama-quantize and llama-imatrix run for real; the parity gate loads the files in llama.cpp.

One merged model and one F16 GGUF are built per module and shared; each test that needs a changed
input copies it first.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import re
import subprocess
import sys
import time

import pytest

from lorapipe.core import gguf_meta, parity
from lorapipe.core.errors import LorapipeError
from lorapipe.params import EvaluateParams, ExportParams, ParityParams
from lorapipe.stages.convert import convert
from lorapipe.stages.merge import merge
from lorapipe.core.retention import Gates
from lorapipe.stages.quantize import Files, check_type, quantize, valid_types

# Eval-split-like rows (ShareGPT): the parity gate renders them up to the last user turn.
EVAL_ROWS = [
    {"messages": [{"role": "user", "content": "I have been feeling really lonely since I moved to a new city."},
                  {"role": "assistant", "content": "Moving somewhere new can feel isolating. What do you miss most?"}]},
    {"messages": [{"role": "system", "content": "You are a warm, supportive listener."},
                  {"role": "user", "content": "My exam went badly and I feel like a failure."},
                  {"role": "assistant", "content": "One exam does not define you."},
                  {"role": "user", "content": "But everyone else did fine."},
                  {"role": "assistant", "content": "It is hard to compare yourself with others."}]},
    {"messages": [{"role": "user", "content": "最近工作压力很大，晚上总是睡不着。"},
                  {"role": "assistant", "content": "听起来你最近很辛苦。"}]},
    {"messages": [{"role": "user", "content": "我和最好的朋友吵架了，心里很难受。"},
                  {"role": "assistant", "content": "和重要的人争吵确实让人难过。"}]},
]
# Random tiny models have nearly flat logits, so quantization flips more argmaxes than on a real
# model (0.91-1.00 measured); the gate's default 0.8 is for trained models.
# F16 logits of tiny models are within 0.003 of HF (measured), so their bound is tighter than the default.
RANDOM_MODEL_PARITY = ParityParams(max_new_tokens=8, min_argmax_agreement_quant=0.5, max_abs_logit_diff=0.02)
# evaluate's defaults: the gates and the perplexity chunks quantize measures them on
DEFAULT_GATES = Gates(EvaluateParams().max_ppl_delta_pct, EvaluateParams().min_finetune_kept)
CANDIDATES = ["q4_k_m", "q5_k_m", "q6_k", "q8_0"]


@pytest.fixture(scope="module")
def exported(tiny_adapter, tmp_path_factory):
    base, adapter = tiny_adapter("llama")
    root = tmp_path_factory.mktemp("export-llama")
    merged = root / "merged"
    merge(base, adapter, merged)
    f16 = root / "model-f16.gguf"
    result = convert(merged, f16, "f16", name="tiny-support", description="tiny test model")
    return merged, f16, result


def write_rows(path, rows) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def run_quantize(exported, tiny_adapter, out, quant, *, gates=DEFAULT_GATES, candidates=CANDIDATES, train_rows=None,
                 **files):
    """Stage quantize's function on the shared tiny model: its merged folder, base and F16 file, the
    eval rows above; `train_rows` turns the importance matrix on."""
    merged, f16, _ = exported
    base, _ = tiny_adapter("llama")
    inputs = f16.parent  # the module's folder: tests list their own
    ex = ExportParams(quant=quant, quant_candidates=candidates, parity=RANDOM_MODEL_PARITY, imatrix=train_rows is not None)
    ep = EvaluateParams(max_ppl_delta_pct=gates.max_ppl_delta_pct, min_finetune_kept=gates.min_finetune_kept)
    files = {"ref_gguf": f16, "out": out, "merged_dir": merged, "base_dir": base,
             "eval_jsonl": write_rows(inputs / "eval.jsonl", EVAL_ROWS),
             "train_jsonl": write_rows(inputs / "train.jsonl", train_rows or []), **files}
    return quantize(ex, ep, Files(**files))


def test_convert_writes_chat_metadata(exported):
    merged, f16, result = exported
    meta = gguf_meta.metadata(f16)
    assert meta["general.name"] == "tiny-support"
    assert meta["general.description"] == "tiny test model"
    assert meta["tokenizer.chat_template"] == (merged / "chat_template.jinja").read_text()
    assert meta["tokenizer.ggml.pre"] == "smollm"  # recognised by the unpatched converter
    assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    assert set(result["tensor_types"]) == {"F16", "F32"}  # matrices F16, norms F32
    assert not list(f16.parent.glob(".model-f16.gguf.*"))


def test_convert_restores_token_types_of_a_transformers5_folder(exported, tmp_path):
    """A merged folder without added_tokens_decoder (as transformers 5 saves it) is converted through
    a fixed view: <|im_end|> stays a CONTROL token, the folder itself is left untouched."""
    merged, _, _ = exported
    bare = tmp_path / "bare"
    shutil.copytree(merged, bare)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    del config["added_tokens_decoder"]
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    before = (bare / "tokenizer_config.json").read_bytes()
    convert(bare, tmp_path / "model-f16.gguf")
    types = gguf_meta.reader(tmp_path / "model-f16.gguf").fields["tokenizer.ggml.token_type"].contents()
    assert types[2] == 3  # <|im_end|>: gguf TokenType.CONTROL
    assert (bare / "tokenizer_config.json").read_bytes() == before


def test_quantize_q4_k_m_shows_fallbacks_and_passes_parity(exported, tiny_adapter, tmp_path):
    out = tmp_path / "model-quant.gguf"
    metrics = run_quantize(exported, tiny_adapter, out, "q4_k_m")
    assert out.is_file() and metrics["quant"] == "Q4_K_M" == gguf_meta.file_type(out)
    # a fixed type is a one-row candidate table
    [row] = metrics["candidates"]
    assert row["type"] == "Q4_K_M" and row["passed"] and row["failures"] == []
    assert metrics["choice"].startswith("export.quant: Q4_K_M (fixed type")
    # hidden 64 is not a multiple of 256: no K-quant block fits, Q4_K -> Q5_0 and Q6_K -> Q8_0
    types = metrics["tensor_types"]
    assert types.get("Q5_0", 0) > 0 and types.get("Q8_0", 0) > 0 and "Q4_K" not in types and "Q6_K" not in types
    assert types == gguf_meta.tensor_types(out)
    assert metrics["size_bytes"] == out.stat().st_size < metrics["size_f16_bytes"]
    assert 5.0 < metrics["bits_per_weight"] < 9.0
    p = metrics["parity"]
    assert p["passed"] and p["tokens_match"] == p["template_match"] == p["n_prompts"] == 4
    assert p["bos_doubled"] == 0 and p["stop_tokens_ok"]
    assert p["f16_max_abs_logit_diff"] < 0.01 and p["f16_argmax_agreement"] >= 0.98
    assert p["quant_argmax_agreement"] >= 0.5


def test_quantize_with_imatrix(exported, tiny_adapter, tmp_path):
    train_rows = EVAL_ROWS * 8  # rendered: well over the 2 x 128 tokens llama-imatrix needs
    out = tmp_path / "model-quant.gguf"
    metrics = run_quantize(exported, tiny_adapter, out, "Q4_K_M", train_rows=train_rows)
    assert metrics["imatrix"] is True and out.is_file()
    # The file records the imatrix and its text by name only, not by their temporary paths: the
    # same inputs give the same bytes (and DVC hash) on every run.
    meta = gguf_meta.metadata(out)
    assert meta["quantize.imatrix.file"] == "imatrix.gguf" and meta["quantize.imatrix.dataset"] == "calibration.txt"
    again = tmp_path / "again" / "model-quant.gguf"
    run_quantize(exported, tiny_adapter, again, "Q4_K_M", train_rows=train_rows)
    assert again.read_bytes() == out.read_bytes()


def test_auto_keeps_the_first_candidate_that_passes(exported, tiny_adapter, tmp_path):
    """A threshold that Q4_K_M's file fails and Q8_0's passes: auto tries Q4_K_M, records why it failed,
    and keeps Q8_0 at the output path, with both rows in the table."""
    wide = Gates(max_ppl_delta_pct=1000.0, min_finetune_kept=-1000.0)
    q4 = run_quantize(exported, tiny_adapter, tmp_path / "q4" / "m.gguf", "q4_k_m", gates=wide)["candidates"][0]
    q8 = run_quantize(exported, tiny_adapter, tmp_path / "q8" / "m.gguf", "q8_0", gates=wide)["candidates"][0]
    # Q8_0 keeps more of the converted file than Q4_K_M (here: Q5_0/Q8_0 blocks, as hidden 64 fits no K-quant)
    assert abs(q8["ppl_delta_pct"]) < abs(q4["ppl_delta_pct"]), (q4, q8)
    between = Gates(max_ppl_delta_pct=(abs(q4["ppl_delta_pct"]) + abs(q8["ppl_delta_pct"])) / 2, min_finetune_kept=-1000.0)

    out = tmp_path / "model-quant.gguf"
    metrics = run_quantize(exported, tiny_adapter, out, "auto", gates=between, candidates=["q4_k_m", "q8_0"])
    assert metrics["quant"] == "Q8_0" == gguf_meta.file_type(out)
    assert [(r["type"], r["passed"]) for r in metrics["candidates"]] == [("Q4_K_M", False), ("Q8_0", True)]
    failed = metrics["candidates"][0]
    assert any("evaluate.max_ppl_delta_pct" in f for f in failed["failures"]), failed["failures"]
    assert failed["ppl_delta_pct"] == pytest.approx(q4["ppl_delta_pct"])  # the same measure, run to run
    assert metrics["candidates"][1]["size_mb"] > failed["size_mb"]
    assert "auto: Q8_0 is the first" in metrics["choice"] and "Q4_K_M failed" in metrics["choice"]
    assert metrics["size_bytes"] == out.stat().st_size
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no partial file left


def test_auto_with_no_passing_candidate_fails_with_the_table_and_leaves_nothing(exported, tiny_adapter, tmp_path):
    out = tmp_path / "model-quant.gguf"
    impossible = Gates(max_ppl_delta_pct=-1.0, min_finetune_kept=0.5)  # every file "costs" more than -1 %
    with pytest.raises(LorapipeError) as err:
        run_quantize(exported, tiny_adapter, out, "auto", gates=impossible, candidates=["q4_k_m", "q8_0"])
    text = str(err.value)
    assert "no candidate type passes every gate (nothing was written" in text
    assert re.search(r"^\s+Q4_K_M\s.*\sno$", text, re.M) and re.search(r"^\s+Q8_0\s.*\sno$", text, re.M)
    assert "Remedies:" in text and "full-precision base" in text and "train.max_steps" in text
    assert not list(tmp_path.iterdir())


def test_candidate_types_are_checked_before_any_work(exported, tiny_adapter, tmp_path):
    with pytest.raises(LorapipeError, match=r"unknown quantization type 'q4_km'"):
        run_quantize(exported, tiny_adapter, tmp_path / "m.gguf", "auto", candidates=["q4_km", "q8_0"])
    assert not list(tmp_path.iterdir())


def test_unknown_quant_type_lists_valid_ones():
    names = valid_types()
    assert {"Q4_K_M", "Q8_0", "Q5_K_S", "IQ4_XS", "F16"} <= set(names)
    assert check_type("q8_0") == "Q8_0"
    with pytest.raises(LorapipeError, match=r"export.quant: unknown quantization type 'Q4_KM'.*Q4_K_M.*Q8_0"):
        check_type("Q4_KM")


def test_parity_gate_fails_with_readable_diff_and_no_output(exported, tiny_adapter, tmp_path):
    """The F16 GGUF of the merged model checked against the *base* folder (adapter not merged):
    logits differ, the stage fails naming the figures, and nothing is left at the output path."""
    base, _ = tiny_adapter("llama")
    out = tmp_path / "model-quant.gguf"
    with pytest.raises(LorapipeError, match=r"parity gate failed.*\n.*logits: max \|HF - GGUF\| = .* > export.parity.max_abs_logit_diff"):
        run_quantize(exported, tiny_adapter, out, "Q8_0", merged_dir=base)
    assert not out.exists() and not list(tmp_path.iterdir())


def test_greedy_generation_stops_on_a_model_that_learned_to(tiny_gguf):
    """The scripted tiny model answers 'Hello world!' then <|im_end|>: llama.cpp must stop there."""
    folder, f16 = tiny_gguf("scripted")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello world!"}]}]
    report, _ = parity.check_f16(folder, f16, parity.eval_conversations(rows, 1), ParityParams(max_new_tokens=16))
    assert report.failures == [] and report.warnings == []
    assert report.figures["stop_fraction"] == 1.0 and report.figures["gen_tokens"] == [5]  # 4 scripted + EOS
    assert report.figures["hf_gen_tokens"] == [5] and report.figures["stops_on_its_own"] is True


def test_a_model_that_never_stops_passes_with_a_warning(tiny_gguf):
    """A random model runs to the token limit in HF and in llama.cpp alike: that is the model's
    behaviour, not a conversion defect, so the gate passes, says so and records it."""
    folder, f16 = tiny_gguf("random")
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello world!"}]}]
    report, _ = parity.check_f16(folder, f16, parity.eval_conversations(rows, 1), ParityParams(max_new_tokens=8))
    assert report.figures["hf_gen_tokens"] == [8] and report.figures["stops_on_its_own"] is False
    assert not [f for f in report.failures if "does not stop" in f]
    assert report.warnings and "not a conversion defect" in report.warnings[0]


def test_a_gguf_that_runs_on_where_hf_stops_is_a_conversion_defect():
    rep = parity.Report()
    assert parity.compare_stops("model-f16.gguf", [(True, 5), (False, 64), (False, 64)], [(False, 128)] * 3, 64, rep) is False
    assert len(rep.failures) == 1
    assert re.match(r"prompt 0: the HF merged model ends its greedy answer after 5 tokens, but model-f16.gguf does not "
                    r"stop within 128: .*conversion defect", rep.failures[0])
    ok = parity.Report()
    assert parity.compare_stops("m.gguf", [(True, 5), (True, 7)], [(True, 5), (True, 9)], 64, ok) is True
    assert ok.failures == [] and ok.warnings == []


def test_convert_bad_inputs(exported, tmp_path):
    merged, _, _ = exported
    no_config = tmp_path / "no-config"
    shutil.copytree(merged, no_config)
    (no_config / "config.json").unlink()
    with pytest.raises(LorapipeError, match=r"no-config/config.json: missing"):
        convert(no_config, tmp_path / "a.gguf")
    no_tok = tmp_path / "no-tokenizer"
    shutil.copytree(merged, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(LorapipeError, match=r"no tokenizer \(tokenizer.json or tokenizer.model\)"):
        convert(no_tok, tmp_path / "b.gguf")
    with pytest.raises(LorapipeError, match="export.outtype"):
        convert(merged, tmp_path / "c.gguf", "q4_k_m")
    assert not list(tmp_path.glob("*.gguf"))


def test_unsupported_architecture_is_named(exported, tmp_path):
    merged, _, _ = exported
    odd = tmp_path / "odd"
    shutil.copytree(merged, odd)
    config = json.loads((odd / "config.json").read_text())
    config["architectures"] = ["FrobnicatorForCausalLM"]
    (odd / "config.json").write_text(json.dumps(config))
    with pytest.raises(LorapipeError, match=r"architecture FrobnicatorForCausalLM is not supported by the pinned llama.cpp converter"):
        convert(odd, tmp_path / "odd.gguf")
    assert not (tmp_path / "odd.gguf").exists()


# The conversion, run for real, held at the last moment before its output is renamed into place (the
# worst moment for a kill): the test waits for that, whatever the machine's speed, then kills it.
_HELD_CONVERT = """
import os, sys, time
real_replace = os.replace
def held_replace(src, dst, *args, **kwargs):
    if os.path.basename(str(dst)) == os.path.basename(sys.argv[2]):
        open(sys.argv[3], "w").close()
        time.sleep(3600)
    return real_replace(src, dst, *args, **kwargs)
os.replace = held_replace
from lorapipe.stages.convert import convert
convert(sys.argv[1], sys.argv[2])
"""


def test_killed_conversion_leaves_no_output(exported, tmp_path):
    """kill -9 of `convert` (its whole process group) with the converted GGUF written but not yet renamed:
    nothing appears at the output path."""
    merged, _, _ = exported
    out = tmp_path / "model-f16.gguf"
    held = tmp_path / "held"
    proc = subprocess.Popen([sys.executable, "-c", _HELD_CONVERT, str(merged), str(out), str(held)],
                            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not held.exists():
            if proc.poll() is not None:
                pytest.fail(f"conversion exited ({proc.returncode}) before its output was complete: {proc.stderr.read()[-2000:]}")
            assert time.monotonic() < deadline, "conversion did not finish writing in 5 min"
            time.sleep(0.05)
        partial = [p for p in tmp_path.glob(".model-f16.gguf.*") if p.stat().st_size > 0]
        assert partial, "the complete GGUF is not in a temporary sibling"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not out.exists()


def test_truncated_gguf_is_a_clear_error(exported, tmp_path):
    merged, f16, _ = exported
    broken = tmp_path / "model-f16.gguf"
    data = f16.read_bytes()
    broken.write_bytes(data[: len(data) // 2])
    with pytest.raises(LorapipeError, match=r"model-f16.gguf: (not a readable GGUF file|llama.cpp failed to load)"):
        parity.load_gguf(broken)
    with pytest.raises(LorapipeError, match=r"model-f16.gguf: not a readable GGUF file"):
        quantize(ExportParams(quant="Q8_0", imatrix=False), EvaluateParams(),
                 Files(broken, tmp_path / "q.gguf", merged, merged, write_rows(tmp_path / "eval.jsonl", EVAL_ROWS)))
    assert not (tmp_path / "q.gguf").exists()

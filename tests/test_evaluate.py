"""Stage evaluate on tiny random-weight models through the real tools: transformers, the pinned
converter, llama-quantize, llama-tokenize, llama-perplexity, llama-bench and llama.cpp's bindings.

The workspace (two tiny Llama models with SmolLM2's real tokenizer, their F16 and Q4_K_M GGUFs) is
built once per module; every test then takes well under a minute on one thread.
"""

from __future__ import annotations

import json
import math
import re
import shutil

import pytest

from conftest import build_tiny_model
from lorapipe import params as params_mod
from lorapipe.core import paths
from lorapipe.core import perplexity as ppl
from lorapipe.core.errors import LorapipeError

DIALOGUES = [
    ("I feel anxious before every meeting at work.", "That sounds exhausting. What part of the meetings worries you most?"),
    ("My dog died last week and the house feels empty.", "I'm so sorry. Losing a companion leaves a real gap. Would you like to tell me about him?"),
    ("I can't sleep because I keep thinking about my debts.", "Money worries keep the mind racing at night. Have you talked to anyone about it?"),
    ("最近总是觉得很累，不想说话。", "听起来你最近承受了很多。愿意和我说说发生了什么吗？"),
    ("我考试没考好，爸妈很失望。", "这种感觉一定很难受。你自己是怎么看待这次考试的？"),
    ("Nobody at school talks to me.", "Feeling left out hurts. Is there anyone you'd like to get to know better?"),
]
PROMPTS = ["I have been feeling lonely lately.", "我和最好的朋友吵架了。"]
FAST = {"threads": 1, "ctx": 64, "max_chunks": 4, "max_new_tokens": 8, "speed_prompt_tokens": 16,
        "speed_gen_tokens": 8, "prompts": PROMPTS,
        "predict": {"max_rows": 6, "max_new_tokens": 8, "batch_size": 4, "parallel": 2}}


def eval_rows(n: int) -> list[dict]:
    return [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}],
             "source": "test", "origin": f"test:{i}"}
            for i, (u, a) in enumerate(DIALOGUES[i % len(DIALOGUES)] for i in range(n))]


def write_rows(path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, tiny_model, smollm2_tokenizer_dir):
    """A repository-shaped folder with every input of stage evaluate (paths as in core/paths.py)."""
    from lorapipe.stages.convert import convert
    from lorapipe.stages.quantize import quantize_file

    ws = tmp_path_factory.mktemp("evaluate-ws")
    shutil.copytree(tiny_model("llama"), ws / paths.MERGED_DIR)
    build_tiny_model("llama", smollm2_tokenizer_dir, ws / paths.BASE_DIR, seed=1)  # differs from merged
    convert(ws / paths.MERGED_DIR, ws / paths.gguf_path("f16"), "f16")
    quantize_file(ws / paths.gguf_path("f16"), ws / paths.QUANT_GGUF, "q4_k_m")
    write_rows(ws / paths.EVAL_JSONL, eval_rows(24))
    return ws


def run_kwargs(ws, quant="q4_k_m") -> dict:
    return dict(eval_jsonl=ws / paths.EVAL_JSONL, base_dir=ws / paths.BASE_DIR, merged_dir=ws / paths.MERGED_DIR,
                ref_gguf=ws / paths.gguf_path("f16"), quant_gguf=ws / paths.QUANT_GGUF)


def test_stage_writes_metrics_plot_and_samples(workspace, monkeypatch):
    from lorapipe.stages import evaluate

    monkeypatch.chdir(workspace)
    summary = evaluate.run(params_mod.parse({"evaluate": FAST, "export": {"outtype": "f16"}}))
    m = json.loads((workspace / evaluate.METRICS).read_text())

    # the conversion check: F16 GGUF (llama-perplexity) vs HF merged (torch), same tokens and chunks
    assert abs(m["ppl_f16_vs_hf_pct"]) <= 0.5, m
    assert math.isclose(m["ppl_f16_vs_hf_pct"], (m["ppl_f16"] - m["ppl_hf_merged"]) / m["ppl_hf_merged"] * 100)
    assert m["ppl_hf_base"] != m["ppl_hf_merged"]  # two different models were scored
    assert (m["ctx_used"], m["chunks"], m["scored_tokens"]) == (64, 4, 4 * 31)
    assert m["kld_quant_vs_f16"] > 0 and 0 < m["same_top_token_pct"] <= 100
    assert math.isclose(m["ppl_delta_pct"], (m["ppl_quant"] - m["ppl_f16"]) / m["ppl_f16"] * 100)
    assert m["size_ratio"] < 1 and m["size_quant_mb"] < m["size_f16_mb"]
    for key in ("decode_tok_s_hf_merged", "decode_tok_s_f16", "decode_tok_s_quant", "prompt_tok_s_quant"):
        assert m[key] > 0 and math.isfinite(m[key]), key
    assert summary["ppl_quant"] == m["ppl_quant"]

    # assistant tokens only, the same ids for every variant (train's masking)
    assert m["assistant_tokens"] > 0
    for key in ("hf_base", "hf_merged", "f16", "quant"):
        assert math.isfinite(m[f"loss_assistant_{key}"]) and m[f"loss_assistant_{key}"] > 0, key
    assert abs(m["loss_assistant_f16"] - m["loss_assistant_hf_merged"]) < 0.01 * m["loss_assistant_hf_merged"]
    assert m["kld_assistant_f16_vs_merged"] < m["kld_assistant_hf_base_vs_merged"]  # F16 is the merged model
    assert m["kld_assistant_quant_vs_merged"] >= 0

    variants = json.loads((workspace / evaluate.PLOT).read_text())
    assert [v["variant"] for v in variants] == ["base (HF)", "merged (HF)", "f16 (GGUF)", "q4_k_m (GGUF)"]
    assert variants[3]["ppl"] == m["ppl_quant"] and variants[3]["size_mb"] == m["size_quant_mb"]
    assert variants[1]["ppl_assistant"] == pytest.approx(math.exp(m["loss_assistant_hf_merged"]))

    samples = (workspace / evaluate.SAMPLES).read_text()
    for prompt in PROMPTS:
        assert f". {prompt}" in samples
    for variant in ("**base (HF)**", "**merged (HF)**", "**q4_k_m (GGUF)**"):
        assert samples.count(variant) == len(PROMPTS)
    assert "<|im_start|>" not in samples and "<|im_end|>" not in samples

    # phase predict: every variant answered the same 6 eval prompts, in LLaMA-Factory's files
    assert m["answers_rows"] == 6 and m["answers_s"] > 0
    labels = None
    for variant in ("hf_base", "hf_merged", "quant"):
        folder = workspace / evaluate.PREDICTIONS / variant
        rows = [json.loads(x) for x in (folder / "generated_predictions.jsonl").read_text().splitlines()]
        assert len(rows) == 6 and all(r["prompt"].endswith("<|im_start|>assistant\n") for r in rows)
        assert labels in (None, [r["label"] for r in rows])
        labels = [r["label"] for r in rows]
        results = json.loads((folder / "predict_results.json").read_text())
        assert results["predict_bleu-4"] == m[f"answers_bleu4_{variant}"]
        assert results["predict_rouge-l"] == m[f"answers_rougel_{variant}"]
        assert 0 <= m[f"answers_cut_{variant}"] <= 1 and m[f"answers_len_{variant}"] >= 0
    assert set(labels) <= {a for _, a in DIALOGUES}
    assert 0 <= m["answers_exact_quant_vs_merged"] <= 1 and m["answers_distinct1_ref"] > 0
    plot = json.loads((workspace / evaluate.ANSWERS_PLOT).read_text())
    assert [r["variant"] for r in plot] == ["base (HF)", "merged (HF)", "quantized (GGUF)"]


def test_quantize_measures_are_read_when_they_hold_for_the_files(workspace, tmp_path, capsys):
    """Stage quantize records what its gates measured; evaluate reads those figures (the same numbers it
    measures itself) when the content hashes match its files, and measures again when one differs."""
    from test_export import RANDOM_MODEL_PARITY

    from lorapipe.core.retention import Measured, measures_path
    from lorapipe.stages.evaluate import evaluate
    from lorapipe.stages.quantize import Files, quantize, quantize_file

    ws = tmp_path / "ws"
    shutil.copytree(workspace, ws)
    kwargs = run_kwargs(ws)
    measures = measures_path(kwargs["quant_gguf"])
    ep = params_mod.EvaluateParams(**FAST)
    quantize(params_mod.ExportParams(quant="q4_k_m", parity=RANDOM_MODEL_PARITY, imatrix=False, threads=1), ep,
             Files(kwargs["ref_gguf"], kwargs["quant_gguf"], kwargs["merged_dir"], kwargs["base_dir"],
                   kwargs["eval_jsonl"], measures=measures))
    capsys.readouterr()

    here = evaluate(ep, **kwargs).metrics
    assert "KL divergence model-quant.gguf" in capsys.readouterr().err
    read, variants, *_ = evaluate(ep, **kwargs, measures=measures)
    err = capsys.readouterr().err
    assert f"figures from {measures}" in err and "KL divergence" not in err and "assistant tokens" not in err
    speeds = {k for k in here if "tok_s" in k or "speedup" in k or k == "answers_s"}
    assert speeds and set(read) == set(here)
    differ = {k: (here[k], read[k]) for k in here.keys() - speeds
              if read[k] != (pytest.approx(here[k], rel=1e-9) if isinstance(here[k], float) else here[k])}
    assert differ == {}
    assert variants[3]["ppl"] == read["ppl_quant"] == Measured.read(measures).quant.ppl

    # another quantized file at the same path: its hash differs, so evaluate measures it
    quantize_file(kwargs["ref_gguf"], kwargs["quant_gguf"], "q8_0")
    other = evaluate(ep, **kwargs, measures=measures).metrics
    err = capsys.readouterr().err
    assert "was measured on another quantized file (content hash differs): measuring" in err and "KL divergence" in err
    assert other["quant"] == "q8_0" and other["ppl_quant"] != read["ppl_quant"]

    measures.write_text("{}")
    with pytest.raises(LorapipeError, match=re.escape(f"{measures}: not a record of stage quantize's measures")):
        evaluate(ep, **kwargs, measures=measures)


def test_quantization_gate_fails_above_threshold(workspace):
    from lorapipe.stages.evaluate import evaluate

    ep = params_mod.EvaluateParams(**{**FAST, "max_ppl_delta_pct": -100.0})  # any quantization "costs" more
    with pytest.raises(LorapipeError, match=r"(?s)quantization gate failed.*costs too much.*evaluate\.max_ppl_delta_pct = -100"):
        evaluate(ep, **run_kwargs(workspace))


def test_gates_name_the_cause_with_the_figures_of_a_lost_fine_tune():
    """The figures of a real Gemma-3-270M run whose Q4_K_M file had snapped back to the base it came
    from: perplexity far *below* its own F16, and most of the fine-tune gone."""
    from pathlib import Path

    from lorapipe.core.assistant_scores import Scores
    from lorapipe.core.retention import REMEDIES, Figures, Gates, gate_failures

    ep = params_mod.EvaluateParams()
    gates = Gates(ep.max_ppl_delta_pct, ep.min_finetune_kept)
    scores = {"hf_merged": Scores(4.16, None), "hf_base": Scores(5.31, 0.35)}
    lost = Figures(ppl=5.006, ppl_delta_pct=(5.006 - 5.497) / 5.497 * 100, kld=0.079, same_top_pct=80.0, rms_dp_pct=5.0,
                   assistant=Scores(5.2, 0.33), finetune_kept=1 - 0.33 / 0.35)
    failures = gate_failures(gates, lost, quant_gguf=Path("models/gguf/model-quant.gguf"), quant_type="Q4_K_M",
                             ref_gguf=Path("model-f16.gguf"), ppl_ref=5.497, scores=scores)
    assert len(failures) == 2
    assert re.search(r"perplexity 5.0060 is 8.93 % \*below\* its own unquantized file's .*most likely the base", failures[0])
    assert re.search(r"\(Q4_K_M\): the quantized model lost the fine-tune: it kept 6% of it \(limit "
                     r"evaluate.min_finetune_kept = 50%\).*0.3300.*0.3500.*Q4_K_M grid", failures[1])
    assert re.search(r"q6_k or q8_0 to export.quant_candidates.*full-precision base.*train.max_steps", REMEDIES)
    kept = Figures(ppl=4.17, ppl_delta_pct=(4.17 - 4.093) / 4.093 * 100, kld=0.02, same_top_pct=90.0, rms_dp_pct=3.0,
                   assistant=Scores(4.2, 0.1), finetune_kept=0.7)
    assert gate_failures(gates, kept, quant_gguf=Path("q.gguf"), quant_type="Q4_K_M", ref_gguf=Path("f.gguf"),
                         ppl_ref=4.093, scores=scores) == []


def test_short_eval_split_shrinks_context_and_still_agrees(workspace, tmp_path):
    """Two dialogues: shorter than 2 x ctx, so ctx shrinks; fewer than 100 scored tokens, so the KLD
    figures come from llama-perplexity's per-chunk rows rather than its final block."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    f16, quant = workspace / paths.gguf_path("f16"), workspace / paths.QUANT_GGUF
    tok = AutoTokenizer.from_pretrained(workspace / paths.MERGED_DIR)
    text = ppl.render_text(eval_rows(2), tok)
    text_file = tmp_path / "eval.txt"
    text_file.write_text(text, encoding="utf-8")
    stream = ppl.check_same_ids(tok, ppl.hf_text_ids(tok, text), ppl.llama_text_ids(f16, text_file), f16)
    plan = ppl.plan_chunks(len(stream.ids), 512, 32)
    assert plan.shrunk and plan.ctx == len(stream.ids) // 2 and plan.n_chunks == 2 and plan.scored < 100

    ppl_f16 = ppl.gguf_perplexity(f16, text_file, plan, 1, tmp_path / "f16.logits")
    kld = ppl.gguf_kl_divergence(quant, tmp_path / "f16.logits", plan, 1)
    model = AutoModelForCausalLM.from_pretrained(workspace / paths.MERGED_DIR).eval()
    ppl_hf = ppl.hf_perplexity(model, stream, plan)
    assert abs(ppl_f16 - ppl_hf) / ppl_hf * 100 <= 0.5, (ppl_f16, ppl_hf)
    assert kld.kld >= 0 and 0 <= kld.same_top_pct <= 100 and kld.ppl > 0


def test_bos_added_by_the_vocab_is_placed_like_llama_perplexity_does(workspace, tmp_path):
    """SmolLM2's GGUF adds no BOS; a copy with tokenizer.ggml.add_bos_token = true (set with gguf-py's
    own script) makes llama.cpp prepend BOS and overwrite every chunk's first token with it."""
    import dataclasses
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = tmp_path / "model-f16.gguf"
    shutil.copyfile(workspace / paths.gguf_path("f16"), gguf)
    subprocess.run([sys.executable, "-m", "gguf.scripts.gguf_set_metadata", str(gguf), "tokenizer.ggml.add_bos_token",
                    "1", "--force"], check=True, capture_output=True)
    tok = AutoTokenizer.from_pretrained(workspace / paths.MERGED_DIR)
    text = ppl.render_text(eval_rows(12), tok)
    (tmp_path / "eval.txt").write_text(text, encoding="utf-8")
    hf_ids = ppl.hf_text_ids(tok, text)
    stream = ppl.check_same_ids(tok, hf_ids, ppl.llama_text_ids(gguf, tmp_path / "eval.txt"), gguf)
    assert stream.bos_id == tok.bos_token_id and stream.ids == [tok.bos_token_id] + hf_ids

    plan = ppl.plan_chunks(len(stream.ids), 64, 4)
    ppl_gguf = ppl.gguf_perplexity(gguf, tmp_path / "eval.txt", plan, 1)
    model = AutoModelForCausalLM.from_pretrained(workspace / paths.MERGED_DIR).eval()
    gap = abs(ppl_gguf - ppl.hf_perplexity(model, stream, plan))
    gap_without_chunk_bos = abs(ppl_gguf - ppl.hf_perplexity(model, dataclasses.replace(stream, bos_id=None), plan))
    assert gap / ppl_gguf * 100 <= 0.5 and gap < gap_without_chunk_bos


def test_eval_split_below_two_minimal_chunks_is_a_clear_error():
    with pytest.raises(LorapipeError, match=r"data/clean/eval\.jsonl: the eval split is 20 tokens long; perplexity needs at least 32"):
        ppl.plan_chunks(20, 256, 32, "data/clean/eval.jsonl")
    assert ppl.plan_chunks(1000, 256, 32) == ppl.ChunkPlan(256, 3, False)
    assert ppl.plan_chunks(1000, 256, 2).n_chunks == 2


def test_missing_or_truncated_gguf_is_named(workspace, tmp_path):
    from lorapipe.stages.evaluate import evaluate

    ep = params_mod.EvaluateParams(**FAST)
    missing = tmp_path / "model-quant.gguf"
    with pytest.raises(LorapipeError, match=r"model-quant\.gguf: GGUF file not found; it is made by stage quantize"):
        evaluate(ep, **{**run_kwargs(workspace), "quant_gguf": missing})
    broken = tmp_path / "model-q4_k_m.gguf"
    broken.write_bytes((workspace / paths.QUANT_GGUF).read_bytes()[:4096])  # truncated copy
    with pytest.raises(LorapipeError, match=re.escape(f"on {broken}: llama-perplexity failed with exit code 1")):
        evaluate(ep, **{**run_kwargs(workspace), "quant_gguf": broken})


def test_an_empty_eval_split_names_the_param_to_change(workspace, tmp_path):
    from lorapipe.stages.evaluate import evaluate

    empty = tmp_path / "eval.jsonl"
    empty.write_text("", encoding="utf-8")
    with pytest.raises(LorapipeError, match=re.escape(f"{empty}: the eval split is empty; set data.split.eval_fraction > 0")):
        evaluate(params_mod.EvaluateParams(**FAST), **{**run_kwargs(workspace), "eval_jsonl": empty})


def test_llama_perplexity_failure_shows_its_stderr_tail(workspace, tmp_path):
    stale = tmp_path / "f16.logits"
    stale.write_bytes(b"not a logits file\n")
    with pytest.raises(LorapipeError) as err:
        ppl.gguf_kl_divergence(workspace / paths.QUANT_GGUF, stale, ppl.ChunkPlan(64, 4, False), 1)
    what, tail = str(err.value).split("stderr tail:")
    assert "llama-perplexity --kl-divergence on" in what and "no KL-divergence result" in what
    assert "does not look like a file containing log-probabilities" in tail  # llama.cpp's own words


def test_token_mismatch_says_where(workspace):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(workspace / paths.MERGED_DIR)
    ids = ppl.hf_text_ids(tok, "I feel sad today. 我很难过。")
    assert ppl.check_same_ids(tok, ids, ids, "x.gguf") == ppl.Stream(ids, None)
    assert ppl.check_same_ids(tok, ids, [1] + ids, "x.gguf") == ppl.Stream([1] + ids, 1)  # llama.cpp's BOS
    other = ids[:3] + [ids[3] + 1] + ids[4:]
    with pytest.raises(LorapipeError, match=r"x\.gguf\): HF \d+ tokens, llama\.cpp \d+, first difference at token 3"):
        ppl.check_same_ids(tok, ids, other, "x.gguf")


def test_parse_kl_divergence_reads_final_block_or_last_chunk_row():
    # Excerpts of real llama-perplexity --kl-divergence output (pinned build, the tiny Q4_K_M vs F16).
    rows = """chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1    50763.4052 ± 1610.0779      -0.00194 ±    0.00091       0.00002 ±    0.00000     0.000 ±  0.000 %    100.000 ±  0.000 %
   2    50346.9980 ± 1221.8905      -0.00184 ±    0.00072       0.00002 ±    0.00000     0.000 ±  0.000 %    100.000 ±  0.000 %
"""
    final = rows + """====== Perplexity statistics ======
Mean PPL(Q)                   : 49987.888088 ± 784.669622
Mean PPL(base)                : 50054.509313 ± 786.504793
Cor(ln(PPL(Q)), ln(PPL(base))):  99.94%
Mean ln(PPL(Q)/PPL(base))     :  -0.001332 ±   0.000560
====== KL divergence statistics ======
Mean    KLD:   0.000020 ±   0.000001
Maximum KLD:   0.000040
====== Token probability statistics ======
Mean    Δp:  0.000 ± 0.000 %
RMS Δp    :  0.000 ± 0.000 %
Same top p: 100.000 ± 0.000 %
"""
    r = ppl.parse_kl_divergence(final)
    assert (r.ppl, r.ln_ppl_ratio, r.kld, r.rms_dp_pct, r.same_top_pct) == (49987.888088, -0.001332, 0.00002, 0.0, 100.0)
    r = ppl.parse_kl_divergence(rows)  # < 100 scored tokens: no final block, the last row has the totals
    assert (r.ppl, r.ln_ppl_ratio, r.kld, r.same_top_pct) == (50346.998, -0.00184, 0.00002, 100.0)
    with pytest.raises(ValueError):
        ppl.parse_kl_divergence("perplexity: tokenizing the input ..")

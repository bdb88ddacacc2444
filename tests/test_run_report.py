"""The ui's run page reads the converted file's figures under the type evaluate used (f16 or bf16)."""

from __future__ import annotations

from lorapipe.core import run_report
from lorapipe.params import parse


def bf16_run() -> dict:
    ev = {"quant": "Q8_0", "unquantized": "bf16", "ppl_hf_base": 5.04, "ppl_hf_merged": 5.497, "ppl_bf16": 5.4975,
          "ppl_quant": 5.51, "ppl_bf16_vs_hf_pct": 0.01, "ppl_delta_pct": 0.23, "kld_quant_vs_bf16": 0.004,
          "loss_assistant_bf16": 4.164, "size_bf16_mb": 540.0, "decode_tok_s_bf16": 20.0, "finetune_kept": 0.97}
    quantize = {"parity": {"n_prompts": 2, "tokens_match": 2, "template_match": 2, "bos_doubled": 0,
                           "stop_fraction": 0.0, "hf_stop_fraction": 0.0, "f16_max_abs_logit_diff": 0.3,
                           "max_abs_logit_diff_limit": 0.4, "f16_argmax_agreement": 1.0, "quant_argmax_agreement": 0.9}}
    return {"eval": ev, "quantize": quantize}


def test_variants_show_the_bf16_file_figures():
    table = run_report.variants(bf16_run()["eval"])
    row = table.loc["bf16 (GGUF)"]
    assert (row["ppl"], row["assistant loss"], row["size MB"]) == (5.4975, 4.164, 540.0)
    assert table.loc["Q8_0 (GGUF)", "KLD vs bf16"] == 0.004


def test_gates_read_bf16_keys_and_the_recorded_logit_limit():
    table = run_report.gates(bf16_run(), parse({})).set_index("gate")
    assert table.loc["ppl bf16 GGUF vs HF merged %", "measured"] == "0.01"
    # 0.3 is over the F16 limit of params.yaml but within the limit the gate used for BF16 weights
    assert table.loc["max |logit| unquantized vs HF", "passed"] == "pass"
    assert set(table["passed"]) == {"pass"}


def test_an_f16_run_without_the_new_keys_still_reads():
    ev = {"quant": "Q4_K_M", "ppl_f16": 3.1, "ppl_f16_vs_hf_pct": 0.0, "ppl_delta_pct": 2.0}
    assert run_report.variants(ev).loc["f16 (GGUF)", "ppl"] == 3.1


def test_the_run_page_shows_every_quantization_candidate_and_the_choice():
    run = bf16_run()
    run["quantize"].update(choice="auto: Q8_0 is the first of export.quant_candidates (Q4_K_M, Q8_0) that passes every "
                                  "gate; Q4_K_M failed",
                           candidates=[{"type": "Q4_K_M", "size_mb": 240.0, "bits_per_weight": 5.2, "argmax_agreement": 0.8,
                                        "ppl_delta_pct": -6.1, "finetune_kept": 0.69, "passed": False},
                                       {"type": "Q8_0", "size_mb": 300.0, "bits_per_weight": 8.5, "argmax_agreement": 0.92,
                                        "ppl_delta_pct": -1.1, "finetune_kept": 0.996, "passed": True}])
    table = run_report.quant_candidates(run["quantize"])
    assert list(table.index) == ["Q4_K_M", "Q8_0"]
    assert list(table["passed"]) == ["FAIL", "pass"] and table.loc["Q8_0", "fine-tune kept"] == 0.996
    assert run_report.quant_candidates({}).empty  # a quantize.json without candidates shows no table


def test_the_run_page_shows_answer_scores_and_answers_side_by_side(tmp_path):
    import json
    import shutil

    from conftest import REPO_ROOT

    run = REPO_ROOT / "tests" / "fixtures" / "run"  # a real default run's files
    ev = json.loads((run / "metrics" / "eval.json").read_text(encoding="utf-8"))
    table = run_report.answer_scores(ev)
    assert list(table.index) == ["base (HF)", "merged (HF)", "quantized (GGUF)", "reference"]
    assert table.loc["merged (HF)", "BLEU-4"] == ev["answers_bleu4_hf_merged"]
    assert table.loc["quantized (GGUF)", "same as merged"] == ev["answers_exact_quant_vs_merged"]
    assert table.loc["reference", "distinct-2"] == ev["answers_distinct2_ref"]

    assert run_report.answers_side_by_side(tmp_path) is None  # evaluate not run yet
    shutil.copytree(run / "reports", tmp_path / "reports")
    (tmp_path / "metrics").mkdir()
    (tmp_path / "metrics" / "eval.json").write_text(json.dumps(ev), encoding="utf-8")
    side = run_report.answers_side_by_side(tmp_path)
    assert len(side) == ev["answers_rows"]
    assert list(side.columns) == ["prompt", "reference", "base (HF)", "merged (HF)", "quantized (GGUF)"]
    page = run_report.render(tmp_path, parse({}), dvc="/nonexistent/dvc")
    assert "Answers side by side" in page and "BLEU-4" in page
    assert "<|im_start|>" not in page  # the rendered prompts' special tokens are escaped text
    assert "&lt;|im_start|&gt;" in page

    broken = tmp_path / "reports" / "predictions" / "quant" / "generated_predictions.jsonl"
    broken.write_text("{not json\n", encoding="utf-8")
    assert "generated_predictions.jsonl:1: not JSON" in run_report.render(tmp_path, parse({}), dvc="/nonexistent/dvc")

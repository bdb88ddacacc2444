"""Progress of the long steps: core.log's helper, and every stage's slow parts reporting through it on
tiny models with the real tools (transformers, the converter, llama-imatrix, llama-quantize,
llama-perplexity, llama-bench, llama.cpp's bindings).

Under pytest stderr is not a terminal, so the helper writes the plain lines a `dvc repro` log gets:
`<step>: started`, `<step>: done, <count>/<total> <unit>, <time>`. The tests check that each step
reports and that counts reach their totals, not the wording around them.
"""

from __future__ import annotations

import re
import shutil

import pytest

from lorapipe.core import log
from lorapipe.core.llamacpp_run import run_tool, tensor_progress


def done_lines(err: str) -> dict[str, str]:
    """{step: what its closing line says} for every `<step>: done, ...` line."""
    return {m[1]: m[2] for m in re.finditer(r"(?m)^(.+?): done, (.*)$", err)}


def test_plain_lines_when_not_a_terminal(capsys, monkeypatch):
    monkeypatch.setattr(log, "LOG_INTERVAL_S", 0.0)
    monkeypatch.setattr(log, "TICK_S", 0.05)
    items = list(log.progress(range(3), "step", unit="row"))
    with log.Activity("blocking call") as act:
        import time

        time.sleep(0.2)  # long enough for the ticker to write an interim line
        act.set(5, total=10)
    err = capsys.readouterr().err
    assert items == [0, 1, 2]
    assert "\r" not in err  # no bar animation in a log
    assert err.splitlines()[0] == "step: started (3 row)"
    assert done_lines(err)["step"].startswith("3/3 row")
    assert re.search(r"(?m)^blocking call: \d+\.\d s$", err)  # interim: elapsed time, no counts yet
    assert done_lines(err)["blocking call"].startswith("5/10 it")


def test_tool_progress_is_relayed_from_llama_quantize(tiny_gguf, tmp_path, capsys):
    _, f16 = tiny_gguf("random")
    run_tool("llama-quantize", [f16, tmp_path / "q8.gguf", "Q8_0"], what="quantize", progress=tensor_progress("q8_0"))
    n, total = re.match(r"(\d+)/(\d+) tensor", done_lines(capsys.readouterr().err)["q8_0"]).groups()
    assert n == total and int(total) > 10


@pytest.mark.slow
def test_every_slow_stage_part_reports_progress(tiny_adapter, tiny_gguf, tmp_path, capsys, monkeypatch):
    """base (dequantize, save), merge, convert, quantize (imatrix, llama-quantize, parity per prompt),
    evaluate (perplexity per variant and chunk, llama-bench runs, HF speed runs, samples)."""
    from test_evaluate import FAST, eval_rows, write_rows
    from test_export import EVAL_ROWS, RANDOM_MODEL_PARITY

    from lorapipe import params as params_mod
    from lorapipe.core import paths
    from lorapipe.stages import evaluate
    from lorapipe.stages.base import _save_from_gguf
    from lorapipe.stages.convert import convert
    from lorapipe.stages.merge import merge
    from lorapipe.stages.quantize import Files, quantize

    _, tiny_f16 = tiny_gguf("random")
    _save_from_gguf(tiny_f16, tmp_path / "base-from-gguf")
    base, adapter = tiny_adapter("llama")
    ws = tmp_path / "ws"
    merge(base, adapter, ws / paths.MERGED_DIR)
    shutil.copytree(base, ws / paths.BASE_DIR)
    convert(ws / paths.MERGED_DIR, ws / paths.gguf_path("f16"), "f16")
    write_rows(ws / paths.EVAL_JSONL, EVAL_ROWS)
    write_rows(ws / paths.TRAIN_JSONL, EVAL_ROWS * 8)
    quantize(params_mod.ExportParams(quant="q4_k_m", parity=RANDOM_MODEL_PARITY), params_mod.EvaluateParams(),
             Files(ws / paths.gguf_path("f16"), ws / paths.QUANT_GGUF, ws / paths.MERGED_DIR, ws / paths.BASE_DIR,
                   ws / paths.EVAL_JSONL, ws / paths.TRAIN_JSONL))
    write_rows(ws / paths.EVAL_JSONL, eval_rows(24))  # no record of quantize's (Files.measures): evaluate measures
    monkeypatch.chdir(ws)
    evaluate.run(params_mod.parse({"evaluate": FAST, "export": {"outtype": "f16"}}))

    done = done_lines(capsys.readouterr().err)

    def counted(step: str, unit: str) -> None:
        assert step in done, f"no progress for {step!r}; got {sorted(done)}"
        m = re.match(rf"(\d+)/(\d+) {unit}", done[step])
        assert m and m[1] == m[2] and int(m[2]) > 0, (step, done[step])

    for step in ("base: dequantizing model-random-f16.gguf", "base: saving safetensors", "merge: loading and merging",
                 "merge: saving safetensors"):
        assert step in done, f"no progress for {step!r}; got {sorted(done)}"  # blocking calls: elapsed time only
    counted("convert: tensors", "%")
    counted("quantize: importance matrix", "pass")
    counted("quantize: Q4_K_M", "tensor")
    for step in ("quantize: parity, greedy stop", "quantize: parity, logits f16 vs HF", "quantize: parity, f16 logits",
                 "quantize: parity, quantized logits"):
        counted(step, "prompt")
    counted("perplexity model-f16.gguf", "chunk")
    counted("KL divergence model-quant.gguf", "chunk")
    counted("assistant tokens HF merged", "row")
    counted("assistant tokens HF base", "row")
    counted("assistant tokens model-quant.gguf", "row")
    counted("evaluate: perplexity HF merged", "batch")
    counted("evaluate: perplexity HF base", "batch")
    counted("speed (HF)", "run")
    counted("llama-bench model-f16.gguf", "run")
    counted("llama-bench model-quant.gguf", "run")
    counted("evaluate: samples (HF)", "batch")
    counted("evaluate: answers hf_merged", "batch")
    counted("evaluate: samples model-quant.gguf", "prompt")

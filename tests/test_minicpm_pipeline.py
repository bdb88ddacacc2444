"""MiniCPM-1 through every stage: a tiny remote-code checkpoint (tests/test_minicpm_fixture.py) as
model.source, with model.trust_remote_code passed by base, train, merge, convert and the quantize
gate; without the flag it fails at base, naming the key."""

from __future__ import annotations

import contextlib
import json
import math

import pytest

from lorapipe import params as params_mod
from lorapipe.core import gguf_meta, paths
from lorapipe.core.errors import LorapipeError
from conftest import write_jsonl
from test_minicpm_fixture import make_tiny_minicpm

ROWS = [{"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}], "source": "t", "origin": f"t:{i}"}
        for i, (u, a) in enumerate([("I feel lonely since I moved.", "That sounds hard. What do you miss most?"),
                                    ("我考试没考好。", "这一定让你很难受。愿意说说吗？"),
                                    ("I can't sleep at night.", "Worries keep the mind awake. What is on your mind?")] * 4)]


def params(source, trust: bool) -> params_mod.Params:
    return params_mod.parse({
        "model": {"source": str(source), "preset": None, "trust_remote_code": trust},
        "train": {"max_steps": 2, "batch_size": 4, "cutoff_len": 64, "save_steps": 2, "lr": 1e-3},
        "lora": {"rank": 4, "alpha": 8},
        "export": {"outtype": "auto", "quant": "q4_k_m", "imatrix": False, "threads": 1,
                   # a random model: quantization moves its flat logits a lot, and it never learned to stop
                   "parity": {"n_prompts": 2, "max_new_tokens": 8, "min_argmax_agreement_quant": 0.3}},
    })


def test_minicpm1_needs_the_flag_and_then_runs_every_stage(tmp_path):
    from lorapipe.stages import base, convert, merge, quantize, train

    source = make_tiny_minicpm(tmp_path / "minicpm")
    work = tmp_path / "work"
    work.mkdir()
    with contextlib.chdir(work):
        with pytest.raises(LorapipeError, match=r"model_type 'minicpm'\) needs its own modeling code.*model.trust_remote_code: true"):
            base.run(params(source, trust=False))
        assert not paths.BASE_DIR.exists()

        on = params(source, trust=True)
        base.run(on)
        assert sorted(p.name for p in paths.BASE_DIR.glob("*.py")) == ["configuration_minicpm.py", "modeling_minicpm.py"]
        assert "auto_map" in json.loads((paths.BASE_DIR / "config.json").read_text())

        write_jsonl(paths.TRAIN_JSONL, ROWS[:9])
        write_jsonl(paths.EVAL_JSONL, ROWS[9:])
        summary = train.run(on)
        assert summary["steps"] == 2 and math.isfinite(summary["eval_loss"]) and summary["eval_loss"] > 0
        merge.run(on)
        assert sorted(p.name for p in paths.MERGED_DIR.glob("*.py")) == ["configuration_minicpm.py", "modeling_minicpm.py"]
        result = convert.run(on)
        assert result["arch"] == "minicpm" and result["outtype"] == "f16"  # auto: not a family that needs bf16
        assert paths.gguf_path("auto").is_file()
        quantize.run(on)  # the parity gate: tokens, template, stop tokens, logits of HF (remote code) vs GGUF
        figures = json.loads((paths.METRICS_DIR / "quantize.json").read_text())["parity"]
        assert figures["passed"] and figures["f16_max_abs_logit_diff"] < 0.05 and figures["tokens_match"] == 2
        assert gguf_meta.metadata(paths.QUANT_GGUF)["general.architecture"] == "minicpm"

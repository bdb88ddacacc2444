"""scripts/check_metrics.py: a rerun's metrics against the committed ones, within README's tolerances."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess

from conftest import REPO_ROOT

spec = importlib.util.spec_from_file_location("check_metrics", REPO_ROOT / "scripts/check_metrics.py")
check_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_metrics)


def committed() -> dict:
    """The metrics committed at HEAD (the working tree's may be mid-rerun)."""
    return check_metrics.committed_metrics("HEAD", REPO_ROOT)


def test_same_metrics_pass_and_each_kind_of_drift_is_judged_by_its_rule():
    old = committed()
    assert check_metrics.compare(old, old) == []

    new = copy.deepcopy(old)
    new["train"]["eval_loss"] *= 1.002          # float kernels of another CPU: within 0.5 %
    new["eval"]["kld_quant_vs_f16"] += 0.001
    new["eval"]["decode_tok_s_quant"] *= 3       # speed: another machine, not compared
    new["train"]["runtime_s"] *= 2
    assert check_metrics.compare(old, new) == []

    new["train"]["eval_loss"] = old["train"]["eval_loss"] * 1.02
    new["data"]["kept"] += 1                     # data must be identical everywhere
    new["quantize"]["tensor_types"]["Q5_0"] -= 1
    new["quantize"]["parity"]["passed"] = False
    bad = check_metrics.compare(old, new)
    assert [line.split(":")[:2] for line in bad] == [
        ["data", " kept"], ["train", " eval_loss"], ["quantize", " parity.passed"], ["quantize", " tensor_types.Q5_0"]]


def test_script_compares_a_rerun_with_the_commit(tmp_path, capsys):
    git = ["git", "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], cwd=tmp_path, check=True)
    (tmp_path / "metrics").mkdir()
    old = committed()
    for name, data in old.items():
        (tmp_path / f"metrics/{name}.json").write_text(json.dumps(data))
    subprocess.run([*git, "add", "-A"], cwd=tmp_path, check=True)
    subprocess.run([*git, "commit", "-qm", "metrics"], cwd=tmp_path, check=True)
    rerun = copy.deepcopy(old)
    rerun["eval"]["ppl_quant"] *= 1.001
    (tmp_path / "metrics/eval.json").write_text(json.dumps(rerun["eval"]))
    assert check_metrics.main(["--root", str(tmp_path)]) == 0
    assert "4 metrics files compared with HEAD: all within tolerance" in capsys.readouterr().out
    rerun["eval"]["ppl_quant"] *= 1.05
    (tmp_path / "metrics/eval.json").write_text(json.dumps(rerun["eval"]))
    assert check_metrics.main(["--root", str(tmp_path)]) == 1
    assert "OUTSIDE TOLERANCE  eval: ppl_quant" in capsys.readouterr().out

"""scripts/check_metrics.py: a rerun's metrics against the committed ones, within its stated tolerances;
a stated tolerance for every key the stages write (the committed files' keys and the stage code's)."""

from __future__ import annotations

import ast
import copy
import importlib.util
import json
import re

import pytest

from conftest import REPO_ROOT, git

spec = importlib.util.spec_from_file_location("check_metrics", REPO_ROOT / "scripts/check_metrics.py")
check_metrics = importlib.util.module_from_spec(spec)
spec.loader.exec_module(check_metrics)
SRC = REPO_ROOT / "src" / "lorapipe"
RUN = REPO_ROOT / "tests" / "fixtures" / "run"


def committed() -> dict:
    """A real run's metrics (tests/fixtures/run), not the checkout's: `make repro` rewrites those, and
    which keys a rerun writes (tensor types, candidates) depends on what it chose on that machine."""
    return check_metrics.current_metrics(RUN)


def metrics_repo(root, metrics: dict) -> None:
    """A git repository at `root` whose HEAD commits `metrics` as metrics/<name>.json."""
    git("init", "-q", cwd=root)
    (root / "metrics").mkdir()
    for name, data in metrics.items():
        (root / f"metrics/{name}.json").write_text(json.dumps(data))
    git("add", "-A", cwd=root)
    git("commit", "-qm", "metrics", cwd=root)


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
    old = committed()
    metrics_repo(tmp_path, old)
    rerun = copy.deepcopy(old)
    rerun["eval"]["ppl_quant"] *= 1.001
    (tmp_path / "metrics/eval.json").write_text(json.dumps(rerun["eval"]))
    assert check_metrics.main(["--root", str(tmp_path)]) == 0
    assert "4 metrics files compared with HEAD: all within tolerance" in capsys.readouterr().out
    rerun["eval"]["ppl_quant"] *= 1.05
    (tmp_path / "metrics/eval.json").write_text(json.dumps(rerun["eval"]))
    assert check_metrics.main(["--root", str(tmp_path)]) == 1
    assert "OUTSIDE TOLERANCE  eval: ppl_quant" in capsys.readouterr().out


def test_a_key_without_a_stated_tolerance_is_an_error_naming_it(tmp_path, capsys):
    old = committed()
    new = copy.deepcopy(old)
    new["eval"]["brand_new_figure"] = 1.0  # on one side only: still named
    assert check_metrics.rule_for("eval", "brand_new_figure") is None
    assert check_metrics.compare(old, new) == [f"eval: brand_new_figure: {check_metrics.NO_TOLERANCE}"]
    metrics_repo(tmp_path, old)
    (tmp_path / "metrics/eval.json").write_text(json.dumps(new["eval"]))
    assert check_metrics.main(["--root", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "not compared       eval: brand_new_figure (only here)" in out
    assert "NO TOLERANCE  eval: brand_new_figure: no tolerance stated" in out


def test_quantize_candidates_are_compared_per_type():
    row = {"type": "Q4_K_M", "size_mb": 105.45, "bits_per_weight": 6.17, "argmax_agreement": 0.77, "ppl_delta_pct": 2.2,
           "kld": 0.02, "kld_assistant_vs_merged": 0.045, "finetune_kept": 0.894, "passed": False,
           "failures": ["finetune_kept 0.894 < evaluate.min_finetune_kept 0.9"]}
    old = {"quantize": {"quant": "Q6_K", "choice": "auto: Q6_K is the first that passes; Q4_K_M failed",
                        "candidates": [row, {**row, "type": "Q6_K", "passed": True, "failures": []}]}}
    new = copy.deepcopy(old)
    new["quantize"]["candidates"][0].update(finetune_kept=0.886, failures=["finetune_kept 0.886 < evaluate.min_finetune_kept 0.9"])
    assert check_metrics.compare(old, new) == []  # the same gate fails, its figure within tolerance
    new["quantize"]["candidates"][0]["failures"].append("ppl_delta_pct 5.1 > evaluate.max_ppl_delta_pct 5")
    new["quantize"]["candidates"][1]["size_mb"] = 120.0
    assert [line.split(":")[1] for line in check_metrics.compare(old, new)] == [
        " candidates.Q4_K_M.failures", " candidates.Q6_K.size_mb"]
    new = copy.deepcopy(old)
    new["quantize"]["candidates"].pop(0)  # on this machine the first type passed
    new["quantize"].update(quant="Q4_K_M", choice="auto: Q4_K_M, the first, passes every gate")
    assert [line.split(":")[1] for line in check_metrics.compare(old, new)] == [" candidates", " choice", " quant"]


# ------------------------------------------------------------------ every key a stage writes has a rule
def test_every_key_of_the_committed_metrics_has_a_tolerance():
    # A real run's files; a rerun's keys are checked by scripts/check_metrics.py itself (.ci/run runs it
    # after `make repro`), and every key the stage code can write by the PRODUCERS tests below.
    metrics = committed()
    for name in check_metrics.FILES:
        assert metrics[name] is not None, f"metrics/{name}.json is missing"
        unstated = [k for k in check_metrics.flat(metrics[name]) if check_metrics.rule_for(name, k) is None]
        assert unstated == [], f"metrics/{name}.json: no tolerance for {unstated} in scripts/check_metrics.py"


# Where the stages' code builds what they write to metrics/<file>.json: (file, module, function, the
# dict there: the variable or attribute assigned it, or "return", key prefix in the file).
PRODUCERS = [
    ("data", "stages/clean.py", "Report.metrics", "return", ""),
    ("data", "stages/clean.py", "Counts.as_dict", "return", ""),
    ("data", "stages/clean.py", "Counts.as_dict", "return", "sources.*."),
    ("train", "stages/train.py", "_metrics", "return", ""),
    ("quantize", "stages/quantize.py", "quantize", "metrics", ""),
    ("quantize", "stages/quantize.py", "size_metrics", "return", ""),
    ("quantize", "stages/quantize.py", "candidate_row", "return", "candidates.*."),
    ("quantize", "core/parity.py", "check_f16", "rep.figures", "parity."),
    *(("quantize", "core/parity.py", phase, "return", "parity.")
      for phase in ("_check_tokens", "_check_template", "_check_stop_tokens", "_check_generation", "_check_logits")),
    ("quantize", "core/parity.py", "QuantCheck.check", "rep.figures", "parity."),
    ("eval", "stages/evaluate.py", "eval_metrics", "metrics", ""),
    ("eval", "stages/evaluate.py", "score_answers", "timing", ""),
    ("eval", "core/predictions.py", "variant_metrics", "return", ""),
    ("eval", "core/predictions.py", "shared_metrics", "return", ""),
]
# `**x` in those dicts: each spreads the dict of a producer above.
SPREADS = {"total.as_dict()", "chosen.sizes", "ref_report.figures", "quant_report.figures",
           "tokens", "template", "stop_tokens", "generation", "logits"}


def function(module: str, qualname: str) -> tuple[ast.Module, ast.AST]:
    """The module's syntax tree and the function's in it."""
    tree = node = ast.parse((SRC / module).read_text(encoding="utf-8"))
    for part in qualname.split("."):
        node = next((n for n in node.body if isinstance(n, (ast.FunctionDef, ast.ClassDef)) and n.name == part), None)
        assert node is not None, f"{module}: no {qualname} (update PRODUCERS in {__name__})"
    return tree, node


def key_text(node: ast.AST) -> str | None:
    """A dict key as written: "name", f"ppl_{x}" -> "ppl_*"; None when it is computed otherwise."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.JoinedStr):
        return "".join(v.value if isinstance(v, ast.Constant) else "*" for v in node.values)
    return None


def dict_keys(node: ast.AST, prefix: str, where: str) -> list[str]:
    """The keys of a dict display (nested dicts flattened with dots, as check_metrics.flat does)."""
    if isinstance(node, ast.DictComp):
        key = key_text(node.key)
        assert key is not None, f"{where}: a dict comprehension with computed keys: {ast.unparse(node)[:80]}"
        return [prefix + key]
    keys = []
    for k, v in zip(node.keys, node.values):
        if k is None:  # **spread
            if isinstance(v, (ast.Dict, ast.DictComp)):
                keys += dict_keys(v, prefix, where)
            else:
                assert ast.unparse(v) in SPREADS, f"{where}: **{ast.unparse(v)}: what does it spread? (SPREADS, PRODUCERS)"
            continue
        key = key_text(k)
        assert key is not None, f"{where}: a computed key {ast.unparse(k)}"
        keys += dict_keys(v, f"{prefix}{key}.", where) if isinstance(v, ast.Dict) else [prefix + key]
    return keys


def producer_keys(module: str, qualname: str, target: str, prefix: str) -> list[str]:
    """The keys the function's dict gets: its display's, and `target["key"] = ...` anywhere in the module."""
    where = f"{module}: {qualname}"
    tree, func = function(module, qualname)
    dicts = [n.value for n in ast.walk(func) if isinstance(n, ast.Return) and isinstance(n.value, ast.Dict)] if target == "return" else [
        n.value for n in ast.walk(func) if isinstance(n, ast.Assign) and [ast.unparse(t) for t in n.targets] == [target]]
    assert dicts, f"{where}: no dict assigned to {target} (update PRODUCERS in {__name__})"
    assert all(isinstance(d, ast.Dict) for d in dicts), f"{where}: {target} is assigned something else than a dict display"
    keys = [k for d in dicts for k in dict_keys(d, prefix, where)]
    for n in ast.walk(tree):
        if isinstance(n, ast.Assign) and isinstance(n.targets[0], ast.Subscript) and ast.unparse(n.targets[0].value) == target:
            key = key_text(n.targets[0].slice)
            assert key is not None, f"{module}: {ast.unparse(n.targets[0])}: a computed key"
            keys.append(prefix + key)
        if isinstance(n, ast.Call) and ast.unparse(n.func) == f"{target}.update":
            raise AssertionError(f"{module}: {ast.unparse(n)[:80]}: state the keys in {qualname}'s dict display")
    if prefix == "candidates.*.":  # the type names the candidate: check_metrics.flat keys its fields by it
        keys = [k for k in keys if k != "candidates.*.type"] + ["candidates"]
    return keys


def stated(name: str, key: str) -> bool:
    """A rule matches the key, or the key holds a nested object whose members have rules."""
    return check_metrics.rule_for(name, key) is not None or any(
        p.startswith(key + ".") for p, _ in check_metrics.TOLERANCE[name])


def test_the_metrics_files_the_stages_write_are_the_ones_compared():
    written = {m for f in SRC.rglob("*.py") for m in re.findall(r'METRICS_DIR\s*/\s*"(\w+)\.json"', f.read_text(encoding="utf-8"))}
    assert written == set(check_metrics.FILES) == {p[0] for p in PRODUCERS}


@pytest.mark.parametrize("producer", PRODUCERS, ids=lambda p: f"{p[0]}:{p[2]}:{p[4] or '-'}")
def test_every_key_the_stage_code_writes_has_a_tolerance(producer):
    name, *where = producer
    keys = producer_keys(*where)
    assert keys
    unstated = [k for k in keys if not stated(name, k)]
    assert unstated == [], f"metrics/{name}.json: {where[0]} {where[1]} writes {unstated}, which have no tolerance in scripts/check_metrics.py"

"""The whole graph, for real: git + DVC in a temp copy of the repo, a tiny model, small real data.

Proves incrementality (a change reruns exactly the stages it affects), the params -> stages table,
experiments (`dvc exp run -S`), metrics diffs and a push/pull round trip through a local remote.
The copy runs its own code (PYTHONPATH=<copy>/src), so editing a module in the copy is a real edit.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from lorapipe.core import gguf_meta
from lorapipe.core.inputs import Input, add_deps

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent
STAGES = ("base", "ingest", "clean", "train", "merge", "convert", "quantize", "evaluate", "package")


def tiny_params(model_dir: Path) -> dict:
    p = yaml.safe_load((REPO_ROOT / "params.yaml").read_text())
    p["model"].update(source=str(model_dir), preset="smollm2-135m-instruct")
    p["data"]["sources"] = [
        {"name": "support", "type": "sharegpt", "path": "data/sources/support.jsonl"},
        {"name": "chatterbot", "type": "chatterbot", "languages": ["english"], "categories": ["emotion", "psychology"]},
    ]
    p["data"]["split"]["eval_fraction"] = 0.2
    p["train"].update(max_steps=4, batch_size=4, cutoff_len=128, logging_steps=1, save_steps=2)
    p["lora"]["rank"] = 4
    p["evaluate"].update(ctx=32, max_chunks=4, max_new_tokens=8, prompts=["I feel lonely.", "我很难过。"])
    # A random tiny model: quantization error is large relative to its flat logits, so the quality
    # gate is opened wide here; the gate itself is tested in test_evaluate.
    p["evaluate"]["max_ppl_delta_pct"] = 1000.0
    p["export"]["parity"]["min_argmax_agreement_quant"] = 0.0
    return p


def run(cmd: list[str], cwd: Path, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def stages_run(output: str) -> list[str]:
    return re.findall(r"Running stage '([\w-]+)'", output)


def copy_project_for_pipeline(parent: Path, tiny_model) -> tuple[Path, dict]:
    """A git repo at parent/repo with the project's files (no tests, no results) and tiny_params();
    returns it and the environment its commands run in."""
    root = parent / "repo"
    files = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"], cwd=REPO_ROOT,
                           capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith(("tests/", "benchmarks/")) or not (REPO_ROOT / rel).is_file():
            continue
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, dest)
    for generated in ("dvc.lock", "metrics", "plots", "reports", "dvclive", "models/README.md", "models/gguf"):
        path = root / generated
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    model_dir = tiny_model("llama")
    (root / "params.yaml").write_text(yaml.safe_dump(tiny_params(model_dir), allow_unicode=True, sort_keys=False))
    # the local checkpoint folder is an input of base, listed in dvc.yaml as a user lists theirs (docs/inputs.md)
    assert add_deps("base", [Input(model_dir, "model.source")], root) == [str(model_dir)]
    # git's author and config, DVC's and HF's settings come from the run's environment (conftest)
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", PYTHONPATH=str(root / "src"))
    run(["git", "init", "-q"], root, env)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "copy"], root, env)
    return root, env


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, tiny_model):
    root, env = copy_project_for_pipeline(tmp_path_factory.mktemp("pipeline"), tiny_model)
    first = run(["dvc", "repro"], root, env)
    ran = stages_run(first.stdout)
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "first repro"], root, env)
    commit = run(["git", "rev-parse", "HEAD"], root, env).stdout.strip()
    return {"root": root, "env": env, "first": ran, "commit": commit}


@pytest.fixture
def fresh(pipeline):
    """The pipeline repository as its first repro left it, whatever other tests did to it before:
    the committed files, the outputs dvc.lock names, no experiments, no remote."""
    root, env = pipeline["root"], pipeline["env"]
    # no `git clean`: train's models/checkpoints is an empty folder DVC neither caches nor ignores
    run(["git", "reset", "-q", "--hard", pipeline["commit"]], root, env)
    run(["dvc", "exp", "remove", "--all-commits"], root, env, check=False)
    run(["dvc", "checkout", "--force"], root, env)
    return pipeline


def repro(pipeline, *targets) -> list[str]:
    return stages_run(run(["dvc", "repro", *targets], pipeline["root"], pipeline["env"]).stdout)


def set_param(pipeline, dotted: str, value) -> None:
    path = pipeline["root"] / "params.yaml"
    p = yaml.safe_load(path.read_text())
    node = p
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node[part]
    node[leaf] = value
    path.write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False))


def test_first_repro_runs_every_stage_and_second_runs_nothing(fresh):
    assert sorted(fresh["first"]) == sorted(STAGES)
    assert repro(fresh) == []


def test_model_card_holds_what_the_real_dvc_lock_recorded(fresh):
    """Stage package read the dvc.lock that DVC itself wrote during the repro: the card's params and
    artifact hashes are those of the lock, not of params.yaml."""
    root = fresh["root"]
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    card = (root / "models/README.md").read_text()
    outs = [(stage, out) for stage, entry in lock.items() if stage != "package" for out in entry.get("outs") or []]
    assert {stage for stage, _ in outs} == set(STAGES) - {"package"}
    for stage, out in outs:
        assert f"| {stage} | {out['path']} | {out['md5']} | {out['size']} |" in card, out["path"]
    lora = lock["train"]["params"]["params.yaml"]["lora"]
    assert lora["rank"] == 4 and "| lora.rank | 4 |" in card


def test_clean_param_reruns_clean_only_upstream(fresh):
    set_param(fresh, "data.clean.max_tokens", 2047)
    ran = repro(fresh)
    assert "clean" in ran and not {"base", "ingest"} & set(ran)


def test_source_edit_reruns_ingest_and_clean(fresh):
    src = fresh["root"] / "data/sources/support.jsonl"
    row = {"messages": [{"role": "user", "content": "I failed my driving test again."},
                        {"role": "assistant", "content": "That is disappointing. Many people need a few tries; what felt hardest?"}]}
    with open(src, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
    assert repro(fresh, "clean") == ["ingest", "clean"]


def test_stage_module_edit_reruns_that_stage_only(fresh):
    module = fresh["root"] / "src/lorapipe/stages/clean.py"
    module.write_text(module.read_text() + "\n# edited\n")
    assert repro(fresh, "clean") == ["clean"]


def changed_stages(pipeline) -> set[str]:
    out = run(["dvc", "status", "--json"], pipeline["root"], pipeline["env"]).stdout
    return set(json.loads(out or "{}"))


def test_core_module_edit_reruns_exactly_its_importers(fresh):
    root = fresh["root"]
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    core = root / "src/lorapipe/core/io.py"
    importers = {name for name, st in stages.items() if "src/lorapipe/core/io.py" in st.get("deps", [])}
    assert importers, "core/io.py is used by the stages that write artifacts"
    original = core.read_text()
    core.write_text(original + "\n# edited\n")
    try:
        assert changed_stages(fresh) == importers
    finally:
        core.write_text(original)
    assert changed_stages(fresh) == set()


def leaf_keys(node, prefix=""):
    if isinstance(node, dict):
        for key, value in node.items():
            yield from leaf_keys(value, f"{prefix}{key}.")
    else:
        yield prefix[:-1]


# Which stage each params key belongs to (the most specific prefix wins). A key that is in no
# stage's params reruns nothing (chat, serve.host and serve.port are read by package's model card only;
# the rest of serve and ui by no stage).
OWNER = {
    "model": {"base"}, "data.sources": {"ingest"}, "data.clean": {"clean"}, "data.split": {"clean"},
    "train": {"train"}, "lora": {"train"}, "merge": {"merge"},
    "export.outtype": {"convert", "quantize", "evaluate"}, "export.name": {"convert"}, "export.description": {"convert"},
    "export.quant": {"quantize"}, "export.quant_candidates": {"quantize"}, "export.imatrix": {"quantize"},
    "export.parity": {"quantize"},
    "export.threads": {"quantize"},
    "model.trust_remote_code": {"base", "train", "merge", "convert", "quantize", "evaluate"},
    "evaluate": {"evaluate"}, "evaluate.ctx": {"quantize", "evaluate"}, "evaluate.max_chunks": {"quantize", "evaluate"},
    "evaluate.max_ppl_delta_pct": {"quantize", "evaluate"}, "evaluate.min_finetune_kept": {"quantize", "evaluate"},
    "chat": {"package"}, "serve": set(), "serve.host": {"package"}, "serve.port": {"package"}, "ui": set(),
    "package": {"package"},
}


def owner(key: str) -> set[str]:
    best = max((p for p in OWNER if key == p or key.startswith(p + ".")), key=len)
    return OWNER[best]


def test_every_params_key_marks_exactly_its_stages(fresh):
    path = fresh["root"] / "params.yaml"
    original = path.read_text()
    defined = set(STAGES)
    table = {}
    try:
        for key in leaf_keys(yaml.safe_load(original)):
            p = yaml.safe_load(original)
            node = p
            *parents, leaf = key.split(".")
            for part in parents:
                node = node[part]
            node[leaf] = "__changed__" if not isinstance(node[leaf], (int, float)) or isinstance(node[leaf], bool) else node[leaf] + 1
            path.write_text(yaml.safe_dump(p, allow_unicode=True, sort_keys=False))
            table[key] = changed_stages(fresh)
    finally:
        path.write_text(original)
    wrong = {k: (sorted(v), sorted(owner(k) & defined)) for k, v in table.items() if v != owner(k) & defined}
    assert not wrong, f"params key -> (stages marked changed, expected): {wrong}"


def test_quant_change_reruns_quantize_and_downstream_only(fresh):
    set_param(fresh, "export.quant", "q8_0")
    ran = repro(fresh)
    assert "quantize" in ran and not {"base", "ingest", "clean", "train", "merge", "convert"} & set(ran)
    # the same path holds the new type; evaluate and package follow because the file changed
    assert gguf_meta.file_type(fresh["root"] / "models/gguf/model-quant.gguf") == "Q8_0"
    assert {"evaluate", "package"} <= set(ran)
    assert json.loads((fresh["root"] / "metrics/quantize.json").read_text())["choice"].startswith("export.quant: Q8_0")


def test_exp_run_rank_reruns_train_and_downstream_not_data(fresh):
    root, env = fresh["root"], fresh["env"]
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "before experiment", "--allow-empty"], root, env)
    out = run(["dvc", "exp", "run", "-S", "lora.rank=8"], root, env).stdout
    try:
        ran = stages_run(out)
        assert ran[:2] == ["train", "merge"] and not {"base", "ingest", "clean"} & set(ran)
        shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
        assert "lora.rank" in json.dumps(shown) or '"rank": 8' in json.dumps(shown)
        diff = run(["dvc", "metrics", "diff", "--json"], root, env).stdout
        assert "metrics/train.json" in diff
    finally:
        # `dvc exp run` leaves the workspace at the experiment's params and results: put it back, so
        # that a failure here shows as this test's alone (the `fresh` fixture resets it for the next).
        run(["git", "checkout", "--", "."], root, env)
        run(["dvc", "checkout", "--force"], root, env)


def test_queued_sweep_shows_each_experiment_and_metrics_diff_has_its_values(fresh):
    """README's sweep commands (on three ranks): queue them, run the queue, show and compare them."""
    root, env = fresh["root"], fresh["env"]
    run(["git", "add", "-A"], root, env)
    run(["git", "commit", "-qm", "before sweep", "--allow-empty"], root, env)
    assert yaml.safe_load((root / "params.yaml").read_text())["lora"]["rank"] == 4
    run(["dvc", "exp", "run", "--queue", "-S", "lora.rank=4,8,16"], root, env)
    run(["dvc", "queue", "start", "-j", "1"], root, env)
    # `dvc queue start` hands the queue to a background worker; wait for it, bounded in time.
    deadline = time.monotonic() + 900
    while True:
        status = run(["dvc", "queue", "status"], root, env).stdout
        if not re.search(r"\b(Queued|Running)\b", status):
            break
        assert time.monotonic() < deadline, f"the queue did not finish in 15 min:\n{status}"
        time.sleep(5)
    assert "Failed" not in status, status

    shown = json.loads(run(["dvc", "exp", "show", "--json"], root, env).stdout)
    head = next(c for c in shown if c["rev"] != "workspace")
    exps = {}
    for exp in head.get("experiments") or []:
        rev = exp["revs"][0]
        data = rev["data"]
        rank = data["params"]["params.yaml"]["data"]["lora"]["rank"]
        exps[rank] = (rev["name"], data["metrics"]["metrics/train.json"]["data"])
    assert sorted(exps) == [4, 8, 16], status
    head_train = json.loads((root / "metrics/train.json").read_text())
    # rank 4 is the committed params: the queue reruns the same training on the same CPU, bit for bit
    assert exps[4][1]["eval_loss"] == head_train["eval_loss"]
    assert exps[16][1]["trainable_params"] == 4 * head_train["trainable_params"]  # LoRA size grows with the rank
    assert exps[8][1]["eval_loss"] != exps[16][1]["eval_loss"]

    # Apply rank 16 and diff against the commit: the values, not only the file names.
    run(["dvc", "exp", "apply", exps[16][0]], root, env)
    try:
        diff = json.loads(run(["dvc", "metrics", "diff", "--json"], root, env).stdout)
        loss = diff["metrics/train.json"]["eval_loss"]
        assert (loss["old"], loss["new"]) == (head_train["eval_loss"], exps[16][1]["eval_loss"])
        assert loss["diff"] == pytest.approx(exps[16][1]["eval_loss"] - head_train["eval_loss"])
        params_diff = json.loads(run(["dvc", "params", "diff", "--json"], root, env).stdout)
        rank = params_diff["params.yaml"]["lora.rank"]
        assert (rank["old"], rank["new"]) == (4, 16)
    finally:
        run(["git", "checkout", "--", "."], root, env)
        run(["dvc", "checkout", "--force"], root, env)


def test_push_pull_through_a_local_remote(fresh, tmp_path):
    root, env = fresh["root"], fresh["env"]
    run(["dvc", "remote", "add", "-f", "-d", "local", str(tmp_path / "remote")], root, env)
    run(["dvc", "push"], root, env)
    gguf = sorted((root / "models/gguf").glob("*.gguf"))
    assert gguf
    digest = gguf[0].read_bytes()
    shutil.rmtree(root / ".dvc/cache")
    for cached in ("models/base", "models/adapter", "models/merged"):
        shutil.rmtree(root / cached)
    for path in gguf:
        path.unlink()
    run(["dvc", "pull"], root, env)
    assert gguf[0].read_bytes() == digest
    assert (root / "models/adapter").is_dir() and (root / "models/base/config.json").is_file()
    assert repro(fresh) == []

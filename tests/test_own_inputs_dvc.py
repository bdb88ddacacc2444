"""A user's own inputs under real git + DVC: a data file outside data/sources, a LLaMA-Factory data folder
and a local checkpoint folder. Until dvc.yaml lists them the stages refuse to run, saying which lines to
add; once listed, an edit to any of them makes `dvc status` name its stage, and `dvc repro` reruns that
stage and what its changed outputs feed, nothing else."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT, write_jsonl
from lorapipe.core.inputs import add_deps
from lorapipe.params import load
from lorapipe.stages import base, ingest

pytestmark = pytest.mark.slow

VENV_BIN = Path(sys.executable).parent


def copy_project(root: Path) -> None:
    """The tracked files a pipeline run needs (no tests, no earlier results)."""
    files = subprocess.run(["git", "ls-files"], cwd=REPO_ROOT, capture_output=True, text=True, check=True).stdout.split()
    for rel in files:
        if rel.startswith(("tests/", "benchmarks/", "docs/")) or rel == "dvc.lock" or not (REPO_ROOT / rel).is_file():
            continue
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(REPO_ROOT / rel, root / rel)


def rows(n: int, tag: str) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"{tag} question {i}: I feel a little low today."},
                          {"role": "assistant", "content": f"{tag} answer {i}: I'm sorry to hear that. What happened?"}]}
            for i in range(n)]


def test_edits_to_own_data_and_checkpoint_rerun_exactly_their_stages(tmp_path, tiny_model, monkeypatch):
    root, outside = tmp_path / "repo", tmp_path / "elsewhere"
    copy_project(root)
    mine = outside / "mine.jsonl"
    write_jsonl(mine, rows(12, "mine"))
    lf = outside / "LLaMA-Factory" / "data"
    write_jsonl(lf / "sft.jsonl", [{"instruction": f"lf question {i}: work is stressful.", "output": f"lf answer {i}: that sounds hard."}
                                   for i in range(12)])
    (lf / "dataset_info.json").write_text(json.dumps({"my_sft": {"file_name": "sft.jsonl"}}))
    ckpt = outside / "my-checkpoint"
    shutil.copytree(tiny_model("llama"), ckpt)
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["model"].update(source=str(ckpt), preset="smollm2-135m-instruct")
    params["data"]["sources"] = [
        {"name": "support", "type": "sharegpt", "path": "data/sources/support.jsonl"},
        {"name": "mine", "type": "sharegpt", "path": str(mine)},
        {"name": "lf", "type": "llamafactory", "dataset_info": str(lf / "dataset_info.json"), "datasets": ["my_sft"]},
    ]
    (root / "params.yaml").write_text(yaml.safe_dump(params, allow_unicode=True, sort_keys=False))
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}", PYTHONPATH=str(root / "src"), HF_HUB_OFFLINE="1",
               DVC_NO_ANALYTICS="1", GIT_CONFIG_GLOBAL=os.devnull, GIT_CONFIG_NOSYSTEM="1",
               GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")

    def sh(*cmd: str, check: bool = True) -> str:
        proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
        if check and proc.returncode:
            raise AssertionError(f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return proc.stdout + proc.stderr

    def repro() -> list[str]:
        out = sh("dvc", "repro", "clean")
        sh("git", "add", "-A")
        sh("git", "commit", "-qm", "repro")
        return sorted(re.findall(r"Running stage '([\w-]+)'", out))

    def status() -> str:
        return sh("dvc", "status", "base", "ingest", "clean")

    sh("git", "init", "-q")
    sh("git", "add", "-A")
    sh("git", "commit", "-qm", "copy")

    # Not listed yet: each stage refuses before it writes anything, naming the inputs and the lines to add.
    refused = sh("dvc", "repro", "base", check=False)
    assert "stage base reads inputs that dvc.yaml does not list as its deps" in refused
    assert f"      - {ckpt}\n" in refused and not (root / "models" / "base").exists()
    refused = sh("dvc", "repro", "ingest", check=False)
    assert "stage ingest reads inputs that dvc.yaml does not list as its deps" in refused
    assert f"      - {mine}\n      - {lf / 'dataset_info.json'}\n      - {lf / 'sft.jsonl'}\n" in refused
    assert "support.jsonl" not in refused and not (root / "data" / "raw").exists()

    monkeypatch.chdir(root)  # the lines the error gives, added as it says (add_deps writes exactly them)
    p = load("params.yaml")
    assert add_deps("base", base.inputs(p)) == [str(ckpt)]
    assert add_deps("ingest", ingest.inputs(p)) == [str(mine), str(lf / "dataset_info.json"), str(lf / "sft.jsonl")]
    assert repro() == ["base", "clean", "ingest"]
    assert "Data and pipelines are up to date" in status()

    # A row appended to the data file outside data/sources: ingest and clean, not base.
    write_jsonl(mine, rows(13, "mine"))
    out = status()
    assert "ingest:" in out and str(mine) in out and "base:" not in out
    assert repro() == ["clean", "ingest"]
    assert sum(1 for line in (root / "data" / "raw" / "mine.jsonl").open()) == 13

    # A row appended to a file of the LLaMA-Factory data folder: the same.
    with open(lf / "sft.jsonl", "a") as f:
        f.write(json.dumps({"instruction": "one more question", "output": "one more answer"}) + "\n")
    out = status()
    assert "ingest:" in out and str(lf / "sft.jsonl") in out and "base:" not in out
    assert repro() == ["clean", "ingest"]

    # A file of the checkpoint folder changed: base, and clean (it reads the base's tokenizer files).
    config = json.loads((ckpt / "tokenizer_config.json").read_text())
    (ckpt / "tokenizer_config.json").write_text(json.dumps({**config, "model_max_length": 4096}))
    out = status()
    assert "base:" in out and str(ckpt) in out and "ingest:" not in out
    assert repro() == ["base", "clean"]

    # A new pin of a package that carries data: base and ingest rerun; their outputs are the same,
    # so clean is not.
    with open(root / "requirements-data.txt", "a") as f:
        f.write("# a comment changes the file as a new pin would\n")
    out = status()
    assert "base:" in out and "ingest:" in out and "requirements-data.txt" in out
    assert repro() == ["base", "ingest"]
    assert "Data and pipelines are up to date" in status()

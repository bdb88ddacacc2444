"""`lorapipe import-llamafactory` on YAMLs shaped like the seed's three (Qwen2.5, Gemma-3, MiniCPM LoRA)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from conftest import REPO_ROOT
from lorapipe import cli, params as params_mod
from lorapipe.import_llamafactory import convert

FIX = REPO_ROOT / "tests" / "fixtures" / "llamafactory"
INFO = FIX / "data" / "dataset_info.json"
SEEDS = {
    "qwen": ("train_lora/qwen2_5_1_5b_lora_sft.yaml", "merge_lora/qwen2_5_1_5b_lora_sft.yaml"),
    "gemma": ("train_lora/gemma3_1b_lora_sft.yaml", "merge_lora/gemma3_1b_lora_sft.yaml"),
    "minicpm": ("train_lora/minicpm_0_5b_lora_sft.yaml", "merge_lora/minicpm_0_5b_lora_sft.yaml"),
}


def run_cli(*argv: str) -> int:
    return cli.main(["import-llamafactory", *argv])


@pytest.mark.parametrize("seed", list(SEEDS))
def test_seed_yaml_imports_to_loadable_params(seed, tmp_path, capsys):
    train, merge = SEEDS[seed]
    out = tmp_path / "params.yaml"
    assert run_cli(str(FIX / train), "--merge-yaml", str(FIX / merge), "--dataset-info", str(INFO), "--out", str(out)) == 0
    report = capsys.readouterr().err
    p = params_mod.load(out)  # what it writes must load through lorapipe's own validation

    assert p.lora.rank == 16 and p.lora.alpha == 32 and p.lora.target == "all"
    assert p.train.cutoff_len == 2048 and p.train.grad_accum == 8 and p.train.lr == pytest.approx(1e-4)
    assert p.train.epochs == 3.0 and p.train.precision == "bf16"
    assert [s.name for s in p.data.sources] == ["train_data_multi_50pct", "merged_30pct"]
    assert all(s.type == "llamafactory" and Path(s.dataset_info) == INFO for s in p.data.sources)
    # The seed's YAMLs say trust_remote_code: true; only the user's own flag turns it on (next test).
    assert p.model.trust_remote_code is False
    assert "trust_remote_code: true was imported as model.trust_remote_code: false" in report
    if seed == "qwen":
        assert p.model.source.endswith("Qwen2.5-1.5B-Instruct") and p.model.chat_template == "qwen"
        # keys the YAML leaves out mean LLaMA-Factory's defaults, not lorapipe's
        assert p.lora.dropout == 0.0 and p.train.scheduler == "linear" and p.train.warmup_ratio == 0.0
        assert p.train.batch_size == 2
        assert "lora_dropout" in report and "default" in report
    if seed == "gemma":
        assert p.model.chat_template == "gemma" and p.lora.dropout == 0.05
    if seed == "minicpm":
        assert p.model.chat_template == "qwen"
        assert p.train.batch_size == 4 and p.train.scheduler == "cosine" and p.train.warmup_ratio == 0.1
        assert p.train.logging_steps == 10 and p.train.save_steps == 500


def test_trust_remote_code_is_imported_only_with_the_users_flag(tmp_path, capsys):
    train, merge = SEEDS["minicpm"]
    args = (str(FIX / train), "--merge-yaml", str(FIX / merge), "--dataset-info", str(INFO))
    assert run_cli(*args, "--out", str(tmp_path / "with.yaml"), "--trust-remote-code") == 0
    assert "warning:" not in capsys.readouterr().err
    assert params_mod.load(tmp_path / "with.yaml").model.trust_remote_code is True
    # --strict turns the warning into an error: the decision is the user's, never taken for them
    assert run_cli(*args, "--out", str(tmp_path / "strict.yaml"), "--strict") == 2
    assert "trust_remote_code" in capsys.readouterr().err and not (tmp_path / "strict.yaml").exists()


@pytest.mark.parametrize("seed", list(SEEDS))
def test_every_key_is_accounted_for(seed):
    """Nothing is dropped silently: each key of both YAMLs appears in the report with a status."""
    train, merge = SEEDS[seed]
    imp = convert(FIX / train, FIX / merge, str(INFO), trust_remote_code=True)  # else that decision is warned of
    for file in (train, merge):
        keys = set(yaml.safe_load((FIX / file).read_text()))
        listed = {key for f, key, status, detail in imp.report.rows if f.endswith(file) and detail}
        assert keys <= listed, f"{file}: keys not reported: {keys - listed}"
    assert not imp.report.warnings


def test_minicpm_extra_keys_listed_as_ignored_with_reasons():
    imp = convert(FIX / SEEDS["minicpm"][0], FIX / SEEDS["minicpm"][1], str(INFO))
    status = {key: (st, detail) for _, key, st, detail in imp.report.rows}
    for key in ("output_dir", "plot_loss", "dataloader_num_workers", "ddp_timeout",
                "overwrite_cache", "preprocessing_num_workers", "report_to", "export_size", "export_legacy_format"):
        assert status[key][0] == "ignored" and status[key][1], key


def test_unknown_keys_warn_by_name_and_strict_fails(tmp_path, capsys):
    src = yaml.safe_load((FIX / SEEDS["gemma"][0]).read_text())
    src.update(lora_rnak=8, my_own_setting=1, warmup_steps=100)
    bad = tmp_path / "typo.yaml"
    bad.write_text(yaml.safe_dump(src))
    assert run_cli(str(bad), "--dataset-info", str(INFO)) == 0
    captured = capsys.readouterr()
    assert "unknown key 'lora_rnak'" in captured.err and "did you mean 'lora_rank'" in captured.err
    assert "unknown key 'my_own_setting'" in captured.err
    # a real LLaMA-Factory key without an equivalent is listed as such, not called unknown
    assert "warmup_steps" in captured.err and "unknown key 'warmup_steps'" not in captured.err
    assert yaml.safe_load(captured.out)["lora"]["rank"] == 16  # the YAML still came out, on stdout only

    assert run_cli(str(bad), "--dataset-info", str(INFO), "--strict") == 2
    assert "lora_rnak" in capsys.readouterr().err


def test_write_updates_params_in_place_keeping_other_sections(tmp_path, capsys):
    target = tmp_path / "params.yaml"
    shutil.copy(REPO_ROOT / "params.yaml", target)
    before = params_mod.load(target)
    assert run_cli(str(FIX / SEEDS["gemma"][0]), "--dataset-info", str(INFO), "--params", str(target), "--write") == 0
    after = params_mod.load(target)
    text = target.read_text()
    assert "# stage: evaluate" in text  # comments survive (round-trip YAML)
    assert after.evaluate == before.evaluate and after.export == before.export and after.chat == before.chat
    assert after.data.clean == before.data.clean  # only data.sources is replaced
    assert after.train.logging_steps == before.train.logging_steps  # keys the YAML does not set stay
    assert after.model.chat_template == "gemma" and after.lora.dropout == 0.05
    assert [s.name for s in after.data.sources] == ["train_data_multi_50pct", "merged_30pct"]


def test_imported_sources_read_through_the_ingest_adapter():
    """The data.sources it writes are usable: the llamafactory adapter reads the fixture rows."""
    from lorapipe.sources import adapter
    from lorapipe.sources._common import Context

    sections = convert(FIX / SEEDS["qwen"][0], None, str(INFO)).sections()
    p = params_mod.parse(sections)
    rows = []
    for i, src in enumerate(p.data.sources):
        rows += list(adapter(src.type).read(Context(src, f"data.sources[{i}]")))
    assert len(rows) == 3 and all("messages" in r for r in rows)


def test_bad_inputs_are_clear_errors(tmp_path, capsys):
    assert run_cli(str(tmp_path / "missing.yaml")) == 2
    assert "missing.yaml: train YAML not found" in capsys.readouterr().err

    broken = tmp_path / "broken.yaml"
    broken.write_text("lora_rank: 16\n  bad: [indent\n")
    assert run_cli(str(broken)) == 2
    assert "broken.yaml:" in capsys.readouterr().err

    src = yaml.safe_load((FIX / SEEDS["qwen"][0]).read_text())
    for change, message in (({"dataset": "nope"}, "dataset nope not registered"),
                            ({"finetuning_type": "full"}, "LoRA only"),
                            ({"learning_rate": "fast"}, "learning_rate: 'fast' is not a number")):
        bad = tmp_path / "bad.yaml"
        bad.write_text(yaml.safe_dump({**src, **change}))
        assert run_cli(str(bad), "--dataset-info", str(INFO)) == 2
        assert message in capsys.readouterr().err


def test_template_without_equivalent_is_explained(tmp_path, capsys):
    src = yaml.safe_load((FIX / SEEDS["minicpm"][0]).read_text())
    src["template"] = "llama2"
    f = tmp_path / "llama2.yaml"
    f.write_text(yaml.safe_dump(src))
    imp = convert(f, None, str(INFO))
    assert imp.sections()["model"]["chat_template"] is None
    assert any("llama2" in w and "chat_template.jinja" in w for w in imp.report.warnings)


def test_write_lists_the_checkpoint_and_data_as_deps_in_dvc_yaml(tmp_path, capsys):
    """--write also names the YAML's local checkpoint folder and dataset files as deps of base and
    ingest, the lines those stages otherwise refuse to run without; a second --write adds none."""
    from lorapipe.core.inputs import declared_deps, undeclared
    from lorapipe.stages import base, ingest

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    src = yaml.safe_load((FIX / SEEDS["qwen"][0]).read_text())
    train_yaml = tmp_path / "train.yaml"
    train_yaml.write_text(yaml.safe_dump({**src, "model_name_or_path": str(ckpt)}))
    project = tmp_path / "project"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, project / name)
    target = project / "params.yaml"

    assert run_cli(str(train_yaml), "--dataset-info", str(INFO), "--params", str(target), "--write") == 0
    err = capsys.readouterr().err
    p = params_mod.load(target)
    assert str(ckpt) in declared_deps_text(project, "base")
    for path in (INFO, FIX / "data" / "train_data_multi_50pct.jsonl", FIX / "data" / "merged_30pct.jsonl"):
        assert f"added to stages.ingest.deps: {path}" in err
    assert undeclared("base", base.inputs(p), project) == [] and undeclared("ingest", ingest.inputs(p), project) == []
    assert "# One stage = one module" in (project / "dvc.yaml").read_text()  # its comments survive
    deps_before = declared_deps("ingest", project)

    assert run_cli(str(train_yaml), "--dataset-info", str(INFO), "--params", str(target), "--write") == 0
    assert "added to stages" not in capsys.readouterr().err
    assert declared_deps("ingest", project) == deps_before


def test_write_with_a_checkpoint_not_on_this_machine_says_dvc_yaml_was_not_updated(tmp_path, capsys):
    project = tmp_path / "project"
    project.mkdir()
    for name in ("params.yaml", "dvc.yaml"):
        shutil.copy(REPO_ROOT / name, project / name)
    # the seed's model_name_or_path, /root/autodl-tmp/Qwen/Qwen2.5-1.5B-Instruct, is not on this machine
    assert run_cli(str(FIX / SEEDS["qwen"][0]), "--dataset-info", str(INFO), "--params", str(project / "params.yaml"),
                   "--write") == 0
    err = capsys.readouterr().err
    assert "stages.base.deps not updated" in err and "autodl-tmp" in err
    assert "added to stages.ingest.deps" in err  # the data files are still listed


def declared_deps_text(project: Path, stage: str) -> str:
    return "\n".join(yaml.safe_load((project / "dvc.yaml").read_text())["stages"][stage]["deps"])

"""params.yaml is loaded once into a typed object; bad keys fail naming the key and a suggestion."""

import inspect

import pytest

from lorapipe import params
from conftest import REPO_ROOT, SOURCE_FIXTURES


def test_repo_params_yaml_loads_with_every_section():
    p = params.load(REPO_ROOT / "params.yaml")
    assert p.model.source == "embedded"
    assert p.data.sources, "the default pipeline ingests real offline sources"
    assert p.export.quant


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"data": {"clean": {"max_token": 5}}}, "unknown key 'data.clean.max_token' (did you mean 'max_tokens'?)"),
        ({"lora": {"rnak": 4}}, "unknown key 'lora.rnak' (did you mean 'rank'?)"),
        ({"trian": {}}, "unknown key 'trian' (did you mean 'train'?)"),
        ({"data": {"sources": [{"name": "a", "type": "sharegpt", "pth": "x"}]}}, "unknown key 'data.sources.0.pth' (did you mean 'path'?)"),
        ({"data": {"sources": [{"name": "a", "type": "sharegtp", "path": "x"}]}}, "unknown source type 'sharegtp' (did you mean 'sharegpt'?)"),
        ({"data": {"sources": [{"name": "a"}]}}, "missing 'type'; valid types: sharegpt, llamafactory"),
        ({"lora": {"rank": 0}}, "lora.rank: Input should be greater than 0"),
        ({"lora": {"rank": -4}}, "lora.rank: Input should be greater than 0"),
        ({"train": {"lr": "fast"}}, "train.lr:"),
    ],
)
def test_bad_params_name_the_key(raw, expected):
    with pytest.raises(params.ParamsError) as err:
        params.parse(raw)
    assert expected in str(err.value)


def test_duplicate_source_names_rejected():
    src = {"name": "a", "type": "chitchat"}
    with pytest.raises(params.ParamsError, match="repeated: a"):
        params.parse({"data": {"sources": [src, src]}})


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(params.ParamsError, match="params file not found"):
        params.load(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(params.ParamsError, match="not valid YAML"):
        params.load(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(params.ParamsError, match="top level must be a mapping"):
        params.load(bad)


def test_cli_reports_params_error_without_traceback(tmp_path, capsys, monkeypatch):
    from lorapipe.cli import main

    (tmp_path / "params.yaml").write_text("lora:\n  rnak: 8\n")
    monkeypatch.chdir(tmp_path)
    assert main(["train"]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'lora.rnak' (did you mean 'rank'?)" in err and "Traceback" not in err


def test_every_source_type_has_its_adapter_module():
    """params.SOURCE_TYPES is the one list of source types; each must name a module in lorapipe.sources."""
    from lorapipe import sources

    for source_type in params.SOURCE_TYPES:
        module = sources.adapter(source_type)
        assert module.__name__ == f"lorapipe.sources.{source_type}"
        read = inspect.signature(module.read)
        assert list(read.parameters)[0] == "ctx", f"{source_type}: read(ctx, ...) is the adapters' interface"
        # each adapter is run for real on a file in its data set's release format
        assert (SOURCE_FIXTURES / source_type).is_dir(), f"no tests/fixtures/sources/{source_type}/"
        assert (REPO_ROOT / "tests" / f"test_sources_{source_type}.py").is_file(), f"no tests/test_sources_{source_type}.py"
    with pytest.raises(ValueError, match="unknown source type"):
        sources.adapter("_common")


def test_cli_fails_loudly_when_a_command_module_does_not_import(monkeypatch):
    """A command whose module cannot be imported is an error, not a silently missing subcommand."""
    import sys

    from lorapipe import cli

    monkeypatch.setitem(sys.modules, "lorapipe.serve", None)  # importing it now raises ModuleNotFoundError
    with pytest.raises(ModuleNotFoundError):
        cli.build_parser()


@pytest.mark.parametrize(
    "raw, expected",
    [
        ({"export": {"quant_candidates": ["q4_k_m", "auto"]}}, "export.quant_candidates: Value error, 'auto' is not a quantization type"),
        ({"export": {"quant_candidates": ["q4_k_m", "Q4_K_M"]}}, "export.quant_candidates: Value error, a type is listed twice"),
        ({"export": {"quant_candidates": []}}, "export.quant_candidates: List should have at least 1 item"),
        ({"export": {"quant_candidate": ["q8_0"]}}, "unknown key 'export.quant_candidate' (did you mean 'quant_candidates'?)"),
    ],
)
def test_quant_candidates_are_checked(raw, expected):
    with pytest.raises(params.ParamsError) as err:
        params.parse(raw)
    assert expected in str(err.value)


def test_quant_defaults_to_auto_over_the_candidates_smallest_first():
    p = params.parse({})
    assert p.export.quant == "auto" and p.export.quant_candidates == ["q4_k_m", "q5_k_m", "q6_k", "q8_0"]

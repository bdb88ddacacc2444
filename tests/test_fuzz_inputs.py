"""Property-based fuzz of what users feed in: ingest + clean over generated JSONL files and LLaMA-Factory
data folders, and import-llamafactory over generated YAMLs (hypothesis, fixed seed).

Broken JSON, odd encodings, wrong types, huge and empty fields, mixed line endings: never a traceback,
every input line in exactly one count, and every error names the file and line, or the params key.
FUZZ_EXAMPLES sets the number of generated inputs per test (docs/inputs.md gives the figures of a run).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st

from conftest import REPO_ROOT
from lorapipe import cli
from lorapipe.core.chatlength import ChatLength
from lorapipe.core.errors import LorapipeError
from lorapipe.import_llamafactory.keys import MAPPED
from lorapipe.params import parse
from lorapipe.stages import clean, ingest

pytestmark = pytest.mark.slow  # about 10,000 generated inputs: minutes, not seconds

SEED = 20261207
EXAMPLES = {"jsonl": 4000, "llamafactory": 3000, "import": 3000}  # 10,000 generated inputs in all
SCALE = float(os.environ.get("FUZZ_SCALE", "1"))  # e.g. FUZZ_SCALE=0.1 for a quick look
SETTINGS = dict(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def examples(kind: str) -> int:
    return max(1, int(EXAMPLES[kind] * SCALE))


# ------------------------------------------------------------------------------------ generators
texts = st.one_of(st.text(max_size=40), st.sampled_from(["", " ", "最近压力很大", "I feel low.", "\u200b", "\ud800x"]),
                  st.just("x" * 20_000))
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True), texts)
json_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=8), inner, max_size=4)), max_leaves=12)
roles = st.sampled_from(["system", "user", "assistant", "tool", "USER", "", None, 3])
messages = st.lists(st.fixed_dictionaries({"role": roles, "content": st.one_of(texts, scalars)}), max_size=5)
lf_turns = st.lists(st.fixed_dictionaries({"from": st.sampled_from(["human", "gpt", "system", "observation", "x"]),
                                           "value": st.one_of(texts, scalars)}), max_size=5)
records = st.one_of(
    st.fixed_dictionaries({"messages": messages}),
    st.fixed_dictionaries({"conversations": lf_turns}, optional={"system": texts}),
    st.fixed_dictionaries({"instruction": st.one_of(texts, scalars), "output": st.one_of(texts, scalars)},
                          optional={"input": texts, "history": json_values, "system": texts}),
    json_values,
)


def encode(value) -> bytes:
    try:
        return json.dumps(value, ensure_ascii=False).encode("utf-8", "surrogatepass")
    except ValueError:  # NaN inside a dict key order etc. never happens; floats dump as NaN
        return b"null"


@st.composite
def line(draw) -> bytes:
    kind = draw(st.sampled_from(["record", "record", "record", "truncated", "bytes", "utf16", "latin1", "blank"]))
    if kind == "record":
        return encode(draw(records))
    if kind == "truncated":
        data = encode(draw(records))
        return data[: draw(st.integers(0, max(0, len(data) - 1)))]
    if kind == "bytes":
        return draw(st.binary(max_size=60)).replace(b"\n", b"")
    if kind == "utf16":
        return encode(draw(records)).decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass")
    if kind == "latin1":
        return json.dumps({"messages": [{"role": "user", "content": "café"}, {"role": "assistant", "content": "é"}]},
                          ensure_ascii=False).encode("latin-1")
    return draw(st.sampled_from([b"", b" ", b"\t", b"\r"]))


@st.composite
def jsonl_file(draw) -> bytes:
    lines = draw(st.lists(line(), max_size=12))
    out = draw(st.sampled_from([b"", b"\xef\xbb\xbf"]))
    for i, data in enumerate(lines):
        last = i == len(lines) - 1
        out += data + (draw(st.sampled_from([b"\n", b"\r\n", b""])) if last else draw(st.sampled_from([b"\n", b"\r\n"])))
    return out.replace(b"\n", b"\n")  # (lines hold no newline of their own: each is one line of the file)


def line_count(data: bytes) -> int:
    """Lines as a file iterates them: each ends at b"\\n"; a last one without it counts too."""
    return data.count(b"\n") + (1 if data and not data.endswith(b"\n") else 0)


# ------------------------------------------------------------------------------------ the checks
@pytest.fixture(scope="module")
def project(tmp_path_factory, smollm2_tokenizer_dir):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "data").mkdir()
    (root / "data" / "rules.yaml").write_text((REPO_ROOT / "data" / "rules.yaml").read_text(encoding="utf-8"), encoding="utf-8")
    return root, ChatLength(smollm2_tokenizer_dir), clean.load_rules(root / "data" / "rules.yaml")


def names_a_place(message: str, files: list[Path]) -> bool:
    """An error names an input file (with a line, a record or an entry) or a params key."""
    return bool(re.search(r"data\.sources\[\d+\]", message)) or any(str(f) in message for f in files)


def ingest_and_clean(project, sources: list[dict], inputs: list[Path]) -> tuple[dict, dict] | None:
    """Ingest + clean in `project`; None when ingest refused the input with an error naming its place."""
    root, length, rules = project
    params = parse({"data": {"sources": sources}})
    with contextlib.chdir(root):
        try:
            summary = ingest.run(params)
        except LorapipeError as exc:
            assert names_a_place(str(exc), inputs), str(exc)
            assert not list(root.rglob("*.partial")) and not list(root.rglob("*.tmp*"))
            return None
        raw = sorted(Path("data/raw").glob("*.jsonl"))
        with tempfile.TemporaryDirectory() as out_dir:
            handles = [open(Path(out_dir) / n, "wb") for n in ("train", "eval", "rejects")]
            try:
                metrics = clean.clean_files(raw, clean.Outputs(*handles), clean.Settings(max_tokens=256), length, rules,
                                            show_progress=False)
            finally:
                for h in handles:
                    h.close()
        raw_lines = sum(line_count(p.read_bytes()) for p in raw)
    # every line ingest wrote is read by clean or counted blank; every read line is kept or rejected
    assert metrics["read"] + metrics["blank_lines"] == raw_lines
    assert metrics["kept"] + metrics["rejected"] == metrics["read"] == summary["rows"] + summary["quarantined"]
    return summary, metrics


@seed(SEED)
@settings(max_examples=examples("jsonl"), **SETTINGS)
@given(data=jsonl_file())
def test_fuzz_jsonl_source_every_line_counted_once(project, data):
    root = project[0]
    path = root / "in" / "user.jsonl"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    done = ingest_and_clean(project, [{"name": "user", "type": "sharegpt", "path": str(path)}], [path])
    assert done is not None  # a JSONL file of any bytes is read line by line: nothing refuses it whole
    summary, _ = done
    assert summary["rows"] + summary["quarantined"] + summary["blank_lines"] == line_count(data)


@st.composite
def llamafactory_folder(draw):
    formatting = draw(st.sampled_from(["alpaca", "sharegpt", None, "ranking?"]))
    entry = {"file_name": draw(st.sampled_from(["d.jsonl", "d.json", "missing.json", "sub"]))}
    if formatting:
        entry["formatting"] = formatting
    if draw(st.booleans()):
        entry["columns"] = draw(st.dictionaries(st.sampled_from(["prompt", "query", "response", "history", "system", "messages"]),
                                                st.sampled_from(["instruction", "input", "output", "conversations", "messages", "nope"]),
                                                max_size=3))
    if draw(st.booleans()):
        entry["tags"] = draw(st.dictionaries(st.sampled_from(["role_tag", "content_tag", "user_tag", "assistant_tag"]),
                                             st.sampled_from(["from", "value", "role", "content", "human", "gpt"]), max_size=3))
    info = draw(st.one_of(st.just({"mine": entry}), st.just({"mine": entry}), json_values.map(lambda v: {"mine": v}), json_values))
    info_bytes = draw(st.one_of(st.just(None), st.binary(max_size=30)))
    body = draw(st.one_of(jsonl_file(), st.lists(records, max_size=8).map(lambda r: encode(r))))
    return info, info_bytes, body


@seed(SEED)
@settings(max_examples=examples("llamafactory"), **SETTINGS)
@given(case=llamafactory_folder())
def test_fuzz_llamafactory_folder_every_record_counted_once(project, case):
    info, info_bytes, body = case
    folder = Path(tempfile.mkdtemp(dir=project[0]))
    info_path = folder / "dataset_info.json"
    info_path.write_bytes(info_bytes if info_bytes is not None else encode(info))
    for name in ("d.jsonl", "d.json"):
        (folder / name).write_bytes(body)
    (folder / "sub").mkdir()
    (folder / "sub" / "part.jsonl").write_bytes(body)
    files = [info_path, folder / "d.jsonl", folder / "d.json", folder / "sub"]
    done = ingest_and_clean(project, [{"name": "lf", "type": "llamafactory", "dataset_info": str(info_path), "datasets": ["mine"]}], files)
    if done is None:
        return
    summary, _ = done
    # a JSON-lines file: every line is a row, a quarantine record or blank; a JSON array: every element
    text = body.lstrip(b"\xef\xbb\xbf \t\r\n")
    expected = len(json.loads(body.decode("utf-8-sig"))) if text[:1] == b"[" else line_count(body)
    assert summary["rows"] + summary["quarantined"] + summary["blank_lines"] == expected


LF_KEYS = sorted(MAPPED) + ["dataset", "dataset_dir", "stage", "finetuning_type", "do_train", "output_dir", "nonsense_key"]


@st.composite
def train_yaml(draw) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80))
    cfg = draw(st.dictionaries(st.sampled_from(LF_KEYS), st.one_of(scalars, json_values, st.sampled_from(
        ["lora", "sft", "all", "q_proj,v_proj", "cosine", "qwen", "gemma", "mine", "1e-4", "true"])), max_size=12))
    if draw(st.booleans()):
        cfg.update(stage="sft", finetuning_type="lora", model_name_or_path=draw(st.sampled_from(["Qwen/Qwen2.5-1.5B-Instruct", "/m", 3])))
    return yaml.safe_dump(cfg, allow_unicode=True).encode("utf-8") if draw(st.booleans()) else json.dumps(cfg, default=str).encode()


@seed(SEED)
@settings(max_examples=examples("import"), **SETTINGS)
@given(data=train_yaml())
def test_fuzz_import_llamafactory_never_a_traceback(project, data):
    folder = Path(tempfile.mkdtemp(dir=project[0]))
    path = folder / "train.yaml"
    path.write_bytes(data)
    (folder / "dataset_info.json").write_text(json.dumps({"mine": {"file_name": "d.jsonl"}}))
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = cli.main(["import-llamafactory", str(path), "--dataset-info", str(folder / "dataset_info.json"),
                       "--out", str(folder / "params.yaml")])
    text = err.getvalue()
    assert rc in (0, 2), text
    if rc == 2:  # the error names the YAML (with its key) or the params key the sections failed on
        message = text.split("error: ", 1)[1]
        assert str(path) in message or "dataset_info.json" in message, message
        assert not (folder / "params.yaml").exists()
    else:
        parse(yaml.safe_load((folder / "params.yaml").read_text(encoding="utf-8")))

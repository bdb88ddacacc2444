"""Stage `package`: the files that ship the model, kept in git (dvc.yaml `cache: false`).

- models/gguf/Modelfile for Ollama: FROM the quantized GGUF beside it, a TEMPLATE in Ollama's Go
  template syntax equivalent to the GGUF's own chat template, SYSTEM with the template's default
  system prompt, PARAMETER stop for the end-of-turn token(s) and the sampling defaults of `chat`.
- models/README.md, the model card: base model, data sources with row counts, LoRA and training
  params, every metric in metrics/*.json, the git commit and the dvc.lock hashes of the artifacts
  that produced it, and how to run it (lorapipe chat / serve, ollama create / run).

The Go template is chosen by the markers the chat template uses (ChatML `<|im_start|>`, Gemma
`<start_of_turn>`): Ollama cannot run Jinja, and a template we cannot translate is an error rather
than a Modelfile that silently prompts the model wrong. The default system prompt is found by
rendering the template itself (transformers' renderer) for a conversation without one.

dvc.lock is read, not declared a dependency: DVC rewrites it after every stage, so the hashes are
those of the upstream artifacts at the time this stage ran (it runs last).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import yaml

from lorapipe.core import gguf_meta, paths
from lorapipe.core.errors import LorapipeError
from lorapipe.core.io import write_text
from lorapipe.core.templates import CHATML_STOP, GEMMA_STOP, PRESETS

# Ollama templates (Go text/template), after Ollama's own qwen2.5 and gemma3 library templates.
# System messages reach them as .System (Ollama folds system messages and the Modelfile SYSTEM
# into it), so the loop renders user/assistant turns only.
CHATML_GO = """\
{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<|im_start|>user
{{ .Content }}<|im_end|>
{{ else if eq .Role "assistant" }}<|im_start|>assistant
{{ .Content }}{{ if not $last }}<|im_end|>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<|im_start|>assistant
{{ end }}
{{- end }}"""

# Gemma has no system role: like its Jinja template, the system text opens the first user turn,
# followed by a blank line; the assistant role is called "model". BOS is added by llama.cpp.
GEMMA_GO = """\
{{- $prefix := "" }}{{ if .System }}{{ $prefix = printf "%s\\n\\n" .System }}{{ end }}
{{- range $i, $_ := .Messages }}
{{- $last := eq (len (slice $.Messages $i)) 1 }}
{{- if eq .Role "user" }}<start_of_turn>user
{{ $prefix }}{{ .Content }}<end_of_turn>
{{ $prefix = "" }}
{{- else if eq .Role "assistant" }}<start_of_turn>model
{{ .Content }}{{ if not $last }}<end_of_turn>
{{ end }}
{{- end }}
{{- if and $last (ne .Role "assistant") }}<start_of_turn>model
{{ end }}
{{- end }}"""

FAMILIES = {
    # family: (markers that identify it, Go template, stop strings, system block opening)
    # (stop strings: the family's end-of-turn token from core/templates.py; ChatML also stops at a new turn)
    "chatml": (("<|im_start|>", CHATML_STOP), CHATML_GO, (CHATML_STOP, "<|im_start|>"), "<|im_start|>system\n"),
    "gemma": (("<start_of_turn>", GEMMA_STOP), GEMMA_GO, (GEMMA_STOP,), None),
}

PROBE = "\u2063lorapipe-probe\u2063"  # a user message no template adds itself


def template_family(chat_template: str) -> str:
    for family, (markers, *_rest) in FAMILIES.items():
        if all(m in chat_template for m in markers):
            return family
    raise LorapipeError("the GGUF's chat template uses neither ChatML (<|im_start|>/<|im_end|>) nor Gemma "
                        "(<start_of_turn>/<end_of_turn>) markers; the package stage cannot translate it into an "
                        "Ollama TEMPLATE")


def render(chat_template: str, messages: list[dict], bos: str = "", eos: str = "") -> str:
    """Render a chat template exactly as transformers' apply_chat_template does."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, _ = render_jinja_template([messages], chat_template=chat_template, add_generation_prompt=True,
                                        bos_token=bos, eos_token=eos)
    return rendered[0]


def default_system(chat_template: str, family: str) -> str | None:
    """The system prompt the template inserts when a conversation has none (SmolLM2 and Qwen do)."""
    opening = FAMILIES[family][3]
    if opening is None:
        return None
    text = render(chat_template, [{"role": "user", "content": PROBE}])
    head = text.split(PROBE)[0]
    if opening not in head:
        return None
    system = head.split(opening, 1)[1]
    return system.split("<|im_end|>", 1)[0] if "<|im_end|>" in system else None


def _quote(text: str) -> str:
    if '"""' in text:
        raise LorapipeError('a Modelfile value cannot contain """: ' + text[:60])
    return f'"""{text}"""'


def modelfile(gguf_name: str, chat_template: str, chat, num_ctx: int, source: str) -> str:
    family = template_family(chat_template)
    _, go_template, stops, _ = FAMILIES[family]
    lines = [
        f"# Ollama Modelfile written by `lorapipe package` from {source} (chat template: {family}).",
        "#   ollama create <name> -f models/gguf/Modelfile && ollama run <name>",
        f"FROM ./{gguf_name}",
        f"TEMPLATE {_quote(go_template)}",
    ]
    system = chat.system if chat.system else default_system(chat_template, family)
    if system:
        lines.append(f"SYSTEM {_quote(system)}")
    lines += [f'PARAMETER stop "{s}"' for s in stops]
    lines += [
        f"PARAMETER temperature {chat.temperature:g}",
        f"PARAMETER top_p {chat.top_p:g}",
        "PARAMETER top_k 50",  # transformers' and LLaMA-Factory chat's default, as `lorapipe chat`
        f"PARAMETER repeat_penalty {chat.repetition_penalty:g}",
        f"PARAMETER num_predict {chat.max_new_tokens}",
        f"PARAMETER num_ctx {num_ctx}",
    ]
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- model card
def flatten(obj, prefix: str = "") -> list[tuple[str, object]]:
    """Nested metrics as (dotted.key, value) rows, in file order."""
    if isinstance(obj, dict):
        rows = []
        for k, v in obj.items():
            rows += flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return rows
    if isinstance(obj, list) and obj and all(isinstance(v, (dict, list)) for v in obj):
        rows = []
        for i, v in enumerate(obj):
            rows += flatten(v, f"{prefix}[{i}]")
        return rows
    return [(prefix, obj)]


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, dict)):
        return "`" + json.dumps(value, ensure_ascii=False) + "`"
    return "`null`" if value is None else str(value).replace("|", "\\|").replace("\n", " ")


def read_metrics(metrics_dir: Path) -> dict[str, dict]:
    out = {}
    for path in sorted(metrics_dir.glob("*.json")):
        try:
            out[path.name] = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise LorapipeError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    return out


def read_lock(lock_path: Path) -> dict:
    if not lock_path.is_file():
        return {}
    try:
        return yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise LorapipeError(f"{lock_path}: not valid YAML: {exc}") from None


def lock_outs(lock: dict) -> list[tuple[str, str, str, int | None]]:
    """(stage, path, md5, size) of every stage output recorded in dvc.lock (package's own excluded)."""
    rows = []
    for stage, entry in (lock.get("stages") or {}).items():
        if stage == "package":
            continue
        for out in entry.get("outs") or []:
            rows.append((stage, out.get("path", "?"), out.get("md5") or out.get("hash") or "?", out.get("size")))
    return rows


def recorded_params(lock: dict, params) -> tuple[dict, bool]:
    """The params the upstream stages ran with, as dvc.lock recorded them ({'train': {...}, 'data.sources':
    [...], ...}), and whether they came from there. Reading them from dvc.lock rather than params.yaml
    describes the artifacts as built (and keeps this stage's own params to package/chat/serve).
    Without a dvc.lock (`lorapipe package` run by hand) the current params stand in, and the card says so."""
    found: dict = {}
    for entry in (lock.get("stages") or {}).values():
        for values in (entry.get("params") or {}).values():
            found.update(values or {})
    if found:
        return found, True
    dump = params.model_dump()
    return {"model": dump["model"], "data.sources": dump["data"]["sources"], "train": dump["train"],
            "lora": dump["lora"], "merge": dump["merge"], "export.outtype": dump["export"]["outtype"]}, False


def _get(recorded: dict, key: str, default=None):
    """recorded['train']['lr'] or recorded['train.lr'], as DVC records either form."""
    if key in recorded:
        return recorded[key]
    head, _, rest = key.partition(".")
    node = recorded.get(head)
    for part in rest.split(".") if rest else []:
        if not isinstance(node, dict):
            return default
        node = node.get(part)
    return default if node is None and rest else node


def git_state(pipeline_outputs: set[str]) -> tuple[str, list[str] | None]:
    """(commit, changed tracked files) of the working tree; ('not a git checkout ...', None) outside one.

    Files the pipeline itself rewrites during `dvc repro` (dvc.lock, outputs kept in git such as
    metrics/*.json) are not counted: they always differ from the commit until the run is committed."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout (or no commit yet)", None
    changed = [line[3:].strip().strip('"') for line in status.splitlines() if line.strip()]
    ignored = pipeline_outputs | {"dvc.lock", paths.MODELFILE.as_posix(), paths.MODEL_CARD.as_posix()}
    return commit, [f for f in changed if f not in ignored and not any(f.startswith(o.rstrip("/") + "/") for o in ignored)]


def _table(header: tuple[str, ...], rows: list[tuple]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in rows]
    return lines


def quantization_section(quantize: dict) -> list[str]:
    """Every quantization type stage quantize tried, with its figures, and why it kept the one it kept."""
    candidates = quantize.get("candidates") or []
    if not candidates:
        return []
    rows = [(c.get("type"), _num(c.get("size_mb"), ".1f"), _num(c.get("bits_per_weight"), ".2f"),
             _num(c.get("argmax_agreement"), ".3f"), _num(c.get("ppl_delta_pct"), "+.2f"),
             _num(c.get("finetune_kept"), ".3f"), "yes" if c.get("passed") else "no") for c in candidates]
    return ["", "## Quantization", "", quantize.get("choice", ""), "",
            *_table(("type", "MB", "bits/weight", "argmax agreement", "ppl change %", "fine-tune kept", "passed"), rows)]


ANSWER_ROWS = (("hf_base", "base (HF)"), ("hf_merged", "merged (HF)"), ("quant", "quantized (GGUF)"), ("ref", "reference"))


def answers_section(evaluation: dict) -> list[str]:
    """evaluate's answer figures per variant (metrics/eval.json `answers_*`, docs/answers.md)."""
    if "answers_rows" not in evaluation:
        return []
    rows = [(label, *(_num(evaluation.get(f"answers_{k}_{variant}"), spec) for k, spec in (
        ("bleu4", ".2f"), ("rouge1", ".2f"), ("rouge2", ".2f"), ("rougel", ".2f"), ("distinct2", ".3f"),
        ("len", ".1f"), ("seqrep4", ".3f"), ("cut", ".0%"), ("empty", ".0%")))) for variant, label in ANSWER_ROWS]
    return ["", "## Answers", "",
            f"Greedy answers to {evaluation['answers_rows']} eval prompts (`reports/predictions/`), BLEU-4 and ROUGE as "
            "LLaMA-Factory's `do_predict` scores them. They show comparability with LLaMA-Factory runs and "
            "degeneration (loops, cut or empty answers), not answer quality as people judge it. The quantized "
            f"file gives the merged model's exact answer to {_num(evaluation.get('answers_exact_quant_vs_merged'), '.0%')} "
            f"of the prompts (BLEU-4 {_num(evaluation.get('answers_bleu4_quant_vs_merged'), '.2f')} against them).", "",
            *_table(("variant", "BLEU-4", "ROUGE-1", "ROUGE-2", "ROUGE-L", "distinct-2", "mean tokens", "seq-rep-4",
                     "cut", "empty"), rows)]


def _num(value, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def model_card(params, *, gguf: Path, meta: dict, family: str, metrics: dict[str, dict], lock: dict,
               commit: str, changed: list[str] | None, ollama_name: str) -> str:
    rec, from_lock = recorded_params(lock, params)
    model = _get(rec, "model") or {}
    name = meta.get("general.name") or "lorapipe-model"
    description = meta.get("general.description") or ""
    base = model.get("source", "?")
    preset = PRESETS.get(model.get("preset") or "")
    if base == "embedded" and preset:
        base = f"{preset.hub_id} (embedded copy)"
    quant = gguf_meta.file_type(gguf)  # the type quantize chose (export.quant may say `auto`)
    L = ["---", f"base_model: {json.dumps(base, ensure_ascii=False)}", "tags: [lorapipe, lora, gguf, chat]",
         f"license: {json.dumps(params.package.license or 'unknown')}", "---", "",
         f"# {name}", "", *([description, ""] if description else []),
         f"A LoRA fine-tune of **{base}** built by lorapipe: merged, converted to GGUF and quantized to **{quant}** "
         f"(`{gguf.as_posix()}`, {gguf.stat().st_size / 1e6:.1f} MB, architecture "
         f"`{meta.get('general.architecture', '?')}`, chat template: {family}).", ""]
    if not params.package.license:
        L += ["License: unknown — set `package.license` to the base model's license (see its model card).", ""]
    if not from_lock:
        L += ["> Params below are read from params.yaml: no dvc.lock yet (run through `dvc repro` for the "
              "recorded ones).", ""]

    L += ["## Base model", ""]
    L += _table(("key", "value"), [(f"model.{k}", v) for k, v in model.items()])
    L += ["", "## Data", ""]
    data = metrics.get("data.json", {})
    per_source = data.get("sources", {}) if isinstance(data, dict) else {}
    declared = {s.get("name"): s.get("type") for s in (_get(rec, "data.sources") or []) if isinstance(s, dict)}
    rows = []
    for src in dict.fromkeys([*declared, *per_source]):
        counts = per_source.get(src, {})
        rows.append((src, declared.get(src, "?"), counts.get("read"), counts.get("kept"), counts.get("rejected")))
    L += _table(("source", "type", "rows read", "rows kept", "rows rejected"), rows)
    if data:
        L += ["", f"Total: {data.get('read')} rows read, {data.get('kept')} kept ({data.get('train')} train / "
                  f"{data.get('eval')} eval), {data.get('rejected')} rejected."]
    L += ["", "## Training", ""]
    rows = []
    for section in ("lora", "train", "merge"):
        value = _get(rec, section)
        rows += [(f"{section}.{k}", v) for k, v in value.items()] if isinstance(value, dict) else []
    if _get(rec, "export.outtype") is not None:
        rows.append(("export.outtype", _get(rec, "export.outtype")))
    rows.append(("export.quant", _get(rec, "export.quant", params.export.quant)))
    L += _table(("param", "value"), rows)
    L += quantization_section(metrics.get("quantize.json", {}))
    L += answers_section(metrics.get("eval.json", {}))
    parity = metrics.get("quantize.json", {}).get("parity", {})
    evaluation = metrics.get("eval.json", {})
    if parity or evaluation:
        L += ["", "## Gates", ""]
    if parity.get("stops_on_its_own") is False:
        L += [f"- **Does not stop on its own**: greedy answers of the fine-tuned model (HF and GGUF alike) ended on the "
              f"end-of-turn token in only {parity.get('hf_stop_fraction', 0):.0%} of the checked prompts within "
              f"{_get(rec, 'export.parity.max_new_tokens', params.export.parity.max_new_tokens)} tokens. Chat answers "
              "will run to the length limit: start from an instruct checkpoint or train longer."]
    elif parity:
        L += [f"- Stops on its own: the GGUF ends its answers wherever the HF model does "
              f"({parity.get('hf_stop_fraction', 0):.0%} of the checked prompts)."]
    if evaluation.get("finetune_kept") is not None:
        L += [f"- The quantized file keeps {evaluation['finetune_kept']:.0%} of the fine-tune (1 − KLD to the "
              "fine-tuned model / KLD of the base, on assistant tokens)."]
    L += ["", "## Metrics", ""]
    if not metrics:
        L += ["(no metrics/*.json found)", ""]
    for fname, obj in metrics.items():
        shown = {k: v for k, v in obj.items() if k != "candidates"} if isinstance(obj, dict) else obj  # table above
        L += [f"### metrics/{fname}", ""] + _table(("metric", "value"), flatten(shown)) + [""]
    L += ["## Provenance", ""]
    state = ""
    if changed:
        listed = ", ".join(f"`{f}`" for f in changed[:10]) + (f" and {len(changed) - 10} more" if len(changed) > 10 else "")
        state = f" (with uncommitted changes: {listed})"
    L += [f"- git commit: `{commit}`{state}", "- artifacts (md5 from dvc.lock; `.dir` = a folder's manifest):", ""]
    outs = lock_outs(lock)
    L += _table(("stage", "path", "md5", "bytes"), outs) if outs else ["(no dvc.lock yet: run `dvc repro`)"]
    url = f"http://{params.serve.host}:{params.serve.port}"
    L += ["", "## How to run it", "",
          "```bash",
          "lorapipe chat                          # quantized GGUF through llama.cpp (/reset, /system <text>, /exit)",
          "lorapipe chat --backend hf             # merged model (models/merged) through transformers",
          'lorapipe chat --prompt "你好" --temperature 0   # one-shot answer, for scripts',
          f"lorapipe serve                         # OpenAI-compatible API on {url}/v1 (params serve.host/port)",
          f"curl {url}/v1/chat/completions -H 'Content-Type: application/json' \\",
          "     -d '{\"messages\": [{\"role\": \"user\", \"content\": \"hello\"}]}'",
          f"ollama create {ollama_name} -f models/gguf/Modelfile",
          f"ollama run {ollama_name}",
          "```", "",
          f"The Modelfile points at `./{gguf.name}` beside it and carries the chat template, stop tokens and the "
          "sampling defaults (params `chat`).", ""]
    return "\n".join(L)


def run(params) -> dict:
    gguf = paths.QUANT_GGUF
    if not gguf.is_file():
        raise LorapipeError(f"{gguf}: quantized GGUF not found; run `lorapipe quantize` first")
    meta = gguf_meta.metadata(gguf)
    chat_template = meta.get("tokenizer.chat_template")
    if not chat_template:
        raise LorapipeError(f"{gguf}: no chat template in its metadata (tokenizer.chat_template)")
    family = template_family(chat_template)
    ollama_name = params.package.ollama_name or meta.get("general.name") or "lorapipe-model"
    text = modelfile(gguf.name, chat_template, params.chat, params.package.num_ctx, gguf.as_posix())
    metrics = read_metrics(paths.METRICS_DIR)
    lock = read_lock(Path("dvc.lock"))
    commit, changed = git_state({path for _, path, _, _ in lock_outs(lock)} | {paths.METRICS_DIR.as_posix()})
    card = model_card(params, gguf=gguf, meta=meta, family=family, metrics=metrics, lock=lock,
                      commit=commit, changed=changed, ollama_name=ollama_name)
    write_text(paths.MODELFILE, text)
    write_text(paths.MODEL_CARD, card)
    return {"modelfile": paths.MODELFILE.as_posix(), "card": paths.MODEL_CARD.as_posix(), "template": family,
            "metrics_files": len(metrics), "commit": commit[:12],
            "uncommitted": len(changed) if changed is not None else "n/a"}

"""The run page of `lorapipe ui`: what the last run measured, read from the committed metrics.

Everything here comes from small files kept in git (metrics/*.json, dvclive/plots/, params.yaml),
so the page also works on a clone that has only pulled metrics, without any model file. pandas builds
the tables (counts by source and reason, the variants, the experiments of `dvc exp show --json`).
"""

from __future__ import annotations

import html
import json
import subprocess
from pathlib import Path

import pandas as pd

from lorapipe.core import paths
from lorapipe.core.errors import LorapipeError

LOSS_TSV = Path("dvclive/plots/metrics/train/loss.tsv")
EVAL_LOSS_TSV = Path("dvclive/plots/metrics/eval/loss.tsv")
EXP_SHOW_TIMEOUT_S = 60
# Metrics shown per experiment (dvc exp show has dozens); the params shown are those that differ.
EXP_METRICS = ("train_loss", "eval_loss", "ppl_hf_merged", "quant", "ppl_quant", "ppl_delta_pct", "kld_quant_vs_f16",
               "kld_quant_vs_bf16", "finetune_kept", "size_quant_mb", "decode_tok_s_quant")


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def metrics(root: Path) -> dict:
    """metrics/{data,train,quantize,eval}.json; a missing file is None (a stage not run yet)."""
    return {name: _read_json(root / paths.METRICS_DIR / f"{name}.json") for name in ("data", "train", "quantize", "eval")}


def counts_by_source(data: dict) -> pd.DataFrame:
    rows = {src: {k: v.get(k, 0) for k in ("read", "kept", "train", "eval", "rejected")}
            for src, v in sorted(data.get("sources", {}).items())}
    rows["all"] = {k: data.get(k, 0) for k in ("read", "kept", "train", "eval", "rejected")}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("source")


def rejects_by_reason(data: dict) -> pd.DataFrame:
    dropped = pd.Series(data.get("dropped", {}), name="rows", dtype="int64")
    return dropped[dropped > 0].sort_values(ascending=False).rename_axis("reason").to_frame()


def unquantized(ev: dict) -> str:
    """The converted file's type (export.outtype after `auto`): the suffix of its keys in eval.json."""
    return ev.get("unquantized", "f16")


def variants(ev: dict) -> pd.DataFrame:
    """One row per scored variant: the evaluate stage's ppl, KLD, size and speed."""
    ref = unquantized(ev)
    rows = [
        ("base (HF)", ev.get("ppl_hf_base"), ev.get("loss_assistant_hf_base"), None, None, None, None),
        ("merged (HF)", ev.get("ppl_hf_merged"), ev.get("loss_assistant_hf_merged"), None, ev.get("size_hf_merged_mb"),
         ev.get("prompt_tok_s_hf_merged"), ev.get("decode_tok_s_hf_merged")),
        (f"{ref} (GGUF)", ev.get(f"ppl_{ref}"), ev.get(f"loss_assistant_{ref}"), None, ev.get(f"size_{ref}_mb"),
         ev.get(f"prompt_tok_s_{ref}"), ev.get(f"decode_tok_s_{ref}")),
        (f"{ev.get('quant', 'quant')} (GGUF)", ev.get("ppl_quant"), ev.get("loss_assistant_quant"), ev.get(f"kld_quant_vs_{ref}"),
         ev.get("size_quant_mb"), ev.get("prompt_tok_s_quant"), ev.get("decode_tok_s_quant")),
    ]
    df = pd.DataFrame(rows, columns=["variant", "ppl", "assistant loss", f"KLD vs {ref}", "size MB", "prompt tok/s",
                                     "decode tok/s"])
    return df.set_index("variant")


ANSWER_FIGURES = {"bleu4": "BLEU-4", "rouge1": "ROUGE-1", "rouge2": "ROUGE-2", "rougel": "ROUGE-L",
                  "distinct1": "distinct-1", "distinct2": "distinct-2", "len": "mean tokens", "seqrep4": "seq-rep-4",
                  "cut": "cut share", "empty": "empty share"}


def answer_scores(ev: dict) -> pd.DataFrame:
    """One row per variant (and the references): evaluate's `answers_*` figures (docs/answers.md)."""
    from lorapipe.core.predictions import VARIANTS

    rows = {label: {name: ev.get(f"answers_{key}_{variant}") for key, name in ANSWER_FIGURES.items()}
            for variant, label in {**VARIANTS, "ref": "reference"}.items()}
    df = pd.DataFrame.from_dict(rows, orient="index").rename_axis("variant")
    df["same as merged"] = [None, None, ev.get("answers_exact_quant_vs_merged"), None]
    return df


def answers_side_by_side(root: Path) -> pd.DataFrame | None:
    """reports/predictions/: a row per prompt, the reference beside each variant's answer; None when
    evaluate has not written them. A malformed file raises LorapipeError naming its line."""
    from lorapipe.core.predictions import VARIANTS, read_predictions

    folder = root / paths.REPORTS_DIR / "predictions"
    files = {label: folder / variant / "generated_predictions.jsonl" for variant, label in VARIANTS.items()}
    if not all(f.is_file() for f in files.values()):
        return None
    per_variant = {label: read_predictions(f) for label, f in files.items()}
    first = next(iter(per_variant.values()))
    table = {"prompt": [r["prompt"] for r in first], "reference": [r["label"] for r in first]}
    table.update({label: [r["predict"] for r in rows] for label, rows in per_variant.items()})
    return pd.DataFrame(table).rename_axis("#")


def gates(m: dict, params) -> pd.DataFrame:
    """Each gate of quantize and evaluate: the measured value, the threshold of params.yaml, the outcome."""
    rows = []
    par = (m.get("quantize") or {}).get("parity")
    pp = params.export.parity
    if par:
        n = par.get("n_prompts", 0)
        limit = par.get("max_abs_logit_diff_limit", pp.max_abs_logit_diff)
        rows += [
            ("quantize", "tokens HF = GGUF", f"{par.get('tokens_match')}/{n}", f"{n}/{n}", par.get("tokens_match") == n),
            ("quantize", "template HF = GGUF", f"{par.get('template_match')}/{n}", f"{n}/{n}", par.get("template_match") == n),
            ("quantize", "BOS not doubled", par.get("bos_doubled"), 0, par.get("bos_doubled") == 0),
            ("quantize", "GGUF stops where HF stops", f"{_fmt(par.get('stop_fraction'))} (HF {_fmt(par.get('hf_stop_fraction'))})",
             ">= HF's", (par.get("stop_fraction") or 0) >= (par.get("hf_stop_fraction") or 0)),
            ("quantize", "max |logit| unquantized vs HF", _fmt(par.get("f16_max_abs_logit_diff")), f"<= {_fmt(limit)}",
             (par.get("f16_max_abs_logit_diff") or 0) <= limit),
            ("quantize", "argmax unquantized vs HF", _fmt(par.get("f16_argmax_agreement")), f">= {pp.min_argmax_agreement}",
             (par.get("f16_argmax_agreement") or 0) >= pp.min_argmax_agreement),
            ("quantize", "argmax quant vs unquantized", _fmt(par.get("quant_argmax_agreement")),
             f">= {pp.min_argmax_agreement_quant}",
             (par.get("quant_argmax_agreement") or 0) >= pp.min_argmax_agreement_quant),
        ]
    ev = m.get("eval")
    ep = params.evaluate
    if ev:
        ref = unquantized(ev)
        rows += [
            ("evaluate", f"ppl {ref} GGUF vs HF merged %", _fmt(ev.get(f"ppl_{ref}_vs_hf_pct")),
             f"|x| <= {ep.max_ppl_f16_vs_hf_pct}", abs(ev.get(f"ppl_{ref}_vs_hf_pct", 0)) <= ep.max_ppl_f16_vs_hf_pct),
            ("evaluate", f"ppl quant vs {ref} %", _fmt(ev.get("ppl_delta_pct")), f"|x| <= {ep.max_ppl_delta_pct}",
             abs(ev.get("ppl_delta_pct", 0)) <= ep.max_ppl_delta_pct),
        ]
        if ev.get("finetune_kept") is not None:
            rows.append(("evaluate", "fine-tune kept by the quantized file", _fmt(ev["finetune_kept"]),
                         f">= {ep.min_finetune_kept}", ev["finetune_kept"] >= ep.min_finetune_kept))
    df = pd.DataFrame(rows, columns=["stage", "gate", "measured", "threshold", "passed"])
    df["passed"] = df["passed"].map({True: "pass", False: "FAIL"})
    return df


def quant_candidates(quantize: dict) -> pd.DataFrame:
    """Every quantization type stage quantize tried (metrics/quantize.json `candidates`), in order."""
    cols = {"type": "type", "size_mb": "MB", "bits_per_weight": "bits/weight", "argmax_agreement": "argmax agreement",
            "ppl_delta_pct": "ppl change %", "finetune_kept": "fine-tune kept", "passed": "passed"}
    df = pd.DataFrame([{label: c.get(key) for key, label in cols.items()} for c in quantize.get("candidates") or []])
    if not df.empty:
        df["passed"] = df["passed"].map({True: "pass", False: "FAIL"})
        df = df.set_index("type")
    return df


def _fmt(value) -> str:
    return "—" if value is None else f"{value:.4g}" if isinstance(value, float) else str(value)


def experiments(root: Path, dvc: str = "dvc") -> tuple[pd.DataFrame | None, str]:
    """`dvc exp show --json` as a table: one row per commit/experiment, the params that differ and
    the key metrics. Returns (None, why) when dvc cannot say (no repository, dvc missing, timeout)."""
    try:
        proc = subprocess.run([dvc, "exp", "show", "--json"], cwd=root, capture_output=True, text=True,
                              timeout=EXP_SHOW_TIMEOUT_S, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return None, f"`dvc exp show --json` did not run: {exc}"
    if proc.returncode != 0:
        return None, f"`dvc exp show --json` failed: {(proc.stderr or proc.stdout).strip().splitlines()[-1:]}"
    try:
        return experiments_table(json.loads(proc.stdout)), ""
    except (ValueError, KeyError, TypeError) as exc:
        return None, f"`dvc exp show --json` gave output this page cannot read ({exc})"


def _flat(prefix: str, node, out: dict) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _flat(f"{prefix}{k}.", v, out)
    elif not isinstance(node, list):
        out[prefix[:-1]] = node


def _exp_name(entry: dict) -> str:
    rev = str(entry.get("rev", ""))
    return entry.get("name") or (rev[:7] if len(rev) == 40 else rev)


def _exp_row(entry: dict, name: str) -> dict:
    data = entry.get("data") or {}
    row: dict = {"experiment": name}
    params, mets = {}, {}
    for file_data in (data.get("params") or {}).values():
        _flat("", (file_data or {}).get("data"), params)
    for file_data in (data.get("metrics") or {}).values():
        _flat("", (file_data or {}).get("data"), mets)
    row.update({f"param {k}": v for k, v in params.items()})
    row.update({k: mets.get(k) for k in EXP_METRICS})
    return row


def experiments_table(exp_json: list) -> pd.DataFrame:
    rows = []
    for commit in exp_json:
        rows.append(_exp_row(commit, _exp_name(commit)))
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                rows.append(_exp_row(rev, _exp_name(rev)))
    df = pd.DataFrame(rows)
    if df.empty:
        return df
    df = df.set_index("experiment")
    params = [c for c in df.columns if c.startswith("param ")]
    varying = [c for c in params if df[c].astype(str).nunique() > 1]
    return df[[*varying, *[c for c in EXP_METRICS if c in df.columns]]].rename(
        columns=lambda c: c.removeprefix("param "))


def loss_curve_svg(root: Path, width: int = 560, height: int = 220) -> str | None:
    """Train loss per step (and eval loss points) from dvclive's TSVs as an inline SVG."""
    try:
        train = pd.read_csv(root / LOSS_TSV, sep="\t")
    except (OSError, ValueError):
        return None
    try:
        ev = pd.read_csv(root / EVAL_LOSS_TSV, sep="\t")
    except (OSError, ValueError):
        ev = pd.DataFrame(columns=["step", "loss"])
    if train.empty:
        return None
    steps = pd.concat([train["step"], ev["step"]])
    losses = pd.concat([train["loss"], ev["loss"]])
    x0, x1 = float(steps.min()), float(max(steps.max(), steps.min() + 1))
    y0, y1 = float(losses.min()), float(max(losses.max(), losses.min() + 1e-6))
    pad = 36

    def xy(step, loss):
        return (pad + (step - x0) / (x1 - x0) * (width - 2 * pad),
                height - pad - (loss - y0) / (y1 - y0) * (height - 2 * pad))

    line = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, l) for s, l in zip(train["step"], train["loss"])))
    dots = "".join(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="4" class="eval"><title>eval loss {l:.4f} at step {s}</title></circle>'
                   for s, l in zip(ev["step"], ev["loss"]) for x, y in [xy(s, l)])
    return (f'<svg class="loss" viewBox="0 0 {width} {height}" width="{width}" height="{height}" role="img" '
            f'aria-label="training loss per step">'
            f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" class="axis"/>'
            f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" class="axis"/>'
            f'<text x="{pad}" y="{pad - 8}">{y1:.2f}</text><text x="{pad}" y="{height - 8}">{y0:.2f}</text>'
            f'<text x="{width - pad}" y="{height - 8}" text-anchor="end">step {int(x1)}</text>'
            f'<polyline points="{line}" class="train"/>{dots}'
            f'<text x="{width - pad}" y="{pad - 8}" text-anchor="end">— train/loss  ● eval/loss</text></svg>')


def _table(df: pd.DataFrame, caption: str) -> str:
    return (f"<h3>{html.escape(caption)}</h3>"
            + df.to_html(classes="grid", border=0, float_format=lambda v: f"{v:.4g}", na_rep="—"))


def render(root: Path, params, dvc: str = "dvc") -> str:
    """The run page as an HTML fragment (the ui's Run tab)."""
    m = metrics(root)
    parts = []
    if m["data"]:
        parts.append(_table(counts_by_source(m["data"]), "Data: rows by source (clean)"))
        parts.append(_table(rejects_by_reason(m["data"]), "Data: rejected rows by reason"))
    else:
        parts.append("<p>metrics/data.json is missing: run <code>dvc repro clean</code> (or <code>git pull</code>).</p>")
    t = m["train"]
    if t:
        parts.append("<h3>Training</h3><p>" + html.escape(
            f"eval loss {t.get('eval_loss')} (base {t.get('eval_loss_base')}), train loss {t.get('train_loss')}, "
            f"{t.get('steps')} steps, {t.get('train_rows')} rows, {t.get('train_tokens_per_s')} tokens/s") + "</p>")
    svg = loss_curve_svg(root)
    parts.append(svg or "<p>No dvclive loss curve (dvclive/plots/metrics/train/loss.tsv) yet.</p>")
    if m["eval"]:
        parts.append(_table(variants(m["eval"]), "Variants (evaluate, same eval token stream)"))
        if "answers_rows" in m["eval"]:
            parts.append(_table(answer_scores(m["eval"]), f"Answers to {m['eval']['answers_rows']} eval prompts "
                                "(BLEU/ROUGE as LLaMA-Factory scores them; docs/answers.md)"))
    try:
        side = answers_side_by_side(root)
    except LorapipeError as exc:
        parts.append(f"<p>{html.escape(str(exc))}</p>")
    else:
        if side is not None:
            parts.append("<h3>Answers side by side (reports/predictions/)</h3>"
                         + side.to_html(classes="grid answers", border=0, na_rep="—"))
    q = m["quantize"] or {}
    candidates = quant_candidates(q)
    if not candidates.empty:
        parts.append(_table(candidates, "Quantization candidates (quantize)") + f"<p>{html.escape(q.get('choice', ''))}</p>")
    g = gates(m, params)
    if not g.empty:
        parts.append(_table(g.set_index(["stage", "gate"]), "Gates"))
    exps, why = experiments(root, dvc)
    if exps is not None and not exps.empty:
        parts.append(_table(exps, "Experiments (dvc exp show)"))
    else:
        parts.append(f"<h3>Experiments</h3><p>{html.escape(why or 'none yet: dvc exp run -S lora.rank=8')}</p>")
    return "\n".join(parts)

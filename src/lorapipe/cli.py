"""`lorapipe <stage>`: one subcommand per dvc.yaml stage, plus chat / serve / ui / import-llamafactory.

Thin on purpose: parse flags, load params once, run the stage's `run(params)`, print its one-line
summary. Stage modules are imported lazily so `lorapipe clean` does not pay for torch imports.
"""

from __future__ import annotations

import argparse
import importlib
import sys

STAGES = ("base", "ingest", "clean", "train", "merge", "convert", "quantize", "evaluate", "package")
# Each names the paths the stage writes, its dvc.yaml outs (tests/test_dvc_graph.py checks the two agree).
STAGE_HELP = {
    "base": "materialise the base model as a plain HF folder (models/base/)",
    "ingest": "read every data source into ShareGPT rows (data/raw/<source>.jsonl)",
    "clean": "validate, filter, dedupe and split (data/clean/, metrics/data.json)",
    "train": "LoRA fine-tune the base model (models/adapter/, metrics/train.json, dvclive/; "
             "models/checkpoints/ until it finishes)",
    "merge": "merge the adapter into the base (models/merged/)",
    "convert": "convert the merged model to GGUF with llama.cpp (models/gguf/model-<export.outtype>.gguf)",
    "quantize": "quantize the GGUF with llama-quantize to the first type that passes the parity and quality gates "
                "(models/gguf/model-quant.gguf, models/gguf/model-quant.measures.json, metrics/quantize.json, "
                "plots/quant_candidates.json)",
    "evaluate": "perplexity, KLD, size and speed of every variant, their answers to the eval prompts and the "
                "answers' scores (metrics/eval.json, plots/variants.json, plots/answers.json, reports/samples.md, "
                "reports/predictions/)",
    "package": "write the Ollama Modelfile and the model card (models/gguf/Modelfile, models/README.md)",
}


def _run_stage(name: str, args: argparse.Namespace) -> int:
    from lorapipe import params as params_mod
    from lorapipe.core.log import Timer, summary

    params = params_mod.load(args.params)
    stage = importlib.import_module(f"lorapipe.stages.{name}")
    if hasattr(stage, "inputs"):  # what it reads from outside the graph must be a dep DVC checks
        from lorapipe.core.inputs import check_declared

        check_declared(name, stage.inputs(params))
    with Timer() as t:
        fields = stage.run(params) or {}
    print(summary(name, fields, t.seconds), flush=True)
    return 0


def _run_command(name: str, args: argparse.Namespace) -> int:
    module = importlib.import_module(f"lorapipe.{name.replace('-', '_')}")
    return module.main(args) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lorapipe", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in STAGES:
        p = sub.add_parser(name, help=STAGE_HELP[name], description=STAGE_HELP[name])
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        p.set_defaults(handler=_run_stage)
    for module_name in ("chat", "serve", "ui", "import_llamafactory"):
        module = importlib.import_module(f"lorapipe.{module_name}")  # a broken import fails here, loudly
        p = sub.add_parser(module_name.replace("_", "-"), help=module.HELP, description=module.HELP)
        p.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
        module.add_arguments(p)
        p.set_defaults(handler=_run_command)
    return parser


def main(argv: list[str] | None = None) -> int:
    from lorapipe.core.errors import LorapipeError
    from lorapipe.params import ParamsError

    args = build_parser().parse_args(argv)
    try:
        return args.handler(args.command, args)
    except (LorapipeError, ParamsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

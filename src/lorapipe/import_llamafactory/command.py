"""The command: arguments, the conversion of the YAMLs, and where the sections go (stdout, --out, --write)."""

from __future__ import annotations

import argparse
import io
import sys
from pathlib import Path

import yaml

from lorapipe.core.errors import LorapipeError
from lorapipe.import_llamafactory.mapping import LFImport, read_arguments

HELP = "convert a LLaMA-Factory train YAML (+ merge YAML, dataset_info.json) into params.yaml sections"


def dump(sections: dict) -> str:
    return yaml.safe_dump(sections, sort_keys=False, allow_unicode=True, default_flow_style=False)


def update_params_file(path: Path, sections: dict) -> None:
    """Merge `sections` into an existing params.yaml keeping its comments, order and other sections
    (ruamel.yaml's round trip; DVC itself edits params.yaml with it)."""
    from ruamel.yaml import YAML

    from lorapipe.core.io import write_text

    ry = YAML()  # round-trip mode
    ry.preserve_quotes = True
    try:
        doc = ry.load(path.read_text(encoding="utf-8")) if path.is_file() else None
    except Exception as exc:  # ruamel raises several parser error types
        raise LorapipeError(f"{path}: not valid YAML: {exc}") from None
    if doc is None:
        from ruamel.yaml.comments import CommentedMap

        doc = CommentedMap()

    def merge(dst, src):
        for key, value in src.items():
            if isinstance(value, dict) and key in dst and hasattr(dst[key], "items") and key != "sources":
                merge(dst[key], value)
            else:
                dst[key] = value

    merge(doc, sections)
    buf = io.StringIO()
    ry.dump(doc, buf)
    write_text(path, buf.getvalue())


def declare_inputs(params, root: Path) -> None:
    """Name the imported checkpoint folder and dataset files as deps of base and ingest in the
    project's dvc.yaml, as those stages require before they run (docs/inputs.md)."""
    import importlib

    from lorapipe.core.inputs import DVC_YAML, add_deps

    if not (root / DVC_YAML).is_file():
        return
    for stage in ("base", "ingest"):
        try:
            added = add_deps(stage, importlib.import_module(f"lorapipe.stages.{stage}").inputs(params), root)
        except LorapipeError as exc:  # e.g. a checkpoint folder not on this machine: the stage will say so too
            print(f"{root / DVC_YAML}: stages.{stage}.deps not updated: {exc}", file=sys.stderr)
            continue
        for line in added:
            print(f"{root / DVC_YAML}: added to stages.{stage}.deps: {line}", file=sys.stderr)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("train_yaml", help="LLaMA-Factory train YAML (examples/train_lora/*.yaml)")
    parser.add_argument("--merge-yaml", default=None, help="its merge/export YAML (examples/merge_lora/*.yaml)")
    parser.add_argument("--dataset-info", default=None,
                        help="dataset_info.json the `dataset` names are registered in (default: <dataset_dir>/dataset_info.json)")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", default=None, help="write the sections to this YAML file (default: print them)")
    where.add_argument("--write", action="store_true",
                       help="update the params file (--params) in place, keeping its other sections and comments, and "
                            "list the checkpoint folder and data files it names as deps in the dvc.yaml beside it")
    parser.add_argument("--strict", action="store_true", help="unknown keys are an error instead of a warning")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="import the YAML's trust_remote_code: true as is (it lets the checkpoint run its own code); "
                             "without this flag it is written false, with a warning")


def convert(train_yaml: str | Path, merge_yaml: str | Path | None = None, dataset_info: str | None = None,
            trust_remote_code: bool = False) -> LFImport:
    imp = LFImport(trust_remote_code)
    imp.map_train(read_arguments(train_yaml, "train YAML"), str(train_yaml), dataset_info)
    if merge_yaml:
        imp.map_merge(read_arguments(merge_yaml, "merge YAML"), str(merge_yaml))
    return imp


def main(args: argparse.Namespace) -> int:
    from lorapipe import params as params_mod

    imp = convert(args.train_yaml, args.merge_yaml, args.dataset_info, args.trust_remote_code)
    sections = imp.sections()
    print(imp.report.text(), file=sys.stderr)
    if args.strict and imp.report.warnings:
        raise LorapipeError("unknown keys (--strict): " + "; ".join(imp.report.warnings))
    # What we write must load: validate the sections as lorapipe params before writing anything.
    params_mod.parse(sections, f"sections imported from {args.train_yaml}")
    if args.write:
        target = Path(args.params)
        update_params_file(target, sections)
        print(f"updated {target}: {', '.join(sections)}", file=sys.stderr)
        declare_inputs(params_mod.load(target), target.parent)
    elif args.out:
        from lorapipe.core.io import write_text

        header = f"# imported from {args.train_yaml}" + (f" and {args.merge_yaml}" if args.merge_yaml else "") + "\n"
        write_text(args.out, header + dump(sections))
        params_mod.load(args.out)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        sys.stdout.write(dump(sections))
    return 0

"""The files a stage reads from outside the graph, and the check that DVC checks each of them.

DVC reruns a stage when one of its deps changes, and deps are written in dvc.yaml; the files a
user's data sources and checkpoint name are written in params.yaml. DVC cannot turn the one into the
other: it interpolates single strings into deps, not lists (`Cannot interpolate data of type 'list'`),
and a dep path that does not exist is an error, so `${model.source}` fails for `embedded` or a hub id.
So each stage that reads such inputs lists them (`inputs(params)`), and `lorapipe <stage>` refuses to
run while dvc.yaml does not name each one, or a folder above it, as a dep of that stage: the error
gives the exact lines to add. Once they are there, DVC hashes them like any other dep.

Data that comes in a pinned package (the embedded model, the chatterbot and chitchat corpora) is
checked through its pin in requirements-data.txt, and the installed version must equal that pin.
"""

from __future__ import annotations

import importlib.metadata
import os
import re
from dataclasses import dataclass
from io import StringIO
from pathlib import Path

import yaml

from lorapipe.core.errors import LorapipeError

DATA_PINS = Path("requirements-data.txt")  # packages that carry data the stages read
DVC_YAML = Path("dvc.yaml")


@dataclass(frozen=True)
class Input:
    """A file or folder a stage reads, and the params key (or package) that names it."""

    path: Path
    key: str


def _pins(pins_file: Path) -> dict[str, str]:
    pins = {}
    for line in pins_file.read_text(encoding="utf-8").splitlines():
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)==(\S+)", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def pinned_package(dist: str, key: str, root: Path = Path(".")) -> Input:
    """The pin file as the input standing for an installed package's data; the installed version
    must be the pinned one, or a changed package would go unseen. Outside a project (no pin file)
    there is nothing to compare with, and check_declared still wants the file as a dep."""
    pins_file = root / DATA_PINS
    if not pins_file.is_file():
        return Input(pins_file, f"{key}: the {dist} package, pinned in {DATA_PINS}")
    pinned = _pins(pins_file).get(dist)
    if pinned is None:
        raise LorapipeError(f"{key}: {pins_file} does not pin {dist}; add `{dist}==<version>` to it")
    try:
        installed = importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        raise LorapipeError(f"{key}: the {dist} package is not installed (run `make setup`)") from None
    if installed != pinned:
        raise LorapipeError(f"{key}: {dist} {installed} is installed but {pins_file} pins {pinned}; "
                            "run `make setup` (or change the pin, which reruns the stages that read it)")
    return Input(pins_file, f"{key}: the {dist} package, pinned in {DATA_PINS}")


def declared_deps(stage: str, root: Path = Path(".")) -> list[Path] | None:
    """The literal deps of `stage` in dvc.yaml as absolute paths (templated ones are left out: no
    outside input is templated); None when there is no dvc.yaml or it has no such stage."""
    dvc_yaml = root / DVC_YAML
    if not dvc_yaml.is_file():
        return None
    try:
        stages = (yaml.safe_load(dvc_yaml.read_text(encoding="utf-8")) or {}).get("stages") or {}
    except yaml.YAMLError as exc:
        raise LorapipeError(f"{dvc_yaml}: not valid YAML: {exc}") from None
    if stage not in stages:
        return None
    deps = []
    for dep in stages[stage].get("deps") or []:
        path = next(iter(dep)) if isinstance(dep, dict) else str(dep)
        if "${" not in path:
            deps.append(absolute(Path(path), root))
    return deps


def absolute(path: Path, root: Path = Path(".")) -> Path:
    """`path` (relative to `root`, `~` expanded) made absolute, symbolic links left as they are: DVC
    names a dep by the path written, not by where a link leads."""
    path = path.expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else Path(os.path.abspath(root)) / path))


def dep_line(path: Path, root: Path = Path(".")) -> str:
    """How dvc.yaml names `path`: relative to the project when inside it, else absolute."""
    full, top = absolute(path, root), absolute(Path("."), root)
    return full.relative_to(top).as_posix() if full.is_relative_to(top) else full.as_posix()


def undeclared(stage: str, inputs: list[Input], root: Path = Path(".")) -> list[Input]:
    """The inputs that no dep of `stage` covers (the path itself or a folder above it)."""
    deps = declared_deps(stage, root)
    if deps is None:
        return []  # not run by DVC from this project: there is no graph to keep honest
    return [i for i in inputs if not any(d == (p := absolute(i.path, root)) or d in p.parents for d in deps)]


def check_declared(stage: str, inputs: list[Input], root: Path = Path(".")) -> None:
    """Refuse to run `stage` while dvc.yaml does not name each of its outside inputs as a dep."""
    missing = undeclared(stage, inputs, root)
    if not missing:
        return
    lines = "\n".join(f"      - {line}" for line in dict.fromkeys(dep_line(i.path, root) for i in missing))
    named = "\n".join(f"  {dep_line(i.path, root)}  ({i.key})" for i in missing)
    raise LorapipeError(
        f"stage {stage} reads inputs that dvc.yaml does not list as its deps, so DVC would not see them change:\n"
        f"{named}\nAdd these lines under stages.{stage}.deps in {root / DVC_YAML}:\n{lines}\n"
        "then run `dvc repro` again (docs/inputs.md).")


def add_deps(stage: str, inputs: list[Input], root: Path = Path(".")) -> list[str]:
    """List the inputs that dvc.yaml lacks under stages.<stage>.deps, keeping the file's comments and
    order (ruamel.yaml's round trip, as DVC edits its own files); returns the lines added."""
    from ruamel.yaml import YAML

    from lorapipe.core.io import write_text

    missing = list(dict.fromkeys(dep_line(i.path, root) for i in undeclared(stage, inputs, root)))
    if not missing:
        return []
    dvc_yaml = root / DVC_YAML
    ry = YAML()
    ry.preserve_quotes = True
    ry.indent(mapping=2, sequence=4, offset=2)  # dvc.yaml's own layout
    ry.width = 4096  # no folding of long lines
    doc = ry.load(dvc_yaml.read_text(encoding="utf-8"))
    doc["stages"][stage]["deps"].extend(missing)
    buf = StringIO()
    ry.dump(doc, buf)
    write_text(dvc_yaml, buf.getvalue())
    return missing

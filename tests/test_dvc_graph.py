"""dvc.yaml is the contract: each stage's deps are its own module plus exactly the lorapipe modules it
imports (directly or transitively), and its params are only keys of its own section. Checked
statically against the real imports, so adding an import without a dep fails here."""

import ast
from pathlib import Path

import yaml

from conftest import REPO_ROOT
from lorapipe import params as params_mod

SRC = REPO_ROOT / "src"
PKG = SRC / "lorapipe"
STAGES = ("base", "ingest", "clean", "train", "merge", "convert", "quantize", "evaluate", "package")


def module_file(name: str) -> Path | None:
    """The file a module is built from: its .py or its package's __init__.py."""
    rel = Path(*name.split("."))
    for cand in (SRC / rel.with_suffix(".py"), SRC / rel / "__init__.py"):
        if cand.is_file():
            return cand
    return None


def type_checking_only(tree: ast.Module) -> set[ast.AST]:
    """Nodes under `if TYPE_CHECKING:`: never run, so what they import is no dependency."""
    blocks = [n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING")]
    return {inner for block in blocks for stmt in block.body for inner in ast.walk(stmt)}


def imported_modules(path: Path) -> set[str]:
    """lorapipe modules imported anywhere in a file (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = ".".join(path.relative_to(SRC).with_suffix("").parts[:-1])
    found = set()
    skipped = type_checking_only(tree)
    for node in ast.walk(tree):
        if node in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("lorapipe")}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            if not base.startswith("lorapipe"):
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.add(sub if module_file(sub) else base)
    return found


def closure(stage: str) -> set[Path]:
    todo, seen = [f"lorapipe.stages.{stage}"], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name)
        if path is not None:
            todo.extend(imported_modules(path))
    files = {module_file(n) for n in seen} - {None}
    # Importing a module runs its packages' __init__ files too: those that hold code are deps.
    for f in list(files):
        for parent in f.parents:
            if parent == PKG.parent:
                break
            if (parent / "__init__.py").is_file():
                files.add(parent / "__init__.py")
    return {f for f in files if f.name != "__init__.py" or holds_code(f)}


def holds_code(init: Path) -> bool:
    body = ast.parse(init.read_text()).body
    return any(
        not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
        and not (isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "__version__")
        for n in body
    )


def test_shared_package_init_files_hold_no_code():
    # Imported implicitly by every stage: code there would be a dependency no dvc.yaml lists.
    for init in (PKG / "__init__.py", PKG / "core" / "__init__.py", PKG / "stages" / "__init__.py"):
        assert not holds_code(init), f"{init} holds code"


def load_stages() -> dict:
    return yaml.safe_load((REPO_ROOT / "dvc.yaml").read_text())["stages"]


def test_every_pipeline_stage_is_in_dvc_yaml_with_its_command():
    stages = load_stages()
    assert sorted(stages) == sorted(STAGES), "dvc.yaml's stages are not the pipeline's"
    for name in STAGES:
        assert (PKG / "stages" / f"{name}.py").is_file(), f"stage {name}: its module src/lorapipe/stages/{name}.py is missing"
        assert stages[name]["cmd"] == f"lorapipe {name}"


def test_code_deps_are_exactly_the_imported_modules():
    for name, stage in load_stages().items():
        assert (PKG / "stages" / f"{name}.py").is_file(), f"dvc.yaml stage {name} has no module"
        declared = {REPO_ROOT / d for d in stage.get("deps", []) if str(d).startswith("src/")}
        declared_files = {d for d in declared if d.suffix == ".py"}
        declared_dirs = {d for d in declared if d.is_dir()}
        needed = closure(name)
        covered = {f for f in needed if f in declared_files or any(d in f.parents for d in declared_dirs)}
        missing = sorted(str(f.relative_to(REPO_ROOT)) for f in needed - covered)
        assert not missing, f"stage {name}: dvc.yaml deps lack imported modules {missing}"
        extra = sorted(str(f.relative_to(REPO_ROOT)) for f in declared_files - needed)
        assert not extra, f"stage {name}: dvc.yaml deps list modules it does not import {extra}"
        for d in declared_dirs:
            assert any(d in f.parents for f in needed), f"stage {name}: dep folder {d} holds no imported module"


def test_params_are_own_section_and_exist():
    # model.trust_remote_code is the one opt-in that lets a stage run a model's own code: every stage
    # that loads the model through transformers reads it (and reruns when it changes).
    trust = "model.trust_remote_code"
    own = {
        "base": ("model",), "ingest": ("data.sources",), "clean": ("data.clean", "data.split"),
        "train": ("train", "lora", trust), "merge": ("merge", trust), "convert": ("export", trust),
        # quantize gates each candidate type with evaluate's thresholds, on evaluate's chunks (core/retention.py)
        "quantize": ("export", trust, "evaluate.ctx", "evaluate.max_chunks", "evaluate.max_ppl_delta_pct", "evaluate.min_finetune_kept"),
        "evaluate": ("evaluate", "export.outtype", trust), "package": ("package", "chat", "serve"),
    }
    p = params_mod.load(REPO_ROOT / "params.yaml").model_dump()
    for name, stage in load_stages().items():
        for key in stage.get("params", []):
            assert isinstance(key, str), f"stage {name}: params from other files are not used"
            assert any(key == o or key.startswith(o + ".") for o in own.get(name, ())), f"stage {name} reads {key}, not its own section"
            node = p
            for part in key.split("."):
                assert part in node, f"stage {name}: params key {key} does not exist"
                node = node[part]


def test_the_quantized_file_is_one_static_out():
    """Whatever type export.quant chooses, quantize writes one fixed path (core/paths.QUANT_GGUF), and every
    stage that reads it names that same path: `dvc exp run -S export.quant=...` changes no out."""
    from lorapipe.core import paths

    stages = load_stages()
    quant = paths.QUANT_GGUF.as_posix()
    assert quant in stages["quantize"]["outs"]
    for name in ("evaluate", "package"):
        assert quant in stages[name]["deps"], name
    text = (REPO_ROOT / "dvc.yaml").read_text()
    assert "${export.quant" not in text


def test_stage_help_names_the_stage_outputs():
    """`lorapipe <stage> --help` names every path the stage writes (its dvc.yaml outs, metrics and
    plots; a folder named with a trailing / covers what is inside) and no path it does not write."""
    import re

    from lorapipe.cli import STAGE_HELP

    for name, stage in load_stages().items():
        written = [re.sub(r"\$\{([\w.]+)\}", r"<\1>", next(iter(o)) if isinstance(o, dict) else o)
                   for key in ("outs", "metrics", "plots") for o in stage.get(key, [])]
        help_text = STAGE_HELP[name]
        named = re.findall(r"[\w.<>-]+(?:/[\w.<>-]*)+", help_text)
        for path in written:
            assert any(path == n.rstrip("/") or (n.endswith("/") and path.startswith(n)) or n.startswith(path + "/")
                       for n in named), f"lorapipe {name}: the help ({help_text!r}) does not name {path}"
        for n in named:
            assert any(p == n.rstrip("/") or p.startswith(n) or n.startswith(p + "/") for p in written), (
                f"lorapipe {name}: the help names {n}, which dvc.yaml does not list as the stage's output")

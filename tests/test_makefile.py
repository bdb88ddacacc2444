"""The Makefile's entry points: `make repro` installs nothing system-wide; `make test` brings the ui test's browser."""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest

from conftest import REPO_ROOT


def dry_run(target: str, tmp_path) -> str:
    """The commands `make <target>` would run on a machine with nothing set up yet (make -n runs none)."""
    if shutil.which("make") is None:
        pytest.skip("make is not on PATH")
    # Under `make test` this runs inside make: without the parent's MAKELEVEL/MAKEFLAGS the inner make
    # neither joins its jobserver nor prints "Entering directory" lines. Without the LORAPIPE_* paths
    # that `make test` exports, the inner make derives them from LORAPIPE_CACHE=<tmp> as on a new
    # machine, instead of finding this machine's finished llama.cpp build.
    env = {k: v for k, v in os.environ.items()
           if k not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS") and not k.startswith("LORAPIPE_")}
    proc = subprocess.run(["make", "--no-print-directory", "-n", target, f"LORAPIPE_CACHE={tmp_path}", f"VENV={tmp_path}/venv"],
                          cwd=REPO_ROOT, capture_output=True, text=True, check=True, env=env)
    return proc.stdout


def test_repro_and_setup_install_no_system_package(tmp_path):
    repro = dry_run("repro", tmp_path)
    assert "scripts/setup-venv.sh" in repro and "scripts/build-llama-cpp.sh" in repro and "dvc repro" in repro
    for commands in (repro, dry_run("setup", tmp_path)):
        assert "install-browser" not in commands and "apt-get" not in commands, commands


def test_test_and_setup_browser_install_the_browser(tmp_path):
    assert "scripts/install-browser.sh" in dry_run("test", tmp_path)
    assert dry_run("setup-browser", tmp_path).strip() == "scripts/install-browser.sh"

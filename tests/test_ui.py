"""`lorapipe ui`: the real page, real llama-servers on two tiny GGUFs, driven by a real headless Chromium.

The two models are scripted (conftest.build_scripted_model) to answer differently, so the test can
tell the compare panes apart: A says "Hi there!", B says "Hello world!". The ui runs in a project of
its own: a git + DVC repository holding a real run's metrics and loss curves (tests/fixtures/run), as
a clone that pulled only those, so the Run tab and `dvc exp show` read what the test set up.
"""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import requests
import yaml

from conftest import CHILD_ENV, LORAPIPE, REPO_ROOT, build_scripted_model, free_port, git, headless_chromium

SCRIPT_A = ("Hi", "Ġthere", "!")


RUN = REPO_ROOT / "tests" / "fixtures" / "run"
DVC = str(Path(sys.executable).with_name("dvc"))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A committed git + DVC repository with a real run's params, metrics and dvclive curves, its
    metrics declared in dvc.yaml so that `dvc exp show` reports them."""
    root = tmp_path_factory.mktemp("ui-project")
    for name in ("metrics", "dvclive"):
        shutil.copytree(RUN / name, root / name)
    shutil.copy(RUN / "params.yaml", root / "params.yaml")
    (root / "dvc.yaml").write_text(yaml.safe_dump({"metrics": [f"metrics/{n}.json" for n in ("train", "eval")],
                                                   "params": ["params.yaml"]}))
    git("init", "-q", cwd=root)
    subprocess.run([DVC, "init", "-q"], cwd=root, check=True, capture_output=True, env=CHILD_ENV)
    git("add", "-A", cwd=root)
    git("commit", "-qm", "a run", cwd=root)
    return root


@pytest.fixture(scope="module")
def two_models(smollm2_tokenizer_dir, tiny_gguf, tmp_path_factory):
    """(A: a second scripted model as F16 GGUF, B: the scripted model quantized like the pipeline's)."""
    from lorapipe.stages.convert import convert

    _, b = tiny_gguf("scripted", quant="Q4_K_M")
    folder = build_scripted_model(smollm2_tokenizer_dir, tmp_path_factory.mktemp("tiny-scripted-a"), script=SCRIPT_A)
    a = tmp_path_factory.mktemp("gguf-a") / "model-a-f16.gguf"
    convert(folder, a, "f16", name="tiny-a")
    return a, b


@pytest.fixture(scope="module")
def ui(two_models, project):
    """A running `lorapipe ui` in the project (its Run tab reads the project's metrics), default host."""
    a, b = two_models
    port = free_port()
    proc = subprocess.Popen([*LORAPIPE, "ui", "--model", str(b), "--compare", str(a), "--port", str(port)],
                            cwd=project, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=CHILD_ENV)
    line = proc.stdout.readline()  # blocks until ready (or exit: then the line is empty)
    if "ready" not in line:
        proc.kill()
        pytest.fail(f"ui did not come up (exit code {proc.poll()}): {proc.stderr.read()[-2000:]}")
    yield f"http://127.0.0.1:{port}", proc, port
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out


def listening_addresses(pid: int, port: int) -> set[str]:
    """The local addresses process `pid` listens on at `port`, as the kernel reports them."""
    return {c.laddr.ip for c in psutil.Process(pid).net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == port}


def test_listens_on_loopback_by_default_and_serves_the_page_and_run(ui):
    base, proc, port = ui
    assert listening_addresses(proc.pid, port) == {"127.0.0.1"}
    page = requests.get(base + "/", timeout=10)
    assert page.status_code == 200 and "<nav>" in page.text
    info = requests.get(base + "/api/info", timeout=10).json()
    assert info["models"]["a"]["name"] == "model-a-f16.gguf"
    run = requests.get(base + "/run", timeout=90).text
    for heading in ("rows by source", "Variants", "Gates"):
        assert heading in run
    assert "<svg" in run  # the loss curve from dvclive's TSV
    # the table of `dvc exp show --json` run in the project (its fallback line also says "Experiments")
    assert "Experiments (dvc exp show)" in run, run[run.find("Experiments"):][:500]
    eval_loss = json.loads((RUN / "metrics/train.json").read_text())["eval_loss"]
    exps = run[run.find("Experiments (dvc exp show)"):]
    assert f">{eval_loss:.4g}<" in exps  # the run's eval loss, as dvc reported it (the page's 4 digits)


def test_api_streams_and_refuses_bad_requests(ui):
    base, _, _ = ui
    with requests.post(base + "/api/chat", json={"model": "a", "messages": [{"role": "user", "content": "hi"}],
                                                 "temperature": 0, "max_tokens": 16}, stream=True, timeout=60) as r:
        assert r.status_code == 200
        lines = [line for line in r.iter_lines() if line]
    assert len(lines) >= 3 and b'"done": true' in lines[-1]  # several pieces, then the end
    for bad in ({"messages": []}, {"model": "c", "messages": [{"role": "user", "content": "x"}]},
                {"messages": [{"role": "robot", "content": "x"}]},
                {"messages": [{"role": "user", "content": "x"}], "max_tokens": -1}, [1, 2]):
        r = requests.post(base + "/api/chat", json=bad, timeout=10)
        assert r.status_code == 400 and r.json()["error"], bad
    r = requests.post(base + "/api/chat", data=b"{not json", headers={"Content-Type": "application/json"}, timeout=10)
    assert r.status_code == 400
    assert requests.get(base + "/nope", timeout=10).status_code == 404


def test_compare_and_chat_stream_in_a_real_browser(ui, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _, _ = ui
    drv = headless_chromium()
    try:
        drv.get(base + "/")
        wait = WebDriverWait(drv, 60)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")

        def set_value(el_id: str, value: str) -> None:
            el = drv.find_element(By.ID, el_id)
            el.clear()
            el.send_keys(value)

        drv.find_element(By.CSS_SELECTOR, "nav button[data-tab=compare]").click()
        set_value("cmp-temp", "0")
        set_value("cmp-max", "16")
        set_value("cmp-input", "I feel lonely.")
        drv.find_element(By.ID, "cmp-send").click()
        answers = {}
        for side in ("a", "b"):
            sel = f"#cmp-log-{side} .msg.assistant"
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, sel).get_attribute("data-state") == "done")
            el = drv.find_element(By.CSS_SELECTOR, sel)
            answers[side] = el.find_element(By.CLASS_NAME, "text").text
            assert int(el.get_attribute("data-chunks")) >= 2, "the answer did not arrive in pieces (not streamed)"
            assert "tokens/s" in drv.find_element(By.ID, f"cmp-stat-{side}").text
        assert answers == {"a": "Hi there!", "b": "Hello world!"}
        drv.save_screenshot(str(tmp_path / "ui-compare.png"))

        drv.find_element(By.CSS_SELECTOR, "nav button[data-tab=chat]").click()
        set_value("chat-temp", "0")
        set_value("chat-system", "Be kind.")
        set_value("chat-input", "hello")
        drv.find_element(By.ID, "chat-send").click()
        sel = "#chat-log .msg.assistant"
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, sel).get_attribute("data-state") == "done")
        assert drv.find_element(By.CSS_SELECTOR, sel + " .text").text == "Hello world!"
        drv.find_element(By.ID, "chat-reset").click()
        assert drv.find_elements(By.CSS_SELECTOR, "#chat-log .msg") == []

        drv.find_element(By.CSS_SELECTOR, "nav button[data-tab=run]").click()
        wait.until(lambda d: "Gates" in d.find_element(By.ID, "run").text)
        assert (tmp_path / "ui-compare.png").stat().st_size > 10_000
    finally:
        drv.quit()

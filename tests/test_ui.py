"""`lorapipe ui`: the real page, real llama-servers on two tiny GGUFs, driven by a real headless Chromium.

The two models are scripted (conftest.build_scripted_model) to answer differently, so the test can
tell the compare panes apart: A says "Hi there!", B says "Hello world!". The run page reads this
checkout's committed metrics, as on a clone that pulled only those.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from conftest import REPO_ROOT, build_scripted_model

LORAPIPE = [sys.executable, "-m", "lorapipe.cli"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
SCRIPT_A = ("Hi", "Ġthere", "!")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


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
def ui(two_models):
    """A running `lorapipe ui` (from the repository root, so its Run tab reads the committed metrics)."""
    a, b = two_models
    port = free_port()
    proc = subprocess.Popen([*LORAPIPE, "ui", "--model", str(b), "--compare", str(a), "--port", str(port)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)
    line = proc.stdout.readline()  # blocks until ready (or exit: then the line is empty)
    if "ready" not in line:
        proc.kill()
        pytest.fail(f"ui did not come up (exit code {proc.poll()}): {proc.stderr.read()[-2000:]}")
    yield f"http://127.0.0.1:{port}", proc
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0 and "stopped" in out


def test_listens_on_loopback_by_default_and_serves_the_page_and_run(ui):
    base, _ = ui
    page = requests.get(base + "/", timeout=10)
    assert page.status_code == 200 and "<nav>" in page.text
    info = requests.get(base + "/api/info", timeout=10).json()
    assert info["models"]["a"]["name"] == "model-a-f16.gguf"
    run = requests.get(base + "/run", timeout=90).text
    for heading in ("rows by source", "Variants", "Gates", "Experiments"):
        assert heading in run
    assert "<svg" in run  # the loss curve from dvclive's TSV


def test_api_streams_and_refuses_bad_requests(ui):
    base, _ = ui
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


def browser():
    """A headless Chromium through chromium-driver (Debian packages), or skip saying what is missing."""
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver:
        pytest.skip("no chromium/chromedriver on PATH (`make setup-browser` installs them as root)")
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        pytest.skip("selenium is not installed (make setup)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900"):
        opts.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=driver), options=opts)


def test_compare_and_chat_stream_in_a_real_browser(ui, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base, _ = ui
    drv = browser()
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

#!/usr/bin/env python3
"""Screenshots of a running `lorapipe ui` for docs/commands.md, taken in headless Chromium (as tests/test_ui.py
drives it): the Compare tab after one greedy prompt answered by both models, and the Run tab.

    lorapipe ui &                                  # wait for "[ui] ready"
    python scripts/ui_screenshot.py http://127.0.0.1:7860 --prompt "I feel lonely since I moved."
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("url", help="the ui's address (loopback)")
    p.add_argument("--prompt", default="I have been feeling lonely since I moved to a new city.")
    p.add_argument("--max-tokens", default="96")
    p.add_argument("--out", default=str(ROOT / "reports"), help="folder for ui-compare.png and ui-run.png")
    args = p.parse_args(argv)

    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860"):
        opts.add_argument(arg)
    drv = webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=opts)
    try:
        drv.get(args.url)
        wait = WebDriverWait(drv, 300)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "1")
        drv.find_element(By.CSS_SELECTOR, "nav button[data-tab=compare]").click()
        for el_id, value in (("cmp-temp", "0"), ("cmp-max", args.max_tokens), ("cmp-input", args.prompt)):
            el = drv.find_element(By.ID, el_id)
            el.clear()
            el.send_keys(value)
        drv.find_element(By.ID, "cmp-send").click()
        for side in ("a", "b"):
            sel = f"#cmp-log-{side} .msg.assistant"
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, sel).get_attribute("data-state") == "done")
        out = Path(args.out)
        drv.save_screenshot(str(out / "ui-compare.png"))
        drv.find_element(By.CSS_SELECTOR, "nav button[data-tab=run]").click()
        wait.until(lambda d: "Gates" in d.find_element(By.ID, "run").text)
        drv.set_window_size(1280, 2400)
        drv.save_screenshot(str(out / "ui-run.png"))
        print(f"saved {out / 'ui-compare.png'} and {out / 'ui-run.png'}")
    finally:
        drv.quit()
    return 0


if __name__ == "__main__":
    sys.exit(main())

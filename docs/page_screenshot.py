"""A screenshot of caption-serve's page (docs/page.png) in headless Chromium, and the browser helpers the page's
test shares.

  python docs/page_screenshot.py PHOTO [--url http://127.0.0.1:8000] [--word 2] [-o docs/page.png]

Needs a running caption-serve, Debian's `chromium` and `chromium-driver` (apt-get install chromium
chromium-driver) and selenium (pip install 'edgecap[dev]').
"""

from __future__ import annotations

import argparse
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

BROWSERS = ("chromium", "chromium-browser", "google-chrome")
WAIT_S = 60


def find_chromium() -> tuple[str, str] | None:
    """(browser, driver) executables on PATH, or None."""
    browser = next((path for name in BROWSERS if (path := shutil.which(name))), None)
    driver = shutil.which("chromedriver")
    return (browser, driver) if browser and driver else None


@contextmanager
def chromium(width: int = 1280, height: int = 1000) -> Iterator:
    """A headless Chromium driven by selenium through the system's chromedriver (no download)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    found = find_chromium()
    if found is None:
        raise RuntimeError("no chromium and chromedriver on PATH (apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = found[0]
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                 f"--window-size={width},{height}", "--use-fake-ui-for-media-stream"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=found[1]))
    try:
        yield driver
    finally:
        driver.quit()


def upload(driver, path: Path, timeout: float = WAIT_S) -> str:
    """Choose `path` in the page's file input and wait until the page is done or shows an error; -> the state."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.find_element(By.ID, "file").send_keys(str(Path(path).resolve()))
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-state")
                                         in ("done", "error"))
    return driver.find_element(By.TAG_NAME, "body").get_attribute("data-state")


def open_page(driver, url: str, timeout: float = WAIT_S) -> None:
    """Load the page and wait for its model card."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, timeout).until(lambda d: d.find_element(By.ID, "card").text
                                         or d.find_element(By.ID, "error").text)


def main() -> None:
    from selenium.webdriver.common.by import By

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("photo", type=Path)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--word", type=int, default=1, help="the word whose attention map is shown (default: 1)")
    p.add_argument("-o", "--output", type=Path, default=Path(__file__).with_name("page.png"))
    args = p.parse_args()
    with chromium() as driver:
        open_page(driver, args.url + "/")
        if upload(driver, args.photo) != "done":
            raise SystemExit(f"the page shows an error: {driver.find_element(By.ID, 'error').text}")
        driver.find_elements(By.CSS_SELECTOR, ".word")[args.word].click()
        driver.save_screenshot(str(args.output))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()

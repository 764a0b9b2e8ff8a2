"""Headless Chromium from Debian (/usr/bin/chromium, /usr/bin/chromedriver) driven by Selenium.

No browser is ever downloaded: Selenium Manager is bypassed by naming the driver's path.
Each browser gets a fresh profile folder and is quit (and its folder removed) by the caller.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"


def available() -> str | None:
    """Why a browser cannot run here, or None."""
    for path in (CHROMIUM, CHROMEDRIVER):
        if not Path(path).exists():
            return f"{path} is missing (apt-get install chromium chromium-driver)"
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed"
    return None


class Browser:
    def __init__(self, width: int = 1280, height: int = 900) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        self.profile = Path(tempfile.mkdtemp(prefix="guarita-chromium-"))
        options = webdriver.ChromeOptions()
        options.binary_location = CHROMIUM
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                    f"--user-data-dir={self.profile}", f"--window-size={width},{height}"):
            options.add_argument(arg)
        try:
            self.driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
        except BaseException:
            shutil.rmtree(self.profile, ignore_errors=True)
            raise

    def quit(self) -> None:
        try:
            self.driver.quit()
        finally:
            shutil.rmtree(self.profile, ignore_errors=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.quit()

    # -- helpers ------------------------------------------------------------------------

    def wait(self, predicate: Callable[[], Any], timeout: float = 15.0, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                value = predicate()
                if value:
                    return value
            except Exception as exc:  # the page may be between loads
                last = exc
            time.sleep(0.05)
        raise AssertionError(f"timed out waiting for {what} on {self.driver.current_url}"
                             + (f" (last error: {last})" if last else "")
                             + f"\n--- page text ---\n{self.text()[:3000]}")

    def text(self) -> str:
        try:
            return str(self.driver.find_element("tag name", "body").text)
        except Exception:
            return ""

    def css(self, selector: str) -> Any:
        return self.driver.find_element("css selector", selector)

    def all(self, selector: str) -> list[Any]:
        return list(self.driver.find_elements("css selector", selector))

    def act(self, selector: str, action: Callable[[Any], Any], timeout: float = 15.0) -> None:
        """Find and act on an element, again if the page replaced it meanwhile (live refresh)."""
        from selenium.common.exceptions import (
            NoSuchElementException,
            StaleElementReferenceException,
        )

        deadline = time.monotonic() + timeout
        while True:
            try:
                action(self.css(selector))
                return
            except (StaleElementReferenceException, NoSuchElementException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wait_text(self, needle: str, timeout: float = 15.0) -> None:
        self.wait(lambda: needle in self.text(), timeout, f"text {needle!r}")

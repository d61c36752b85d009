"""Headless Chromium for tests that drive the real ComfyUI frontend: Debian's `chromium` and `chromium-driver`
through selenium (nothing is downloaded at run time). Skips, saying why, when either is missing."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--disable-dev-shm-usage", "--window-size=1500,1000")


def chromium_or_skip() -> tuple[str, str]:
    """(chromium binary, chromedriver) or pytest.skip with the reason."""
    import pytest

    try:
        import selenium  # noqa: F401
    except ImportError:
        pytest.skip("selenium is not installed in this Python (pip install selenium)")
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    driver = shutil.which("chromedriver")
    if binary is None or driver is None:
        pytest.skip("chromium and chromium-driver are not installed (apt-get install -y chromium chromium-driver)")
    return binary, driver


class Browser:
    """One Chromium page: `js(...)` runs a script, `wait(...)` polls one until it is truthy."""

    def __init__(self, binary: str, driver: str, profile: Path) -> None:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service

        opts = webdriver.ChromeOptions()
        opts.binary_location = binary
        for flag in CHROMIUM_FLAGS:
            opts.add_argument(flag)
        opts.add_argument(f"--user-data-dir={profile}")
        opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
        self.driver = webdriver.Chrome(service=Service(driver), options=opts)
        self.driver.set_script_timeout(60)
        self.console: list[dict[str, Any]] = []

    def close(self) -> None:
        self.driver.quit()

    def open(self, url: str) -> None:
        self.driver.get(url)

    def js(self, script: str, *args: Any) -> Any:
        return self.driver.execute_script(script, *args)

    def js_async(self, body: str, *args: Any) -> Any:
        """Run an async function body; its return value comes back (errors come back as {'error': text})."""
        return self.driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            f"(async (...args) => {{ {body} }})(...Array.from(arguments).slice(0, -1))"
            ".then(done, (e) => done({error: String(e && e.stack || e)}));", *args)

    def wait(self, script: str, *args: Any, timeout: float = 30.0, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        last: Any = None
        while time.monotonic() < deadline:
            last = self.js(script, *args)
            if last:
                return last
            time.sleep(0.1)
        raise AssertionError(f"timed out after {timeout}s waiting for {what or script}; last value {last!r}")

    def logs(self) -> list[dict[str, Any]]:
        """Browser console entries since the last call (also kept in `self.console`)."""
        entries = self.driver.get_log("browser")
        self.console += entries
        return entries

    def screenshot(self, path: Path, css: str | None = None) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        if css is None:
            self.driver.save_screenshot(str(path))
        else:
            from selenium.webdriver.common.by import By

            self.driver.find_element(By.CSS_SELECTOR, css).screenshot(str(path))
        return path

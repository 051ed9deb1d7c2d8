"""A headless Chromium from the system's packages, driven by selenium, for the status page.

Nothing is downloaded: the browser is ``chromium`` and the driver
``chromedriver`` (Debian: ``apt-get install chromium chromium-driver``; CI
installs them, see ``dev.py``). Where they are missing the browser tests are
skipped with one line saying what to install, except under CI, where they fail.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

INSTALL = "apt-get install chromium chromium-driver"
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
)


def _find(*names: str) -> str | None:
    for name in names:
        found = shutil.which(name)
        if found:
            return found
    return None


CHROMIUM = _find("chromium", "chromium-browser")
CHROMEDRIVER = _find("chromedriver")


def missing() -> str | None:
    """Why the browser tests cannot run here (None: they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed: pip install -e '.[test]'"
    absent = [
        name
        for name, path in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER))
        if path is None
    ]
    if absent:
        return (
            f"no {' and no '.join(absent)} on PATH: install them to run the status page's "
            f"browser tests ({INSTALL})"
        )
    return None


def start_chromium(profile: Path, width: int = 1280, height: int = 1000) -> WebDriver:
    """A headless Chromium with a fresh profile in ``profile``."""
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    assert CHROMIUM is not None
    assert CHROMEDRIVER is not None
    options = Options()
    options.binary_location = CHROMIUM
    for flag in FLAGS:
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={profile}")
    options.add_argument(f"--window-size={width},{height}")
    # Both paths given: selenium never looks for (or downloads) a browser or a driver.
    service = Service(executable_path=CHROMEDRIVER, log_output=os.devnull)
    driver = webdriver.Chrome(service=service, options=options)
    driver.set_page_load_timeout(20)
    return driver


def wait_for(driver: WebDriver, condition: Any, timeout: float = 15.0) -> Any:
    """What ``condition(driver)`` returns once it is truthy (``WebDriverWait``)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(driver, timeout, poll_frequency=0.05).until(condition)


def log_in(driver: WebDriver, url: str, token: str) -> None:
    """Open the page at ``url`` and paste ``token`` into its prompt."""
    from selenium.webdriver.common.by import By

    driver.get(url)
    field = wait_for(driver, lambda d: d.find_element(By.ID, "token"))
    field.send_keys(token)
    driver.find_element(By.ID, "open").click()

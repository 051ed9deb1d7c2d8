"""The status page in a real headless Chromium against a real daemon on loopback.

The browser is the system's (``apt-get install chromium chromium-driver``),
driven by selenium; without it these tests are skipped with one line saying
what to install, and under CI (``CI`` set) they fail instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from remote_exec.client.blocking import BlockingExecutor
from remote_exec.client.websocket import WebSocketExecutor
from tests.status import browser
from tests.status.conftest import TOKEN
from tests.status.instruments import Stage
from tests.ws_instruments import DaemonProcess

if TYPE_CHECKING:
    from selenium.webdriver.remote.webdriver import WebDriver

pytestmark = pytest.mark.timeout(120)

MISSING = browser.missing()
if MISSING is not None and not os.environ.get("CI"):
    # One line for the whole module, saying what to install.
    pytest.skip(MISSING, allow_module_level=True)


@pytest.fixture(scope="module")
def chromium() -> None:
    if MISSING is not None:  # under CI: the browser tests must run
        pytest.fail(f"CI runs the browser tests: {MISSING}")


@pytest.fixture
def driver(chromium: None, tmp_path: Path) -> Iterator[WebDriver]:
    started = browser.start_chromium(tmp_path / "profile")
    try:
        yield started
    finally:
        started.quit()


def start_daemon(env: dict[str, str], backend: str = "asyncio") -> DaemonProcess:
    return DaemonProcess("--allow-module", "tests.*", "--backend", backend, env=env, token=TOKEN)


def page_url(daemon: DaemonProcess) -> str:
    return f"http://127.0.0.1:{daemon.port}/"


def by_css(driver: WebDriver, selector: str) -> list[object]:
    from selenium.webdriver.common.by import By

    return list(driver.find_elements(By.CSS_SELECTOR, selector))


def text_of(driver: WebDriver, selector: str) -> str:
    from selenium.webdriver.common.by import By

    found = driver.find_elements(By.CSS_SELECTOR, selector)
    return str(found[0].get_attribute("textContent")) if found else ""


def test_without_the_token_only_the_prompt_shows(
    driver: WebDriver, clean_env: dict[str, str]
) -> None:
    from selenium.webdriver.common.by import By

    with (
        start_daemon(clean_env) as daemon,
        BlockingExecutor(WebSocketExecutor(daemon.url, token=TOKEN)) as bx,
    ):
        stage = Stage("secret")
        with bx.remote_instance(stage, "stage-secret-name", "x"):
            bx.run(stage.say, "a-secret-log-line")
            driver.get(page_url(daemon))
            prompt = browser.wait_for(driver, lambda d: d.find_element(By.ID, "token"))
            assert prompt.is_displayed()
            assert prompt.get_attribute("type") == "password"
            dashboard = driver.find_element(By.ID, "dashboard")
            assert not dashboard.is_displayed()
            assert (
                driver.execute_script(
                    "return document.getElementById('dashboard').childElementCount"
                )
                == 0
            )
            shown = driver.find_element(By.TAG_NAME, "body").get_attribute("textContent") or ""
            assert "stage-secret-name" not in shown
            assert "a-secret-log-line" not in driver.page_source
            # A wrong token: refused, forgotten, and still nothing but the prompt.
            browser.log_in(driver, page_url(daemon), "not-the-token")
            error = browser.wait_for(
                driver, lambda d: d.find_element(By.ID, "login-error").text or None
            )
            assert "refused" in error
            assert driver.execute_script("return sessionStorage.length") == 0
            assert not driver.find_element(By.ID, "dashboard").is_displayed()
            assert "stage-secret-name" not in driver.page_source


@pytest.mark.parametrize("backend", ["asyncio", "trio"])
def test_live_invocations_logs_and_the_cancel_button(
    driver: WebDriver, clean_env: dict[str, str], backend: str
) -> None:
    from selenium.webdriver.common.by import By

    with (
        start_daemon(clean_env, backend) as daemon,
        BlockingExecutor(WebSocketExecutor(daemon.url, token=TOKEN)) as bx,
    ):
        browser.log_in(driver, page_url(daemon), TOKEN)
        browser.wait_for(driver, lambda d: d.find_element(By.ID, "dashboard").is_displayed())
        assert not driver.find_element(By.ID, "login").is_displayed()
        assert TOKEN not in driver.current_url
        assert driver.execute_script("return sessionStorage.getItem('remote-exec-token')") == TOKEN
        facts = browser.wait_for(driver, lambda d: text_of(d, "#daemon-facts") or None)
        assert daemon.url in facts
        assert backend in facts

        # An instance a client creates appears.
        stage = Stage("x")
        with bx.remote_instance(stage, "stage", "x"):
            browser.wait_for(driver, lambda d: by_css(d, '#instance-rows tr[data-name="stage"]'))
            row = text_of(driver, '#instance-rows tr[data-name="stage"]')
            assert "tests.status.instruments.Stage" in row

            # A long cooperative call appears running, its log arriving live.
            scan = bx.submit(stage.scan, 100_000, 0.05)
            running = f'tr.inv[data-id="{scan.id}"][data-status="running"]'
            browser.wait_for(driver, lambda d: by_css(d, running))
            log = f'tr.logrow[data-log-for="{scan.id}"] .log'
            browser.wait_for(driver, lambda d: "step 3:" in text_of(d, log))
            lines = len(by_css(driver, f"{log} .line"))
            browser.wait_for(driver, lambda d: "step 12:" in text_of(d, log))
            assert len(by_css(driver, f"{log} .line")) > lines  # more came, live
            assert "scan of 100000 steps along x" in text_of(driver, log)

            # The cancel button stops it; its status becomes cancelled.
            driver.find_element(By.CSS_SELECTOR, f"{running} button.cancel").click()
            cancelled = f'tr.inv[data-id="{scan.id}"][data-status="cancelled"]'
            browser.wait_for(driver, lambda d: by_css(d, cancelled))
            assert "InvocationCancelled" in text_of(driver, cancelled)
            assert bx.get_invocation(scan.id).status == "cancelled"
            assert not driver.find_element(
                By.CSS_SELECTOR, f"{cancelled} button.cancel"
            ).is_displayed()

            # A log line with HTML in it shows as text.
            html = "<script>window.pwned = 1</script><b id='bold'>bold</b><img src=x onerror='window.pwned = 2'>"
            said = bx.submit(stage.say, html)
            said_row = f'tr.inv[data-id="{said.id}"]'
            browser.wait_for(driver, lambda d: by_css(d, said_row))
            driver.find_element(By.CSS_SELECTOR, f"{said_row} button.toggle").click()
            said_log = f'tr.logrow[data-log-for="{said.id}"] .log .message'
            browser.wait_for(driver, lambda d: text_of(d, said_log) == html)
            assert by_css(driver, "#bold") == []
            assert by_css(driver, "tr.logrow img") == []
            assert driver.execute_script("return window.pwned === undefined")

        # Deleted: gone from the page too.
        browser.wait_for(driver, lambda d: not by_css(d, '#instance-rows tr[data-name="stage"]'))

        # The token stays in this tab across a reload; "Forget token" drops it.
        driver.refresh()
        browser.wait_for(driver, lambda d: d.find_element(By.ID, "dashboard").is_displayed())
        driver.find_element(By.ID, "forget").click()
        browser.wait_for(driver, lambda d: d.find_element(By.ID, "token").is_displayed())
        assert not driver.find_element(By.ID, "dashboard").is_displayed()
        assert driver.execute_script("return sessionStorage.length") == 0

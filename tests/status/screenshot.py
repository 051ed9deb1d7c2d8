"""Make ``docs/status-page.png``: the status page with a running invocation.

    python -m tests.status.screenshot [PATH]

Starts a real daemon (with a history file), has a client create two stages,
run a few calls and start a long scan, then opens the page in the system's
headless Chromium (see ``tests/status/browser.py``), pastes the token and
takes the picture once the scan has logged a few steps.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

from remote_exec.client.blocking import BlockingExecutor
from remote_exec.client.websocket import WebSocketExecutor
from tests.status import browser
from tests.status.instruments import Stage
from tests.ws_instruments import ROOT, DaemonProcess

TOKEN = "screenshot-token-0123456789"


def main(path: Path) -> int:
    reason = browser.missing()
    if reason is not None:
        print(f"cannot take the screenshot: {reason}", file=sys.stderr)
        return 1
    from selenium.webdriver.common.by import By

    with tempfile.TemporaryDirectory() as scratch:
        env = dict(os.environ, XDG_STATE_HOME=scratch)
        history = Path(scratch) / "history.db"
        with (
            DaemonProcess(
                "--allow-module", "tests.*", "--history", str(history), env=env, token=TOKEN
            ) as daemon,
            BlockingExecutor(WebSocketExecutor(daemon.url, token=TOKEN)) as bx,
        ):
            x, y = Stage("x"), Stage("y")
            bx.create_remote_instance(x, "stage-x", "x")
            bx.create_remote_instance(y, "stage-y", "y")
            bx.run(x.home)
            bx.run(y.home)
            bx.run(y.scan, 4, 0.05)
            bx.run(x.say, "limit switch <X+> reached: backing off 0.5 mm")
            stopped = bx.submit(y.scan, 1000, 0.05)
            bx.cancel_invocation(stopped.id)
            bx.submit(x.scan, 1000, 0.4)
            bx.submit(x.home)  # queued behind the scan
            driver = browser.start_chromium(Path(scratch) / "profile", 1280, 1180)
            try:
                browser.log_in(driver, f"http://127.0.0.1:{daemon.port}/", TOKEN)
                browser.wait_for(
                    driver,
                    lambda d: "step 7:" in (d.find_element(By.ID, "invocations").text or ""),
                    timeout=30,
                )
                driver.save_screenshot(str(path))
            finally:
                driver.quit()
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else ROOT / "docs" / "status-page.png"
    sys.exit(main(target))

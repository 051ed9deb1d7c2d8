"""What the status page's tests run inside a real daemon (``--allow-module tests.*``).

The daemon imports this module, so it imports only what the daemon has.
"""

from __future__ import annotations

import logging

from remote_exec import apply_executor, cancellable_sleep

log = logging.getLogger("lab.stage")


class Stage:
    """A motorised stage that scans slowly and says so at every step."""

    def __init__(self, axis: str = "x") -> None:
        self.axis = axis
        self.position = 0.0

    @apply_executor
    def scan(self, steps: int, pause: float = 0.05) -> float:
        """``steps`` moves of 0.1 mm, a reading after each; stops when cancelled."""
        log.info("scan of %d steps along %s", steps, self.axis)
        for step in range(steps):
            cancellable_sleep(pause)
            self.position += 0.1
            log.info(
                "step %d: %s = %.1f mm, reading %.3f V",
                step + 1,
                self.axis,
                self.position,
                0.5 + 0.01 * (step % 7),
            )
        log.info("scan done")
        return self.position

    @apply_executor
    def say(self, message: str) -> str:
        """Log ``message`` as it is (a test puts HTML in it)."""
        log.warning("%s", message)
        return message

    @apply_executor
    def home(self) -> float:
        log.info("homing %s", self.axis)
        self.position = 0.0
        return self.position

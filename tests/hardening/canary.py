"""Off every hardening daemon's allow-list: importing it is the bug the hostile suite hunts.

On import it writes the file named by ``REMOTE_EXEC_CANARY`` (set only in the
daemons' environment), so that an import leaves a trace even if the module
were later removed from ``sys.modules``.
"""

from __future__ import annotations

import os
from pathlib import Path

from remote_exec import apply_executor

_MARKER = os.environ.get("REMOTE_EXEC_CANARY")
if _MARKER:
    Path(_MARKER).write_text(f"imported by process {os.getpid()}\n")


class Canary:
    @apply_executor
    def chirp(self) -> str:
        return "chirp"

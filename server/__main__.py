"""``python -m remote_exec.server [options]`` is ``remote-exec serve [options]``."""

from __future__ import annotations

import sys

from .cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    sys.exit(main(args if args[:1] == ["serve"] else ["serve", *args]))

"""``python -m lymphnode <command> [args ...]``: the ``lymphnode`` console script without its
launcher (see :mod:`lymphnode.cli`)."""

from __future__ import annotations

import sys

from lymphnode.cli import main

if __name__ == "__main__":
    sys.exit(main())

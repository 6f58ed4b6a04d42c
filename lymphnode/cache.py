"""``python -m lymphnode.cache import|info ...``: the patch-cache CLI (logic in
:mod:`lymphnode.patches.cache`)."""

from __future__ import annotations

import sys

from lymphnode.patches.cache import main

if __name__ == "__main__":
    sys.exit(main())

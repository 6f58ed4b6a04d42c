"""``python -m lymphnode.annotations to-mask SLIDE XML OUT.tif [--level N]``: an ASAP outline as a
pyramidal 0/255 mask TIFF (logic in :mod:`lymphnode.wsi.annotations`)."""

from __future__ import annotations

import sys

from lymphnode.wsi.annotations import main

if __name__ == "__main__":
    sys.exit(main())

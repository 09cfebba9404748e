"""``python -m bray.archiver``: the same CLI as ``bray-archive``."""

from __future__ import annotations

import sys

from bray.archiver.cli import main

if __name__ == "__main__":
    sys.exit(main())

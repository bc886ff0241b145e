#!/usr/bin/env python3
"""``python scripts/ndif_local.py install|start|deploy|status|stop|env|watch ...``: a local, CPU-only NDIF
server (the real ``ndif`` server software) for tests and offline runs. The code is the package
scripts/ndif_local/ beside this file (its __init__.py explains the stack); run it with the project's venv.

Run as a script, this file's folder is first on sys.path, and a package directory wins over a module
of the same name there: ``ndif_local`` below is the package, not this file.
"""

import sys

from ndif_local.cli import main

if __name__ == "__main__":
    sys.exit(main())

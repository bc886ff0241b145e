"""``python -m ndif_local ...`` (with scripts/ on the path): the same as ``python scripts/ndif_local.py``."""

import sys

from .cli import main

sys.exit(main())

"""``python -m kvcl``: the same command line as the ``kvcl`` script."""

import sys

from .cli import main

sys.exit(main())

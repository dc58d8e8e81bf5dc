"""``python -m autoqra ...``: the command line (same as the ``autoqra`` script)."""

import sys

from autoqra.cli import main

sys.exit(main())

"""``python -m tooti``: the command line."""

import sys

from tooti.cli import main

sys.exit(main())

"""``python -m levit`` is the ``levit`` command."""

import sys

from .cli import main

sys.exit(main())

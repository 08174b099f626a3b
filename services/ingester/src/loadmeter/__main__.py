"""``python -m loadmeter``: the same as the ``loadmeter`` command."""

import sys

from .cli import main

sys.exit(main())

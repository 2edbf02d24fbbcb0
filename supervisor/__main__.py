"""``python -m supervisor``: see :mod:`supervisor.cli`."""

import sys

from .cli import main

sys.exit(main())

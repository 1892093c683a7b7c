"""``python -m nfrewrite``: the same as the ``nfrewrite`` command."""

import sys

from nfrewrite.cli import main

sys.exit(main())

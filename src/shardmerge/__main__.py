"""``python -m shardmerge``: the ``shardmerge`` command."""

import sys

from .cli import main

sys.exit(main())

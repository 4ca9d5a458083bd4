"""``python -m bench ...`` is ``fanin bench ...``."""

import sys

from bench.cli import main

sys.exit(main())

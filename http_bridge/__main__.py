"""`python -m casledger.http_bridge ...` = `casledger bridge ...` (how `serve` starts it)."""

import sys

from casledger.service.cli import main

sys.exit(main(["bridge", *sys.argv[1:]]))

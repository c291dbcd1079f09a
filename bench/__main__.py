"""``python -m bench``: the offline verify benchmark (see :mod:`bench.verify_bench`)."""

from __future__ import annotations

import sys

from bench.verify_bench import main

sys.exit(main())

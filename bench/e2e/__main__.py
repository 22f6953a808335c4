"""`python -m bench.e2e [--studies N] [--interval S] [--workers 1,2]`."""

from __future__ import annotations

import json
import sys

from bench.e2e.run import main

print(json.dumps(main(sys.argv[1:]), indent=2, default=str))

"""`make bench`: runs every benchmark module in bench/ (or those named) and prints its figures.

Each module has a `main() -> dict` that measures our code and a named baseline in the same
run and prints ratios; results are also written to bench/results/<name>.json.
"""

from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main(argv: list[str]) -> int:
    names = argv or sorted(m.name for m in pkgutil.iter_modules([str(HERE)]) if not m.name.startswith("_"))
    out_dir = HERE / "results"
    out_dir.mkdir(exist_ok=True)
    for name in names:
        print(f"== bench/{name}", flush=True)
        result = importlib.import_module(f"bench.{name}").main()
        (out_dir / f"{name}.json").write_text(json.dumps(result, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

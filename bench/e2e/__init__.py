"""bench/e2e: push -> committed score on the real stack (see run.py); `python -m bench e2e`."""

from __future__ import annotations

from typing import Any


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from bench.e2e.run import main as run

    return run(argv)

"""Fixtures shared by every test module: where the real data lives, free ports, settings.

Fixtures owned by one area live in their own plugin module (listed in pytest_plugins) so
that the ingest, pixel and training suites can grow without editing each other's files.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("XRAY_TRIAGE_SHARED_DATA", REPO.parent / "shared" / "data"))

pytest_plugins = [
    p
    for p in (
        "tests.plugins.ingest",
        "tests.plugins.pixels",
        "tests.plugins.training",
        "tests.plugins.scoring",
        "tests.plugins.worklist",
        "tests.plugins.worklist_browser",
    )
    if (REPO / (p.replace(".", "/") + ".py")).exists()
]


def shared_file(*parts: str) -> Path:
    """A file under ../shared/data; skips the test with a clear message when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found: {path} (../shared/data must sit beside the checkout)")
    return path


def pydicom_data_file(name: str) -> Path:
    """A file shipped by the `pydicom-data` package (RG1_UNCR.dcm, RG3_J2KI.dcm, ...)."""
    try:
        import data_store  # noqa: F401 - the import name of the pydicom-data package
        from pydicom.data import get_testdata_file
    except ImportError:  # pragma: no cover
        pytest.skip("pydicom-data is not installed")
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"{name} not found in pydicom-data")
    return Path(path)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def shared_data() -> Path:
    if not SHARED_DATA.exists():
        pytest.skip(f"real data not found: {SHARED_DATA}")
    return SHARED_DATA

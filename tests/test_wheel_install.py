"""The product as hospital IT installs it: a built wheel in a fresh virtual environment, run from an
empty folder outside the checkout, with `db upgrade`, `run`, a DCMTK push and a scored study.

Dependencies are not downloaded (no network at run time): the fresh environment sees the
development environment's site-packages through a ``.pth`` line, which adds them to the path
without running their ``.pth`` hooks, so the checkout's editable install is *not* visible and
every project module is imported from the wheel (asserted).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
from sqlalchemy import select

from db.models import Study
from db.session import make_engine
from tests.conftest import REPO, shared_file
from tests.plugins.ingest import storescu, wait_for
from tests.plugins.scoring import FINAL, scoring_settings, write_config

# Files a wheel once left out ("Package would be ignored"): without them nothing migrates or serves.
REQUIRED = [
    "db/migrations/env.py",
    "db/migrations/script.py.mako",
    "db/migrations/versions/0001_initial.py",
    "models/default/model.keras",
    "models/default/card.json",
    "training/configs/default.yaml",
    "worklist/templates/worklist.html",
    "worklist/static/app.css",
]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    # setuptools leaves build/ in the source tree, and a stale build/lib would slip removed modules
    # into later wheels: build from a copy of the source, as a release build from a clean tree would.
    source = tmp_path_factory.mktemp("source") / "xray-triage"
    skip = shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__", "var", "test-artifacts")
    shutil.copytree(REPO, source, ignore=skip)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-w", str(out), "-q"],
        check=True,
        cwd=out,
        capture_output=True,
        timeout=600,
    )
    (built,) = out.glob("xray_triage-*.whl")
    return built


def test_the_wheel_carries_every_package_and_data_file(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [name for name in REQUIRED if name not in names]
    assert missing == []
    assert not any(name.startswith(("tests/", "bench/")) for name in names)
    versions = sorted(p.name for p in (REPO / "db/migrations/versions").glob("*.py"))
    assert all(f"db/migrations/versions/{v}" in names for v in versions)


def test_installed_wheel_migrates_runs_and_scores_a_push_from_an_empty_folder(wheel: Path, tmp_path: Path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=300)
    site = Path(
        subprocess.run(
            [str(venv / "bin/python"), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True, capture_output=True, text=True,
        ).stdout.strip()
    )  # fmt: skip
    (site / "dev-dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(venv / "bin/python"), "install", "--no-deps", "--no-index",
         "-q", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )  # fmt: skip
    where = subprocess.run(
        [str(venv / "bin/python"), "-c", "import dicom_io, db; print(dicom_io.__file__); print(db.__file__)"],
        check=True, capture_output=True, text=True, cwd=tmp_path,
    ).stdout  # fmt: skip
    assert str(REPO) not in where and str(site) in where, where

    work = tmp_path / "site"  # an empty folder outside the checkout, as IT would use
    work.mkdir()
    var = work / "var"
    settings = scoring_settings(f"sqlite:///{var / 'xray-triage.db'}", f"sqla+sqlite:///{var / 'broker.db'}", var,
                                tmp_path.name)  # fmt: skip
    var.mkdir()
    config = write_config(settings, work / "xray-triage.yaml")
    cli = str(venv / "bin/xray-triage")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    upgraded = subprocess.run([cli, "--config", str(config), "db", "upgrade"], cwd=work, env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
    assert upgraded.returncode == 0, upgraded.stderr[-3000:]
    log = (work / "run.log").open("ab")
    proc = subprocess.Popen([cli, "--config", str(config), "run"], cwd=work, env=env, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    try:
        port = settings.listener.port
        film = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
        wait_for(lambda: proc.poll() is None and storescu(port, [film]).returncode == 0, timeout=180, interval=1,
                 what="the installed listener to accept a push")  # fmt: skip

        def final_state() -> str | None:
            engine = make_engine(settings.database.url)
            try:
                with engine.connect() as conn:
                    state = conn.execute(select(Study.state)).scalar_one_or_none()
            finally:
                engine.dispose()
            return str(state) if state in FINAL else None

        state = wait_for(final_state, timeout=300, interval=1, what="the pushed study to be scored")
        assert state == "scored", (work / "run.log").read_text()[-4000:]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=120)
        log.close()
    assert (var / "spool").is_dir()

"""Fixtures for the browser test: the whole product as a user runs it, and a real headless Chromium.

* ``browser_stack``: ``xray-triage db upgrade``, ``xray-triage user add`` and ``xray-triage run``
  (listener, worker and web app as child processes) on the embedded default (SQLite + the
  embedded SQL broker) in a tmp dir, with free ports and a short stability window.  ``run``
  gets a process group of its own, so teardown reaches the listener, the worker, its pool
  and the web server even when ``run`` itself is wedged, and checks that nothing is left.
* ``chrome``: Debian's ``chromium`` driven by Debian's ``chromedriver`` through Selenium,
  headless, with explicit paths so Selenium Manager never downloads a browser or driver.
* ``chest_cr``: a real shared radiograph (PNG/JPEG) as a CR chest instance to push.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from sqlalchemy import select

from bench.e2e.dx import dx_from_image
from db.models import Study, StudyState
from db.session import make_engine, make_sessionmaker
from settings import Settings
from tests.conftest import REPO, free_port
from tests.plugins.ingest import storescu, wait_for
from tests.plugins.pixels import dicom_from_pixels
from tests.plugins.scoring import FINAL, scoring_settings, write_config

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"
WINDOW = (1400, 1000)
ARTIFACTS = REPO / "test-artifacts"
USER, PASSWORD = "dr.browser", "browser-test-passphrase-42"
# `xray-triage ...` exactly as the console script runs it (xray_triage.cli:main), with this venv.
CLI = [sys.executable, "-m", "xray_triage.cli"]


def chest_cr(
    image: Path, out: Path, patient_name: str, patient_id: str, accession: str, size: int = 1024, age: str = "003Y"
) -> Path:
    """`image` (a real shared radiograph) as a CR chest AP instance of a new study.

    The shared Kermany JPEGs are 224 px, below the eligibility minimum, so the pixels are
    upscaled to a detector-sized 16-bit frame by the benchmark's `dx_from_image` (square, like
    the source) and wrapped by the pixel suite's `dicom_from_pixels` as CR Image Storage.
    Kermany films are of children aged one to five, so the header says so (Patient's Age):
    the worker judges them at the paediatric operating point, as it would at a hospital.
    """
    dx = dx_from_image(image, out.with_suffix(".dx.dcm"), rows=size, columns=size)
    pixels = pydicom.dcmread(dx).pixel_array
    dx.unlink()
    ds = dicom_from_pixels(
        pixels,
        modality="CR",
        PatientName=patient_name,
        PatientID=patient_id,
        AccessionNumber=accession,
        PatientAge=age,
        StudyDate=time.strftime("%Y%m%d"),
        StudyTime=time.strftime("%H%M%S"),
        StudyDescription="CHEST AP",
        BodyPartExamined="CHEST",
        ViewPosition="AP",
        SeriesNumber=1,
        InstanceNumber=1,
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def _group_members(pgid: int) -> list[int]:
    """PIDs of live (not zombie) processes in process group `pgid`."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            raw = stat.read_text()
        except OSError:
            continue
        # pid (comm) state ppid pgrp ...; comm may hold spaces, so split after the last ')'
        fields = raw[raw.rfind(")") + 2 :].split()
        if len(fields) > 2 and int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


@dataclass
class BrowserStack:
    """`xray-triage run` on a tmp dir, and what a test needs to talk to it."""

    settings: Settings
    config: Path
    var: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def __post_init__(self) -> None:
        self.factory = make_sessionmaker(make_engine(self.settings.database.url))

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.settings.web.port}"

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def push(self, files: list[Path]) -> None:
        result = storescu(self.settings.listener.port, files)
        assert result.returncode == 0, result.stderr[-2000:]

    def study(self, uid: str) -> Study | None:
        with self.factory() as s:
            return s.scalars(select(Study).where(Study.study_uid == uid)).one_or_none()

    def wait_scored(self, uid: str, timeout: float = 300.0) -> Study:
        def final() -> Study | None:
            assert self.proc.poll() is None, f"xray-triage run exited:\n{self.output()[-4000:]}"
            study = self.study(uid)
            return study if study is not None and StudyState(study.state) in FINAL else None

        study: Study = wait_for(final, timeout=timeout, interval=0.3, what=f"study {uid} to be scored")
        assert study.state == StudyState.SCORED, f"{study.state}: {study.state_reason}\n{self.output()[-4000:]}"
        return study

    def stop(self) -> None:
        """SIGTERM to `run` (it stops its children), then SIGKILL to whatever of the group is left."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(60)
        self.factory.kw["bind"].dispose()
        wait_for(lambda: not _group_members(self.proc.pid), timeout=60, what="every xray-triage process to end")


def cli(config: Path, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [*CLI, "--config", str(config), *args], cwd=REPO, input=stdin, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"xray-triage {' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def browser_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserStack]:
    """The product on the embedded default, started the way a site starts it; users added by the CLI."""
    var = tmp_path_factory.mktemp("browser")
    # A site zone other than the machine's (UTC here): pages must show Berlin wall-clock time.
    web = {"bind_address": "127.0.0.1", "port": free_port(), "time_zone": "Europe/Berlin"}
    # The site's default triage policy: findings steer per operating point on the card's
    # within-collection evidence (docs/triage.md); with the shipped model only pneumonia on a
    # child's film steers, with the card's paediatric threshold and the default critical one.
    settings = scoring_settings(
        f"sqlite:///{var / 'xray-triage.db'}",
        f"sqla+sqlite:///{var / 'broker.db'}",
        var,
        var.name,
        web=web,
    )
    config = write_config(settings, var / "xray-triage.yaml")
    cli(config, "db", "upgrade")
    added = cli(config, "user", "add", USER, "--role", "radiologist", "--password-stdin", stdin=PASSWORD + "\n")
    assert f"user {USER} added" in added.stdout
    cli(config, "user", "add", "api.colleague", "--role", "radiologist", "--password-stdin", stdin=PASSWORD + "\n")

    log_path = var / "run.log"
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            [*CLI, "--config", str(config), "run"],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown reaches every child
        )
    stack = BrowserStack(settings, config, var, proc, log_path)
    try:

        def web_up() -> bool:
            assert proc.poll() is None, f"xray-triage run exited:\n{stack.output()[-4000:]}"
            try:
                return httpx.get(stack.base_url + "/login", timeout=5).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(web_up, timeout=120, interval=0.3, what="the worklist web app to answer")
        yield stack
    finally:
        stack.stop()
        ARTIFACTS.mkdir(exist_ok=True)
        shutil.copy(log_path, ARTIFACTS / "browser-run.log")  # the three processes' logs, for a failed run


@pytest.fixture(scope="module")
def chrome() -> Iterator[Any]:
    """Headless Debian Chromium via Debian's chromedriver; nothing is downloaded."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    for binary in (CHROMIUM, CHROMEDRIVER):
        assert Path(binary).exists(), (
            f"{binary} missing: apt-get install -y chromium chromium-driver (scripts/system_deps.sh)"
        )
    previous = os.environ.get("SE_OFFLINE")
    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never fetch anything
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root
        "--disable-dev-shm-usage",
        f"--window-size={WINDOW[0]},{WINDOW[1]}",
        "--force-device-scale-factor=1",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        "--lang=en-US",
    ):
        options.add_argument(arg)
    ARTIFACTS.mkdir(exist_ok=True)
    service = Service(executable_path=CHROMEDRIVER, log_output=str(ARTIFACTS / "chromedriver.log"))
    driver = webdriver.Chrome(service=service, options=options)
    try:
        driver.set_window_size(*WINDOW)
        driver.set_page_load_timeout(120)
        yield driver
    finally:
        driver.quit()
        if previous is None:
            os.environ.pop("SE_OFFLINE", None)
        else:
            os.environ["SE_OFFLINE"] = previous

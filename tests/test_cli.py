"""The `xray-triage` command as an operator meets it: help, exit codes, masked secrets, `run`."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest
import yaml

from hl7_io.oru import parse_oru
from tests.conftest import REPO
from tests.plugins.ingest import echoscu, shared_file, storescu, wait_for
from tests.plugins.mllp import MllpReceiver
from xray_triage.cli import EXIT_CONFIG, build_parser, main

CLI = [sys.executable, "-m", "xray_triage.cli"]


def _commands() -> list[list[str]]:
    """Every command and sub-command the parser knows, so a new one cannot ship without --help."""
    parser = build_parser()
    out: list[list[str]] = []

    def walk(p, prefix: list[str]) -> None:
        subs = [a for a in p._actions if a.__class__.__name__ == "_SubParsersAction"]
        if not subs:
            out.append(prefix)
        for action in subs:
            for name, child in action.choices.items():
                walk(child, [*prefix, name])

    walk(parser, [])
    return out


@pytest.mark.parametrize("command", _commands(), ids=" ".join)
def test_help_on_every_command(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([*command, "--help"])
    assert done.value.code == 0
    assert "usage: xray-triage" in capsys.readouterr().out


def test_mandatory_commands_exist():
    names = {" ".join(c) for c in _commands()}
    assert {"listen", "worker", "run", "web", "user add", "db upgrade", "config check", "status"} <= names


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("XRAY_TRIAGE")}
    env.update(extra)
    return env


def test_config_error_names_the_key_and_exits_2(tmp_path):
    result = subprocess.run(
        [*CLI, "config", "check"], cwd=REPO, capture_output=True, text=True,
        env=_env(XRAY_TRIAGE_LISTENER__PORT="99999"),
    )  # fmt: skip
    assert result.returncode == EXIT_CONFIG == 2
    assert "listener.port" in result.stderr and "Traceback" not in result.stderr
    missing = subprocess.run([*CLI, "--config", str(tmp_path / "nope.yaml"), "listen"], cwd=REPO,
                             capture_output=True, text=True, env=_env())  # fmt: skip
    assert missing.returncode == 2 and "cannot read configuration file" in missing.stderr


def test_config_check_masks_secrets(capsys):
    os.environ["XRAY_TRIAGE_DATABASE__URL"] = "postgresql+psycopg://triage:TopSecret@db:5432/xt"
    try:
        assert main(["config", "check"]) == 0
    finally:
        del os.environ["XRAY_TRIAGE_DATABASE__URL"]
    out = capsys.readouterr()
    assert "TopSecret" not in out.out + out.err
    assert json.loads(out.out)["database"]["url"] == "postgresql+psycopg://triage:***@db:5432/xt"


def test_db_upgrade_and_status(sqlite_backend, tmp_path, start_listener, capsys):
    settings = sqlite_backend.settings(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    assert main(["--config", str(config), "db", "upgrade"]) == 0
    assert "database at revision" in capsys.readouterr().out
    handle = start_listener(settings, with_handoff=False)
    assert storescu(handle.port, [shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")]).returncode == 0
    assert main(["--config", str(config), "status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["studies"]["receiving"] == 1


def test_run_prints_where_to_push_serves_and_stops_on_ctrl_c(sqlite_backend, tmp_path, request):
    ris = MllpReceiver()  # with a destination configured, run also starts the export worker
    request.addfinalizer(ris.close)
    destination = {"name": "ris", "kind": "hl7", "host": "127.0.0.1", "port": ris.port}
    export = {"destinations": [destination], "queue": f"xt-run-{os.getpid()}.export"}
    settings = sqlite_backend.settings(tmp_path, export=export)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    errors = (tmp_path / "run.err").open("w")
    proc = subprocess.Popen(
        [*CLI, "--config", str(config), "run"], cwd=REPO, stdout=subprocess.PIPE, stderr=errors,
        text=True, env=_env(), start_new_session=True,
    )  # fmt: skip
    try:
        port = settings.listener.port
        lines = [proc.stdout.readline()]  # the children may print first; "running" comes once the ports answer
        while lines[-1] and "is running" not in lines[-1] and len(lines) < 500:
            lines.append(proc.stdout.readline())
        assert re.search(rf"AE title XRAY_TRIAGE at 127\.0\.0\.1:{port}", lines[-1]), lines
        wait_for(lambda: echoscu(port).returncode == 0, timeout=60, what="the listener started by run")
        web = f"http://127.0.0.1:{settings.web.port}"
        assert f"Worklist: {web}/" in proc.stdout.readline() + proc.stdout.readline() + proc.stdout.readline()
        health = wait_for(lambda: _get(f"{web}/healthz"), timeout=120, what="the web app started by run")
        assert set(json.loads(health)["checks"]) == {"listener", "database", "broker", "workers"}
        assert json.loads(health)["checks"]["listener"]["ok"] is True
        # The container healthchecks' command: a C-ECHO, and /healthz (200 once the worker reports).
        probe = _health(config, "listener")
        assert (probe.returncode, probe.stdout.strip()) == (0, "listener: C-ECHO success")
        wait_for(lambda: _health(config, "web").returncode == 0, timeout=180, what="health web to pass")
        # A pushed study is scored and its priority reaches the RIS through run's export worker.
        pushed = shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")
        assert storescu(port, [pushed]).returncode == 0
        wait_for(lambda: ris.messages, timeout=300, what="the priority message from run's export worker")
        assert parse_oru(ris.messages[0]).study_uid == str(
            pydicom.dcmread(pushed, stop_before_pixels=True).StudyInstanceUID
        )
    finally:
        # Ctrl-C in a terminal reaches the whole process group.
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    errors.close()
    assert " ERROR " not in (tmp_path / "run.err").read_text()  # a normal Ctrl-C is no error
    assert echoscu(settings.listener.port).returncode != 0  # the listener child is gone too
    assert _get(f"http://127.0.0.1:{settings.web.port}/healthz") is None  # and the web app
    for service, reason in (("listener", "no DICOM association"), ("web", "nothing answers http://127.0.0.1")):
        probe = _health(config, service)
        assert probe.returncode == 1 and probe.stderr.startswith(f"{service}: down: {reason}"), probe.stderr


def _health(config: Path, service: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "--config", str(config), "health", service], capture_output=True, text=True,
                          env=_env(), timeout=60)  # fmt: skip


def _get(url: str) -> str | None:
    """The body of a GET, whatever its status; None while nothing listens."""
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.read().decode()
    except urllib.error.HTTPError as exc:  # /healthz answers 503 until a worker has reported
        return exc.read().decode()
    except OSError:
        return None


def _user_add(config, *args: str, password: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, "--config", str(config), "user", "add", *args, "--password-stdin"], cwd=REPO, input=password + "\n",
        capture_output=True, text=True, env=_env(),
    )  # fmt: skip


def test_user_add_stores_an_argon2_hash_and_refuses_bad_input(sqlite_backend, tmp_path):
    from sqlalchemy import select

    from db.models import Role, User
    from db.session import make_engine, make_sessionmaker, upgrade

    settings = sqlite_backend.settings(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    fresh = tmp_path / "fresh.yaml"  # a database nobody has migrated yet
    fresh.write_text(yaml.safe_dump({"database": {"url": f"sqlite:///{tmp_path / 'fresh.db'}"}}))
    early = _user_add(fresh, "dr.house", password="a long enough secret")
    assert early.returncode == 1 and "run `xray-triage db upgrade` first" in early.stderr
    assert "SELECT" not in early.stderr and "Traceback" not in early.stderr
    upgrade(settings.database.url)
    ok = _user_add(config, "dr.house", "--role", "admin", password="a long enough secret")
    assert ok.returncode == 0 and "added with role admin" in ok.stdout
    assert "a long enough secret" not in ok.stdout + ok.stderr
    short = _user_add(config, "dr.who", password="short")
    assert short.returncode == 2 and "at least 10 characters" in short.stderr
    taken = _user_add(config, "dr.house", password="another long secret")
    assert taken.returncode == 2 and "already exists" in taken.stderr
    hostile = _user_add(config, "x' OR 1=1 --", password="a long enough secret")
    assert hostile.returncode == 2 and "user name must be" in hostile.stderr
    with make_sessionmaker(make_engine(settings.database.url))() as session:
        users = session.scalars(select(User)).all()
    assert [(u.username, u.role) for u in users] == [("dr.house", Role.ADMIN)]
    assert users[0].password_hash.startswith("$argon2id$") and "a long enough secret" not in users[0].password_hash


def test_password_change_and_disable_end_the_users_sessions(sqlite_backend, tmp_path):
    from db.models import User, utcnow
    from db.session import make_engine, make_sessionmaker, session_scope, upgrade
    from worklist.sessions import open_session, session_user

    settings = sqlite_backend.settings(tmp_path)
    upgrade(settings.database.url)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    assert _user_add(config, "dr.house", password="a long enough secret").returncode == 0
    factory = make_sessionmaker(make_engine(settings.database.url))

    def new_session() -> str:
        with session_scope(factory) as s:
            user_id = s.query(User.id).filter_by(username="dr.house").scalar()
            return open_session(s, user_id, utcnow())

    def alive(token: str) -> bool:
        with factory() as s:
            return session_user(s, token, utcnow(), 3600) is not None

    def cli(*args: str, password: str | None = None) -> subprocess.CompletedProcess[str]:
        extra = ["--password-stdin"] if password is not None else []
        return subprocess.run([*CLI, "--config", str(config), "user", *args, *extra], cwd=REPO, capture_output=True,
                              text=True, env=_env(), input=(password or "") + "\n")  # fmt: skip

    token = new_session()
    assert alive(token)
    changed = cli("password", "dr.house", password="another long secret")
    assert changed.returncode == 0 and "sessions are ended" in changed.stdout
    assert not alive(token)
    assert cli("password", "dr.house", password="short").returncode == 2
    assert cli("password", "nobody", password="another long secret").returncode == 2

    token = new_session()
    disabled = cli("disable", "dr.house")
    assert disabled.returncode == 0 and not alive(token)
    token = new_session()
    assert not alive(token)  # a disabled account has no live session, whatever its cookie says
    assert cli("enable", "dr.house").returncode == 0 and alive(token)
    assert cli("disable", "nobody").returncode == 2


def test_config_is_accepted_after_the_subcommand_too(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text("listener:\n  ae_title: AFTER_SUB\n")
    for argv in (["--config", str(config), "config", "check"], ["config", "check", "--config", str(config)]):
        result = subprocess.run([*CLI, *argv], cwd=tmp_path, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert '"ae_title": "AFTER_SUB"' in result.stdout


def test_user_add_without_a_terminal_or_password_stdin_says_what_to_do(tmp_path):
    config = tmp_path / "site.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'x.db'}\n")
    result = subprocess.run([*CLI, "--config", str(config), "user", "add", "someone"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode != 0 and "Traceback" not in result.stderr and "EOFError" not in result.stderr
    assert "--password-stdin" in result.stderr


def _children(pid: int) -> dict[str, int]:
    """The direct children of `pid` by subcommand (listen, worker, web), from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if int(fields[1]) == pid:
            for name in ("listen", "worker", "web"):
                if name.encode() in cmdline:
                    out[name] = int(stat.parent.name)
    return out


def _start_run(settings, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path]:
    """`xray-triage run` in its own process group, its output in a log; returns once it says it is running."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    log = tmp_path / "run.log"
    with log.open("w") as out:
        proc = subprocess.Popen([*CLI, "--config", str(config), "run"], cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                                env=_env(), start_new_session=True)  # fmt: skip
    try:
        wait_for(lambda: "is running" in log.read_text(), timeout=180, what="run to say it is running")
    except BaseException:
        os.killpg(proc.pid, signal.SIGKILL)
        raise
    return proc, log


def test_run_restarts_a_crashed_child_and_leaves_the_others_alone(sqlite_backend, tmp_path):
    settings = sqlite_backend.settings(tmp_path)
    proc, log = _start_run(settings, tmp_path)
    try:
        before = wait_for(lambda: c if len(c := _children(proc.pid)) == 3 else None, timeout=30, what="3 children")
        os.kill(before["listen"], signal.SIGKILL)
        wait_for(lambda: "restarting the DICOM listener" in log.read_text(), timeout=60, what="the restart")
        wait_for(lambda: echoscu(settings.listener.port).returncode == 0, timeout=120, what="the listener to be back")
        after = _children(proc.pid)
        assert after["listen"] != before["listen"]
        assert after["worker"] == before["worker"] and after["web"] == before["web"]
        assert "the DICOM listener exited with status -9; restarting it in 1 s" in log.read_text()
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_run_with_the_web_port_taken_says_which_component_and_address(sqlite_backend, tmp_path):
    import socket

    settings = sqlite_backend.settings(tmp_path)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(json.loads(settings.model_dump_json())))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", settings.web.port))
        taken.listen()
        result = subprocess.run([*CLI, "--config", str(config), "run"], cwd=REPO, capture_output=True, text=True,
                                env=_env(), timeout=300, start_new_session=True)  # fmt: skip
    assert result.returncode != 0
    assert f"worklist web app cannot listen on 127.0.0.1:{settings.web.port}" in result.stderr
    assert "the web app did not start" in result.stderr
    assert "is running" not in result.stdout


def test_listen_on_a_database_that_was_never_migrated_says_to_run_db_upgrade(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(f"database:\n  url: sqlite:///{tmp_path / 'fresh.db'}\nstorage:\n  spool_dir: {tmp_path}/spool\n")
    result = subprocess.run([*CLI, "--config", str(config), "listen"], cwd=tmp_path, capture_output=True, text=True,
                            timeout=300, stdin=subprocess.DEVNULL)  # fmt: skip
    assert result.returncode == 1
    assert "the database is empty" in result.stderr and "xray-triage db upgrade" in result.stderr
    assert "Traceback" not in result.stderr and "SELECT" not in result.stderr


def test_run_migrates_the_embedded_database_by_itself_and_says_so(sqlite_backend, tmp_path):
    settings = sqlite_backend.settings(tmp_path, database={"url": f"sqlite:///{tmp_path / 'never-upgraded.db'}"})
    proc, log = _start_run(settings, tmp_path)
    try:
        assert "migrated the embedded database (was empty)" in log.read_text()
        assert (
            storescu(settings.listener.port, [shared_file("dicom", "siim_cr_chest_pa_jpeg_baseline.dcm")]).returncode
            == 0
        )
    finally:
        os.killpg(proc.pid, signal.SIGINT)
        proc.wait(timeout=60)
    assert proc.returncode == 0
    assert "no such table" not in log.read_text()


def test_children_of_run_die_with_it_even_on_kill_9(sqlite_backend, tmp_path):
    settings = sqlite_backend.settings(tmp_path)
    proc, _log = _start_run(settings, tmp_path)
    children = wait_for(lambda: c if len(c := _children(proc.pid)) == 3 else None, timeout=30, what="3 children")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)

    def gone(pid: int) -> bool:
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
        except OSError:
            return True

    wait_for(lambda: all(gone(pid) for pid in children.values()), timeout=60, what="the orphaned children to stop")
    assert echoscu(settings.listener.port).returncode != 0

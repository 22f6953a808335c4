"""The `xray-triage` command.

Every sub-command loads the one Settings object first, so a bad configuration stops every
process the same way: a one-line reason naming the key, and exit status 2.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from settings import ConfigError, Settings, effective_config, load_settings

log = logging.getLogger("xray_triage")

EXIT_CONFIG = 2
EXIT_USAGE = 2
EXIT_RUNTIME = 1


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level, logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pynetdicom logs whole datasets (patient names and IDs) at DEBUG; never let it.
    logging.getLogger("pynetdicom").setLevel(max(logging.INFO, getattr(logging, level, logging.INFO)))


def cmd_config_check(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_io.tls import server_ssl_context

    server_ssl_context(settings.listener.tls)  # certificate, key and CA files load (ConfigError if not)
    data = effective_config(settings)
    print(json.dumps(data, indent=2))
    if settings.listener.allowed_callers is None:
        print("warning: listener.allowed_callers is not set: any calling AE title is accepted", file=sys.stderr)
    return 0


def cmd_db_upgrade(settings: Settings, args: argparse.Namespace) -> int:
    from db.session import current_revision, upgrade

    upgrade(settings.database.url)
    print(f"database at revision {current_revision(settings.database.url)}")
    return 0


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from xray_triage.status import collect_status

    report = collect_status(settings)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        print("studies per state:")
        for state, n in report["studies"].items():
            print(f"  {state:<11} {n}")
        print("exports per state:")
        for state, n in report["exports"].items():
            print(f"  {state:<13} {n}")
        print("queue depth:")
        for queue, n in report["queues"].items():
            print(f"  {queue:<24} {'unknown' if n is None else n}")
    return 0


def cmd_health(settings: Settings, args: argparse.Namespace) -> int:
    """Exit 0 when the service answers as it should: the container healthchecks run this."""
    from xray_triage import probes

    try:
        if args.service == "listener":
            print(f"listener: {probes.listener(settings.listener)}")
            return 0
        status, report = probes.web_health(settings.web)
    except probes.ServiceDown as exc:
        print(f"{args.service}: down: {exc}", file=sys.stderr)
        return 1
    failing = [f"{name}: {check.get('error')}" for name, check in report["checks"].items()
               if isinstance(check, dict) and not check.get("ok")]  # fmt: skip
    print(f"web: HTTP {status}" + "".join(f"\n  {line}" for line in failing))
    return 0 if status == 200 else 1


def _require_schema(settings: Settings, *, migrate_embedded: bool = False) -> int | None:
    """None when the database schema is current (migrating the embedded SQLite default if asked);
    else an exit status after one line that says what to do.  A database that cannot be reached
    is left to the service itself (the listener answers 0xC001 until it is back)."""
    import sqlalchemy.exc

    from db.session import SchemaNotCurrent, ensure_schema

    try:
        migrated_from = ensure_schema(settings.database.url, migrate_embedded=migrate_embedded)
    except SchemaNotCurrent as exc:
        print(f"xray-triage: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except sqlalchemy.exc.OperationalError as exc:
        log.warning("database not reachable at start-up (%s); starting anyway", type(exc.orig).__name__)
        return None
    if migrated_from is not None:
        print(f"xray-triage: migrated the embedded database (was {migrated_from})", file=sys.stderr)
    return None


def cmd_listen(settings: Settings, args: argparse.Namespace) -> int:
    from xray_triage.services import serve_intake

    if (code := _require_schema(settings)) is not None:
        return code
    serve_intake(settings)
    return 0


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from xray_triage.runner import run_worker

    if (code := _require_schema(settings)) is not None:
        return code

    queues = args.queues.split(",") if args.queues else [settings.queues.urgent, settings.queues.routine]
    return run_worker(settings, queues=queues, concurrency=args.concurrency)


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    from xray_triage.runner import run_all

    if (code := _require_schema(settings, migrate_embedded=True)) is not None:
        return code
    return run_all(settings, config_path=args.config, concurrency=args.concurrency)


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    from worklist.server import serve

    if (code := _require_schema(settings)) is not None:
        return code
    serve(settings)
    return 0


def _read_password(args: argparse.Namespace) -> str:
    """From stdin (scripts) or asked twice on the terminal; never from the command line."""
    import getpass

    if args.password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise ValueError("no terminal to ask for the password on: pipe it in with --password-stdin")
    first = getpass.getpass(f"password for {args.username}: ")
    if getpass.getpass("again: ") != first:
        raise ValueError("the two passwords differ")
    return first


def _with_user_session(settings: Settings, action: Callable[[Any], object]) -> int:
    """Run `action(session)` in one transaction; a ValueError is the operator's mistake (exit 2)."""
    import sqlalchemy.exc

    from db.session import make_engine, make_sessionmaker, session_scope

    engine = make_engine(settings.database.url, hide_parameters=True)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            action(session)
    except ValueError as exc:
        print(f"xray-triage: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except sqlalchemy.exc.SQLAlchemyError as exc:
        # Most often a fresh database: say what to do instead of printing SQL.
        print(
            f"xray-triage: the users table cannot be read ({type(exc).__name__}); "
            "run `xray-triage db upgrade` first, or check database.url",
            file=sys.stderr,
        )
        return EXIT_RUNTIME
    finally:
        engine.dispose()
    return 0


def cmd_user_add(settings: Settings, args: argparse.Namespace) -> int:
    from worklist.users import add_user

    password = _read_password(args)
    code = _with_user_session(settings, lambda session: add_user(session, args.username, password, args.role))
    if code == 0:
        print(f"user {args.username} added with role {args.role}")
    return code


def cmd_user_password(settings: Settings, args: argparse.Namespace) -> int:
    from db.models import utcnow
    from worklist.sessions import revoke_all
    from worklist.users import set_password

    password = _read_password(args)
    code = _with_user_session(
        settings, lambda session: revoke_all(session, set_password(session, args.username, password), utcnow())
    )
    if code == 0:
        print(f"password of {args.username} changed; their sessions are ended")
    return code


def cmd_user_disable(settings: Settings, args: argparse.Namespace) -> int:
    from db.models import utcnow
    from worklist.sessions import revoke_all
    from worklist.users import set_disabled

    disable = args.user_command == "disable"

    def action(session: Any) -> None:
        user_id = set_disabled(session, args.username, disable)
        if disable:
            revoke_all(session, user_id, utcnow())

    code = _with_user_session(settings, action)
    if code == 0:
        print(f"user {args.username} {'disabled; their sessions are ended' if disable else 'enabled'}")
    return code


def cmd_truth_import(settings: Settings, args: argparse.Namespace) -> int:
    import sqlalchemy.exc

    from db.session import make_engine, make_sessionmaker, session_scope
    from xray_triage.truth_import import TruthImportError, import_truth

    engine = make_engine(settings.database.url, hide_parameters=True)
    try:
        with session_scope(make_sessionmaker(engine)) as session:
            rows = import_truth(session, Path(args.file), args.by)
    except TruthImportError as exc:
        for problem in exc.problems:
            print(f"xray-triage: {problem}", file=sys.stderr)
        print(f"xray-triage: {exc}", file=sys.stderr)
        return EXIT_RUNTIME
    except sqlalchemy.exc.SQLAlchemyError as exc:
        print(f"xray-triage: the database cannot be written ({type(exc).__name__}); nothing imported", file=sys.stderr)
        return EXIT_RUNTIME
    finally:
        engine.dispose()
    studies = len({r.study_id for r in rows})
    print(f"imported {len(rows)} label(s) for {studies} stud{'y' if studies == 1 else 'ies'}")
    return 0


def cmd_site_report(settings: Settings, args: argparse.Namespace) -> int:
    from xray_triage.site_report import day_end, parse_day, write_site_report

    try:
        since = parse_day(args.since)
        until = day_end(args.until) if args.until else None
    except ValueError:
        print("xray-triage: --since and --until take a date YYYY-MM-DD", file=sys.stderr)
        return EXIT_USAGE
    out = Path(args.out) if args.out else None
    if out is not None and out.exists():
        print(f"xray-triage: {out} exists; choose a new folder", file=sys.stderr)
        return EXIT_USAGE
    folder = write_site_report(settings, since, until, out, args.target_sensitivity)
    print(f"site report written to {folder}/report.md")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="xray-triage",
        description="Chest X-ray triage beside a PACS. Decision support only - not for diagnostic use.",
    )
    parser.add_argument("--config", help="configuration file (YAML); default: $XRAY_TRIAGE_CONFIG")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def add(name: str, func: Callable[[Settings, argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        return p

    add("listen", cmd_listen, "run the DICOM C-STORE/C-ECHO listener and the study hand-off")
    p = add("worker", cmd_worker, "run a Celery worker that processes queued studies")
    p.add_argument("--queues", help="comma-separated queue names (default: urgent and routine)")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1)")
    add("web", cmd_web, "serve the worklist web app and JSON API")
    p = add("run", cmd_run, "listener, worker and worklist web app in one command (what `make run` starts)")
    p.add_argument("--concurrency", type=int, default=1, help="worker processes (default 1)")

    db = sub.add_parser("db", help="database maintenance", description="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", metavar="ACTION")
    db_sub.required = True
    p = db_sub.add_parser("upgrade", help="apply migrations up to the latest revision")
    p.set_defaults(func=cmd_db_upgrade)

    cfg = sub.add_parser("config", help="configuration tools", description="configuration tools")
    cfg_sub = cfg.add_subparsers(dest="config_command", metavar="ACTION")
    cfg_sub.required = True
    p = cfg_sub.add_parser("check", help="validate and print the effective configuration, secrets masked")
    p.set_defaults(func=cmd_config_check)

    user = sub.add_parser("user", help="worklist users", description="worklist users")
    user_sub = user.add_subparsers(dest="user_command", metavar="ACTION")
    user_sub.required = True
    for name, func, help_ in (
        ("add", cmd_user_add, "add a worklist user (password asked twice, or read from stdin)"),
        ("password", cmd_user_password, "change a user's password and end their sessions"),
        ("disable", cmd_user_disable, "disable a user and end their sessions"),
        ("enable", cmd_user_disable, "enable a disabled user"),
    ):
        p = user_sub.add_parser(name, help=help_, description=help_)
        p.add_argument("username")
        if name == "add":
            p.add_argument("--role", choices=["radiologist", "admin"], default="radiologist")
        if name in ("add", "password"):
            p.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
        p.set_defaults(func=func)

    truth = sub.add_parser("truth", help="radiologists' ground truth", description="radiologists' ground truth")
    truth_sub = truth.add_subparsers(dest="truth_command", metavar="ACTION")
    truth_sub.required = True
    p = truth_sub.add_parser(
        "import",
        help="import reference labels from a CSV (study_uid or accession, finding, present); all or nothing",
        description="import reference labels from a CSV (study_uid or accession, finding, present); all or nothing",
    )
    p.add_argument("file", help="CSV file with a header row")
    p.add_argument("--by", default="import", help="who the labels are recorded as (default: import)")
    p.set_defaults(func=cmd_truth_import)

    p = add("site-report", cmd_site_report, "measure the model on this site's labelled studies; propose thresholds")
    p.add_argument("--since", required=True, help="first day, YYYY-MM-DD")
    p.add_argument("--until", help="last day, YYYY-MM-DD (default: today)")
    p.add_argument("--out", help="new folder for the report (default: ./site-report-<UTC time>)")
    p.add_argument("--target-sensitivity", type=float, help="for the proposed thresholds (default: the card's)")

    p = add("health", cmd_health, "probe a running service (exit 0 when healthy): container healthchecks")
    p.add_argument("service", choices=["listener", "web"], help="listener: a C-ECHO; web: GET /healthz")
    p = add("status", cmd_status, "studies per state and queue depth")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    from training.commands import register_commands  # train / evaluate; imports no Keras
    from xray_triage.predict import register as register_predict

    register_predict(add)
    register_commands(add)
    _accept_global_options_everywhere(parser)
    return parser


def _accept_global_options_everywhere(parser: argparse.ArgumentParser) -> None:
    """`--config` before or after the subcommand (``xray-triage status --config site.yaml`` works too).

    Except where a command has a `--config` of its own (``train --config`` names the training
    config): there the site configuration goes before the subcommand.
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                if "--config" not in sub._option_string_actions:
                    sub.add_argument("--config", default=argparse.SUPPRESS, help="configuration file (YAML)")
                _accept_global_options_everywhere(sub)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        settings = load_settings(args.config)
        from triage.operating import check_finding_names  # numpy and the model card: not for --help

        check_finding_names(settings)
    except ConfigError as exc:
        print(f"xray-triage: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    setup_logging(settings.log_level)
    try:
        return int(args.func(settings, args) or 0)
    except KeyboardInterrupt:
        return 130
    except ConfigError as exc:  # found when a command first uses a setting (e.g. TLS files)
        print(f"xray-triage: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # the CLI promises a one-line reason, not a traceback
        log.debug("command failed", exc_info=True)
        print(f"xray-triage: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_RUNTIME


if __name__ == "__main__":
    sys.exit(main())

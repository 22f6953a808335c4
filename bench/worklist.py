"""bench/worklist: server time of the worklist's first and filtered pages over 10,000 studies.

A fresh PostgreSQL database (``xt_bench_<random>``, dropped at the end, even on error) is
migrated to head and filled with BENCH_WORKLIST_N (10,000) seeded, realistic studies: received
over the last 3 days (so escalation applies to most of them), mostly routine, ~15% urgent,
~3% critical, NULL priority for the pending ones; scored / ineligible / failed / pending;
read for most old studies and unread for recent ones; 5 calling AE titles; one CR/DX PA/AP
series each; fake patient names.  Bulk inserts, then ANALYZE.

Measured, interleaved, BENCH_WORKLIST_REPEATS (200) times after a warm-up:

* HTTP: ``create_app(settings)`` under uvicorn in a background thread on a free 127.0.0.1
  port, logged in through POST /api/login; GET /api/worklist (first page, 50 rows), GET
  /worklist (the HTML page) and two filtered API pages.  *Server* time is measured inside
  the server by an ASGI wrapper around the whole app (arrival of the request to the last body
  byte handed to uvicorn, sessions and middleware included); client time (httpx, keep-alive)
  is reported too.
* The query functions alone on a session: ``worklist_page`` (ids + count + studies + series +
  row dicts), ``ordered_ids`` (ids + count) and ``page_statement`` (ids only).

Baseline, same run: the naive single query ``select(Study).where(filters).order_by(
*worklist_order(cfg, now)).limit(50)``, whose ORDER BY a CASE expression has to read and sort
every matching row (the bench checks it returns the same 50 ids in the same order).  Ratios
are ours / baseline (below 1 = faster than the baseline).  Goal: p95 <= 100 ms.

Plans: ``EXPLAIN (ANALYZE, BUFFERS)`` of the SQL the app runs (``worklist.queries.
page_statement`` and ``total_statement``) and of the baseline, with the indexes each plan
reads and whether the page reads ix_study_priority_received (or its siblings with the same
``(priority, received_at, id)`` tail, migration 0004).  Also: the generic plan each page
would get if it were a prepared statement (it is not today: psycopg drops prepared
statements at every ROLLBACK, and each request's session ends with one), plan-only cases
(unread only, finding only, page 20), and the page plans again after ``VACUUM`` (what
autovacuum leaves: index-only scans).  The bench loads with ANALYZE only, so the timed runs
see a freshly loaded table, the worst case for index-only scans.

BENCH_WORKLIST_N, _DAYS (3), _REPEATS, _WARMUP change the size; XT_BENCH_PG_ADMIN the server.
"""

from __future__ import annotations

import asyncio
import os
import queue
import random
import re
import secrets
import socket
import statistics
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, Select, func, insert, select, text
from sqlalchemy.orm import Session, sessionmaker

N_STUDIES = int(os.environ.get("BENCH_WORKLIST_N", "10000"))
REPEATS = int(os.environ.get("BENCH_WORKLIST_REPEATS", "200"))
WARMUP = int(os.environ.get("BENCH_WORKLIST_WARMUP", "20"))
DAYS = float(os.environ.get("BENCH_WORKLIST_DAYS", "3"))  # studies received over the last DAYS days
SEED = 6
PAGE_SIZE = 50
GOAL_P95_MS = 100.0
TARGET_INDEX = "ix_study_priority_received"
PG_ADMIN_URL = os.environ.get("XT_BENCH_PG_ADMIN", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_URL_TEMPLATE = os.environ.get("XT_BENCH_PG_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/{name}")
USERNAME, PASSWORD = "bench.radiologist", "bench-worklist-password"

AE_TITLES = ("DX_ER", "CR_WARD3", "DX_MOBILE1", "CR_OUTPT", "DX_ICU")
AE_WEIGHTS = (0.30, 0.20, 0.20, 0.20, 0.10)
LAST_NAMES = (
    "SMITH", "JONES", "GARCIA", "MULLER", "ROSSI", "DUBOIS", "NOVAK", "KOWALSKI", "SILVA", "JANSEN",
    "NIELSEN", "KIM", "NGUYEN", "OKAFOR", "HASSAN", "TANAKA", "IVANOV", "LEHTINEN", "MURPHY", "SCHMIDT",
    "MARTIN", "BROWN", "LOPEZ", "WEBER", "FISCHER", "BAKER", "CHEN", "PATEL", "SINGH", "OLSEN",
)  # fmt: skip
FIRST_NAMES = (
    "ANNA", "JOHN", "MARIA", "PETER", "LENA", "AHMED", "SOFIA", "LUCAS", "EMMA", "NOAH",
    "MIA", "OMAR", "JULIA", "DAVID", "ELIF", "MARC", "YUKI", "IVAN", "SARA", "TOM",
)  # fmt: skip
READERS = ("dr.adams", "dr.berg", "dr.costa", "dr.dahl")
MODEL_REF = "densenet121-chest@bench"
FAIL_REASONS = ("pixel decode failed: truncated JPEG 2000 stream", "model error: CUDA out of memory")
INELIGIBLE_REASONS = ("lateral view", "body part ABDOMEN", "image too small (200x180)", "For Processing image")


# --------------------------------------------------------------------------- database


def _admin_engine() -> Engine:
    from db.session import make_engine

    return make_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")


def create_database(name: str) -> str:
    from db.session import upgrade

    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    url = PG_URL_TEMPLATE.format(name=name)
    upgrade(url)
    return url


def drop_database(name: str) -> None:
    admin = _admin_engine()
    try:
        with admin.connect() as conn:
            conn.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        admin.dispose()


# --------------------------------------------------------------------------- data


def _uid(rng: random.Random) -> str:
    return f"2.25.{rng.getrandbits(120)}"


def _flagged(names: set[str]) -> str:
    from models.findings import FINDING_NAMES

    return "," + ",".join(n for n in FINDING_NAMES if n in names) + ","


def _read_state(rng: random.Random, age_h: float, level: int) -> str:
    """Old studies are mostly read, recent ones unread; urgent and critical ones are read sooner."""
    age_h *= (3.0, 2.0, 1.0)[level]
    if age_h < 1:
        weights = (0.85, 0.10, 0.05)
    elif age_h < 4:
        weights = (0.50, 0.10, 0.40)
    elif age_h < 24:
        weights = (0.20, 0.05, 0.75)
    else:
        weights = (0.03, 0.01, 0.96)
    return rng.choices(("unread", "in_progress", "read"), weights)[0]


def make_studies(n: int, now: datetime, seed: int = SEED) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Rows for the study and series tables, ids 1..n in arrival order."""
    from triage.policy import AI_UNAVAILABLE

    rng = random.Random(seed)
    ages = sorted((rng.uniform(0, DAYS * 86400) for _ in range(n)), reverse=True)  # oldest first -> id order
    studies: list[dict[str, Any]] = []
    series: list[dict[str, Any]] = []
    for i, age_s in enumerate(ages, start=1):
        received = now - timedelta(seconds=age_s)
        last_instance = received + timedelta(seconds=rng.uniform(0, 20))
        age_h = age_s / 3600
        ae = rng.choices(AE_TITLES, AE_WEIGHTS)[0]
        acquired = received - timedelta(minutes=rng.uniform(1, 30))
        row: dict[str, Any] = {
            "id": i,
            "study_uid": _uid(rng),
            "accession_number": f"ACC{rng.randrange(10**8):08d}",
            "patient_id": f"P{rng.randrange(10**7):07d}",
            "patient_name": f"{rng.choice(LAST_NAMES)}^{rng.choice(FIRST_NAMES)}",
            "patient_sex": rng.choice(("F", "M")),
            "patient_birth_date": f"{rng.randint(1930, 2020)}{rng.randint(1, 12):02d}{rng.randint(1, 28):02d}",
            "study_date": acquired.strftime("%Y%m%d"),
            "study_time": acquired.strftime("%H%M%S"),
            "description": rng.choice(("XR CHEST PA", "XR CHEST AP PORTABLE", "XR THORAX")),
            "requested_priority": "STAT" if ae in ("DX_ER", "DX_ICU") and rng.random() < 0.2 else "ROUTINE",
            "calling_ae": ae,
            "calling_host": f"10.1.{AE_TITLES.index(ae)}.{rng.randint(2, 250)}",
            "received_at": received,
            "last_instance_at": last_instance,
            "handoff_generation": 1,
            "read_state": "unread",
        }
        pending = (age_h < 1 / 3 and rng.random() < 0.8) or rng.random() < 0.01  # fresh, or stuck
        if pending:
            state = "receiving" if age_s < 60 else rng.choice(("queued", "processing"))
            row.update(state=state, state_changed_at=last_instance, priority=None, ai_priority=None)
            if state != "receiving":
                row["queued_at"] = last_instance + timedelta(seconds=5)
                row["queue_name"] = "xray-triage.routine"
            if state == "processing":
                row["processing_at"] = row["queued_at"] + timedelta(seconds=rng.uniform(0.1, 30))
        else:
            queued = last_instance + timedelta(seconds=5)
            processing = queued + timedelta(seconds=rng.uniform(0.1, 30))
            finished = min(now, processing + timedelta(seconds=rng.uniform(0.3, 2)))
            row.update(
                queued_at=queued, processing_at=processing, finished_at=finished, state_changed_at=finished,
                queue_name="xray-triage.urgent" if row["requested_priority"] == "STAT" else "xray-triage.routine",
            )  # fmt: skip
            r = rng.random()
            if r < 0.075:  # 1.5% failed, 6% ineligible
                state = "failed" if r < 0.015 else "ineligible"
                reason = rng.choice(FAIL_REASONS if state == "failed" else INELIGIBLE_REASONS)
                row.update(
                    state=state, state_reason=reason, priority=2, ai_priority=2, ai_state=AI_UNAVAILABLE,
                    priority_reason=f"{AI_UNAVAILABLE} ({reason})",
                )  # fmt: skip
            else:
                p = rng.random()
                level = 0 if p < 0.032 else 1 if p < 0.032 + 0.16 else 2
                if level == 0:
                    top = rng.choices(("pneumonia", "covid19"), (0.7, 0.3))[0]
                    score = rng.uniform(0.9, 0.995)
                    flagged = {top, "pneumonia"} | ({"mass"} if rng.random() < 0.1 else set())
                    words = f"critical: {top} {score:.2f} ≥ 0.50"
                elif level == 1:
                    top = rng.choices(("pneumonia", "mass", "covid19"), (0.5, 0.35, 0.15))[0]
                    score = rng.uniform(0.5, 0.9)
                    flagged = {top} | ({rng.choice(("pneumonia", "mass"))} if rng.random() < 0.2 else set())
                    words = f"urgent: {top} {score:.2f} ≥ 0.50"
                else:
                    top = rng.choice(("pneumonia", "mass", "covid19"))
                    score = rng.uniform(0.02, 0.49)
                    flagged = set()
                    words = f"routine: no finding above threshold (closest: {top} {score:.2f} < 0.50)"
                row.update(
                    state="scored", priority=level, ai_priority=level, priority_reason=words, model_ref=MODEL_REF,
                    top_finding=top, top_score=round(score, 4), flagged_findings=_flagged(flagged) if flagged else None,
                )  # fmt: skip
            read = _read_state(rng, age_h, int(row["priority"]))
            if read != "unread":
                row.update(
                    read_state=read, read_by=rng.choice(READERS),
                    read_state_at=min(now, finished + timedelta(minutes=rng.uniform(1, min(age_h * 60, 600) + 1))),
                )  # fmt: skip
        studies.append(row)
        view = rng.choices(("PA", "AP"), (0.65, 0.35))[0]
        series.append(
            {
                "id": i,
                "series_uid": _uid(rng),
                "study_id": i,
                "modality": rng.choices(("DX", "CR"), (0.6, 0.4))[0],
                "body_part": "CHEST",
                "view_position": view,
                "series_number": 1,
                "description": f"CHEST {view}",
            }
        )
    # Every row gets every key: one executemany, NULL where a study has nothing.
    keys = {k for r in studies for k in r}
    return [{k: r.get(k) for k in keys} for r in studies], series


def populate(engine: Engine, n: int, now: datetime) -> dict[str, Any]:
    from db.models import Series, Study

    studies, series = make_studies(n, now)
    t0 = time.perf_counter()
    with engine.begin() as conn:
        conn.execute(insert(Study), studies)
        conn.execute(insert(Series), series)
        for table in ("study", "series"):
            conn.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("ANALYZE"))
    insert_s = time.perf_counter() - t0
    return {"studies": n, "insert_and_analyze_s": round(insert_s, 2)}


def describe(factory: sessionmaker[Session], now: datetime) -> dict[str, Any]:
    from db.models import Study
    from settings import TriageConfig
    from triage.policy import effective_priority_sql

    cfg = TriageConfig()
    with factory() as s:

        def counts(col: Any) -> dict[str, int]:
            return {str(k): int(v) for k, v in s.execute(select(col, func.count()).group_by(col).order_by(col))}

        return {
            "stored_priority": counts(Study.priority),
            "effective_priority_now": counts(effective_priority_sql(now, cfg)),
            "state": counts(Study.state),
            "read_state": counts(Study.read_state),
            "calling_ae": counts(Study.calling_ae),
        }


# --------------------------------------------------------------------------- cases


def cases(now: datetime) -> dict[str, dict[str, Any]]:
    """Filters of each measured page (the API's query parameters)."""
    return {
        "first_page": {},
        "filtered_urgent_unread_pneumonia": {
            "priority": ["urgent"],
            "read_state": ["unread"],
            "finding": ["pneumonia"],
        },
        "filtered_ae_dates": {
            "calling_ae": "DX_ER",
            "date_from": (now - timedelta(days=2)).date().isoformat(),
            "date_to": (now - timedelta(days=1)).date().isoformat(),
        },
    }


def _query(params: dict[str, Any]) -> Any:
    from worklist.queries import WorklistQuery

    return WorklistQuery.model_validate({**params, "page_size": PAGE_SIZE})


def baseline_statement(q: Any, cfg: Any, now: datetime, page_size: int) -> Select[Any]:
    """The naive worklist query: one SELECT ordered by the CASE expression of effective priority."""
    from sqlalchemy import case as sql_case

    from db.models import Study
    from triage.policy import effective_priority_sql, worklist_order
    from worklist.queries import (
        WorklistOrder,
        _filters,  # the same filters the app applies
    )

    where = _filters(q)
    if q.priority:  # the effective-priority filter, as the naive query must express it
        where.append(effective_priority_sql(now, cfg).in_(sorted(q.levels())))
    order = worklist_order(cfg, now)
    if q.order is WorklistOrder.UNREAD_FIRST:  # the default: read studies below the rest
        order = [sql_case((Study.read_state == "read", 1), else_=0), *order]
    return select(Study).where(*where).order_by(*order).limit(page_size)


# --------------------------------------------------------------------------- stats


def summary(samples_s: list[float]) -> dict[str, float]:
    ms = sorted(x * 1000 for x in samples_s)
    return {
        "n": len(ms),
        "median_ms": round(statistics.median(ms), 3),
        "p95_ms": round(statistics.quantiles(ms, n=100, method="inclusive")[94], 3),
        "max_ms": round(ms[-1], 3),
    }


def _ratio(ours: dict[str, float], base: dict[str, float]) -> dict[str, float]:
    return {
        "median": round(ours["median_ms"] / base["median_ms"], 3),
        "p95": round(ours["p95_ms"] / base["p95_ms"], 3),
    }


def _goal(s: dict[str, float]) -> str:
    return "PASS" if s["p95_ms"] <= GOAL_P95_MS else "FAIL"


def _line(label: str, s: dict[str, float], base: dict[str, float] | None = None, goal: bool = True) -> str:
    out = f"  {label:44s} p50 {s['median_ms']:8.2f} ms  p95 {s['p95_ms']:8.2f} ms"
    if base is not None:
        r = _ratio(s, base)
        out += f"  | x{r['median']:.2f} / x{r['p95']:.2f} of baseline"
    if goal:
        out += f"  | goal p95 <= {GOAL_P95_MS:.0f} ms: {_goal(s)}"
    return out


# --------------------------------------------------------------------------- the query functions alone


def measure_queries(factory: sessionmaker[Session], settings: Any) -> tuple[dict[str, Any], int]:
    from db.models import utcnow
    from worklist.queries import ordered_ids, page_statement, worklist_page

    cfg, web = settings.triage, settings.web
    now0 = utcnow()
    the_cases = {name: _query(params) for name, params in cases(now0).items()}

    def run(fn: Callable[[Session, Any, datetime], Any]) -> Callable[[Any], float]:
        def timed(q: Any) -> float:
            t0 = time.perf_counter()
            with factory() as s:
                fn(s, q, utcnow())
                s.rollback()
            return time.perf_counter() - t0

        return timed

    def ids_only(s: Session, q: Any, now: datetime) -> Any:
        stmt = page_statement(q, cfg, now, PAGE_SIZE)
        return s.execute(stmt).all() if stmt is not None else []

    variants: dict[str, Callable[[Any], float]] = {
        "worklist_page": run(lambda s, q, now: worklist_page(s, q, cfg, web, now)),
        "ordered_ids": run(lambda s, q, now: ordered_ids(s, q, cfg, now, PAGE_SIZE)),
        "page_statement": run(ids_only),
        "baseline": run(lambda s, q, now: s.scalars(baseline_statement(q, cfg, now, PAGE_SIZE)).all()),
    }
    # Same rows, same order: the baseline is the reference ordering.
    same: dict[str, bool] = {}
    with factory() as s:
        for name, q in the_cases.items():
            ours = [int(r[0]) for r in ids_only(s, q, now0)]
            base = [st.id for st in s.scalars(baseline_statement(q, cfg, now0, PAGE_SIZE))]
            same[name] = ours == base
            print(f"  {name}: {len(ours)} rows, same ids in the same order as the baseline: {same[name]}")
    samples: dict[str, dict[str, list[float]]] = {c: {v: [] for v in variants} for c in the_cases}
    for i in range(WARMUP + REPEATS):
        for cname, q in the_cases.items():
            for vname, timed in variants.items():
                dt = timed(q)
                if i >= WARMUP:
                    samples[cname][vname].append(dt)
    with factory() as s:
        prepared = int(s.scalar(text("SELECT count(*) FROM pg_prepared_statements")) or 0)
    print(
        f"  server-side prepared statements on the pooled connection after the runs: {prepared} (psycopg drops"
        " them at every ROLLBACK and each session, the app's included, ends with one: every run gets a plan"
        " made for its own parameter values)"
    )
    out: dict[str, Any] = {}
    for cname in the_cases:
        stats = {v: summary(x) for v, x in samples[cname].items()}
        base = stats["baseline"]
        out[cname] = {
            "same_rows_as_baseline": same[cname],
            **{
                v: {**st, **({"ratio_to_baseline": _ratio(st, base)} if v != "baseline" else {})}
                for v, st in stats.items()
            },
        }
        print(f" {cname}")
        for v, st in stats.items():
            print(_line(v, st, None if v == "baseline" else base))
    return out, prepared


# --------------------------------------------------------------------------- through HTTP


class ServerTimer:
    """ASGI wrapper around the whole app: seconds from a request's arrival to its last body byte sent."""

    def __init__(self, app: Any) -> None:
        self.app = app
        self.samples: queue.Queue[float] = queue.Queue()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        t0 = time.perf_counter()
        try:
            await self.app(scope, receive, send)
        finally:
            self.samples.put(time.perf_counter() - t0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure_http(settings: Any, baselines: dict[str, dict[str, float]]) -> dict[str, Any]:
    import httpx
    import uvicorn

    from db.models import utcnow
    from worklist.app import create_app

    app = create_app(settings)
    timer = ServerTimer(app)
    port = _free_port()
    server = uvicorn.Server(
        uvicorn.Config(timer, host="127.0.0.1", port=port, log_level="warning", access_log=False, server_header=False)
    )
    thread = threading.Thread(target=lambda: asyncio.run(server.serve()), name="bench-uvicorn", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 30
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.02)
        c = cases(utcnow())
        requests = {
            "api_first_page": ("/api/worklist", {"page_size": PAGE_SIZE}, "first_page"),
            "html_first_page": ("/worklist", {}, "first_page"),
            "api_filtered_urgent_unread_pneumonia": (
                "/api/worklist",
                {**c["filtered_urgent_unread_pneumonia"], "page_size": PAGE_SIZE},
                "filtered_urgent_unread_pneumonia",
            ),
            "api_filtered_ae_dates": (
                "/api/worklist",
                {**c["filtered_ae_dates"], "page_size": PAGE_SIZE},
                "filtered_ae_dates",
            ),
        }
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            login = client.post("/api/login", json={"username": USERNAME, "password": PASSWORD})
            login.raise_for_status()
            timer.samples.get(timeout=10)
            server_s: dict[str, list[float]] = {k: [] for k in requests}
            client_s: dict[str, list[float]] = {k: [] for k in requests}
            sizes: dict[str, int] = {}
            for i in range(WARMUP + REPEATS):
                for name, (path, params, _case) in requests.items():
                    t0 = time.perf_counter()
                    r = client.get(path, params=params)
                    dt = time.perf_counter() - t0
                    srv = timer.samples.get(timeout=10)
                    if r.status_code != 200:
                        raise RuntimeError(f"GET {path} answered {r.status_code}: {r.text[:300]}")
                    if i == 0:
                        sizes[name] = len(r.content)
                        if path.startswith("/api/"):
                            body = r.json()
                            print(f"  {name}: {len(body['items'])} rows of {body['total']}, {len(r.content)} bytes")
                        else:
                            print(f"  {name}: HTML {len(r.content)} bytes")
                    if i >= WARMUP:
                        server_s[name].append(srv)
                        client_s[name].append(dt)
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        app.state.engine.dispose()
    out: dict[str, Any] = {}
    for name, (path, params, case) in requests.items():
        srv, cli = summary(server_s[name]), summary(client_s[name])
        base = baselines[case]
        out[name] = {
            "path": path,
            "params": params,
            "response_bytes": sizes[name],
            "server": {**srv, "ratio_to_baseline": _ratio(srv, base), "goal_p95_ok": srv["p95_ms"] <= GOAL_P95_MS},
            "client": {**cli, "goal_p95_ok": cli["p95_ms"] <= GOAL_P95_MS},
            "baseline_case": case,
        }
        print(f" {name}  (GET {path})")
        print(_line("server time", srv, base))
        print(_line("client time", cli))
    return out


# --------------------------------------------------------------------------- plans

_SCAN_RE = re.compile(
    r"(Index Only Scan|Index Scan|Bitmap Index Scan)(?: Backward)?(?: using| on) (\w+)|(Seq Scan) on (\w+)"
)
# Indexes whose tail is (priority, received_at, id): a worklist segment is a range of any of them.
SEGMENT_INDEXES = ("ix_study_priority_received", "ix_study_read_state_priority", "ix_study_flagged_priority")
# Filters of the plan-only cases (EXPLAINed, not timed).
PLAN_ONLY_CASES: dict[str, dict[str, Any]] = {
    "unread_only": {"read_state": ["unread"]},
    "finding_only": {"finding": ["pneumonia"]},
    "page_20": {"page": 20},
}


def _compiled(engine: Engine, stmt: Select[Any]) -> Any:
    return stmt.compile(dialect=engine.dialect, compile_kwargs={"render_postcompile": True})


def explain(engine: Engine, stmt: Select[Any]) -> str:
    """EXPLAIN (ANALYZE, BUFFERS) of exactly this statement, with its bound parameters (a custom plan)."""
    compiled = _compiled(engine, stmt)
    with engine.connect() as conn:
        rows = conn.exec_driver_sql("EXPLAIN (ANALYZE, BUFFERS) " + str(compiled), dict(compiled.params)).all()
        conn.rollback()
    return "\n".join(str(r[0]) for r in rows)


def explain_generic(engine: Engine, stmt: Select[Any]) -> str:
    """The same, as PostgreSQL's *generic* plan of the prepared statement.

    psycopg prepares a statement server-side once it has run 5 times on a connection, and
    PostgreSQL may then switch to one plan for all parameter values (it cannot see the
    values of ``now - cap``); ``plan_cache_mode = force_generic_plan`` shows that plan.
    """
    from psycopg import sql

    compiled = _compiled(engine, stmt)
    names: list[str] = []

    def placeholder(m: re.Match[str]) -> str:
        if m.group(1) not in names:
            names.append(m.group(1))
        return f"${names.index(m.group(1)) + 1}"

    text_sql = re.sub(r"%\((\w+)\)s", placeholder, str(compiled))
    with engine.connect() as conn:
        raw = conn.connection.dbapi_connection
        assert raw is not None
        args = ", ".join(sql.Literal(compiled.params[n]).as_string(raw) for n in names)
        cur = raw.cursor()
        try:
            cur.execute("SET plan_cache_mode = force_generic_plan")
            cur.execute(f"PREPARE xt_bench_generic AS {text_sql}")
            cur.execute(f"EXPLAIN (ANALYZE, BUFFERS) EXECUTE xt_bench_generic({args})")
            rows = cur.fetchall()
        finally:
            raw.rollback()
            cur.execute("DEALLOCATE ALL")
            cur.execute("RESET plan_cache_mode")
            raw.commit()
            cur.close()
    return "\n".join(str(r[0]) for r in rows)


def plan_facts(plan: str) -> dict[str, Any]:
    scans: Counter[str] = Counter()
    for m in _SCAN_RE.finditer(plan):
        scans[f"{m.group(1)} {m.group(2)}" if m.group(1) else f"{m.group(3)} {m.group(4)}"] += 1
    removed = sum(int(x) for x in re.findall(r"Rows Removed by Filter: (\d+)", plan))
    exec_ms = re.search(r"Execution Time: ([\d.]+) ms", plan)
    hits = re.search(r"Buffers: shared hit=(\d+)", plan)
    ordered = [k for k in scans if k.startswith(("Index Scan", "Index Only Scan"))]
    return {
        "scans": dict(scans),
        "uses_target_index": any(k.endswith(" " + TARGET_INDEX) for k in ordered),
        "segment_indexes_only": bool(scans) and all(k.split()[-1] in SEGMENT_INDEXES for k in scans),
        "seq_scan": any(k.startswith("Seq Scan") for k in scans),
        "rows_removed_by_filter": removed,
        "sorts": re.findall(r"Sort Method: ([\w-]+(?: [\w-]+)?)", plan),
        "execution_ms": float(exec_ms.group(1)) if exec_ms else None,
        "top_shared_hit": int(hits.group(1)) if hits else None,
    }


def _verdict(label: str, f: dict[str, Any]) -> str:
    scans = ", ".join(f"{k} x{v}" for k, v in f["scans"].items())
    return (
        f">>> {label}: Index Scan / Index Only Scan on {TARGET_INDEX}: {'yes' if f['uses_target_index'] else 'NO'}"
        f"; only (.., priority, received_at, id) indexes: {'yes' if f['segment_indexes_only'] else 'no'}"
        f"; seq scan: {'YES' if f['seq_scan'] else 'no'}; rows removed by filter: {f['rows_removed_by_filter']}"
        f"; execution {f['execution_ms']} ms\n>>>     scans: {scans}"
    )


def show_plans(engine: Engine, settings: Any) -> dict[str, Any]:
    """Full custom plans of the timed cases; one-line facts of generic plans and of the plan-only cases."""
    from db.models import utcnow
    from worklist.queries import page_statement, total_statement

    cfg = settings.triage
    now = utcnow()
    out: dict[str, Any] = {}
    for cname, params in {**cases(now), **PLAN_ONLY_CASES}.items():
        q = _query(params)
        stmts = {
            "page_statement": page_statement(q, cfg, now, PAGE_SIZE),
            "total_statement": total_statement(q, cfg, now),
            "baseline": baseline_statement(q, cfg, now, PAGE_SIZE),
        }
        full = cname not in PLAN_ONLY_CASES
        out[cname] = {}
        for sname, stmt in stmts.items():
            if stmt is None or (not full and sname == "total_statement"):
                continue
            explain(engine, stmt)  # warm
            plan = explain(engine, stmt)
            out[cname][sname] = {"plan": plan, **plan_facts(plan)}
            if full:
                print(f"\n--- {cname} / {sname}: EXPLAIN (ANALYZE, BUFFERS)\n{plan}")
            print(_verdict(f"{cname} / {sname}", out[cname][sname]))
            if sname == "page_statement":
                generic = explain_generic(engine, stmt)
                out[cname]["page_statement_generic"] = {"plan": generic, **plan_facts(generic)}
                print(_verdict(f"{cname} / {sname} (generic plan, if prepared)", out[cname]["page_statement_generic"]))
    # The HTML page also lists the calling AE titles (worklist/routers/worklist.py `AeTitles`, the same statement).
    from sqlalchemy import distinct

    from db.models import Study

    ae_titles = select(distinct(Study.calling_ae)).order_by(Study.calling_ae).limit(200)
    plan = explain(engine, ae_titles)
    out["html_ae_titles"] = {"plan": plan, **plan_facts(plan)}
    print(f"\n--- /worklist HTML only: calling AE titles (AeTitles): EXPLAIN (ANALYZE, BUFFERS)\n{plan}")
    return out


def plans_after_vacuum(engine: Engine, settings: Any) -> dict[str, Any]:
    """After VACUUM (what autovacuum leaves): the visibility map lets segments be Index Only Scans."""
    from db.models import utcnow
    from worklist.queries import page_statement

    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as conn:
        conn.execute(text("VACUUM (ANALYZE) study"))
    now = utcnow()
    out: dict[str, Any] = {}
    for cname, params in {**cases(now), **PLAN_ONLY_CASES}.items():
        stmt = page_statement(_query(params), settings.triage, now, PAGE_SIZE)
        assert stmt is not None
        explain(engine, stmt)
        plan = explain(engine, stmt)
        out[cname] = {"plan": plan, **plan_facts(plan)}
        print(_verdict(f"{cname} / page_statement after VACUUM", out[cname]))
    return out


# --------------------------------------------------------------------------- main


def _settings(url: str, var: Path) -> Any:
    from settings import Settings

    return Settings.model_validate(
        {
            "database": {"url": url},
            "storage": {"spool_dir": str(var / "spool")},
            "worker": {"heatmap_dir": str(var / "heatmaps")},
            "web": {"secret_key": secrets.token_urlsafe(48), "page_size": PAGE_SIZE},
            "log_level": "WARNING",
        }
    )


def main() -> dict[str, Any]:
    from db.models import utcnow
    from db.session import make_engine, make_sessionmaker
    from worklist.users import add_user

    name = f"xt_bench_{secrets.token_hex(4)}"
    result: dict[str, Any] = {
        "goal": f"p95 <= {GOAL_P95_MS:.0f} ms",
        "baseline": "select(Study).where(filters).order_by(*triage.policy.worklist_order(cfg, now)).limit(50)",
        "repeats": REPEATS,
        "warmup": WARMUP,
        "page_size": PAGE_SIZE,
        "database": name,
        "days": DAYS,
        "cpus": os.cpu_count(),
        "loadavg_at_start": os.getloadavg(),
    }
    engine: Engine | None = None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            url = create_database(name)
            engine = make_engine(url)
            factory = make_sessionmaker(engine)
            settings = _settings(url, Path(tmp))
            now = datetime.now(UTC)
            result["population"] = populate(engine, N_STUDIES, now)
            result["population"].update(describe(factory, now))
            p = result["population"]
            print(
                f"{N_STUDIES} studies in {p['insert_and_analyze_s']} s (bulk insert + ANALYZE); "
                f"stored priority {p['stored_priority']}; effective now {p['effective_priority_now']}"
            )
            print(f"states {p['state']}; read {p['read_state']}")
            print(f"{os.cpu_count()} CPUs, load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
            with factory() as s:
                add_user(s, USERNAME, PASSWORD, "radiologist")
                s.commit()
            print("\n== query functions alone (one session per call, as the app)")
            result["query"], result["prepared_statements_after_runs"] = measure_queries(factory, settings)
            baselines = {c: v["baseline"] for c, v in result["query"].items()}
            print("\n== HTTP: create_app(settings) under uvicorn, logged in (server time measured inside the server)")
            result["http"] = measure_http(settings, baselines)
            print("\n== query plans")
            result["plans"] = show_plans(engine, settings)
            print("\n== plans after VACUUM (ANALYZE) study")
            result["plans_after_vacuum"] = plans_after_vacuum(engine, settings)
            result["measured_at"] = utcnow().isoformat()
            result["loadavg_at_end"] = os.getloadavg()
    finally:
        if engine is not None:
            engine.dispose()
        drop_database(name)
        print(f"\ndatabase {name} dropped")
    _summary(result)
    return result


def _summary(result: dict[str, Any]) -> None:
    print("\n== summary (goal p95 <= 100 ms)")
    for name, r in result["http"].items():
        s = r["server"]
        print(
            f"  HTTP {name:40s} server p50 {s['median_ms']:.2f} p95 {s['p95_ms']:.2f} ms "
            f"(client p95 {r['client']['p95_ms']:.2f}) {_goal(s)}"
        )
    for cname, r in result["query"].items():
        for v in ("worklist_page", "page_statement"):
            s = r[v]
            print(
                f"  {cname:34s} {v:15s} p50 {s['median_ms']:.2f} p95 {s['p95_ms']:.2f} ms; baseline p50 "
                f"{r['baseline']['median_ms']:.2f} ms; ratio x{s['ratio_to_baseline']['median']} {_goal(s)}"
            )
    for cname, plans in result["plans"].items():
        if "page_statement" not in plans:
            continue
        for key in ("page_statement", "page_statement_generic"):
            p = plans[key]
            print(
                f"  plan {cname:34s} {key:22s} {TARGET_INDEX}: {'yes' if p['uses_target_index'] else 'no '}; "
                f"segment indexes only: {'yes' if p['segment_indexes_only'] else 'no '}; "
                f"rows removed {p['rows_removed_by_filter']:6d}; {p['execution_ms']} ms"
            )

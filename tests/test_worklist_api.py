"""The worklist web app through its HTTP interface, on SQLite and on PostgreSQL.

Every test drives the real app (``worklist.app.create_app``) with FastAPI's TestClient over a
migrated database of the ``backend`` fixture: order and escalation against the triage
policy's ``sort_key``, filters and paging, roles, log-in, CSRF, the read state and its audit
trail, cookies, bad input, patient data kept out of URLs, /healthz and the OpenAPI document.
Studies and users are written with the ORM, as the worker and ``xray-triage user add`` do.
"""

from __future__ import annotations

import itertools
import json
import random
import re
from datetime import datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, urlsplit

from fastapi.testclient import TestClient
from httpx import Response
from sqlalchemy import func, select, text

from db.models import Study, utcnow
from tests.plugins.worklist import PASSWORD, WorklistApp, csrf_from
from triage.policy import Level, effective_priority, sort_key

ROW_RE = re.compile(r'<tr data-uid="([^"]+)" data-priority="(\w+)"')
URL_ATTR_RE = re.compile(r'\b(?:href|src|action)="([^"]*)"')
# Far enough from every cap that the seconds between inserting a study and asking for the
# worklist can never move it across one.
MARGIN_MIN = 3.0


def worklist_json(client: TestClient, **params: Any) -> dict[str, Any]:
    r = client.get("/api/worklist", params=params)
    assert r.status_code == 200, r.text
    return dict(r.json())


def uids(client: TestClient, **params: Any) -> list[str]:
    return [item["study_uid"] for item in worklist_json(client, page_size=200, **params)["items"]]


def assert_still_answering(client: TestClient) -> None:
    r = client.get("/api/me")
    assert r.status_code == 200, r.text
    assert r.json()["user"]


def assert_json_error(r: Response, status: int, *words: str) -> dict[str, Any]:
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    body = dict(r.json())
    assert body["status"] == status
    for word in words:
        assert word in body["error"], (word, body)
    return body


def assert_html_error(r: Response, status: int, *words: str) -> None:
    assert r.status_code == status, (r.status_code, r.text[:500])
    assert r.headers["content-type"].startswith("text/html")
    message = re.search(r'<p class="error" id="error-message">([^<]*)</p>', r.text)
    assert message, r.text[:500]
    for word in words:
        assert word in message.group(1), (word, message.group(1))


def random_age(rng: random.Random, caps: list[float], low: float = 0.5, high: float = 600.0) -> float:
    """Minutes of waiting in [low, high], never within MARGIN_MIN of a cap."""
    while True:
        age = round(rng.uniform(low, high), 3)
        if all(abs(age - cap) > MARGIN_MIN for cap in caps):
            return age


def expected_order(wl: WorklistApp, rows: dict[int, tuple[str, int | None, datetime]], now: datetime) -> list[str]:
    """uids in the policy's order: ``sort_key`` (effective priority, waiting time), then id."""
    cfg = wl.settings.triage
    ordered = sorted(rows, key=lambda i: (sort_key(rows[i][1], rows[i][2], now, cfg), i))
    return [rows[i][0] for i in ordered]


# --------------------------------------------------------------------------- order


def test_order_is_effective_priority_then_waiting_time_with_escalation(worklist: WorklistApp) -> None:
    caps = worklist.settings.triage.escalate_after_min
    assert caps == {"routine": 240.0, "urgent": 60.0}, "the expectations below assume the default caps"
    now = utcnow()
    specs = [  # uid, stored priority, minutes waiting
        ("1.1.10", 2, 5),
        ("1.1.9", None, 10),  # not scored yet: counts as routine
        ("1.1.8", 2, 20),
        ("1.1.7", 1, 10),
        ("1.1.6", 1, 30),
        ("1.1.5", None, 280),  # pending past the routine cap: urgent
        ("1.1.4", 2, 300),  # routine past its cap: urgent
        ("1.1.3", 0, 5),
        ("1.1.2", 1, 90),  # urgent past its cap: critical
        ("1.1.1", 0, 1000),  # critical never rises further
    ]
    for uid, priority, age in specs:
        worklist.add_study(uid, priority=priority, age_min=age, now=now)
    client, _ = worklist.logged_in("alice")

    body = worklist_json(client)
    got = [(i["study_uid"], i["priority"], i["escalated"]) for i in body["items"]]
    assert got == [
        ("1.1.1", "critical", False),
        ("1.1.2", "critical", True),
        ("1.1.3", "critical", False),
        ("1.1.4", "urgent", True),
        ("1.1.5", "urgent", True),
        ("1.1.6", "urgent", False),
        ("1.1.7", "urgent", False),
        ("1.1.8", "routine", False),
        ("1.1.9", "routine", False),
        ("1.1.10", "routine", False),
    ]
    assert body["total"] == 10
    items = {i["study_uid"]: i for i in body["items"]}
    assert items["1.1.5"]["ai_state"] == "pending" and items["1.1.5"]["pipeline_state"] == "queued"
    assert items["1.1.2"]["priority_level"] == 0 and items["1.1.4"]["priority_level"] == 1
    assert items["1.1.5"]["waiting_s"] >= 280 * 60 and items["1.1.5"]["waiting"].startswith("4 h ")
    assert body["disclaimer"].startswith("Decision support")

    # The page shows the same rows in the same order.
    page = client.get("/worklist")
    assert page.status_code == 200
    assert ROW_RE.findall(page.text) == [(u, p) for u, p, _ in got]
    assert "10 studies" in page.text


def test_escalation_follows_the_configured_caps(make_worklist) -> None:
    # Only routine escalates here (after 30 min); an urgent study waits as long as it waits.
    wl = make_worklist(triage={"escalate_after_min": {"routine": 30}})
    now = utcnow()
    wl.add_study("1.2.1", priority=2, age_min=45, now=now)  # -> urgent
    wl.add_study("1.2.2", priority=1, age_min=500, now=now)  # stays urgent: no urgent cap
    wl.add_study("1.2.3", priority=2, age_min=20, now=now)  # routine
    wl.add_study("1.2.4", priority=1, age_min=5, now=now)
    client, _ = wl.logged_in("alice")
    items = worklist_json(client)["items"]
    assert [(i["study_uid"], i["priority"], i["escalated"]) for i in items] == [
        ("1.2.2", "urgent", False),
        ("1.2.1", "urgent", True),
        ("1.2.4", "urgent", False),
        ("1.2.3", "routine", False),
    ]


def test_order_matches_the_policy_sort_key_on_random_studies(worklist: WorklistApp) -> None:
    cfg = worklist.settings.triage
    caps = list(cfg.escalate_after_min.values())
    rng = random.Random(20240601)
    now = utcnow()
    rows: dict[int, tuple[str, int | None, datetime]] = {}
    ages: list[float] = []
    for n in range(60):
        priority = rng.choice([0, 1, 2, None])
        # A few studies arrive at exactly the same time as an earlier one: the id breaks the tie.
        age = rng.choice(ages) if ages and n % 10 == 9 else random_age(rng, caps)
        ages.append(age)
        uid = f"1.3.{n + 1}"
        sid = worklist.add_study(uid, priority=priority, age_min=age, now=now)
        rows[sid] = (uid, priority, now - timedelta(minutes=age))
    levels = {effective_priority(p, r, now, cfg) for _, p, r in rows.values()}
    assert levels == {0, 1, 2}
    assert any(effective_priority(p, r, now, cfg) < (2 if p is None else p) for _, p, r in rows.values())

    client, _ = worklist.logged_in("alice")
    body = worklist_json(client, page_size=200)
    assert body["total"] == 60
    assert [i["study_uid"] for i in body["items"]] == expected_order(worklist, rows, now)
    by_uid = {uid: (p, r) for uid, p, r in rows.values()}
    for item in body["items"]:
        priority, received = by_uid[item["study_uid"]]
        level = effective_priority(priority, received, now, cfg)
        assert item["priority_level"] == level
        assert item["priority"] == Level(level).name.lower()
        assert item["escalated"] is (level < (2 if priority is None else priority))

    # Each effective level alone is the same order restricted to that level.
    for name in ("critical", "urgent", "routine"):
        want = [
            u
            for u in expected_order(worklist, rows, now)
            if effective_priority(*by_uid[u], now, cfg) == Level[name.upper()]
        ]
        got = worklist_json(client, page_size=200, priority=name)
        assert [i["study_uid"] for i in got["items"]] == want, name
        assert got["total"] == len(want)


def test_silent_mode_keeps_the_order_by_arrival(make_worklist) -> None:
    wl = make_worklist(triage={"silent_mode": True})
    caps = list(wl.settings.triage.escalate_after_min.values())
    rng = random.Random(7)
    now = utcnow()
    arrivals: list[tuple[float, str]] = []
    for n in range(20):
        # The worker in silent mode stores ROUTINE whatever the model says (ai_priority).
        age = random_age(rng, caps, high=480.0)
        uid = f"1.4.{n + 1}"
        wl.add_study(uid, priority=2, ai_priority=rng.choice([0, 1, 2]), age_min=age, now=now)
        arrivals.append((age, uid))
    assert any(age > 240 for age, _ in arrivals) and any(age < 240 for age, _ in arrivals)
    client, _ = wl.logged_in("alice")
    assert uids(client) == [uid for _, uid in sorted(arrivals, reverse=True)]
    page = client.get("/worklist")
    assert "silent mode: order by arrival" in page.text
    assert [u for u, _ in ROW_RE.findall(page.text)] == [uid for _, uid in sorted(arrivals, reverse=True)]


# --------------------------------------------------------------------------- filters

FILTER_STUDIES: list[dict[str, Any]] = [
    {"uid": "2.1", "priority": 0, "age": 5, "flagged": ("pneumonia", "covid19"), "study_date": "20240301"},
    {"uid": "2.2", "priority": 1, "age": 90, "flagged": ("mass",), "read_state": "in_progress",
     "calling_ae": "DX_ROOM2", "study_date": "20240302"},  # -> critical
    {"uid": "2.3", "priority": 1, "age": 10, "flagged": ("pneumonia",), "read_state": "read",
     "study_date": "20240310"},
    {"uid": "2.4", "priority": 2, "age": 300, "calling_ae": "DX_ROOM2", "study_date": "20240310"},  # -> urgent
    {"uid": "2.5", "priority": 2, "age": 20, "state": "ineligible", "state_reason": "lateral view",
     "study_date": "20240315"},
    {"uid": "2.6", "priority": 2, "age": 30, "state": "failed", "state_reason": "pixel data not decodable",
     "calling_ae": "DX_ROOM2", "study_date": "20240331"},
    {"uid": "2.7", "priority": None, "age": 1, "state": "receiving", "study_date": "20240401"},
    {"uid": "2.8", "priority": None, "age": 2, "state": "queued", "study_date": None},
    {"uid": "2.9", "priority": None, "age": 3, "state": "processing", "calling_ae": "DX_ROOM2",
     "study_date": "20240229"},
    {"uid": "2.10", "priority": None, "age": 250, "state": "queued", "study_date": "20240301"},  # -> urgent
    {"uid": "2.11", "priority": 0, "age": 50, "flagged": ("mass", "covid19"), "read_state": "read",
     "calling_ae": "DX_ROOM2", "study_date": "20240320"},
    {"uid": "2.12", "priority": 2, "age": 15, "read_state": "in_progress", "study_date": "20240305"},
]  # fmt: skip

# critical: 2.2 (90 min), 2.11 (50), 2.1 (5); urgent: 2.4 (300), 2.10 (250), 2.3 (10);
# routine: 2.6 (30), 2.5 (20), 2.12 (15), 2.9 (3), 2.8 (2), 2.7 (1).
# The lists are in triage order (order=priority); by default the read ones (2.11, 2.3) fall below.
READ_STUDIES = ("2.11", "2.3")


def unread_first(want: list[str]) -> list[str]:
    return [u for u in want if u not in READ_STUDIES] + [u for u in want if u in READ_STUDIES]


FILTER_CASES: list[tuple[dict[str, Any], list[str]]] = [
    ({}, ["2.2", "2.11", "2.1", "2.4", "2.10", "2.3", "2.6", "2.5", "2.12", "2.9", "2.8", "2.7"]),
    ({"priority": "critical"}, ["2.2", "2.11", "2.1"]),
    ({"priority": "urgent"}, ["2.4", "2.10", "2.3"]),
    ({"priority": "routine"}, ["2.6", "2.5", "2.12", "2.9", "2.8", "2.7"]),
    ({"priority": ["urgent", "critical"]}, ["2.2", "2.11", "2.1", "2.4", "2.10", "2.3"]),
    ({"finding": "pneumonia"}, ["2.1", "2.3"]),
    ({"finding": "mass"}, ["2.2", "2.11"]),
    ({"finding": "covid19"}, ["2.11", "2.1"]),
    ({"finding": ["pneumonia", "mass"]}, ["2.2", "2.11", "2.1", "2.3"]),
    ({"ai_state": "scored"}, ["2.2", "2.11", "2.1", "2.4", "2.3", "2.12"]),
    ({"ai_state": "ineligible"}, ["2.5"]),
    ({"ai_state": "failed"}, ["2.6"]),
    ({"ai_state": "pending"}, ["2.10", "2.9", "2.8", "2.7"]),
    ({"ai_state": ["failed", "ineligible"]}, ["2.6", "2.5"]),
    ({"read_state": "unread"}, ["2.1", "2.4", "2.10", "2.6", "2.5", "2.9", "2.8", "2.7"]),
    ({"read_state": "read"}, ["2.11", "2.3"]),
    ({"read_state": "in_progress"}, ["2.2", "2.12"]),
    ({"read_state": ["read", "in_progress"]}, ["2.2", "2.11", "2.3", "2.12"]),
    ({"calling_ae": "DX_ROOM2"}, ["2.2", "2.11", "2.4", "2.6", "2.9"]),
    ({"calling_ae": " DX_ROOM2 "}, ["2.2", "2.11", "2.4", "2.6", "2.9"]),
    ({"calling_ae": ""}, ["2.2", "2.11", "2.1", "2.4", "2.10", "2.3", "2.6", "2.5", "2.12", "2.9", "2.8", "2.7"]),
    ({"calling_ae": "NOBODY"}, []),
    ({"date_from": "2024-03-10"}, ["2.11", "2.4", "2.3", "2.6", "2.5", "2.7"]),
    ({"date_to": "2024-03-01"}, ["2.1", "2.10", "2.9"]),
    ({"date_from": "2024-03-01", "date_to": "2024-03-10"}, ["2.2", "2.1", "2.4", "2.10", "2.3", "2.12"]),
    ({"date_from": "2024-03-11", "date_to": "2024-03-09"}, []),
    ({"date_from": "20240301", "date_to": "20240310"}, ["2.2", "2.1", "2.4", "2.10", "2.3", "2.12"]),  # DICOM DA form
    ({"priority": "urgent", "read_state": "unread"}, ["2.4", "2.10"]),
    ({"finding": "pneumonia", "calling_ae": "CR_ROOM1", "read_state": "unread"}, ["2.1"]),
    ({"ai_state": "pending", "priority": "urgent"}, ["2.10"]),
    ({"priority": "critical", "finding": "covid19", "read_state": "read"}, ["2.11"]),
    ({"ai_state": "scored", "calling_ae": "CR_ROOM1", "date_from": "2024-03-05"}, ["2.3", "2.12"]),
    ({"priority": ["critical", "routine"], "calling_ae": "DX_ROOM2"}, ["2.2", "2.11", "2.6", "2.9"]),
    ({"finding": "mass", "ai_state": "failed"}, []),
]


def _add_filter_studies(wl: WorklistApp) -> None:
    now = utcnow()
    for spec in FILTER_STUDIES:
        kwargs = {k: v for k, v in spec.items() if k not in ("uid", "age")}
        wl.add_study(spec["uid"], age_min=spec["age"], now=now, **kwargs)


def test_filters_and_their_combinations_with_totals(worklist: WorklistApp) -> None:
    _add_filter_studies(worklist)
    client, _ = worklist.logged_in("alice")
    for params, triage_order in FILTER_CASES:
        for order, want in (("priority", triage_order), ("unread_first", unread_first(triage_order))):
            body = worklist_json(client, page_size=200, order=order, **params)
            assert [i["study_uid"] for i in body["items"]] == want, (order, params)
            assert body["total"] == len(want), params
            # Paged by 2, the total still counts every match, and the pages join up in order.
            paged = [worklist_json(client, page_size=2, order=order, page=n, **params) for n in (1, 2, 3)]
            assert all(p["total"] == len(want) for p in paged), params
            assert [i["study_uid"] for p in paged for i in p["items"]] == want[:6], (order, params)
        # Unread first is the default.
        assert [i["study_uid"] for i in worklist_json(client, page_size=200, **params)["items"]] == unread_first(
            triage_order
        )


def test_filtered_rows_show_what_they_were_filtered_on(worklist: WorklistApp) -> None:
    _add_filter_studies(worklist)
    client, _ = worklist.logged_in("alice")
    items = {i["study_uid"]: i for i in worklist_json(client, page_size=200)["items"]}
    assert items["2.1"]["flagged_findings"] == ["pneumonia", "covid19"]
    assert items["2.1"]["top_finding"] == "pneumonia" and items["2.1"]["top_score"] == 0.8
    assert items["2.4"]["flagged_findings"] == [] and items["2.4"]["top_finding"] is None
    assert items["2.5"]["ai_state"] == "ineligible"
    assert items["2.5"]["ai_reason"] == "outside what the model reads: lateral view"  # in words; detail for admins
    assert items["2.6"]["ai_state"] == "failed" and items["2.6"]["ai_reason"] == "image could not be decoded"
    assert {items[u]["ai_state"] for u in ("2.7", "2.8", "2.9", "2.10")} == {"pending"}
    assert items["2.12"]["read_state"] == "in_progress" and items["2.2"]["calling_ae"] == "DX_ROOM2"
    assert items["2.9"]["study_date"] == "20240229" and items["2.8"]["study_date"] is None
    assert items["2.3"]["modality"] == "CR" and items["2.3"]["view"] == "PA"


def test_the_page_applies_the_same_filters(worklist: WorklistApp) -> None:
    _add_filter_studies(worklist)
    client, _ = worklist.logged_in("alice")
    for params, triage_order in FILTER_CASES:
        want = unread_first(triage_order)
        page = client.get("/worklist", params=params)
        assert page.status_code == 200, params
        assert [u for u, _ in ROW_RE.findall(page.text)] == want, params
        assert f"{len(want)} {'study' if len(want) == 1 else 'studies'}" in page.text
        rows = client.get("/worklist/rows", params=params)
        assert rows.status_code == 200 and rows.headers["X-Total"] == str(len(want)), params
        if not want:
            assert "No study matches these filters." in rows.text


# --------------------------------------------------------------------------- paging


def test_pages_concatenate_to_the_whole_order(make_worklist) -> None:
    wl = make_worklist(web={"page_size": 5})
    caps = list(wl.settings.triage.escalate_after_min.values())
    rng = random.Random(99)
    now = utcnow()
    rows: dict[int, tuple[str, int | None, datetime]] = {}
    for n in range(23):
        priority = rng.choice([0, 1, 2, None])
        age = random_age(rng, caps)
        sid = wl.add_study(f"3.{n + 1}", priority=priority, age_min=age, now=now)
        rows[sid] = (f"3.{n + 1}", priority, now - timedelta(minutes=age))
    client, _ = wl.logged_in("alice")
    full = expected_order(wl, rows, now)
    assert uids(client) == full

    # The configured page size is the default.
    first = worklist_json(client)
    assert (first["page"], first["page_size"], first["pages"], first["total"]) == (1, 5, 5, 23)
    assert [i["study_uid"] for i in first["items"]] == full[:5]

    for size in (1, 4, 5, 7, 23, 50):
        seen: list[str] = []
        pages = -(-23 // size)
        for page in range(1, pages + 1):
            body = worklist_json(client, page=page, page_size=size)
            assert (body["page"], body["page_size"], body["pages"], body["total"]) == (page, size, pages, 23)
            assert len(body["items"]) == (size if page < pages else 23 - size * (pages - 1))
            seen += [i["study_uid"] for i in body["items"]]
        assert seen == full, size
        past = worklist_json(client, page=pages + 1, page_size=size)
        assert past["items"] == [] and past["total"] == 23 and past["page"] == pages + 1

    # Paging a filtered list: pages of the filtered order, total of the filter.
    routine = worklist_json(client, page_size=200, priority="routine")
    want = [i["study_uid"] for i in routine["items"]]
    assert want and len(want) < 23
    seen = []
    for page in range(1, len(want) + 1):
        body = worklist_json(client, page=page, page_size=1, priority="routine")
        assert body["total"] == len(want)
        seen += [i["study_uid"] for i in body["items"]]
    assert seen == want
    assert worklist_json(client, page=len(want) + 1, page_size=1, priority="routine")["items"] == []


def test_the_total_is_counted_up_to_a_cap(make_worklist, monkeypatch) -> None:
    """Past COUNT_CAP the total is a lower bound ("5+"), and paging still reaches every study."""
    from worklist import queries

    monkeypatch.setattr(queries, "COUNT_CAP", 5)
    wl = make_worklist()
    now = utcnow()
    for n in range(8):
        wl.add_study(f"3.7.{n + 1}", priority=2, age_min=10 + n, now=now)
    client, _ = wl.logged_in("alice")
    first = worklist_json(client, page_size=3)
    assert (first["total"], first["total_exact"], first["pages"]) == (5, False, 2)
    seen = [i["study_uid"] for i in first["items"]]
    page = 2
    while True:
        body = worklist_json(client, page_size=3, page=page)
        seen += [i["study_uid"] for i in body["items"]]
        if page >= body["pages"]:
            break
        page += 1
    assert seen == [f"3.7.{n}" for n in range(8, 0, -1)]  # oldest first, none lost past the cap
    assert "5+ studies" in client.get("/worklist").text
    assert client.get("/worklist/rows").headers["X-Total"] == "5+"
    assert worklist_json(client, page_size=3, calling_ae="NOBODY")["total_exact"] is True


def test_page_links_keep_the_filters(make_worklist) -> None:
    wl = make_worklist(web={"page_size": 5})
    now = utcnow()
    for n in range(12):
        wl.add_study(f"3.5.{n + 1}", priority=2, age_min=10 + n, now=now, calling_ae="CR_ROOM1")
    wl.add_study("3.5.99", priority=2, age_min=1, now=now, calling_ae="DX_ROOM2")
    client, _ = wl.logged_in("alice")
    page = client.get("/worklist", params={"calling_ae": "CR_ROOM1", "page": 2})
    assert "page 2 of 3" in page.text
    links = [u for u in URL_ATTR_RE.findall(page.text) if "page=" in u]
    targets = {parse_qs(urlsplit(u.replace("&amp;", "&")).query)["page"][0]: u.replace("&amp;", "&") for u in links}
    assert set(targets) == {"1", "3"}
    for n, link in targets.items():
        query = parse_qs(urlsplit(link).query)
        assert query["calling_ae"] == ["CR_ROOM1"]
        follow = client.get("/worklist" + link)
        assert follow.status_code == 200 and f"page {n} of 3" in follow.text
        assert "3.5.99" not in follow.text
    # A page size typed into the URL is kept too, or page 2 would skip rows.
    sized = client.get("/worklist", params={"calling_ae": "CR_ROOM1", "page_size": 4})
    assert "page 1 of 3" in sized.text
    nxt = [u.replace("&amp;", "&") for u in URL_ATTR_RE.findall(sized.text) if "page=2" in u]
    assert nxt and parse_qs(urlsplit(nxt[0]).query)["page_size"] == ["4"]


# --------------------------------------------------------------------------- roles and sessions


def test_admin_pages_need_the_admin_role(worklist: WorklistApp) -> None:
    now = utcnow()
    worklist.add_study("4.1", priority=2, now=now)
    worklist.add_study("4.2", priority=1, now=now)
    worklist.add_study("4.3", priority=2, state="failed", state_reason="decoder error", now=now)
    doc, _ = worklist.logged_in("doc")
    assert_json_error(doc.get("/api/admin/status"), 403, "admin role")
    assert_html_error(doc.get("/admin"), 403, "admin role")
    assert 'href="/admin"' not in doc.get("/worklist").text

    it, _ = worklist.logged_in("it", role="admin")
    r = it.get("/api/admin/status")
    assert r.status_code == 200, r.text
    status = r.json()
    assert status["studies"]["scored"] == 2 and status["studies"]["failed"] == 1
    assert status["studies"]["queued"] == 0
    assert [(f["study_uid"], f["state"], f["reason"]) for f in status["latest_failures"]] == [
        ("4.3", "failed", "decoder error")
    ]
    assert status["config"]["queues"]["urgent"] == worklist.settings.queues.urgent
    assert status["config"]["triage"]["escalate_after_min"] == {"routine": 240.0, "urgent": 60.0}
    assert status["health"]["checks"]["database"]["ok"] is True
    assert status["workers"] == []
    page = it.get("/admin")
    assert page.status_code == 200 and 'href="/admin"' in page.text
    assert worklist.settings.queues.urgent in page.text
    # why each finding does or does not steer, from the card's within-collection evidence
    reasons = status["model"]["steering_reasons"]
    assert set(reasons) == {"adult", "paediatric"}
    for pop, key in (("adult", "steering"), ("paediatric", "steering_paediatric")):
        assert set(reasons[pop]) == {"pneumonia", "mass", "covid19"}
        for f, why in reasons[pop].items():
            assert why.startswith("steers") == (f in status["model"][key]), (pop, f, why)
    assert 'data-population="paediatric"' in page.text and 'id="paediatric-thresholds"' in page.text


def test_admin_status_masks_secrets(make_worklist, backend) -> None:
    secret_key = "K" * 20 + "topsecret-session-key-0123"
    sections: dict[str, Any] = {
        "broker": {"url": "redis://:secretpw@127.0.0.1:6379/0"},
        "web": {"secret_key": secret_key},
    }
    if backend.name == "postgres":  # the local server trusts loopback: the password is only carried
        sections["database"] = {"url": backend.database_url.replace("postgres@", "postgres:dbsecretpw@")}
    wl = make_worklist(**sections)
    it, _ = wl.logged_in("it", role="admin")
    r = it.get("/api/admin/status")
    assert r.status_code == 200, r.text
    config = r.json()["config"]
    assert config["broker"]["url"] == "redis://:***@127.0.0.1:6379/0"
    assert config["web"]["secret_key"] == "***"
    if wl.backend.name == "postgres":
        assert config["database"]["url"].startswith("postgresql+psycopg://postgres:***@127.0.0.1:5432/")
        assert r.json()["health"]["checks"]["database"]["ok"] is True
    page = it.get("/admin")
    assert page.status_code == 200
    for response in (r, page):
        for secret in ("secretpw", "dbsecretpw", secret_key, "topsecret"):
            assert secret not in response.text
    assert "redis://:***@127.0.0.1:6379/0" in page.text


def test_unauthenticated_requests(worklist: WorklistApp) -> None:
    worklist.add_study("4.5")
    anon = worklist.client()
    for path in ("/api/worklist", "/api/studies/4.5", "/api/admin/status", "/api/me"):
        body = assert_json_error(anon.get(path), 401, "not logged in")
        assert body == {"error": "not logged in", "status": 401}
    assert_json_error(anon.get("/api/worklist", params={"priority": "urgent", "page": 2}), 401)

    for path, query in (
        ("/worklist", "?priority=urgent&finding=mass"),
        ("/studies/4.5", ""),
        ("/admin", ""),
        ("/analyse", ""),
        ("/worklist/rows", ""),
    ):
        r = anon.get(path + query)
        assert r.status_code == 303, (path, r.status_code)
        location = r.headers["location"]
        assert location.startswith("/login?")
        assert parse_qs(urlsplit(location).query)["next"] == [path + query]
    assert anon.get("/").headers["location"] == "/worklist"

    # The login page brings the user back where they were going.
    worklist.add_user("alice")
    login = anon.get("/login", params={"next": "/worklist?priority=urgent&finding=mass"})
    assert 'name="next" value="/worklist?priority=urgent&amp;finding=mass"' in login.text
    r = anon.post(
        "/login",
        data={
            "username": "alice",
            "password": PASSWORD,
            "csrf_token": csrf_from(login.text),
            "next": "/worklist?priority=urgent&finding=mass",
        },
    )
    assert r.status_code == 303 and r.headers["location"] == "/worklist?priority=urgent&finding=mass"
    assert anon.get("/api/me").json()["user"] == "alice"


def _form_login(client: TestClient, username: str, password: str = PASSWORD, next_: str | None = None) -> Response:
    token = csrf_from(client.get("/login").text)
    data = {"username": username, "password": password, "csrf_token": token}
    if next_ is not None:
        data["next"] = next_
    return client.post("/login", data=data)


def test_wrong_password_unknown_user_and_disabled_user_cannot_log_in(worklist: WorklistApp) -> None:
    worklist.add_user("alice")
    worklist.add_user("bob")
    worklist.set_disabled("bob")
    for username, password in (("alice", "not the password"), ("nobody", PASSWORD), ("bob", PASSWORD)):
        api = worklist.client()
        r = api.post("/api/login", json={"username": username, "password": password})
        assert_json_error(r, 401, "wrong user name or password")
        assert api.get("/api/me").status_code == 401

        form = worklist.client()
        r = _form_login(form, username, password)
        assert r.status_code == 401 and r.headers["content-type"].startswith("text/html")
        assert '<p class="error" id="login-error">wrong user name or password</p>' in r.text
        assert form.get("/api/me").status_code == 401
        assert form.get("/worklist").status_code == 303
    failed = [e for e in worklist.audit() if e.action == "login_failed"]
    # Counted under the attempted name (what the login throttle reads), never with the password.
    assert len(failed) == 6 and sorted(e.username for e in failed) == [
        "alice",
        "alice",
        "bob",
        "bob",
        "nobody",
        "nobody",
    ]
    assert not any(PASSWORD in (e.detail or "") or "not the password" in (e.detail or "") for e in failed)
    assert not [e for e in worklist.audit() if e.action == "login"]


def test_logout_ends_the_session_server_side(worklist: WorklistApp) -> None:
    """A copy of the cookie taken before logging out no longer works (no wait for its expiry)."""
    client, token = worklist.logged_in("alice")
    stolen = dict(client.cookies)
    thief = worklist.client()
    thief.cookies.update(stolen)
    assert thief.get("/api/me").status_code == 200
    assert client.post("/api/logout", headers={"X-CSRF-Token": token}).json() == {"ok": True}
    assert thief.get("/api/me").status_code == 401
    assert thief.get("/worklist").status_code == 303
    # Two workstations of one user are two sessions: logging out of one keeps the other.
    first, second = worklist.client(), worklist.client()
    worklist.login(first, "alice")
    second_token = worklist.login(second, "alice")
    second.post("/api/logout", headers={"X-CSRF-Token": second_token})
    assert first.get("/api/me").status_code == 200 and second.get("/api/me").status_code == 401


def test_sessions_expire_server_side(make_worklist) -> None:
    wl = make_worklist(web={"session_max_age_s": 60})
    client, _ = wl.logged_in("alice")
    assert client.get("/api/me").status_code == 200
    with wl.session() as s:  # the session was opened two minutes ago
        s.execute(text("UPDATE user_session SET created_at = :t"), {"t": utcnow() - timedelta(minutes=2)})
    assert client.get("/api/me").status_code == 401


def test_failed_logins_lock_that_user_name_for_a_while(make_worklist) -> None:
    wl = make_worklist(web={"login_max_failures": 3, "login_lockout_min": 10})
    wl.add_user("alice")
    wl.add_user("bob")
    api = wl.client()
    for _ in range(3):
        assert_json_error(api.post("/api/login", json={"username": "alice", "password": "guess"}), 401, "wrong")
    # Even the right password is refused now, and the form says why.
    assert_json_error(api.post("/api/login", json={"username": "alice", "password": PASSWORD}), 429, "too many")
    form = wl.client()
    r = _form_login(form, "alice")
    assert r.status_code == 429 and "too many failed logins" in r.text
    # Another user name is not affected, nor an unknown name told apart from a real one.
    assert wl.client().post("/api/login", json={"username": "bob", "password": PASSWORD}).status_code == 200
    for _ in range(3):
        wl.client().post("/api/login", json={"username": "nobody", "password": "guess"})
    assert_json_error(wl.client().post("/api/login", json={"username": "nobody", "password": "x"}), 429, "too many")
    # The window passes: the failures age out and alice logs in again.
    with wl.session() as s:
        s.execute(
            text("UPDATE audit_event SET at = :t WHERE action = 'login_failed'"),
            {"t": utcnow() - timedelta(minutes=11)},
        )
    assert wl.client().post("/api/login", json={"username": "alice", "password": PASSWORD}).status_code == 200


def test_a_user_disabled_after_login_loses_access_on_the_next_request(worklist: WorklistApp) -> None:
    worklist.add_study("4.6")
    api, token = worklist.logged_in("alice")
    page = worklist.client()
    assert _form_login(page, "alice").status_code == 303
    assert api.get("/api/worklist").status_code == 200
    assert page.get("/worklist").status_code == 200

    worklist.set_disabled("alice")
    assert_json_error(api.get("/api/worklist"), 401, "not logged in")
    assert_json_error(api.get("/api/studies/4.6"), 401)
    r = api.post("/api/studies/4.6/read-state", json={"state": "read"}, headers={"X-CSRF-Token": token})
    assert_json_error(r, 401)
    assert worklist.study("4.6").read_state == "unread"
    r = page.get("/worklist")
    assert r.status_code == 303 and r.headers["location"].startswith("/login?")


def test_login_rotates_the_csrf_token(worklist: WorklistApp) -> None:
    worklist.add_study("4.7")
    worklist.add_user("alice")
    client = worklist.client()
    before = csrf_from(client.get("/login").text)
    cookie_before = client.cookies.get("xt_session")
    r = client.post("/login", data={"username": "alice", "password": PASSWORD, "csrf_token": before})
    assert r.status_code == 303 and r.headers["location"] == "/worklist"
    after = client.get("/api/me").json()["csrf_token"]
    assert after != before
    assert client.cookies.get("xt_session") != cookie_before
    assert csrf_from(client.get("/worklist").text) == after
    r = client.post("/api/studies/4.7/read-state", json={"state": "read"}, headers={"X-CSRF-Token": before})
    assert_json_error(r, 403, "CSRF")
    r = client.post("/api/studies/4.7/read-state", json={"state": "read"}, headers={"X-CSRF-Token": after})
    assert r.status_code == 200

    # The API login as well: a token handed out before the login is worthless after it.
    api = worklist.client()
    pre = csrf_from(api.get("/login").text)
    token = worklist.login(api, "alice")
    assert token != pre and api.get("/api/me").json()["csrf_token"] == token
    r = api.post("/api/studies/4.7/read-state", json={"state": "unread"}, headers={"X-CSRF-Token": pre})
    assert r.status_code == 403
    # ... and a second login gives yet another token.
    assert worklist.login(api, "alice") not in (token, pre)


def test_next_never_leads_off_site(worklist: WorklistApp) -> None:
    worklist.add_user("alice")
    hostile = [
        "//evil.example",
        "//evil.example/worklist",
        "https://evil.example",
        "https://evil.example/worklist",
        "http:evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "javascript:alert(1)",
        "evil.example",
        "",
    ]
    for target in hostile:
        login = worklist.client().get("/login", params={"next": target})
        assert 'name="next" value="/worklist"' in login.text, target
        r = _form_login(worklist.client(), "alice", next_=target)
        assert r.status_code == 303 and r.headers["location"] == "/worklist", (target, r.headers["location"])
    for target in ("/\t/evil.example", "/\n/evil.example", "/%2F/evil.example"):
        location = _form_login(worklist.client(), "alice", next_=target).headers["location"]
        # What a browser does with it: drop tabs and newlines, then resolve; it must stay here.
        cleaned = re.sub(r"[\t\n\r]", "", location)
        assert cleaned.startswith("/") and not cleaned.startswith("//"), (target, location)
        assert urlsplit(cleaned).netloc == "", (target, location)
    r = _form_login(worklist.client(), "alice", next_="/studies/1.2.3?x=1")
    assert r.headers["location"] == "/studies/1.2.3?x=1"


# --------------------------------------------------------------------------- CSRF


def test_api_changes_need_the_session_csrf_token(worklist: WorklistApp) -> None:
    worklist.add_study("5.1")
    client, token = worklist.logged_in("alice")
    _other, other_token = worklist.logged_in("bob")
    url = "/api/studies/5.1/read-state"
    assert_json_error(client.post(url, json={"state": "read"}), 403, "CSRF")
    assert_json_error(client.post(url, json={"state": "read"}, headers={"X-CSRF-Token": "wrong"}), 403, "CSRF")
    assert_json_error(client.post(url, json={"state": "read"}, headers={"X-CSRF-Token": ""}), 403, "CSRF")
    assert_json_error(client.post(url, json={"state": "read"}, headers={"X-CSRF-Token": other_token}), 403, "CSRF")
    assert_json_error(client.post("/api/logout", headers={"X-CSRF-Token": "wrong"}), 403, "CSRF")
    assert_json_error(client.post("/api/analyse", files={"file": ("x.png", b"x")}), 403, "CSRF")
    study = worklist.study("5.1")
    assert (study.read_state, study.read_by) == ("unread", None)
    assert not [e for e in worklist.audit() if e.action == "read_state"]

    r = client.post(url, json={"state": "read"}, headers={"X-CSRF-Token": token})
    assert r.status_code == 200
    assert r.json() == {"study_uid": "5.1", "read_state": "read", "read_by": "alice"}
    assert client.get("/api/me").status_code == 200


def test_form_posts_need_the_csrf_field(worklist: WorklistApp) -> None:
    worklist.add_study("5.2")
    worklist.add_user("alice")
    client = worklist.client()
    assert _form_login(client, "alice").status_code == 303
    token = csrf_from(client.get("/worklist").text)

    assert_html_error(client.post("/studies/5.2/read-state", data={"state": "read"}), 403, "CSRF")
    r = client.post("/studies/5.2/read-state", data={"state": "read", "csrf_token": "wrong"})
    assert_html_error(r, 403, "CSRF")
    assert worklist.study("5.2").read_state == "unread"
    assert_html_error(client.post("/logout", data={}), 403, "CSRF")
    assert client.get("/api/me").status_code == 200, "a logout without the token must not log out"
    r = client.post("/analyse", files={"file": ("x.png", b"\x89PNG not really")})
    assert_html_error(r, 403, "CSRF")
    r = client.post("/login", data={"username": "alice", "password": PASSWORD})
    assert_html_error(r, 403, "CSRF")
    # A fresh browser that never loaded the login page has no token at all.
    fresh = worklist.client()
    assert_html_error(fresh.post("/login", data={"username": "alice", "password": PASSWORD}), 403, "CSRF")
    assert fresh.get("/api/me").status_code == 401

    r = client.post("/studies/5.2/read-state", data={"state": "in_progress", "csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/studies/5.2"
    assert (worklist.study("5.2").read_state, worklist.study("5.2").read_by) == ("in_progress", "alice")
    r = client.post("/logout", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/login"
    assert client.get("/api/me").status_code == 401


# --------------------------------------------------------------------------- read state and audit


def test_read_state_changes_are_stored_shown_and_audited(worklist: WorklistApp) -> None:
    worklist.add_study("6.1", priority=1, patient_name="ZEBRA^QUENTIN", patient_id="PIDZQ998877")
    worklist.add_study("6.2", priority=2)
    alice, a_token = worklist.logged_in("alice")
    bob, b_token = worklist.logged_in("bob")
    url = "/api/studies/6.1/read-state"

    t0 = utcnow()
    r = alice.post(url, json={"state": "in_progress"}, headers={"X-CSRF-Token": a_token})
    t1 = utcnow()
    assert r.status_code == 200 and r.json()["read_by"] == "alice"
    study = worklist.study("6.1")
    assert (study.read_state, study.read_by) == ("in_progress", "alice")
    assert study.read_state_at is not None and t0 <= study.read_state_at <= t1
    row = next(i for i in worklist_json(bob)["items"] if i["study_uid"] == "6.1")
    assert (row["read_state"], row["read_by"]) == ("in_progress", "alice")
    assert uids(bob, read_state="in_progress") == ["6.1"]
    assert uids(bob, read_state="unread") == ["6.2"]

    r = bob.post(url, json={"state": "read"}, headers={"X-CSRF-Token": b_token})
    assert r.json() == {"study_uid": "6.1", "read_state": "read", "read_by": "bob"}
    detail = alice.get("/api/studies/6.1").json()
    assert (detail["read_state"], detail["read_by"]) == ("read", "bob")
    assert detail["read_state_at"] == worklist.study("6.1").read_state_at.isoformat()
    assert "read by bob" in alice.get("/studies/6.1").text

    r = alice.post(url, json={"state": "unread"}, headers={"X-CSRF-Token": a_token})
    assert r.json()["read_by"] is None
    study = worklist.study("6.1")
    assert (study.read_state, study.read_by) == ("unread", None) and study.read_state_at is not None
    assert uids(alice, read_state="read") == []

    changes = [(e.username, e.study_uid, e.detail) for e in worklist.audit() if e.action == "read_state"]
    assert changes == [
        ("alice", "6.1", "unread -> in_progress"),
        ("bob", "6.1", "in_progress -> read"),
        ("alice", "6.1", "read -> unread"),
    ]
    events = worklist.audit()
    assert all(e.at is not None for e in events)
    text = json.dumps([[e.username, e.action, e.study_uid, e.detail] for e in events])
    for word in ("ZEBRA", "QUENTIN", "PIDZQ998877"):
        assert word not in text


def test_views_logins_and_logouts_are_audited_without_patient_data(worklist: WorklistApp) -> None:
    worklist.add_study("6.5", patient_name="ZEBRA^QUENTIN", patient_id="PIDZQ998877")
    worklist.add_user("alice")
    worklist.add_user("bob")
    api = worklist.client()
    token = worklist.login(api, "alice")
    assert api.get("/api/studies/6.5").status_code == 200
    assert "ZEBRA" in api.get("/studies/6.5").text  # the page itself shows the name (unmasked site)
    assert api.post("/api/logout", headers={"X-CSRF-Token": token}).json() == {"ok": True}
    assert api.get("/api/me").status_code == 401

    page = worklist.client()
    assert _form_login(page, "bob").status_code == 303
    assert page.get("/studies/6.5").status_code == 200
    assert page.get("/worklist").status_code == 200  # the list itself is not a study view
    assert page.post("/logout", data={"csrf_token": csrf_from(page.get("/worklist").text)}).status_code == 303
    assert _form_login(worklist.client(), "bob", "wrong password!").status_code == 401

    got = [(e.username, e.action, e.study_uid, e.detail) for e in worklist.audit()]
    assert got == [
        ("alice", "login", None, None),
        ("alice", "view_study", "6.5", "api"),
        ("alice", "view_study", "6.5", "page"),
        ("alice", "logout", None, None),
        ("bob", "login", None, None),
        ("bob", "view_study", "6.5", "page"),
        ("bob", "logout", None, None),
        ("bob", "login_failed", None, None),  # under the attempted name: the login throttle counts it
    ]
    events = worklist.audit()
    assert [e.id for e in events] == sorted(e.id for e in events)
    assert all(a.at <= b.at for a, b in itertools.pairwise(events))
    text = json.dumps(got)
    for word in ("ZEBRA", "QUENTIN", "PIDZQ998877"):
        assert word not in text


def _audit_count(wl: WorklistApp, action: str) -> int:
    return sum(1 for e in wl.audit() if e.action == action)


def test_a_failed_view_is_not_audited_as_a_view(worklist: WorklistApp) -> None:
    client, _ = worklist.logged_in("alice")
    assert client.get("/api/studies/9.9.9").status_code == 404
    assert client.get("/api/studies/1.2.x").status_code == 400
    assert _audit_count(worklist, "view_study") == 0
    assert [e.action for e in worklist.audit()] == ["login"]


# --------------------------------------------------------------------------- cookies


def _session_cookie(r: Response) -> list[str]:
    cookies = [c for c in r.headers.get_list("set-cookie") if c.startswith("xt_session=")]
    assert len(cookies) == 1, r.headers.get_list("set-cookie")
    return [part.strip().lower() for part in cookies[0].split(";")]


def test_session_cookie_is_httponly_and_samesite_lax(make_worklist) -> None:
    wl = make_worklist()
    wl.add_user("alice")
    attrs = _session_cookie(wl.client().post("/api/login", json={"username": "alice", "password": PASSWORD}))
    assert "httponly" in attrs and "samesite=lax" in attrs and "path=/" in attrs
    assert "secure" not in attrs
    assert f"max-age={wl.settings.web.session_max_age_s}" in attrs
    attrs = _session_cookie(_form_login(wl.client(), "alice"))
    assert "httponly" in attrs and "samesite=lax" in attrs and "secure" not in attrs

    secure = make_worklist(web={"cookie_secure": True})
    attrs = _session_cookie(secure.client().post("/api/login", json={"username": "alice", "password": PASSWORD}))
    assert "secure" in attrs and "httponly" in attrs and "samesite=lax" in attrs


def test_pages_carry_the_security_headers(worklist: WorklistApp) -> None:
    client, _ = worklist.logged_in("alice")
    for path in ("/worklist", "/api/worklist", "/login"):
        r = client.get(path)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.headers["cache-control"] == "no-store"
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp


# --------------------------------------------------------------------------- bad input

BAD_QUERIES: list[tuple[dict[str, Any], str]] = [
    ({"page": "0"}, "page"),
    ({"page": "-1"}, "page"),
    ({"page": "abc"}, "page"),
    ({"page": "99999999999999999999999"}, "page"),
    ({"page_size": "1000"}, "page_size"),
    ({"page_size": "0"}, "page_size"),
    ({"priority": "bogus"}, "priority"),
    ({"priority": ""}, "priority"),
    ({"finding": "bogus"}, "finding"),
    ({"finding": "'; DROP TABLE study; --"}, "finding"),
    ({"ai_state": "done"}, "ai_state"),
    ({"read_state": "seen"}, "read_state"),
    ({"date_from": "notadate"}, "date_from"),
    ({"date_to": "86400"}, "date_to"),  # digits that are not YYYYMMDD are not a Unix timestamp
    ({"date_to": "2024-13-45"}, "date_to"),
    ({"calling_ae": "A" * 17}, "calling_ae"),
    ({"unknown_parameter": "1"}, "unknown_parameter"),
]


def test_bad_query_parameters_answer_422_naming_the_field(worklist: WorklistApp) -> None:
    worklist.add_study("7.1")
    client, _ = worklist.logged_in("alice")
    for params, name in BAD_QUERIES:
        body = assert_json_error(client.get("/api/worklist", params=params), 422, name)
        assert any(d["field"].split(".")[0] == name for d in body["details"]), (params, body)
        assert_still_answering(client)
        # The page and its refresh answer with an error page, not a crash.
        assert_html_error(client.get("/worklist", params=params), 400, name)
        assert client.get("/worklist/rows", params=params).status_code == 400
    # Several bad fields at once are all named.
    body = assert_json_error(client.get("/api/worklist", params={"page": 0, "finding": "x"}), 422, "page", "finding")
    assert {d["field"].split(".")[0] for d in body["details"]} == {"page", "finding"}
    assert uids(client) == ["7.1"]
    assert worklist.study("7.1").state == "scored"


def test_hostile_uids_in_paths_answer_400(worklist: WorklistApp) -> None:
    worklist.add_study("7.2")
    client, token = worklist.logged_in("alice")
    hostile = ["1.2.3.x", "1." * 32 + "1", "1" * 65, "1..2", ".1.2", "%2e%2e", "..%5C..", "1.2.3%00", "1.2%20", "-1"]
    for bad in hostile:
        assert_json_error(client.get(f"/api/studies/{bad}"), 400, "invalid study UID")
        assert_json_error(client.get(f"/api/studies/{bad}/instances/1.2.3/image.png"), 400, "invalid study UID")
        assert_json_error(client.get(f"/api/studies/7.2/instances/{bad}/image.png"), 400, "SOP Instance UID")
        assert_json_error(
            client.get(f"/api/studies/7.2/instances/{bad}/heatmaps/pneumonia.png"), 400, "SOP Instance UID"
        )
        r = client.post(f"/api/studies/{bad}/read-state", json={"state": "read"}, headers={"X-CSRF-Token": token})
        assert_json_error(r, 400, "invalid study UID")
        assert_html_error(client.get(f"/studies/{bad}"), 400, "invalid study UID")
        assert_still_answering(client)
    # An encoded slash splits the path: no route matches, so nothing is looked up or read.
    for path in ("/api/studies/..%2F..", "/api/studies/7.2/instances/..%2F..%2Fetc/image.png"):
        assert_json_error(client.get(path), 404)
    assert worklist.study("7.2").read_state == "unread"
    assert _audit_count(worklist, "view_study") == 0


def test_unknown_study_instance_and_finding_answer_404(worklist: WorklistApp) -> None:
    worklist.add_study("7.3")
    client, token = worklist.logged_in("alice")
    assert_json_error(client.get("/api/studies/9.9.9"), 404, "no such study")
    assert_html_error(client.get("/studies/9.9.9"), 404, "no such study")
    r = client.post("/api/studies/9.9.9/read-state", json={"state": "read"}, headers={"X-CSRF-Token": token})
    assert_json_error(r, 404, "no such study")
    assert_json_error(client.get("/api/studies/7.3/instances/1.2.3/image.png"), 404, "no such instance")
    assert_json_error(client.get("/api/studies/9.9.9/instances/1.2.3/image.png"), 404, "no such study")
    body = assert_json_error(client.get("/api/studies/7.3/instances/1.2.3/heatmaps/bogus.png"), 404, "unknown finding")
    assert "pneumonia" in body["error"]
    assert_json_error(client.get("/api/studies/7.3/instances/1.2.3/heatmaps/pneumonia.png"), 404, "no such instance")
    assert_json_error(client.get("/api/nothing-here"), 404)
    assert_still_answering(client)


def test_malformed_bodies_answer_422(worklist: WorklistApp) -> None:
    worklist.add_study("7.4")
    client, token = worklist.logged_in("alice")
    url = "/api/studies/7.4/read-state"
    headers = {"X-CSRF-Token": token, "content-type": "application/json"}
    assert_json_error(client.post(url, content=b"{not json", headers=headers), 422)
    assert_json_error(client.post(url, content=b"\xff\xfe\x00garbage", headers=headers), 422)
    assert_json_error(client.post(url, json={"state": "done"}, headers=headers), 422, "state")
    assert_json_error(client.post(url, json={}, headers=headers), 422, "state")
    assert_json_error(client.post(url, json=["read"], headers=headers), 422)
    assert_json_error(client.post(url, headers={"X-CSRF-Token": token}), 422)
    assert worklist.study("7.4").read_state == "unread"
    assert_still_answering(client)

    anon = worklist.client()
    json_header = {"content-type": "application/json"}
    assert_json_error(anon.post("/api/login", content=b"{bad", headers=json_header), 422)
    assert_json_error(anon.post("/api/login", json={"username": "alice"}), 422, "password")
    assert_json_error(anon.post("/api/login", json={"username": "a" * 65, "password": "x"}), 422, "username")
    assert_json_error(anon.post("/api/login", json={"username": "alice", "password": "p" * 2000}), 422, "password")
    # The form's state field is checked too, with an error page.
    form = worklist.client()
    assert _form_login(form, "alice").status_code == 303
    tok = csrf_from(form.get("/worklist").text)
    assert_html_error(form.post("/studies/7.4/read-state", data={"state": "done", "csrf_token": tok}), 400, "state")
    assert worklist.study("7.4").read_state == "unread"
    assert_still_answering(client)


def test_analyse_scores_real_uploads_without_storing_them(make_worklist) -> None:
    from tests.conftest import pydicom_data_file, shared_file

    wl = make_worklist()
    client, token = wl.logged_in("alice")
    headers = {"X-CSRF-Token": token}
    chest = pydicom_data_file("RG1_UNCR.dcm")  # a real adult chest CR with round masses
    r = client.post("/api/analyse", files={"file": ("rg1.dcm", chest.read_bytes())}, headers=headers)
    assert r.status_code == 200, r.text
    body = r.json()
    from models.registry import get_model
    from triage.operating import model_steering

    model = get_model()
    steering = model_steering(model, wl.settings)
    assert (body["kind"], body["eligible"], body["model"]) == ("dicom", True, model.ref)
    assert set(body["scores"]) == {"pneumonia", "mass", "covid19"}
    assert all(0.0 <= p <= 1.0 for p in body["scores"].values())
    assert body["flags"] == {f: body["scores"][f] >= body["thresholds"][f] for f in body["scores"]}
    # Findings without adult within-collection evidence are informational (docs/triage.md):
    # never listed among the top findings that would steer a worklist.
    assert body["informational"] == sorted(set(body["scores"]) - steering)
    assert all(t["finding"] in steering and body["flags"][t["finding"]] for t in body["top_findings"])
    assert body["image_png"].startswith("data:image/png;base64,")
    assert set(body["heatmaps"]) == set(body["scores"]) and "not for diagnostic use" in body["disclaimer"]

    jpeg = shared_file("kermany", "train", "PNEUMONIA", "person1000_bacteria_2931.jpeg")
    r = client.post("/api/analyse", files={"file": ("p.jpeg", jpeg.read_bytes())}, headers=headers)
    assert r.status_code == 200 and r.json()["kind"] == "jpeg" and "no DICOM header" in r.json()["notes"]
    # no header, so the adult operating point, where pneumonia steers only with adult evidence
    assert "operating point: adult (no DICOM header: adult operating point)" in r.json()["notes"]
    assert r.json()["flags"]["pneumonia"]
    tops = [t["finding"] for t in r.json()["top_findings"]]
    assert tops[:1] == (["pneumonia"] if "pneumonia" in steering else [])

    leg = pydicom_data_file("RG3_UNCR.dcm")  # a leg: not scored at all, only the reason
    body = client.post("/api/analyse", files={"file": ("leg.dcm", leg.read_bytes())}, headers=headers).json()
    assert body["eligible"] is False and "EXTREMITY" in body["reason"] and not any(body["flags"].values())
    assert body["scores"] == {} and body["heatmaps"] == {}
    assert body["top_findings"] == []

    with wl.factory() as session:  # nothing became a study
        assert session.scalar(select(func.count()).select_from(Study)) == 0
    assert [e.action for e in wl.audit() if e.action == "analyse"] == ["analyse"] * 3


def test_analyse_judges_a_child_at_the_paediatric_operating_point(make_worklist, tmp_path) -> None:
    """The same rule as the worker and `predict`: Patient's Age under 18 picks the card's
    paediatric thresholds; no age (or a PNG/JPEG) the adult ones."""
    import pydicom

    from models.registry import get_model
    from tests.conftest import pydicom_data_file

    wl = make_worklist()
    client, token = wl.logged_in("alice")
    headers = {"X-CSRF-Token": token}
    model = get_model()
    ds = pydicom.dcmread(pydicom_data_file("RG1_UNCR.dcm"))
    bodies = {}
    for age in ("006Y", "045Y"):
        ds.PatientAge = age
        path = tmp_path / f"rg1-{age}.dcm"
        ds.save_as(path)
        r = client.post("/api/analyse", files={"file": (path.name, path.read_bytes())}, headers=headers)
        assert r.status_code == 200, r.text
        bodies[age] = r.json()
    child, adult = bodies["006Y"], bodies["045Y"]
    assert "operating point: paediatric (Patient's Age 006Y)" in child["notes"]
    assert "operating point: adult (Patient's Age 045Y)" in adult["notes"]
    assert child["thresholds"] == model.thresholds("paediatric")
    assert adult["thresholds"] == model.thresholds("adult")
    assert child["thresholds"] != adult["thresholds"]  # the shipped card has a paediatric point
    assert child["scores"] == adult["scores"]  # same pixels, only the operating point differs


def test_analyse_rejects_unreadable_and_empty_uploads(make_worklist) -> None:
    wl = make_worklist(web={"max_upload_mb": 1})
    client, token = wl.logged_in("alice")
    headers = {"X-CSRF-Token": token}
    assert_json_error(client.post("/api/analyse", files={"file": ("e.dcm", b"")}, headers=headers), 400, "empty file")
    garbage = bytes(random.Random(5).randrange(256) for _ in range(4096))
    for name, data, words in (
        ("garbage.dcm", b"this is not an image at all " * 50, ("not a DICOM, PNG or JPEG image",)),
        ("random.bin", garbage, ()),
        ("fake.png", b"\x89PNG\r\n\x1a\n" + garbage, ()),
        ("fake.jpg", b"\xff\xd8\xff\xe0" + garbage, ()),
        ("fake.dcm", b"\0" * 128 + b"DICM" + garbage, ()),
    ):
        r = client.post("/api/analyse", files={"file": (name, data)}, headers=headers)
        body = assert_json_error(r, 400, *words)
        assert len(body["error"]) > 10 and "Traceback" not in body["error"], (name, body)
        assert_still_answering(client)
    too_big = b"\0" * (1024 * 1024 + 1)
    r = client.post("/api/analyse", files={"file": ("big.dcm", too_big)}, headers=headers)
    assert_json_error(r, 413, "larger than 1 MB")

    # The page answers with the form and the message.
    page = wl.client()
    assert _form_login(page, "alice").status_code == 303
    tok = csrf_from(page.get("/analyse").text)
    r = page.post("/analyse", data={"csrf_token": tok}, files={"file": ("x.dcm", b"not an image " * 20)})
    assert r.status_code == 400 and r.headers["content-type"].startswith("text/html")
    assert re.search(r'id="analyse-error">not a DICOM, PNG or JPEG image', r.text)
    r = page.post("/analyse", data={"csrf_token": tok}, files={"file": ("x.dcm", b"")})
    assert r.status_code == 400 and 'id="analyse-error">empty file<' in r.text
    assert not [e for e in wl.audit() if e.action == "analyse"], "nothing was analysed"
    assert_still_answering(client)


# --------------------------------------------------------------------------- patient data


def test_links_carry_study_uids_only(make_worklist) -> None:
    wl = make_worklist(web={"page_size": 5})
    now = utcnow()
    names = []
    for n in range(7):
        name, pid = f"ZEBRA{n}^QUENTIN{n}", f"PIDZQ{n}99887"
        names += [f"ZEBRA{n}", f"QUENTIN{n}", pid]
        wl.add_study(f"8.{n + 1}", priority=n % 3, age_min=n + 1, now=now, patient_name=name, patient_id=pid)
    client, _ = wl.logged_in("alice")
    page = client.get("/worklist", params={"priority": ["critical", "urgent", "routine"]})
    assert page.status_code == 200
    assert "ZEBRA0, QUENTIN0" in page.text  # shown in the table (this site does not mask) ...
    urls = URL_ATTR_RE.findall(page.text)
    assert any("page=2" in u for u in urls)
    for url in urls:  # ... but never in a link, a form target or a picture address
        for word in names:
            assert word not in url, url
    study_links = [u for u in urls if u.startswith("/studies/")]
    rows = [u for u, _ in ROW_RE.findall(page.text)]
    assert study_links == [f"/studies/{u}" for u in rows] and len(rows) == 5
    for url in urls:
        assert url.startswith(("/", "?")), url
    for uid in rows:
        detail = client.get(f"/studies/{uid}")
        for url in URL_ATTR_RE.findall(detail.text):
            assert not any(word in url for word in names), url


def test_masked_identity_hides_names_and_ids(make_worklist) -> None:
    wl = make_worklist(web={"mask_patient_identity": True})
    wl.add_study("8.20", priority=1, patient_name="ZEBRA^QUENTIN", patient_id="PIDZQ998877")
    wl.add_study("8.21", priority=2, patient_name="", patient_id="AB1")
    client, _ = wl.logged_in("alice")
    items = {i["study_uid"]: i for i in worklist_json(client)["items"]}
    assert (items["8.20"]["patient_name"], items["8.20"]["patient_id"]) == ("Z*** Q***", "***77")
    assert items["8.21"]["patient_id"] == "***"
    assert client.get("/api/studies/8.20").json()["patient_name"] == "Z*** Q***"
    for path in ("/api/worklist", "/worklist", "/worklist/rows", "/api/studies/8.20", "/studies/8.20"):
        r = client.get(path)
        assert r.status_code == 200, path
        for word in ("ZEBRA", "QUENTIN", "PIDZQ998877"):
            assert word not in r.text, (path, word)
    assert "Z*** Q***" in client.get("/worklist").text

    # The same database through an unmasked site shows them: the check above is not vacuous.
    plain = make_worklist()
    other, _ = plain.logged_in("bob")
    assert "ZEBRA^QUENTIN" in other.get("/api/worklist").text


# --------------------------------------------------------------------------- health


def test_healthz_is_ok_with_a_live_worker_and_listener(worklist: WorklistApp, start_listener) -> None:
    worklist.beat(age_s=1)
    start_listener(worklist.settings, with_handoff=False)
    r = worklist.client().get("/healthz")  # no login needed
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    assert set(body["checks"]) == {"listener", "database", "broker", "workers"}
    assert body["checks"]["listener"] == {"ok": True, "echo": "C-ECHO success"}
    assert body["checks"]["database"] == {"ok": True}
    assert body["checks"]["workers"] == {"ok": True, "alive": 1}
    broker = body["checks"]["broker"]
    assert broker["ok"] is True
    assert set(broker["queues"]) == {
        worklist.settings.queues.urgent,
        worklist.settings.queues.routine,
        worklist.settings.export.queue,
    }


def test_healthz_is_503_without_a_live_worker(worklist: WorklistApp, start_listener) -> None:
    client = worklist.client()
    r = client.get("/healthz")
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    assert body["ok"] is False
    assert body["checks"]["database"]["ok"] is True and body["checks"]["broker"]["ok"] is True
    workers = body["checks"]["workers"]
    assert workers["ok"] is False and "no worker heartbeat in the last 90 s" in workers["error"]
    listener = body["checks"]["listener"]  # no listener runs in this test: a real C-ECHO finds none
    assert listener["ok"] is False and "no DICOM association" in listener["error"]

    # A heartbeat older than web.worker_stale_s is a dead worker.
    worklist.beat(age_s=600)
    body = client.get("/healthz").json()
    assert body["ok"] is False and "no worker heartbeat" in body["checks"]["workers"]["error"]
    it, _ = worklist.logged_in("it", role="admin")
    status = it.get("/api/admin/status").json()
    assert [(w["name"], w["alive"]) for w in status["workers"]] == [("worker@test:1", False)]
    assert status["health"]["ok"] is False

    # The worker comes back, and with the listener up everything is ok.
    worklist.beat(age_s=0)
    assert client.get("/healthz").json()["checks"]["workers"]["ok"] is True
    start_listener(worklist.settings, with_handoff=False)
    assert client.get("/healthz").status_code == 200
    assert [w["alive"] for w in it.get("/api/admin/status").json()["workers"]] == [True]


# --------------------------------------------------------------------------- API documentation


def test_openapi_and_docs_are_served(worklist: WorklistApp) -> None:
    client = worklist.client()
    r = client.get("/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    for path, method in (
        ("/api/worklist", "get"),
        ("/api/studies/{study_uid}", "get"),
        ("/api/studies/{study_uid}/read-state", "post"),
        ("/api/studies/{study_uid}/instances/{sop_uid}/image.png", "get"),
        ("/api/studies/{study_uid}/instances/{sop_uid}/heatmaps/{finding}.png", "get"),
        ("/api/analyse", "post"),
        ("/api/login", "post"),
        ("/healthz", "get"),
    ):
        assert method in paths.get(path, {}), path
    params = {p["name"] for p in paths["/api/worklist"]["get"]["parameters"]}
    assert {"priority", "finding", "ai_state", "read_state", "calling_ae", "date_from", "date_to"} <= params
    assert {"page", "page_size"} <= params
    assert not any(p.startswith(("/login", "/worklist", "/studies")) for p in paths), "pages are not API"

    docs = client.get("/docs")
    assert docs.status_code == 200 and "/openapi.json" in docs.text and "swagger-ui" in docs.text.lower()
    redoc = client.get("/redoc")
    assert redoc.status_code == 200 and "/openapi.json" in redoc.text
    # Served from the fastapi-offline package: a hospital network has no CDN to load them from.
    for page in (docs, redoc):
        assets = re.findall(r'<(?:script src|link type="text/css" rel="stylesheet" href)="([^"]+)"', page.text)
        assert assets
        for src in assets:
            assert src.startswith("/docs-assets/"), src
            assert client.get(src).status_code == 200, src
    # The browser must be allowed to run what the pages load (the app's own pages keep the
    # strict policy, see test_pages_carry_the_security_headers).
    for page in (docs, redoc):
        directives = [d.strip().split(" ", 1) for d in page.headers["content-security-policy"].split(";") if d.strip()]
        csp = {d[0]: d[1] if len(d) > 1 else "" for d in directives}
        scripts = csp.get("script-src", csp.get("default-src", ""))
        sources = re.findall(r'<script src="([^"]+)"', page.text)
        assert sources
        for src in sources:
            assert not urlsplit(src).netloc and "'self'" in scripts, (src, scripts)
        if re.search(r"<script>\s*\S", page.text):
            assert "'unsafe-inline'" in scripts
        assert "frame-ancestors 'none'" in page.headers["content-security-policy"]


# --------------------------------------------------------------------------- database outage


def test_a_database_outage_answers_503_and_the_app_recovers(postgres_server, tmp_path, request) -> None:
    """PostgreSQL behind a TCP proxy we cut: every request says so clearly, nothing crashes."""
    from db.session import upgrade
    from tests.plugins.ingest import PG_HOST, PG_PORT, Backend, TcpProxy
    from worklist.app import create_app
    from worklist.users import add_user

    postgres_server.truncate()
    proxy = TcpProxy((PG_HOST, PG_PORT))
    request.addfinalizer(proxy.close)
    backend = Backend("postgres", postgres_server.url_via("127.0.0.1", proxy.port), "redis://127.0.0.1:6379/0",
                      f"xt-web-{proxy.port}.urgent", f"xt-web-{proxy.port}.routine")  # fmt: skip
    settings = backend.settings(tmp_path)
    upgrade(settings.database.url)
    from db.session import make_engine, make_sessionmaker, session_scope

    engine = make_engine(postgres_server.url)
    request.addfinalizer(engine.dispose)
    with session_scope(make_sessionmaker(engine)) as s:
        s.execute(text("DELETE FROM app_user WHERE username = 'outage.doc'"))
        add_user(s, "outage.doc", PASSWORD, "radiologist")
    client = TestClient(create_app(settings))
    r = client.post("/api/login", json={"username": "outage.doc", "password": PASSWORD})
    assert r.status_code == 200, r.text

    proxy.cut()
    api = client.get("/api/worklist")
    assert api.status_code == 503 and "database is unavailable" in api.json()["error"], api.text
    page = client.get("/worklist")
    assert page.status_code == 503 and "database is unavailable" in page.text
    health = client.get("/healthz")
    assert health.status_code == 503 and health.json()["checks"]["database"]["ok"] is False

    proxy.open()
    assert client.get("/api/worklist").status_code == 200  # the pool reconnects: no restart needed

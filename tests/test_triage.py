"""Triage policy: priority from scores and thresholds, silent mode, escalation, worklist order.

The policy functions are pure; the ORDER BY expression is run on both real databases so
the worklist gets the same order from SQL as from ``sort_key``.
"""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import select

from db.models import Study, StudyState, utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from settings import QueuesConfig, TriageConfig
from triage.policy import (
    AI_UNAVAILABLE,
    InstanceOutcome,
    Level,
    decide,
    effective_priority,
    explain,
    flagged_findings,
    sort_key,
    steering_explanation,
    steering_findings,
    thresholds_for,
    top_finding,
    worklist_order,
)
from worker.handoff import queue_for

CARD = {"pneumonia": 0.41, "mass": 0.3, "covid19": 0.5}


def _scored(**scores: float) -> InstanceOutcome:
    return InstanceOutcome("1.2.3", StudyState.SCORED, None, scores)


def test_priority_and_reason_in_words() -> None:
    cfg = TriageConfig()
    d = decide([_scored(pneumonia=0.93, mass=0.1, covid19=0.2)], CARD, cfg)
    assert (d.state, d.priority, d.ai_priority) == ("scored", Level.CRITICAL, Level.CRITICAL)
    assert d.priority_reason == "critical: pneumonia 0.93 ≥ 0.41"
    d = decide([_scored(pneumonia=0.6, mass=0.35, covid19=0.2)], CARD, cfg)
    assert d.priority == Level.URGENT
    assert d.priority_reason == "urgent: pneumonia 0.60 ≥ 0.41, mass 0.35 ≥ 0.30"
    d = decide([_scored(pneumonia=0.2, mass=0.1, covid19=0.45)], CARD, cfg)
    assert d.priority == Level.ROUTINE
    assert d.priority_reason == "routine: no finding above threshold (closest: covid19 0.45 < 0.50)"
    assert d.ai_state is None


def test_most_urgent_instance_sets_the_study() -> None:
    outcomes = [_scored(pneumonia=0.1, mass=0.1, covid19=0.1), _scored(pneumonia=0.5, mass=0.1, covid19=0.1)]
    assert decide(outcomes, CARD, TriageConfig()).priority == Level.URGENT


def test_site_overrides_card_thresholds() -> None:
    cfg = TriageConfig(thresholds={"pneumonia": 0.7}, critical_thresholds={})
    th = thresholds_for(CARD, cfg)
    assert th == {"pneumonia": 0.7, "mass": 0.3, "covid19": 0.5}
    assert decide([_scored(pneumonia=0.93)], th, cfg).priority == Level.URGENT  # no critical level configured
    assert decide([_scored(pneumonia=0.6)], th, cfg).priority == Level.ROUTINE


def test_failed_and_ineligible_stay_on_the_worklist_read_as_usual() -> None:
    cfg = TriageConfig()
    d = decide([InstanceOutcome("1", StudyState.INELIGIBLE, "body part EXTREMITY")], CARD, cfg)
    assert (d.state, d.reason, d.priority, d.ai_state) == (
        "ineligible",
        "body part EXTREMITY",
        Level.ROUTINE,
        AI_UNAVAILABLE,
    )
    d = decide(
        [
            InstanceOutcome("1", StudyState.INELIGIBLE, "lateral"),
            InstanceOutcome("2", StudyState.FAILED, "CorruptPixelData: x"),
        ],
        CARD,
        cfg,
    )
    assert (d.state, d.reason) == ("failed", "CorruptPixelData: x")
    assert d.priority_reason.startswith(AI_UNAVAILABLE)
    # One scored instance is enough to score the study.
    d = decide([InstanceOutcome("1", StudyState.FAILED, "x"), _scored(pneumonia=0.1, mass=0.1, covid19=0.1)], CARD, cfg)
    assert d.state == "scored"


def test_silent_mode_records_the_model_but_keeps_routine() -> None:
    d = decide([_scored(pneumonia=0.95)], CARD, TriageConfig(silent_mode=True))
    assert (d.priority, d.ai_priority) == (Level.ROUTINE, Level.CRITICAL)
    assert d.priority_reason == "silent mode, model says critical: pneumonia 0.95 ≥ 0.41"


def test_explain_without_known_findings() -> None:
    assert explain({"other": 0.9}, CARD) == "no finding scored"


def test_top_finding_is_the_one_the_reason_names_first() -> None:
    cfg = TriageConfig()
    # Two findings above threshold: the larger margin wins, not the larger score.
    d = decide([_scored(pneumonia=0.6, mass=0.55, covid19=0.2)], CARD, cfg)
    assert (d.top_finding, d.top_score) == ("mass", 0.55)
    assert d.priority_reason.startswith("urgent: mass 0.55")
    # Nothing above threshold: the closest miss, as in the reason.
    d = decide([_scored(pneumonia=0.2, mass=0.1, covid19=0.45)], CARD, cfg)
    assert (d.top_finding, d.top_score, d.flagged_findings) == ("covid19", 0.45, None)
    assert "closest: covid19 0.45" in d.priority_reason


def test_top_finding_comes_from_the_instance_that_set_the_level() -> None:
    outcomes = [
        _scored(pneumonia=0.1, mass=0.29, covid19=0.1),  # closest miss, routine
        _scored(pneumonia=0.5, mass=0.1, covid19=0.1),  # urgent: sets the level
    ]
    d = decide(outcomes, CARD, TriageConfig())
    assert d.priority == Level.URGENT
    assert (d.top_finding, d.top_score) == ("pneumonia", 0.5)


def test_flagged_findings_is_the_union_over_instances_in_finding_order() -> None:
    outcomes = [
        _scored(pneumonia=0.1, mass=0.1, covid19=0.6),
        InstanceOutcome("2", StudyState.FAILED, "x"),
        _scored(pneumonia=0.5, mass=0.1, covid19=0.1),
    ]
    d = decide(outcomes, CARD, TriageConfig())
    assert d.flagged_findings == ",pneumonia,covid19,"  # FINDING_NAMES order, not score order
    # One portable LIKE finds a finding and never a longer name containing it.
    assert ",covid19," in d.flagged_findings and ",mass," not in d.flagged_findings
    assert flagged_findings(outcomes[1:2], CARD) is None
    assert flagged_findings([_scored(pneumonia=0.41)], CARD) == ",pneumonia,"  # at the threshold is flagged


def test_top_finding_without_known_findings() -> None:
    assert top_finding({"other": 0.9}, CARD) is None
    d = decide([_scored(other=0.9)], CARD, TriageConfig())
    assert (d.state, d.top_finding, d.top_score, d.flagged_findings) == ("scored", None, None, None)


def test_silent_mode_still_records_the_models_opinion() -> None:
    d = decide([_scored(pneumonia=0.95, mass=0.4, covid19=0.1)], CARD, TriageConfig(silent_mode=True))
    assert d.priority == Level.ROUTINE
    assert (d.top_finding, d.top_score, d.flagged_findings) == ("pneumonia", 0.95, ",pneumonia,mass,")


def test_failed_and_ineligible_have_no_top_finding() -> None:
    for outcomes in (
        [InstanceOutcome("1", StudyState.INELIGIBLE, "lateral")],
        [InstanceOutcome("1", StudyState.FAILED, "x")],
        [],
    ):
        d = decide(outcomes, CARD, TriageConfig())
        assert (d.top_finding, d.top_score, d.flagged_findings) == (None, None, None)


def test_escalation_after_the_cap_of_the_level() -> None:
    cfg = TriageConfig(escalate_after_min={"routine": 240, "urgent": 60})
    now = utcnow()
    assert effective_priority(Level.ROUTINE, now - timedelta(hours=3), now, cfg) == Level.ROUTINE
    assert effective_priority(Level.ROUTINE, now - timedelta(hours=5), now, cfg) == Level.URGENT
    assert effective_priority(None, now - timedelta(hours=5), now, cfg) == Level.URGENT  # not scored yet
    assert effective_priority(Level.URGENT, now - timedelta(minutes=61), now, cfg) == Level.CRITICAL
    assert effective_priority(Level.CRITICAL, now - timedelta(days=1), now, cfg) == Level.CRITICAL
    only_routine = TriageConfig(escalate_after_min={"routine": 240})
    assert effective_priority(Level.URGENT, now - timedelta(days=1), now, only_routine) == Level.URGENT


def test_escalation_levels_are_validated() -> None:
    with pytest.raises(ValueError, match="unknown level"):
        TriageConfig(escalate_after_min={"critical": 5})


def _insert(url: str, rows: list[tuple[str, int | None, timedelta]]) -> None:
    now = utcnow()
    factory = make_sessionmaker(make_engine(url))
    with session_scope(factory) as s:
        for uid, priority, age in rows:
            s.add(Study(study_uid=uid, calling_ae="T", received_at=now - age, last_instance_at=now - age,
                        state=StudyState.SCORED, priority=priority))  # fmt: skip


def _order(url: str, cfg: TriageConfig) -> list[str]:
    factory = make_sessionmaker(make_engine(url))
    with factory() as s:
        return list(s.scalars(select(Study.study_uid).order_by(*worklist_order(cfg, utcnow()))))


def test_worklist_order_in_sql_matches_the_policy(backend) -> None:
    rows = [
        ("routine-new", Level.ROUTINE, timedelta(minutes=5)),
        ("urgent-new", Level.URGENT, timedelta(minutes=1)),
        ("routine-old", Level.ROUTINE, timedelta(hours=5)),  # escalated to urgent, and waiting longer
        ("unscored", None, timedelta(minutes=10)),  # AI unavailable: routine, by time
        ("critical", Level.CRITICAL, timedelta(seconds=10)),
        ("urgent-old", Level.URGENT, timedelta(minutes=90)),  # escalated to critical
    ]
    _insert(backend.database_url, rows)
    cfg = TriageConfig()
    expected = ["urgent-old", "critical", "routine-old", "urgent-new", "unscored", "routine-new"]
    assert _order(backend.database_url, cfg) == expected
    now = utcnow()
    in_memory = sorted(rows, key=lambda r: sort_key(r[1], now - r[2], now, cfg))
    assert [r[0] for r in in_memory] == expected


def test_silent_mode_leaves_the_order_by_time(backend) -> None:
    """Silent mode stores ROUTINE for every study, so the worklist is by waiting time alone."""
    cfg = TriageConfig(silent_mode=True)
    ages = {"a-positive": timedelta(minutes=1), "b-normal": timedelta(minutes=30), "c-positive": timedelta(minutes=20)}
    scores = {"a-positive": 0.95, "b-normal": 0.05, "c-positive": 0.6}
    rows = []
    for uid, age in ages.items():
        d = decide([_scored(pneumonia=scores[uid], mass=0.0, covid19=0.0)], CARD, cfg)
        rows.append((uid, d.priority, age))
    _insert(backend.database_url, rows)
    assert _order(backend.database_url, cfg) == ["b-normal", "c-positive", "a-positive"]


def test_routing_by_calling_ae_and_requested_priority() -> None:
    queues = QueuesConfig(urgent="u", routine="r", urgent_calling_aes=["ER_DR1"])
    assert queue_for(None, queues, "ER_DR1") == "u"
    assert queue_for("STAT", queues, "WARD_CR") == "u"
    assert queue_for("ROUTINE", queues, "WARD_CR") == "r"
    assert queue_for(None, queues) == "r"


# --------------------------------------------------------------------------- steering


def test_a_finding_with_a_useless_operating_point_does_not_steer() -> None:
    cfg = TriageConfig()
    # The shipped model's validation specificities at its thresholds: mass flags 92 % of normals.
    spec = {"pneumonia": 0.93, "mass": 0.08, "covid19": 0.99}
    assert steering_findings(spec, cfg) == {"pneumonia", "covid19"}
    assert steering_findings({**spec, "covid19": None}, cfg) == {"pneumonia", "covid19"}  # unknown: steers
    # A site that set its own mass threshold chose its operating point: mass steers again.
    site = TriageConfig(thresholds={"mass": 0.5})
    assert steering_findings(spec, site) == {"pneumonia", "mass", "covid19"}
    assert steering_findings(spec, TriageConfig(min_steering_specificity=0.0)) == set(spec)


def test_informational_findings_are_flagged_and_named_but_leave_the_level() -> None:
    cfg = TriageConfig()
    thresholds = {"pneumonia": 0.54, "mass": 0.13, "covid19": 0.30}
    only_mass = InstanceOutcome("1.1", StudyState.SCORED, scores={"pneumonia": 0.10, "mass": 0.40, "covid19": 0.01})
    d = decide([only_mass], thresholds, cfg, steering={"pneumonia", "covid19"})
    assert (d.priority, d.ai_priority) == (Level.ROUTINE, Level.ROUTINE)
    assert d.flagged_findings == ",mass,"  # still filterable on the worklist
    assert d.top_finding == "covid19"  # the closest steering miss (0.29 short), not mass
    assert "informational, not steering: mass 0.40 ≥ 0.13" in d.priority_reason
    assert decide([only_mass], thresholds, cfg).priority == Level.URGENT  # default: every finding steers
    both = InstanceOutcome("1.2", StudyState.SCORED, scores={"pneumonia": 0.70, "mass": 0.40, "covid19": 0.01})
    d = decide([both], thresholds, cfg, steering={"pneumonia", "covid19"})
    assert d.priority == Level.URGENT and d.top_finding == "pneumonia"
    assert d.priority_reason.startswith("urgent: pneumonia 0.70 ≥ 0.54; informational")


def test_weak_within_collection_evidence_does_not_steer() -> None:
    """A finding whose adult within-collection AUC interval reaches down to chance is shown
    but does not steer, however good its specificity; no interval at all is weak evidence."""
    cfg = TriageConfig()
    spec = {"pneumonia": 0.9, "mass": 0.9, "covid19": 0.9}
    evidence = {
        "pneumonia": {
            "comparison": "NIH pneumonia/consolidation vs NIH No Finding",
            "auc": 0.82,
            "auc_ci95": [0.71, 0.91],
            "n_pos": 29,
            "n_neg": 28,
        },
        "mass": {
            "comparison": "NIH mass/nodule vs NIH No Finding",
            "auc": 0.62,
            "auc_ci95": [0.49, 0.74],
            "n_pos": 43,
            "n_neg": 28,
        },
        "covid19": {"comparison": "Actualmed COVID-19 vs no finding", "auc": None, "auc_ci95": None},
    }
    # a strong-looking interval from a dozen films is no evidence either
    tiny = {
        "comparison": "Actualmed COVID-19 vs no finding",
        "auc": 0.9,
        "auc_ci95": [0.63, 1.0],
        "n_pos": 8,
        "n_neg": 5,
    }
    assert steering_findings(spec, cfg, {**evidence, "covid19": tiny}) == {"pneumonia"}
    assert "8 positive, 5 negative" in steering_explanation("covid19", spec, cfg, {"covid19": tiny})
    assert steering_findings(spec, TriageConfig(min_steering_evidence_images=5), {"covid19": tiny}) == {"covid19"}
    assert steering_findings(spec, cfg, evidence) == {"pneumonia"}
    assert steering_findings(spec, cfg) == set(spec)  # an old card without evidence: specificity alone
    assert steering_findings(spec, TriageConfig(min_steering_within_auc=0.45), evidence) == {"pneumonia", "mass"}
    assert steering_findings(spec, TriageConfig(thresholds={"mass": 0.4}), evidence) == {"pneumonia", "mass"}
    # a finding the card lists no evidence for at all has none
    assert steering_findings(spec, cfg, {"pneumonia": evidence["pneumonia"]}) == {"pneumonia"}
    why = {f: steering_explanation(f, spec, cfg, evidence) for f in spec}
    assert why["pneumonia"].startswith("steers: NIH pneumonia")
    assert "weak within-collection evidence" in why["mass"] and "[0.49, 0.74]" in why["mass"]
    assert "too little within-collection evidence" in why["covid19"]
    assert "specificity 0.30" in steering_explanation("mass", {**spec, "mass": 0.3}, cfg, evidence)
    assert steering_explanation("mass", spec, TriageConfig(thresholds={"mass": 0.4}), evidence).startswith("steers")


def test_the_shipped_card_steers_only_on_its_evidence() -> None:
    from models.card import ModelCard
    from models.registry import DEFAULT_MODEL_DIR
    from settings import Settings
    from triage.operating import card_evidence, card_specificity, card_steering

    card = ModelCard.load(DEFAULT_MODEL_DIR / "card.json")
    spec = card_specificity(card)
    assert set(spec) == {"pneumonia", "mass", "covid19"} and all(v is not None for v in spec.values())
    cfg = TriageConfig()
    adult = card_evidence(card)
    assert adult is not None and set(adult) == set(spec)  # every finding has an adult comparison
    assert set(card_evidence(card, "paediatric") or {}) == {"pneumonia"}  # Kermany only labels pneumonia
    for population in ("adult", "paediatric"):
        evidence = card_evidence(card, population) or {}
        steering = card_steering(card, Settings(), population)
        own_spec = card_specificity(card, population)  # that population's images at its own point
        for f in spec:
            e = evidence.get(f) or {}
            ci, n = e.get("auc_ci95"), min(e.get("n_pos", 0), e.get("n_neg", 0))
            holds = (
                bool(ci)
                and ci[0] >= cfg.min_steering_within_auc
                and n >= cfg.min_steering_evidence_images
                and own_spec[f] >= cfg.min_steering_specificity
            )
            assert (f in steering) == holds, (population, f)


def test_steering_follows_each_instance_population() -> None:
    """Pneumonia with strong evidence in children and weak in adults: the child's film steers,
    the adult's identical scores are informational; a stored instance keeps its point."""
    cfg = TriageConfig()
    thresholds = {"pneumonia": 0.5, "mass": 0.5, "covid19": 0.5}
    by_pop = {"adult": frozenset({"covid19"}), "paediatric": frozenset({"pneumonia"})}
    scores = {"pneumonia": 0.8, "mass": 0.1, "covid19": 0.1}
    child = InstanceOutcome("1.1", StudyState.SCORED, scores=scores, thresholds=thresholds, population="paediatric")
    adult = InstanceOutcome("1.2", StudyState.SCORED, scores=scores, thresholds=thresholds, population="adult")
    unknown = InstanceOutcome("1.3", StudyState.SCORED, scores=scores, thresholds=thresholds)  # stored before: adult
    assert decide([child], thresholds, cfg, by_pop["adult"], by_pop).priority == Level.URGENT
    d = decide([adult], thresholds, cfg, by_pop["adult"], by_pop)
    assert d.priority == Level.ROUTINE and "informational, not steering: pneumonia 0.80" in d.priority_reason
    assert decide([unknown], thresholds, cfg, by_pop["adult"], by_pop).priority == Level.ROUTINE
    both = decide([adult, child], thresholds, cfg, by_pop["adult"], by_pop)
    assert both.priority == Level.URGENT and both.top_finding == "pneumonia"


def test_each_instance_is_judged_at_its_own_operating_point() -> None:
    """A child's film carries the paediatric thresholds it was flagged at; the study judges it at those."""
    cfg = TriageConfig()
    paediatric = {"pneumonia": 0.7, "mass": 0.3, "covid19": 0.2}
    child = InstanceOutcome(
        "1.1", StudyState.SCORED, scores={"pneumonia": 0.6, "mass": 0.1, "covid19": 0.25}, thresholds=paediatric
    )
    adult = InstanceOutcome("1.2", StudyState.SCORED, scores={"pneumonia": 0.38, "mass": 0.1, "covid19": 0.1})
    # At the study-wide (adult) CARD point the child's pneumonia 0.60 would be urgent; at its own 0.70 it is not,
    # while its covid19 0.25 reaches the paediatric 0.20 (adult 0.50).
    d = decide([child, adult], CARD, cfg)
    assert d.priority == Level.URGENT
    assert d.priority_reason == "urgent: covid19 0.25 ≥ 0.20"
    assert (d.top_finding, d.top_score, d.flagged_findings) == ("covid19", 0.25, ",covid19,")
    assert flagged_findings([child, adult], CARD) == ",covid19,"
    # Without its own thresholds the same film is judged at the study's, exactly as before.
    plain = InstanceOutcome("1.1", StudyState.SCORED, scores=child.scores)
    d = decide([plain, adult], CARD, cfg)
    assert d.priority_reason == "urgent: pneumonia 0.60 ≥ 0.41" and d.flagged_findings == ",pneumonia,"
    # One population: carrying the study's own thresholds changes nothing.
    same = InstanceOutcome("1.1", StudyState.SCORED, scores=child.scores, thresholds=CARD)
    assert decide([same, adult], CARD, cfg) == decide([plain, adult], CARD, cfg)


def test_per_instance_thresholds_and_steering_together() -> None:
    cfg = TriageConfig()
    spec_low = {"pneumonia", "covid19"}  # mass informational, as with the shipped card
    paediatric = {"pneumonia": 0.8, "mass": 0.05, "covid19": 0.6}
    child = InstanceOutcome(
        "1.1", StudyState.SCORED, scores={"pneumonia": 0.5, "mass": 0.1, "covid19": 0.1}, thresholds=paediatric
    )
    d = decide([child], CARD, cfg, steering=spec_low)
    assert d.priority == Level.ROUTINE  # pneumonia 0.50 is below the child's 0.80 though above the adult 0.41
    assert d.priority_reason == (
        "routine: no finding above threshold (closest: pneumonia 0.50 < 0.80); "
        "informational, not steering: mass 0.10 ≥ 0.05"
    )
    assert d.flagged_findings == ",mass,"

"""Typed SQLAlchemy 2 models: studies, series, instances and the study state machine.

The same schema runs on SQLite (embedded default) and PostgreSQL (production), so only
portable column types are used and every timestamp is stored timezone-aware in UTC.
"""

from __future__ import annotations

import enum
from datetime import UTC, datetime

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    DateTime,
    Float,
    ForeignKey,
    Index,
    Integer,
    String,
    Text,
    UniqueConstraint,
    text,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship
from sqlalchemy.types import TypeDecorator


def utcnow() -> datetime:
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """Timezone-aware UTC datetimes on both backends (SQLite drops tzinfo on the way back)."""

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        return value.astimezone(UTC) if value is not None else None

    def process_result_value(self, value: datetime | None, dialect: object) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


class StudyState(enum.StrEnum):
    """receiving -> queued -> processing -> scored | ineligible(reason) | failed(reason)."""

    RECEIVING = "receiving"
    QUEUED = "queued"
    PROCESSING = "processing"
    SCORED = "scored"
    INELIGIBLE = "ineligible"
    FAILED = "failed"


TERMINAL_STATES = frozenset({StudyState.SCORED, StudyState.INELIGIBLE, StudyState.FAILED})
PENDING_STATES = (StudyState.RECEIVING, StudyState.QUEUED, StudyState.PROCESSING)


class AiState(enum.StrEnum):
    """What a radiologist needs of the pipeline's state: the AI's answer, or that it is pending."""

    SCORED = "scored"
    INELIGIBLE = "ineligible"
    FAILED = "failed"
    PENDING = "pending"


def ai_state_of(state: str | StudyState) -> AiState:
    """The one mapping from a study's pipeline state to what the worklist shows."""
    study_state = StudyState(state)
    return AiState(study_state.value) if study_state in TERMINAL_STATES else AiState.PENDING


class ReadState(enum.StrEnum):
    """Where the radiologist's reading of a study stands (the worklist's, not the pipeline's)."""

    UNREAD = "unread"
    IN_PROGRESS = "in_progress"
    READ = "read"


class Role(enum.StrEnum):
    RADIOLOGIST = "radiologist"
    ADMIN = "admin"


class Base(DeclarativeBase):
    type_annotation_map = {datetime: UTCDateTime}  # noqa: RUF012 - read once by SQLAlchemy, never mutated


class Study(Base):
    __tablename__ = "study"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_uid: Mapped[str] = mapped_column(String(64), unique=True)
    accession_number: Mapped[str | None] = mapped_column(String(64))
    patient_id: Mapped[str | None] = mapped_column(String(64))
    patient_name: Mapped[str | None] = mapped_column(String(324))
    patient_sex: Mapped[str | None] = mapped_column(String(16))
    patient_birth_date: Mapped[str | None] = mapped_column(String(8))
    study_date: Mapped[str | None] = mapped_column(String(8))
    study_time: Mapped[str | None] = mapped_column(String(16))
    description: Mapped[str | None] = mapped_column(String(64))
    # Requested priority carried by the order (e.g. STAT/HIGH/ROUTINE), used for routing.
    requested_priority: Mapped[str | None] = mapped_column(String(16))
    calling_ae: Mapped[str] = mapped_column(String(16))
    calling_host: Mapped[str | None] = mapped_column(String(64))

    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_instance_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When an association that delivered instances of it was released (A-RELEASE): the sender
    # says it is done, so the hand-off need not wait out the stability window.  Only counts
    # while no instance arrived after it.
    released_at: Mapped[datetime | None] = mapped_column()
    state: Mapped[StudyState] = mapped_column(String(16), default=StudyState.RECEIVING)
    state_reason: Mapped[str | None] = mapped_column(Text)
    state_changed_at: Mapped[datetime] = mapped_column(default=utcnow)
    queued_at: Mapped[datetime | None] = mapped_column()
    processing_at: Mapped[datetime | None] = mapped_column()
    # The worker process scoring it (its heartbeat row's name): a stopped heartbeat re-queues it.
    processing_by: Mapped[str | None] = mapped_column(String(128))
    finished_at: Mapped[datetime | None] = mapped_column()
    # Seconds from the end of the push (the association's release, else the last instance) to
    # the committed priority: the "time to notification" the metrics report.
    time_to_priority_s: Mapped[float | None] = mapped_column(Float)
    # Bumped every time the study is handed to the queue; a message carries it so a stale or
    # duplicated message (older generation) can be recognised by the worker.
    handoff_generation: Mapped[int] = mapped_column(Integer, default=0)
    queue_name: Mapped[str | None] = mapped_column(String(64))
    # Triage result (filled by the worker; NULL until scored).
    priority: Mapped[int | None] = mapped_column(Integer)
    priority_reason: Mapped[str | None] = mapped_column(Text)
    # What the model alone would have set (equals `priority` unless triage runs in silent mode).
    ai_priority: Mapped[int | None] = mapped_column(Integer)
    # None while not final; "AI unavailable – read as usual" for failed/ineligible studies.
    ai_state: Mapped[str | None] = mapped_column(Text)
    model_ref: Mapped[str | None] = mapped_column(String(128))
    # The finding that set the priority (highest margin over its threshold, else the closest
    # miss) and its score; `flagged_findings` is ",pneumonia,covid19," so the worklist can
    # filter by finding with one portable LIKE.  NULL until scored.
    top_finding: Mapped[str | None] = mapped_column(String(32))
    top_score: Mapped[float | None] = mapped_column(Float)
    flagged_findings: Mapped[str | None] = mapped_column(String(128))
    # The flagged findings that steer the priority, same form: what the worklist row names
    # (an informational finding is flagged but never steers); "," when none does.  NULL until
    # scored, and for studies scored before it was recorded.
    steering_findings: Mapped[str | None] = mapped_column(String(128))
    # Reading state, set from the worklist (who and when, also in the audit table).
    read_state: Mapped[ReadState] = mapped_column(String(16), default=ReadState.UNREAD)
    read_by: Mapped[str | None] = mapped_column(String(64))
    read_state_at: Mapped[datetime | None] = mapped_column()

    series: Mapped[list[Series]] = relationship(back_populates="study", cascade="all, delete-orphan")
    transitions: Mapped[list[StateTransition]] = relationship(
        back_populates="study", cascade="all, delete-orphan", order_by="StateTransition.id"
    )

    __table_args__ = (
        Index("ix_study_state_last_instance", "state", "last_instance_at"),
        # The worklist reads each priority level as a range of this index (worklist/queries.py).
        # No index on received_at alone (migration 0004): arrival order is physical order, so
        # the planner would walk it and filter on priority instead of reading these ranges.
        Index("ix_study_priority_received", "priority", "received_at", "id"),
        # The same ranges within one read state (the "unread" view) and among flagged studies
        # (the finding filter: `flagged_findings LIKE ...` implies IS NOT NULL).
        Index("ix_study_read_state_priority", "read_state", "priority", "received_at", "id"),
        Index(
            "ix_study_flagged_priority",
            "priority",
            "received_at",
            "id",
            postgresql_where=text("flagged_findings IS NOT NULL"),
            sqlite_where=text("flagged_findings IS NOT NULL"),
        ),
        Index("ix_study_calling_ae", "calling_ae", "received_at"),
        Index("ix_study_study_date", "study_date"),
    )


class StateTransition(Base):
    """Every state change of a study, with its time and reason: the audit trail of the pipeline."""

    __tablename__ = "state_transition"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    from_state: Mapped[str | None] = mapped_column(String(16))
    to_state: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    at: Mapped[datetime] = mapped_column(default=utcnow)

    study: Mapped[Study] = relationship(back_populates="transitions")


class Series(Base):
    __tablename__ = "series"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    series_uid: Mapped[str] = mapped_column(String(64), unique=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    modality: Mapped[str | None] = mapped_column(String(16))
    body_part: Mapped[str | None] = mapped_column(String(64))
    view_position: Mapped[str | None] = mapped_column(String(16))
    series_number: Mapped[int | None] = mapped_column(Integer)
    description: Mapped[str | None] = mapped_column(String(64))

    study: Mapped[Study] = relationship(back_populates="series")
    instances: Mapped[list[Instance]] = relationship(back_populates="series", cascade="all, delete-orphan")


class Instance(Base):
    __tablename__ = "instance"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    # 1 for the first copy; a later push of the same UID with different bytes is version 2, ...
    version: Mapped[int] = mapped_column(Integer, default=1)
    series_id: Mapped[int] = mapped_column(ForeignKey("series.id", ondelete="CASCADE"), index=True)
    sop_class_uid: Mapped[str] = mapped_column(String(64))
    transfer_syntax_uid: Mapped[str] = mapped_column(String(64))
    instance_number: Mapped[int | None] = mapped_column(Integer)
    spool_path: Mapped[str] = mapped_column(Text)
    sha256: Mapped[str] = mapped_column(String(64))
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(default=utcnow)
    calling_ae: Mapped[str] = mapped_column(String(16))
    # True when this version's bytes differ from an earlier version of the same UID.
    conflicting_version: Mapped[bool] = mapped_column(Boolean, default=False)

    series: Mapped[Series] = relationship(back_populates="instances")

    __table_args__ = (
        UniqueConstraint("sop_instance_uid", "version", name="uq_instance_uid_version"),
        Index("ix_instance_uid_sha", "sop_instance_uid", "sha256"),
    )


class InstanceResult(Base):
    """One instance scored by one model version: written once, whatever the redeliveries.

    The unique key (instance, model_ref) is what makes a redelivered or re-queued task a
    no-op for instances it already stored.
    """

    __tablename__ = "instance_result"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    instance_id: Mapped[int] = mapped_column(ForeignKey("instance.id", ondelete="CASCADE"))
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    model_ref: Mapped[str] = mapped_column(String(128))
    # "scored", "ineligible" or "failed", with the reason for the last two.
    outcome: Mapped[str] = mapped_column(String(16))
    reason: Mapped[str | None] = mapped_column(Text)
    scores: Mapped[dict[str, float] | None] = mapped_column(JSON)
    flags: Mapped[dict[str, bool] | None] = mapped_column(JSON)
    thresholds: Mapped[dict[str, float] | None] = mapped_column(JSON)
    # The operating point the instance was judged at ("adult" | "paediatric", from its header's
    # age): a redelivered study judges it again at the same point, steering included.
    operating_point: Mapped[str | None] = mapped_column(String(16))
    heatmaps: Mapped[dict[str, str] | None] = mapped_column(JSON)
    pipeline_version: Mapped[str] = mapped_column(String(32))
    received_at: Mapped[datetime | None] = mapped_column()
    queued_at: Mapped[datetime | None] = mapped_column()
    started_at: Mapped[datetime] = mapped_column()
    finished_at: Mapped[datetime] = mapped_column()

    __table_args__ = (UniqueConstraint("instance_id", "model_ref", name="uq_result_instance_model"),)


class ExportState(enum.StrEnum):
    """pending -> sent | export_failed; held (silent mode), superseded (a newer result replaced it)."""

    PENDING = "pending"
    SENT = "sent"
    FAILED = "export_failed"
    HELD = "held"
    SUPERSEDED = "superseded"


class Export(Base):
    """One scored result of a study on its way to one destination (a PACS or a RIS).

    Written in the transaction that stores the result (so nothing scored is forgotten), then
    sent by its own task.  ``objects`` lists what was, or will be, sent: kind, SOP Instance
    UID (DICOM) or control id (HL7), a label and the last status per object.
    """

    __tablename__ = "export"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    destination: Mapped[str] = mapped_column(String(32))
    kind: Mapped[str] = mapped_column(String(8))
    generation: Mapped[int] = mapped_column(Integer)
    model_ref: Mapped[str] = mapped_column(String(128))
    state: Mapped[ExportState] = mapped_column(String(16), default=ExportState.PENDING)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    objects: Mapped[list[dict[str, str]] | None] = mapped_column(JSON)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow)
    # When a task should (again) try it; also the lease of a running attempt, so the sweeper
    # re-publishes only exports whose message was lost.
    next_attempt_at: Mapped[datetime | None] = mapped_column()
    sent_at: Mapped[datetime | None] = mapped_column()

    __table_args__ = (
        UniqueConstraint("study_id", "destination", "generation", name="uq_export_study_destination_generation"),
        Index("ix_export_state_next", "state", "next_attempt_at"),
    )


class TruthLabel(enum.StrEnum):
    """What a radiologist (or an imported reference) says of one finding in a study."""

    PRESENT = "present"
    ABSENT = "absent"
    UNCERTAIN = "uncertain"


class GroundTruth(Base):
    """The current reference label of one finding in one study, with who set it and how.

    Changes are kept in the audit trail; this row is what measurements use.  ``source`` is
    ``radiologist`` (the study page or API) or ``import`` (a CSV of a retrospective check).
    """

    __tablename__ = "ground_truth"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    study_id: Mapped[int] = mapped_column(ForeignKey("study.id", ondelete="CASCADE"), index=True)
    finding: Mapped[str] = mapped_column(String(32))
    label: Mapped[TruthLabel] = mapped_column(String(16))
    source: Mapped[str] = mapped_column(String(16))
    recorded_by: Mapped[str | None] = mapped_column(String(64))
    recorded_at: Mapped[datetime] = mapped_column(default=utcnow)

    __table_args__ = (UniqueConstraint("study_id", "finding", name="uq_ground_truth_study_finding"),)


class SiteOverride(Base):
    """One audited change of a site setting made in the web app: append-only.

    ``key`` is ``threshold:<finding>`` (a site threshold; null returns the finding to the
    card's) or ``silent_mode``.  The current value of a key is its newest row; a rollback is a
    new row whose value is an earlier row's ``previous``.  The configuration file stays the
    base these override.
    """

    __tablename__ = "site_override"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    key: Mapped[str] = mapped_column(String(64), index=True)
    value: Mapped[object | None] = mapped_column(JSON)
    previous: Mapped[object | None] = mapped_column(JSON)
    set_by: Mapped[str] = mapped_column(String(64))
    set_at: Mapped[datetime] = mapped_column(default=utcnow)
    # What the decision rests on, e.g. the site report's folder name.
    evidence: Mapped[str] = mapped_column(Text)
    # Set on a rollback: the row it undid.
    rolls_back: Mapped[int | None] = mapped_column(Integer)


class User(Base):
    """A worklist user; the password is stored only as an argon2id hash (salted, slow)."""

    __tablename__ = "app_user"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    username: Mapped[str] = mapped_column(String(64), unique=True)
    password_hash: Mapped[str] = mapped_column(String(256))
    role: Mapped[Role] = mapped_column(String(16), default=Role.RADIOLOGIST)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class UserSession(Base):
    """A logged-in session, held server-side so that logging out really ends it.

    The cookie carries a random token; only its SHA-256 is stored, so a copy of the database
    cannot be replayed as a login.
    """

    __tablename__ = "user_session"

    token_sha256: Mapped[str] = mapped_column(String(64), primary_key=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("app_user.id", ondelete="CASCADE"), index=True)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    revoked_at: Mapped[datetime | None] = mapped_column()


class AuditEvent(Base):
    """Who viewed or changed what, and when: every study view and every state change."""

    __tablename__ = "audit_event"
    __table_args__ = (Index("ix_audit_event_action_user_at", "action", "username", "at"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    username: Mapped[str | None] = mapped_column(String(64), index=True)
    action: Mapped[str] = mapped_column(String(32))
    study_uid: Mapped[str | None] = mapped_column(String(64), index=True)
    detail: Mapped[str | None] = mapped_column(Text)


class WorkerHeartbeat(Base):
    """One row per worker process, refreshed while it runs: what the admin page and /healthz read."""

    __tablename__ = "worker_heartbeat"

    name: Mapped[str] = mapped_column(String(128), primary_key=True)
    hostname: Mapped[str] = mapped_column(String(128))
    pid: Mapped[int] = mapped_column(Integer)
    queues: Mapped[str] = mapped_column(Text)
    model_ref: Mapped[str | None] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    tasks_done: Mapped[int] = mapped_column(Integer, default=0)

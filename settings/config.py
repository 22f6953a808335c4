"""The one configuration object for every xray-triage process.

Hospital IT edits one YAML file; any key can be overridden by an environment variable
``XRAY_TRIAGE_<SECTION>__<KEY>`` (e.g. ``XRAY_TRIAGE_LISTENER__PORT=11112``) so containers
and test harnesses need no file at all.  Validation happens once, at start-up, and every
error names the dotted key that is wrong, because a listener that starts with a half-valid
configuration is worse than one that refuses to start.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import unquote, urlsplit

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

CONFIG_ENV = "XRAY_TRIAGE_CONFIG"
ENV_PREFIX = "XRAY_TRIAGE_"
# The data folder (spool, databases, heatmaps): $XRAY_TRIAGE_VAR, else var/ under $XRAY_TRIAGE_HOME,
# else var/ under the configuration file's folder (or the working folder without a file).
HOME_ENV = "XRAY_TRIAGE_HOME"
DEFAULT_VAR_DIR = Path(os.environ.get("XRAY_TRIAGE_VAR", "var"))

# Storage SOP classes the listener can accept.  Keys are the short names IT staff
# write in the configuration; values are the SOP Class UIDs.
STORAGE_SOP_CLASSES: dict[str, str] = {
    "CR": "1.2.840.10008.5.1.4.1.1.1",  # Computed Radiography Image Storage
    "DX_PRESENTATION": "1.2.840.10008.5.1.4.1.1.1.1",  # Digital X-Ray, For Presentation
    "DX_PROCESSING": "1.2.840.10008.5.1.4.1.1.1.1.1",  # Digital X-Ray, For Processing
    "SC": "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture Image Storage
}

# Transfer syntaxes accepted for storage; instances are stored exactly as received.
TRANSFER_SYNTAXES: dict[str, str] = {
    "IMPLICIT_VR_LITTLE_ENDIAN": "1.2.840.10008.1.2",
    "EXPLICIT_VR_LITTLE_ENDIAN": "1.2.840.10008.1.2.1",
    "DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN": "1.2.840.10008.1.2.1.99",
    "EXPLICIT_VR_BIG_ENDIAN": "1.2.840.10008.1.2.2",
    "JPEG_BASELINE": "1.2.840.10008.1.2.4.50",
    "JPEG_EXTENDED": "1.2.840.10008.1.2.4.51",
    "JPEG_LOSSLESS_P14": "1.2.840.10008.1.2.4.57",
    "JPEG_LOSSLESS_SV1": "1.2.840.10008.1.2.4.70",
    "JPEG_LS_LOSSLESS": "1.2.840.10008.1.2.4.80",
    "JPEG_LS_NEAR_LOSSLESS": "1.2.840.10008.1.2.4.81",
    "JPEG_2000_LOSSLESS": "1.2.840.10008.1.2.4.90",
    "JPEG_2000": "1.2.840.10008.1.2.4.91",
    "RLE_LOSSLESS": "1.2.840.10008.1.2.5",
}

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # DICOM AE VR: no backslash, no control chars


def _check_ae(value: str) -> str:
    stripped = value.strip()
    if not stripped or not _AE_RE.match(value):
        raise ValueError("must be 1-16 printable ASCII characters without backslash")
    return stripped


AETitle = Annotated[str, AfterValidator(_check_ae)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class AllowedCaller(_Section):
    """A calling AE title that may associate, optionally pinned to the host it must come from."""

    ae_title: AETitle
    host: str | None = None


class ListenerTlsConfig(_Section):
    """DICOM TLS (PS3.15 Annex B) on the listener's port; see docs/conformance.md."""

    cert_file: Path
    key_file: Path
    # The site CA that signs the senders' client certificates (required for mutual authentication).
    ca_file: Path | None = None
    require_client_cert: bool = False

    @model_validator(mode="after")
    def _ca_for_clients(self) -> ListenerTlsConfig:
        # Without a CA no client certificate can be verified: every sender would be refused.
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert needs ca_file (the CA that signs the senders' certificates)")
        return self


class ListenerConfig(_Section):
    ae_title: AETitle = "XRAY_TRIAGE"
    bind_address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 11112
    # None: any calling AE is accepted (a warning is printed at start-up).
    allowed_callers: list[AllowedCaller] | None = None
    # A deployment reachable from the hospital network sets this: start-up then refuses a
    # listener without `allowed_callers` instead of only warning (the container profile does).
    require_allowed_callers: bool = False
    # Where other processes (the web app's /healthz, `run`) reach the listener; default: its
    # bind address, or 127.0.0.1 when bound to every interface.  In a container deployment the
    # web app's container names the listener's service here.
    probe_host: str | None = None
    max_associations: Annotated[int, Field(ge=1, le=1000)] = 10
    # Maximum PDU we are willing to receive; 0 means unlimited (fewer, larger PDUs are faster).
    max_pdu: Annotated[int, Field(ge=0)] = 262144
    sop_classes: list[str] = Field(default_factory=lambda: list(STORAGE_SOP_CLASSES))
    transfer_syntaxes: list[str] = Field(default_factory=lambda: list(TRANSFER_SYNTAXES))
    acse_timeout_s: Annotated[float, Field(gt=0)] = 30.0
    dimse_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    network_timeout_s: Annotated[float, Field(gt=0)] = 60.0
    # A connection must finish its A-ASSOCIATE exchange within this many seconds of opening, or
    # it is closed: a peer that dribbles bytes never holds a slot or a thread for longer.
    association_deadline_s: Annotated[float, Field(gt=0, le=300)] = 20.0
    # When set, the listener's port speaks DICOM TLS only.
    tls: ListenerTlsConfig | None = None

    @model_validator(mode="after")
    def _callers_required(self) -> ListenerConfig:
        if self.require_allowed_callers and not self.allowed_callers:
            raise ValueError(
                "allowed_callers is required (require_allowed_callers is set): list the calling AE titles,"
                ' e.g. XRAY_TRIAGE_LISTENER__ALLOWED_CALLERS=\'[{"ae_title": "PACS"}]\''
            )
        return self

    @field_validator("max_pdu")
    @classmethod
    def _pdu(cls, v: int) -> int:
        if v != 0 and v < 4096:
            raise ValueError("must be 0 (unlimited) or at least 4096 bytes")
        return v

    @field_validator("sop_classes")
    @classmethod
    def _sops(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in STORAGE_SOP_CLASSES]
        if unknown:
            raise ValueError(f"unknown SOP class {unknown}; choose from {sorted(STORAGE_SOP_CLASSES)}")
        return v

    @field_validator("transfer_syntaxes")
    @classmethod
    def _tss(cls, v: list[str]) -> list[str]:
        unknown = [s for s in v if s not in TRANSFER_SYNTAXES]
        if unknown:
            raise ValueError(f"unknown transfer syntax {unknown}; choose from {sorted(TRANSFER_SYNTAXES)}")
        return v

    def sop_class_uids(self) -> list[str]:
        return [STORAGE_SOP_CLASSES[s] for s in self.sop_classes]

    def transfer_syntax_uids(self) -> list[str]:
        return [TRANSFER_SYNTAXES[t] for t in self.transfer_syntaxes]


class StorageConfig(_Section):
    spool_dir: Path = DEFAULT_VAR_DIR / "spool"
    # Below this much free space the listener refuses new instances (0xA700) instead of
    # filling the disk the PACS relay and the database also live on.
    min_free_mb: Annotated[int, Field(ge=0)] = 1024


# Passwords that example files and tutorials ship with.  A deployment still using one has an
# account anyone can guess, so start-up refuses it rather than warn.
PLACEHOLDER_PASSWORDS = frozenset({"change-me", "changeme", "change_me", "password", "secret"})


def _no_placeholder_password(url: str) -> str:
    try:
        password = urlsplit(url).password
    except ValueError:
        return url
    if password is not None and unquote(password).lower() in PLACEHOLDER_PASSWORDS:
        raise ValueError(f"uses the placeholder password {unquote(password)!r}: set a real one (see .env.example)")
    return url


class DatabaseConfig(_Section):
    url: str = f"sqlite:///{DEFAULT_VAR_DIR / 'xray-triage.db'}"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(sqlite|postgresql)(\+\w+)?://", v):
            raise ValueError("must be a sqlite:/// or postgresql+psycopg:// URL")
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v[len("postgresql://") :]
        return _no_placeholder_password(v)


class BrokerConfig(_Section):
    # Embedded default: kombu's SQLAlchemy transport on a SQLite file: durable, no server.
    url: str = f"sqla+sqlite:///{DEFAULT_VAR_DIR / 'broker.db'}"

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not re.match(r"^(sqla\+sqlite|sqla\+postgresql(\+\w+)?|redis|rediss|memory)://", v):
            raise ValueError("must be redis://host:port/db or the embedded sqla+sqlite:///path")
        return _no_placeholder_password(v)


# A study records its queue's name (64 characters in the database).
QueueName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^\S+$")]


class QueuesConfig(_Section):
    urgent: QueueName = "xray-triage.urgent"
    routine: QueueName = "xray-triage.routine"
    # Calling AE titles whose studies always go to the urgent queue (e.g. the ED's DR room).
    urgent_calling_aes: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> QueuesConfig:
        if self.urgent == self.routine:
            raise ValueError("urgent and routine queues must have different names")
        return self


class HandoffConfig(_Section):
    # A study whose sending association was released (A-RELEASE) is queued this long after the
    # release, unless another instance arrives meanwhile: the sender said it is done.
    release_grace_s: Annotated[float, Field(ge=0, le=60)] = 0.5
    # Otherwise (an aborted association, a sender still connected or one that splits a study
    # across associations) a study is handed to the worker once no instance has arrived for this long.
    stability_window_s: Annotated[float, Field(ge=0.1, le=3600)] = 5.0
    poll_interval_s: Annotated[float, Field(gt=0, le=60)] = 0.5


class TriageConfig(_Section):
    """Triage policy (docs/triage.md): priority from per-finding thresholds, escalation by waiting time.

    Thresholds default to the model card's operating points; a site overrides them here after
    checking the model on its own data, ideally first with ``silent_mode`` on (scores are
    recorded, the worklist order stays by time).
    """

    silent_mode: bool = False
    # Per-finding overrides of the model card's thresholds: a score >= threshold makes the study urgent.
    thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(default_factory=dict)
    # A score >= this makes the study critical (findings absent here never make it critical).
    critical_thresholds: dict[str, Annotated[float, Field(ge=0, le=1)]] = Field(
        default_factory=lambda: {"pneumonia": 0.9, "covid19": 0.9}
    )
    # A finding raises the priority only if the model card's validation specificity at its
    # operating threshold reaches this: a finding that flags most normal films (e.g. mass at
    # specificity 0.08) would make every study urgent and the order meaningless.  Such a
    # finding is still scored, flagged, shown and filterable; a site threshold for it in
    # `thresholds` (checked on its own data) makes it steer again.
    min_steering_specificity: Annotated[float, Field(ge=0, le=1)] = 0.5
    # ... and only if the evidence that it works on adults is not weak: the lower end of the
    # 95 % interval of its adult within-collection AUC (model card `steering_evidence`, test
    # split: e.g. NIH pneumonia vs NIH "No Finding") must reach this.  Pooled AUCs do not count:
    # they can be won by recognising collections.  A site threshold override steers regardless.
    min_steering_within_auc: Annotated[float, Field(ge=0, le=1)] = 0.6
    # An interval from fewer images than this per class is no evidence at all: a bootstrap of a
    # dozen films gives an interval far narrower than what the model would show elsewhere.
    min_steering_evidence_images: Annotated[int, Field(ge=1)] = 20
    # A study waiting longer than this (minutes since its first instance) rises one level.
    escalate_after_min: dict[str, Annotated[float, Field(gt=0)]] = Field(
        default_factory=lambda: {"routine": 240.0, "urgent": 60.0}
    )

    @field_validator("escalate_after_min")
    @classmethod
    def _levels(cls, v: dict[str, float]) -> dict[str, float]:
        unknown = [k for k in v if k not in ("routine", "urgent")]
        if unknown:
            raise ValueError(f"unknown level {unknown}; choose from ['routine', 'urgent']")
        return v


class WorkerConfig(_Section):
    """Scoring worker: retries, the sweeper that re-queues lost studies, where heatmaps go."""

    # Each worker process writes a heartbeat row this often (admin page, /healthz).
    heartbeat_interval_s: Annotated[float, Field(gt=0, le=300)] = 15.0
    heatmap_dir: Path = DEFAULT_VAR_DIR / "heatmaps"
    # Images per forward pass.
    batch_size: Annotated[int, Field(ge=1, le=256)] = 16
    # A task scores up to this many studies at once: its own and others already waiting in the
    # queues it serves (never waiting for more to arrive); 1 scores one study per task.
    batch_studies: Annotated[int, Field(ge=1, le=256)] = 16
    # Transient errors (database or broker unreachable): countdown = min(cap, base * 2**retries).
    retry_base_s: Annotated[float, Field(gt=0)] = 1.0
    retry_cap_s: Annotated[float, Field(gt=0)] = 60.0
    max_retries: Annotated[int, Field(ge=0)] = 20
    # The sweeper (in the listener process, beside the hand-off) re-queues a study left in
    # `queued` or `processing` longer than these, e.g. after its message died with a broker.
    queued_timeout_s: Annotated[float, Field(gt=0)] = 600.0
    processing_timeout_s: Annotated[float, Field(gt=0)] = 1800.0
    # A study whose worker's heartbeat is older than this is re-queued by the sweeper (a worker
    # killed outright); three missed heartbeats at the default interval.
    dead_worker_after_s: Annotated[float, Field(gt=0)] = 45.0
    # Heartbeat rows of workers silent this long are deleted (the admin page forgets them).
    heartbeat_expire_s: Annotated[float, Field(gt=0)] = 24 * 3600.0
    # Often enough that a dead worker's study is re-queued within about a minute (45 s + 10 s).
    sweep_interval_s: Annotated[float, Field(gt=0)] = 10.0


class ModelConfig(_Section):
    # Folder with model.keras + card.json, or a .keras file; None: $XRAY_TRIAGE_MODEL, else models/default.
    path: str | None = None
    # A second model scored after the primary on the same studies, stored under its own version,
    # compared on the Performance page; it never steers, never flags a study, never exports.
    shadow_path: str | None = None


class PixelsConfig(_Section):
    """Limits checked against the declared image size BEFORE any pixel buffer is allocated.

    A hostile or broken instance declaring 65535x65535 must be refused with a typed error,
    not take the worker down with a multi-gigabyte allocation.
    """

    max_rows: Annotated[int, Field(ge=1, le=65535)] = 8192
    max_columns: Annotated[int, Field(ge=1, le=65535)] = 8192
    # Bytes of ONE decoded frame (Rows x Columns x Samples x Bits Allocated / 8).
    max_pixel_bytes: Annotated[int, Field(ge=1)] = 128 * 1024 * 1024
    max_frames: Annotated[int, Field(ge=1)] = 4096


class HeaderlessImageConfig(_Section):
    """Plain out-of-scope checks on a PNG or JPEG, which has no header to judge it by.

    The defaults keep every one of the 12,249 PNG/JPEG chest films of the training collections
    in scope, with room to spare (scripts/measure_image_scope.py prints the figures; see
    docs/pixel-path.md, "Images without a DICOM header").
    """

    # A shorter side below this many pixels is a thumbnail: the smallest training films are
    # 224x224 (Kermany, the RSNA normals), the model's own input size.
    min_side: Annotated[int, Field(ge=1, le=65535)] = 128
    # Longer side over shorter side above this: a strip or a panorama, not a frontal chest film
    # (the most elongated training film is 1.76, real cassettes 1.0 to 1.3).
    max_aspect: Annotated[float, Field(ge=1.0)] = 2.0
    # A pixel is coloured when its channels differ by more than this share of the full scale
    # (the Kermany films, grey saved as RGB JPEG, differ by 0 levels) ...
    colour_level: Annotated[float, Field(gt=0.0, le=1.0)] = 0.1
    # ... and more than this share of coloured pixels makes a colour picture (no training film
    # has any; colour photographs 43 to 86 %), while coloured arrows drawn on a film stay under it.
    max_colour_share: Annotated[float, Field(ge=0.0, le=1.0)] = 0.05
    # The 1st..99th percentile of the grey levels spanning less than this share of the full
    # scale is a nearly blank image, whatever the window would stretch it to (training films
    # span 0.25 or more).
    min_contrast: Annotated[float, Field(ge=0.0, lt=1.0)] = 0.05


class EligibilityConfig(_Section):
    """Which instances are frontal chest radiographs the models may score.

    Matching is case-insensitive on the DICOM Code String values; hints are whole words
    searched in the free-text attributes named in ``hint_attributes``.
    """

    modalities: list[str] = Field(default_factory=lambda: ["CR", "DX"])
    body_parts: list[str] = Field(default_factory=lambda: ["CHEST"])
    # Empty Body Part Examined is accepted only when View Position says PA or AP.
    allow_empty_body_part: bool = True
    view_positions: list[str] = Field(default_factory=lambda: ["PA", "AP"])
    # Empty View Position is accepted only when no lateral hint is found in the descriptions.
    allow_empty_view_position: bool = True
    lateral_hints: list[str] = Field(
        default_factory=lambda: ["LAT", "LATERAL", "LL", "RL", "LLD", "RLD", "SEITLICH", "PROFIL", "LATERALE"]
    )
    non_human_hints: list[str] = Field(
        default_factory=lambda: [
            "CANINE", "FELINE", "EQUINE", "BOVINE", "PORCINE", "OVINE", "MURINE",
            "DOG", "CAT", "HORSE", "VETERINARY", "VETERINARIAN", "VET",
        ]
    )  # fmt: skip
    hint_attributes: list[str] = Field(
        default_factory=lambda: [
            "SeriesDescription",
            "ProtocolName",
            "AcquisitionDeviceProcessingDescription",
            "PerformedProcedureStepDescription",
            "InstitutionName",
            "PatientSpeciesDescription",
            "PatientBreedDescription",
        ]
    )
    allow_multiframe: bool = False
    min_rows: Annotated[int, Field(ge=1)] = 256
    min_columns: Annotated[int, Field(ge=1)] = 256
    max_rows: Annotated[int, Field(ge=1)] = 8192
    max_columns: Annotated[int, Field(ge=1)] = 8192
    # PNG/JPEG files, judged by their pixels (dicom_io.image_scope).
    headerless: HeaderlessImageConfig = HeaderlessImageConfig()

    @field_validator("modalities", "body_parts", "view_positions", "lateral_hints", "non_human_hints")
    @classmethod
    def _upper(cls, v: list[str]) -> list[str]:
        return [s.strip().upper() for s in v if s.strip()]


ExportObject = Literal["sr", "heatmaps"]


class ExportDestination(_Section):
    """A PACS (``dicom``: C-STORE of the SR and heatmap images) or a RIS (``hl7``: ORU^R01 over MLLP)."""

    name: Annotated[str, Field(min_length=1, max_length=32, pattern=r"^[A-Za-z0-9_.-]+$")]
    kind: Literal["dicom", "hl7"]
    host: Annotated[str, Field(min_length=1, max_length=253)]
    port: Annotated[int, Field(ge=1, le=65535)]
    # The called AE title of a DICOM destination.
    ae_title: AETitle | None = None
    # DICOM objects sent there (default: all kinds); an hl7 destination gets the priority message.
    objects: list[ExportObject] | None = None
    # MSH-5 and MSH-6 of an hl7 destination (the RIS's application and facility), if it wants them.
    receiving_application: str = ""
    receiving_facility: str = ""

    @model_validator(mode="after")
    def _kind_fields(self) -> ExportDestination:
        if self.kind == "dicom" and self.ae_title is None:
            raise ValueError(f"destination {self.name!r}: a dicom destination needs ae_title")
        if self.kind == "hl7" and self.objects:
            raise ValueError(f"destination {self.name!r}: objects applies to dicom destinations only")
        return self

    @property
    def object_kinds(self) -> tuple[str, ...]:
        if self.kind == "hl7":
            return ("oru",)
        return tuple(self.objects) if self.objects else ("sr", "heatmaps")


class ExportConfig(_Section):
    """Results sent back to the PACS and the RIS, one Celery task per (study, destination)."""

    destinations: list[ExportDestination] = Field(default_factory=list)
    queue: QueueName = "xray-triage.export"
    # Our calling AE title towards DICOM destinations.
    calling_ae_title: AETitle = "XRAY_TRIAGE"
    # MSH-4 of the HL7 messages.
    sending_facility: str = ""
    # Silent mode scores without steering; nothing leaves either, unless this is set.
    in_silent_mode: bool = False
    retry_base_s: Annotated[float, Field(gt=0)] = 5.0
    retry_cap_s: Annotated[float, Field(gt=0)] = 300.0
    # Attempts per (study, destination) before it is export_failed (an admin can retry it).
    max_attempts: Annotated[int, Field(ge=1, le=1000)] = 10
    # Bound on connecting, association negotiation, each DIMSE exchange and an HL7 ACK.
    timeout_s: Annotated[float, Field(gt=0, le=600)] = 30.0
    # Export worker processes that `xray-triage run` starts when destinations are configured.
    concurrency: Annotated[int, Field(ge=1, le=32)] = 2

    @model_validator(mode="after")
    def _unique(self) -> ExportConfig:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"destination names must be unique: {', '.join(dupes)}")
        return self

    def destination(self, name: str) -> ExportDestination | None:
        return next((d for d in self.destinations if d.name == name), None)


class MonitoringConfig(_Section):
    """The Performance page and `site-report` (docs/monitoring.md)."""

    # Population stability index of a finding's scores against the card's validation
    # distribution at or above which the page raises a drift alarm (0.25: a major shift).
    psi_alarm: Annotated[float, Field(gt=0)] = 0.25
    # PSI over a handful of studies is noise (an empty tenth alone scores 0.2): no drift
    # judgement below this many scored studies in the period.
    min_drift_studies: Annotated[int, Field(ge=1)] = 50
    # Bootstrap replicates behind every interval (sensitivity, specificity, PPV, AUC).
    bootstrap: Annotated[int, Field(ge=100, le=10000)] = 500
    # Default period of the Performance page, in days back from now.
    period_days: Annotated[int, Field(ge=1, le=3650)] = 30


class WebConfig(_Section):
    """The worklist web app and JSON API (``xray-triage web``, also started by ``run``)."""

    bind_address: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8080
    # Signs the session cookie.  Unset: a random key is created once in <var>/web-secret-key
    # (mode 0600), so sessions survive restarts without a secret in the configuration file.
    secret_key: str | None = Field(default=None, min_length=32)
    # Show "P***" style initials instead of patient names and IDs on every page and API answer.
    mask_patient_identity: bool = False
    session_max_age_s: Annotated[int, Field(ge=60, le=7 * 24 * 3600)] = 12 * 3600
    # Set on sites that serve the app over HTTPS (behind a reverse proxy): cookies only over TLS.
    cookie_secure: bool = False
    # The worklist page re-reads its rows this often (seconds; the issue asks for <= 10).
    refresh_s: Annotated[float, Field(ge=1, le=10)] = 5.0
    # An urgent or critical study scored less than this long ago is marked "new".
    new_marker_min: Annotated[float, Field(gt=0, le=24 * 60)] = 15.0
    page_size: Annotated[int, Field(ge=5, le=500)] = 50
    # Largest file accepted on the "analyse an image" page.
    max_upload_mb: Annotated[int, Field(ge=1, le=1024)] = 64
    # After this many failed logins for one user name within `login_lockout_min`, further
    # attempts for that name are refused (429) until the window has passed.
    login_max_failures: Annotated[int, Field(ge=1, le=100)] = 5
    login_lockout_min: Annotated[float, Field(gt=0, le=24 * 60)] = 15.0
    # A worker whose heartbeat is older than this is reported as missing by /healthz.
    worker_stale_s: Annotated[float, Field(gt=0)] = 90.0
    # The site's time zone (IANA name, e.g. "Europe/Berlin") every page shows times in; unset:
    # the server's own.  Stored times stay UTC; only what people read is converted.
    time_zone: str | None = None

    @field_validator("time_zone")
    @classmethod
    def _known_zone(cls, v: str | None) -> str | None:
        if v is None or not v.strip():
            return None
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(v.strip())
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r}; use an IANA name such as Europe/Berlin or UTC") from None
        return v.strip()


class Settings(_Section):
    listener: ListenerConfig = ListenerConfig()
    storage: StorageConfig = StorageConfig()
    database: DatabaseConfig = DatabaseConfig()
    broker: BrokerConfig = BrokerConfig()
    queues: QueuesConfig = QueuesConfig()
    handoff: HandoffConfig = HandoffConfig()
    pixels: PixelsConfig = PixelsConfig()
    eligibility: EligibilityConfig = EligibilityConfig()
    triage: TriageConfig = TriageConfig()
    worker: WorkerConfig = WorkerConfig()
    model: ModelConfig = ModelConfig()
    web: WebConfig = WebConfig()
    export: ExportConfig = ExportConfig()
    monitoring: MonitoringConfig = MonitoringConfig()
    log_level: str = "INFO"

    @field_validator("log_level")
    @classmethod
    def _level(cls, v: str) -> str:
        if v.upper() not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
            raise ValueError("must be DEBUG, INFO, WARNING or ERROR")
        return v.upper()


class ConfigError(Exception):
    """Configuration that must stop start-up; the message names the key."""


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """Nested dict from ``XRAY_TRIAGE_SECTION__KEY`` variables; values parsed as YAML scalars."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or "__" not in name:
            continue
        path = name[len(ENV_PREFIX) :].lower().split("__")
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{name}: conflicts with another override")
        node[path[-1]] = value
    return out


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def _format_error(err: ValidationError) -> str:
    parts = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "(root)"
        msg = "unknown key" if e["type"] == "extra_forbidden" else e["msg"]
        parts.append(f"{key}: {msg}")
    return "invalid configuration: " + "; ".join(parts)


def load_settings(path: str | os.PathLike[str] | None = None, environ: dict[str, str] | None = None) -> Settings:
    """Read the file (if any), apply environment overrides, validate; raise ConfigError."""
    environ = dict(os.environ if environ is None else environ)
    path = path or environ.get(CONFIG_ENV)
    data: dict[str, Any] = {}
    if path:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read configuration file {p}: {exc.strerror or exc}") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ConfigError(f"configuration file {p} is not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"configuration file {p} must hold a mapping of sections")
        data = loaded
    data = _merge(data, _env_overrides(environ))
    try:
        settings = Settings.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_format_error(exc)) from None
    home = environ.get(HOME_ENV)
    base = Path(home) if home else (Path(path).resolve().parent if path else None)
    return resolve_paths(settings, base) if base is not None else settings


def _anchored(value: Path, base: Path) -> Path:
    return value if value.is_absolute() else base / value


def _anchored_sqlite(url: str, base: Path) -> str:
    """A SQLite URL's relative file path against `base` (``sqlite:///var/x.db``; four slashes are absolute)."""
    for scheme in ("sqlite:///", "sqla+sqlite:///"):
        if url.startswith(scheme):
            rest = url[len(scheme) :]
            if rest and not rest.startswith("/") and not rest.startswith(":memory:"):
                return scheme + str(base / rest)
    return url


def resolve_paths(settings: Settings, base: Path) -> Settings:
    """Every relative path in the settings, anchored at `base` (XRAY_TRIAGE_HOME, else the config
    file's folder): the same file then means the same folders whatever the working folder, and
    ``status`` run from elsewhere neither fails nor leaves a stray ``var/``."""
    tls = settings.listener.tls
    if tls is not None:
        tls = tls.model_copy(
            update={
                "cert_file": _anchored(tls.cert_file, base),
                "key_file": _anchored(tls.key_file, base),
                "ca_file": _anchored(tls.ca_file, base) if tls.ca_file else None,
            }
        )
    model_path = settings.model.path
    if model_path and not Path(model_path).is_absolute() and (base / model_path).exists():
        model_path = str(base / model_path)  # a model folder beside the config; else a registry name
    return settings.model_copy(
        update={
            "listener": settings.listener.model_copy(update={"tls": tls}),
            "storage": settings.storage.model_copy(update={"spool_dir": _anchored(settings.storage.spool_dir, base)}),
            "database": settings.database.model_copy(update={"url": _anchored_sqlite(settings.database.url, base)}),
            "broker": settings.broker.model_copy(update={"url": _anchored_sqlite(settings.broker.url, base)}),
            "worker": settings.worker.model_copy(update={"heatmap_dir": _anchored(settings.worker.heatmap_dir, base)}),
            "model": settings.model.model_copy(update={"path": model_path}),
        }
    )


_SECRET_RE = re.compile(r"(://[^:/@]*:)([^@]*)(@)")


def mask_secrets(text: str) -> str:
    """Hide passwords embedded in URLs (``scheme://user:secret@host``)."""
    return _SECRET_RE.sub(r"\1***\3", text)


def effective_config(settings: Settings) -> dict[str, Any]:
    """The configuration as plain data, secrets masked: what `config check` and the admin page show."""
    data = json.loads(settings.model_dump_json())
    data["database"]["url"] = mask_secrets(data["database"]["url"])
    data["broker"]["url"] = mask_secrets(data["broker"]["url"])
    if data["web"]["secret_key"] is not None:
        data["web"]["secret_key"] = "***"
    for destination in data["export"]["destinations"]:
        destination["host"] = mask_host(destination["host"])
    return data


def mask_host(host: str) -> str:
    """Only the first label of a destination's address: enough to recognise it on a shared page."""
    first = re.split(r"[.:]", host, maxsplit=1)[0]
    return f"{first}.***" if first != host else "***"

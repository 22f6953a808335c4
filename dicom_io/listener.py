"""The DICOM listener: Verification and Storage SCP on pynetdicom, plus the hand-off thread.

The contract with a sending modality is the C-STORE status.  0x0000 goes out only after the
instance is fsynced under its final name *and* recorded in the database; every other outcome
is a failure status the sender will retry (low disk, database down, unparseable data), so an
instance is never acknowledged and then lost.

Received datasets are streamed by pynetdicom to a temporary file
(``STORE_RECV_CHUNKED_DATASET``) instead of being held in memory, then copied into the spool
behind our own deterministic file meta header, byte for byte as the sender encoded them.
"""

from __future__ import annotations

import logging
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, _config, evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # generated at import
from pynetdicom.transport import ThreadedAssociationServer
from sqlalchemy import Engine
from sqlalchemy.exc import DBAPIError, SQLAlchemyError
from sqlalchemy.orm import Session, sessionmaker

from db.models import utcnow
from db.session import make_engine, make_sessionmaker, session_scope
from dicom_io import association_guard, commands
from dicom_io.ingest import (
    IdentifierConflictError,
    MalformedDatasetError,
    Outcome,
    mark_released,
    read_received_file,
    record_with_retry,
)
from dicom_io.reconcile import reconcile
from dicom_io.spool import InsufficientSpaceError, Spool, SpooledFile
from dicom_io.staging import (
    IMPLEMENTATION_CLASS_UID,
    IMPLEMENTATION_VERSION_NAME,
    StagingFile,
    install,
    part10_header,
    staged_file,
    tune_socket,
)
from dicom_io.tls import server_ssl_context
from dicom_io.uids import InvalidUIDError, require_uid
from settings import Settings

log = logging.getLogger("xray_triage.listener")

# Stream received datasets to disk; never keep a 50 MB image in memory per association.
_config.STORE_RECV_CHUNKED_DATASET = True
# Identifier datasets (C-FIND etc.) carry patient names; never log them.
_config.LOG_REQUEST_IDENTIFIERS = False
_config.LOG_RESPONSE_IDENTIFIERS = False

COPY_CHUNK = 4 * 1024 * 1024

# C-STORE response statuses (PS3.4 Table B.2-1 ranges; the codes within a range are ours and
# are listed in docs/conformance.md).
SUCCESS = 0x0000
OUT_OF_RESOURCES = 0xA700
DATASET_MISMATCH = 0xA900
DATABASE_UNAVAILABLE = 0xC001
STORAGE_FAILED = 0xC002
MALFORMED_DATASET = 0xC210
INVALID_UID = 0xC212
IDENTIFIER_CONFLICT = 0xC213

_REJECT_PERMANENT = 0x01
_SOURCE_SERVICE_USER = 0x01
_DIAG_CALLING_AE_NOT_RECOGNIZED = 0x03
_REJECT_TRANSIENT = 0x02
_SOURCE_PROVIDER_PRESENTATION = 0x03
_DIAG_LOCAL_LIMIT_EXCEEDED = 0x02
# pynetdicom counts an association until its thread ends, and a connection that closes before
# a valid A-ASSOCIATE-RQ leaves its thread waiting out the ACSE timeout (30 s): a dozen garbage
# connections locked real senders out.  pynetdicom's own limit is therefore only a cap on
# threads, set well above listener.max_associations, which is enforced on established
# associations only (see open_associations).
THREAD_CAP_FACTOR = 4
THREAD_CAP_EXTRA = 64


def open_associations(ae: AE) -> int:
    """Established acceptor associations whose DICOM upper layer still runs: the ones that hold a slot.

    A connection still negotiating holds none (it must finish within
    ``listener.association_deadline_s`` or is closed), so peers that dribble an A-ASSOCIATE-RQ
    or send garbage never keep real senders out.  The DUL thread ends when the transport
    closes or aborts; the association thread may wait on for a while, serving no one.
    """
    return sum(1 for a in ae.active_associations if a.is_acceptor and a.is_established and a.dul.is_alive())


def _status(code: int, comment: str) -> Dataset:
    """A status with an Error Comment (LO, 64 chars) the sender's log can show to its operator."""
    ds = Dataset()
    ds.Status = code
    ds.ErrorComment = comment[:64]
    return ds


def _safe_error(exc: BaseException) -> str:
    """An exception as one log line that cannot carry patient data (no SQL parameters)."""
    if isinstance(exc, DBAPIError) and exc.orig is not None:
        first = str(exc.orig).strip().splitlines()[0] if str(exc.orig).strip() else ""
        return f"{type(exc.orig).__name__}: {first[:200]}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


def dataset_offset(path: Path) -> int:
    """Where the dataset starts in pynetdicom's temporary Part-10 file (after its file meta)."""
    with path.open("rb") as fp:
        head = fp.read(144)
    if len(head) < 144 or head[128:132] != b"DICM" or head[132:136] != b"\x02\x00\x00\x00":
        raise MalformedDatasetError("received file has no file meta group length")
    (group_length,) = struct.unpack("<L", head[140:144])
    return 144 + group_length


def _file_chunks(path: Path, offset: int, header: bytes) -> Iterator[bytes]:
    yield header
    with path.open("rb") as fp:
        fp.seek(offset)
        while chunk := fp.read(COPY_CHUNK):
            yield chunk


@dataclass(frozen=True)
class Caller:
    ae_title: str
    host: str


def is_allowed(caller: Caller, settings: Settings) -> bool:
    """The listener.allowed_callers policy: None allows everyone; a host, if given, must match too."""
    allowed = settings.listener.allowed_callers
    if allowed is None:
        return True
    return any(a.ae_title == caller.ae_title and (a.host is None or a.host == caller.host) for a in allowed)


def transfer_syntax_preference(requested: list[Any]) -> dict[str, list[str]]:
    """Per abstract syntax, the transfer syntaxes in the order the requestor proposed them."""
    order: dict[str, list[str]] = {}
    for cx in requested:
        seen = order.setdefault(str(cx.abstract_syntax), [])
        seen += [str(ts) for ts in cx.transfer_syntax if str(ts) not in seen]
    return order


def _prefer_requestor_order(assoc: Any) -> None:
    """Accept, per context, the first transfer syntax the *sender* proposed that we support.

    pynetdicom picks by the acceptor's list order, which would make a modality that offers
    "JPEG 2000, then uncompressed" decompress for us; re-ordering this association's copy
    of our contexts lets the sender send its images as it holds them.
    """
    primitive = getattr(assoc.requestor, "primitive", None)
    order = transfer_syntax_preference(list(getattr(primitive, "presentation_context_definition_list", None) or []))
    contexts = assoc.acceptor.supported_contexts
    for cx in contexts:
        wanted = order.get(str(cx.abstract_syntax))
        if wanted:
            rank = {ts: i for i, ts in enumerate(wanted)}
            cx.transfer_syntax = sorted(cx.transfer_syntax, key=lambda ts: rank.get(str(ts), len(rank)))
    assoc.acceptor.supported_contexts = contexts


class StorageSCP:
    """The event handlers, bound to one spool and one database."""

    def __init__(self, settings: Settings, spool: Spool, factory: sessionmaker[Session]) -> None:
        self.settings = settings
        self.spool = spool
        self.factory = factory
        # Studies each open association delivered instances of, until it ends.
        self._studies: dict[int, set[str]] = {}
        self._studies_lock = threading.Lock()
        # Called after a release was recorded (the shell wires the hand-off here).
        self.on_released: Callable[[], None] | None = None

    @staticmethod
    def _caller(event: evt.Event) -> Caller:
        requestor = event.assoc.requestor
        # Before negotiation (EVT_REQUESTED) the title is only in the A-ASSOCIATE-RQ primitive.
        primitive = getattr(requestor, "primitive", None)
        title = getattr(primitive, "calling_ae_title", None) or requestor.ae_title
        return Caller(str(title).strip(), str(requestor.address))

    def handle_requested(self, event: evt.Event) -> None:
        """EVT_REQUESTED: reject callers not in listener.allowed_callers before negotiation."""
        caller = self._caller(event)
        limit = self.settings.listener.max_associations
        if open_associations(event.assoc.ae) >= limit:
            log.warning("association from %s@%s rejected: %d open associations", caller.ae_title, caller.host, limit)
            event.assoc.acse.send_reject(_REJECT_TRANSIENT, _SOURCE_PROVIDER_PRESENTATION, _DIAG_LOCAL_LIMIT_EXCEEDED)
            event.assoc.kill()
            return
        if is_allowed(caller, self.settings):
            _prefer_requestor_order(event.assoc)
            return
        log.warning("association rejected: calling AE %r from %s is not allowed", caller.ae_title, caller.host)
        event.assoc.acse.send_reject(_REJECT_PERMANENT, _SOURCE_SERVICE_USER, _DIAG_CALLING_AE_NOT_RECOGNIZED)
        event.assoc.kill()

    def handle_connection(self, event: evt.Event) -> None:
        """EVT_CONN_OPEN: every read on this connection, the A-ASSOCIATE-RQ included, is bounded from here on."""
        cfg = self.settings.listener
        tune_socket(event.assoc, cfg.max_pdu, message_s=cfg.network_timeout_s, establish_s=cfg.association_deadline_s)
        # A peer that connects and sends nothing is never read from: pynetdicom's wait for the
        # A-ASSOCIATE-RQ is what ends it, so that wait is bounded by the deadline too.
        event.assoc.acse_timeout = min(cfg.acse_timeout_s, cfg.association_deadline_s)

    def handle_accepted(self, event: evt.Event) -> None:
        caller = self._caller(event)
        log.info("association accepted from %s@%s", caller.ae_title, caller.host)

    def handle_echo(self, event: evt.Event) -> int:
        return SUCCESS

    def handle_released(self, event: evt.Event) -> None:
        """EVT_RELEASED: the sender ended the association normally, so the studies it sent are
        complete from its side; record that and wake the hand-off.  An aborted association
        records nothing: its studies wait out the stability window."""
        with self._studies_lock:
            studies = self._studies.pop(id(event.assoc), set())
        if not studies:
            return
        try:
            with session_scope(self.factory) as session:
                mark_released(session, studies, utcnow())
        except SQLAlchemyError as exc:  # the stability window still hands them off
            log.warning("could not record the release of %d study(ies): %s", len(studies), _safe_error(exc))
            return
        if self.on_released is not None:
            self.on_released()

    def handle_closed(self, event: evt.Event) -> None:
        """EVT_CONN_CLOSE: forget what an association delivered (aborted ones end here too)."""
        with self._studies_lock:
            self._studies.pop(id(event.assoc), None)

    def _delivered(self, event: evt.Event, study_uid: str) -> None:
        with self._studies_lock:
            self._studies.setdefault(id(event.assoc), set()).add(study_uid)

    def handle_store(self, event: evt.Event) -> int | Dataset:
        """EVT_C_STORE: validate, spool durably, record, and only then answer success."""
        started = time.perf_counter()
        caller = self._caller(event)
        request = cast(C_STORE, event.request)  # EVT_C_STORE carries a C-STORE request
        try:
            sop_instance = require_uid(str(request.AffectedSOPInstanceUID or ""), "Affected SOP Instance UID")
            sop_class = require_uid(str(request.AffectedSOPClassUID or ""), "Affected SOP Class UID")
        except InvalidUIDError as exc:
            log.warning("C-STORE from %s@%s refused: %s", caller.ae_title, caller.host, exc)
            return _status(INVALID_UID, "invalid UID in the C-STORE request")
        transfer_syntax = str(event.context.transfer_syntax)
        staged = Path(event.dataset_path)
        staging_file = staged_file(request)
        try:
            if staging_file is not None:
                staging_file.finish()
        except OSError as exc:
            log.error("instance %s: receiving into the spool failed: %s", sop_instance, _safe_error(exc))
            return _status(OUT_OF_RESOURCES if exc.errno == 28 else STORAGE_FAILED, "could not store the instance")
        try:
            offset = dataset_offset(staged)
            header = read_received_file(staged, offset, transfer_syntax, self.settings.pixels.max_pixel_bytes)
        except InvalidUIDError as exc:
            log.warning("instance %s from %s@%s refused: %s", sop_instance, caller.ae_title, caller.host, exc)
            return _status(INVALID_UID, str(exc).split(":")[0])
        except MalformedDatasetError as exc:
            log.warning("instance %s from %s@%s refused: malformed: %s",
                        sop_instance, caller.ae_title, caller.host, exc)  # fmt: skip
            return _status(MALFORMED_DATASET, f"malformed dataset: {exc}")
        if header.sop_instance_uid != sop_instance or header.sop_class_uid != sop_class:
            log.warning("instance %s from %s@%s refused: dataset UIDs differ from the request",
                        sop_instance, caller.ae_title, caller.host)  # fmt: skip
            return _status(DATASET_MISMATCH, "SOP Class/Instance UID differ from the C-STORE request")
        try:
            self.spool.ensure_reserve(staged.stat().st_size)
            stored = self._spool(staging_file, staged, offset, header, transfer_syntax)
        except InsufficientSpaceError as exc:
            log.error("instance %s from %s@%s refused: %s", sop_instance, caller.ae_title, caller.host, exc)
            return _status(OUT_OF_RESOURCES, "storage below its free-space reserve")
        except OSError as exc:
            log.error("instance %s: spool write failed: %s", sop_instance, _safe_error(exc))
            return _status(OUT_OF_RESOURCES if exc.errno == 28 else STORAGE_FAILED, "could not store the instance")
        status = self._record(caller, header, stored, transfer_syntax, started)
        if status == SUCCESS:
            self._delivered(event, header.study_uid)
        return status

    def _spool(
        self, staging_file: StagingFile | None, staged: Path, offset: int, header: Any, transfer_syntax: str
    ) -> SpooledFile:
        """Fast path: the staged file already is the final file (see dicom_io.staging); else copy it."""
        if staging_file is not None:
            staging_file.fsync()
            return self.spool.adopt(
                staged,
                staging_file.sha256(),
                staging_file.size,
                header.study_uid,
                header.series_uid,
                header.sop_instance_uid,
            )
        meta = part10_header(header.sop_class_uid, header.sop_instance_uid, transfer_syntax)
        chunks = _file_chunks(staged, offset, meta)
        return self.spool.write(header.study_uid, header.series_uid, header.sop_instance_uid, chunks)

    def _record(self, caller: Caller, header: Any, stored: SpooledFile, transfer_syntax: str, started: float) -> Any:
        try:
            result = record_with_retry(
                self.factory,
                header,
                stored,
                transfer_syntax_uid=transfer_syntax,
                calling_ae=caller.ae_title,
                calling_host=caller.host,
            )
        except IdentifierConflictError as exc:
            self._discard(stored)
            log.warning("instance %s refused: %s", header.sop_instance_uid, exc)
            return _status(IDENTIFIER_CONFLICT, str(exc))
        except SQLAlchemyError as exc:
            self._discard(stored)
            log.error("instance %s from %s@%s not recorded, database unavailable: %s",
                      header.sop_instance_uid, caller.ae_title, caller.host, _safe_error(exc))  # fmt: skip
            return _status(DATABASE_UNAVAILABLE, "database unavailable, please retry")
        if result.outcome is Outcome.DUPLICATE:
            log.info("instance %s from %s@%s is a duplicate of version %d: acknowledged, not stored again",
                     header.sop_instance_uid, caller.ae_title, caller.host, result.version)  # fmt: skip
        elif result.outcome is Outcome.NEW_VERSION:
            log.warning("instance %s from %s@%s differs from the copy already stored: kept as version %d (flagged)",
                        header.sop_instance_uid, caller.ae_title, caller.host, result.version)  # fmt: skip
        else:
            log.info("stored instance %s of study %s from %s@%s (%d bytes, %.0f ms)",
                     header.sop_instance_uid, header.study_uid, caller.ae_title, caller.host, stored.size,
                     (time.perf_counter() - started) * 1000)  # fmt: skip
        return SUCCESS

    def _discard(self, stored: SpooledFile) -> None:
        try:
            self.spool.discard(stored)
        except OSError as exc:
            log.error("could not remove unrecorded file %s: %s", stored.relative_path, _safe_error(exc))


def build_ae(settings: Settings) -> AE:
    """The pynetdicom AE with our contexts, limits and timeouts."""
    cfg = settings.listener
    ae = AE(ae_title=cfg.ae_title)
    ae.implementation_class_uid = IMPLEMENTATION_CLASS_UID
    ae.implementation_version_name = IMPLEMENTATION_VERSION_NAME
    ae.maximum_pdu_size = cfg.max_pdu
    ae.maximum_associations = cfg.max_associations * THREAD_CAP_FACTOR + THREAD_CAP_EXTRA
    ae.acse_timeout = cfg.acse_timeout_s
    ae.dimse_timeout = cfg.dimse_timeout_s
    ae.network_timeout = cfg.network_timeout_s
    ae.require_called_aet = True
    ae.add_supported_context(Verification)
    transfer_syntaxes = cfg.transfer_syntax_uids()
    for sop_class in cfg.sop_class_uids():
        ae.add_supported_context(sop_class, transfer_syntaxes)
    return ae


@dataclass
class ListenerHandle:
    """A running listener: what to stop, and where it listens."""

    ae: AE
    server: ThreadedAssociationServer
    engine: Engine
    host: str
    port: int
    scp: StorageSCP
    _stopped: bool = field(default=False)

    def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.server.shutdown()
        self.ae.shutdown()
        self.engine.dispose()
        log.info("listener stopped")


class _OneLine(logging.Filter):
    """pynetdicom logs a traceback for every PDU a peer got wrong and every connection it dropped,
    all handled (the association ends); the log should say what happened in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            message = record.getMessage()
            detail = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            record.msg, record.args = (detail if message == str(exc) else f"{message}: {detail}"), None
            record.exc_info, record.exc_text = None, None
        return True


_ONE_LINE = _OneLine()


def _quiet_pynetdicom(settings: Settings) -> None:
    # pynetdicom dumps whole datasets (patient names and IDs) at DEBUG: never below INFO.
    logger = logging.getLogger("pynetdicom")
    if logger.getEffectiveLevel() < logging.INFO:
        logger.setLevel(logging.INFO)
    # Filters do not propagate: each of pynetdicom's module loggers gets one.
    names = [n for n in logging.root.manager.loggerDict if n == "pynetdicom" or n.startswith("pynetdicom.")]
    for name in names:
        child = logging.getLogger(name)
        if _ONE_LINE not in child.filters:
            child.addFilter(_ONE_LINE)


def start(settings: Settings) -> ListenerHandle:
    """Start the listener in background threads; returns at once.

    It only receives and records: queueing what it received is the hand-off's job, which the
    application shell (``xray_triage.services``) starts beside it.
    """
    _quiet_pynetdicom(settings)
    ssl_context = server_ssl_context(settings.listener.tls)  # a bad certificate or key stops start-up first
    spool = Spool(settings.storage.spool_dir, settings.storage.min_free_mb)
    swept = spool.sweep_staging()
    if swept:
        log.warning("removed %d partial file(s) left in the spool by an earlier crash", swept)
    engine = make_engine(
        settings.database.url, hide_parameters=True, pool_size=settings.listener.max_associations + 2, max_overflow=4
    )
    factory = make_sessionmaker(engine)
    reconcile(spool.root, factory)  # before any association: spool and database agree again
    scp = StorageSCP(settings, spool, factory)
    ae = build_ae(settings)
    install(ae, spool.staging)
    commands.install(ae)
    association_guard.install(ae)
    handlers: list[evt.EventHandlerType] = [
        (evt.EVT_CONN_OPEN, scp.handle_connection),
        (evt.EVT_REQUESTED, scp.handle_requested),
        (evt.EVT_ACCEPTED, scp.handle_accepted),
        (evt.EVT_C_ECHO, scp.handle_echo),
        (evt.EVT_C_STORE, scp.handle_store),
        (evt.EVT_RELEASED, scp.handle_released),
        (evt.EVT_CONN_CLOSE, scp.handle_closed),
    ]
    cfg = settings.listener
    try:
        server = ae.start_server(
            (cfg.bind_address, cfg.port), block=False, evt_handlers=handlers, ssl_context=ssl_context
        )
    except OSError as exc:
        engine.dispose()
        where = f"{cfg.bind_address}:{cfg.port}"
        raise OSError(exc.errno, f"DICOM listener cannot listen on {where}: {exc.strerror}") from None
    if server is None:  # only a blocking server returns None
        raise RuntimeError("the DICOM listener did not start")
    host, port = server.server_address[:2]
    if cfg.allowed_callers is None:
        log.warning("listener.allowed_callers is not set: any calling AE title is accepted")
    log.info("listening as AE %s on %s:%d", cfg.ae_title, host, port)
    return ListenerHandle(ae, server, engine, str(host), int(port), scp)

"""Durable, exactly-as-received storage of DICOM Part-10 files.

A C-STORE success tells the modality it may delete its copy, so a file must be on stable
storage before we say so: bytes go to a temporary file inside the spool (same filesystem),
are fsynced, then linked under their final name and the directory is fsynced.  A crash at
any point leaves either the complete file or an orphaned ``.part`` that `sweep_staging`
removes; never a half-written instance under a real name.

Final names are built only from validated UIDs plus the content hash
(``<study>/<series>/<sop>.<sha256[:16]>.dcm``), so different bytes for the same SOP Instance
UID get different names and nothing is ever silently overwritten.
"""

from __future__ import annotations

import errno
import hashlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TypeAlias

from dicom_io.uids import require_uid

STAGING_DIRNAME = ".incoming"
HASH_PREFIX_LEN = 16
_MB = 1024 * 1024

Chunk: TypeAlias = bytes | bytearray | memoryview


class SpoolError(Exception):
    """The spool cannot take this instance; the listener answers with a failure status."""


class InsufficientSpaceError(SpoolError):
    """Free disk space would fall below the configured reserve."""


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    relative_path: str
    sha256: str
    size: int
    # True when identical bytes were already stored under the same name by an earlier push.
    already_present: bool


def relative_instance_path(study_uid: str, series_uid: str, sop_instance_uid: str, sha256: str) -> PurePosixPath:
    """Where an instance lives under the spool root; raises InvalidUIDError for a non-UID."""
    study = require_uid(study_uid, "Study Instance UID")
    series = require_uid(series_uid, "Series Instance UID")
    sop = require_uid(sop_instance_uid, "SOP Instance UID")
    if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
        raise ValueError("sha256 must be 64 lowercase hex digits")
    return PurePosixPath(study, series, f"{sop}.{sha256[:HASH_PREFIX_LEN]}.dcm")


def _require_uids(study_uid: str, series_uid: str, sop_instance_uid: str) -> None:
    require_uid(study_uid, "Study Instance UID")
    require_uid(series_uid, "Series Instance UID")
    require_uid(sop_instance_uid, "SOP Instance UID")


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _makedirs_durable(root: Path, relative: PurePosixPath) -> Path:
    """Create root/relative one level at a time, fsyncing each parent whose entries changed."""
    current = root
    for part in relative.parts:
        child = current / part
        try:
            child.mkdir()
        except FileExistsError:
            pass
        else:
            _fsync_dir(current)
        current = child
    return current


def _write_all(fd: int, chunk: Chunk) -> None:
    view = memoryview(chunk).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


class Spool:
    """One spool directory: the reserve check, durable writes and clean-up of failed writes."""

    def __init__(self, root: Path, min_free_mb: int) -> None:
        self.root = Path(root).resolve()
        self.min_free_bytes = int(min_free_mb) * _MB
        self.staging = self.root / STAGING_DIRNAME
        self.staging.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def ensure_reserve(self, incoming_bytes: int = 0) -> None:
        """Raise InsufficientSpaceError if storing `incoming_bytes` would eat into the reserve."""
        free = self.free_bytes()
        if free - incoming_bytes < self.min_free_bytes:
            raise InsufficientSpaceError(
                f"free space {free // _MB} MiB minus {incoming_bytes // _MB} MiB incoming is below "
                f"the reserve of {self.min_free_bytes // _MB} MiB (storage.min_free_mb)"
            )

    def write(self, study_uid: str, series_uid: str, sop_instance_uid: str, chunks: Iterable[Chunk]) -> SpooledFile:
        """Store the concatenated `chunks` durably; return where, with SHA-256 and size.

        UIDs are validated before any byte is written.  Identical bytes already stored under
        the same name are not written twice (`already_present`).
        """
        _require_uids(study_uid, series_uid, sop_instance_uid)
        fd, tmp_name = tempfile.mkstemp(dir=self.staging, suffix=".part")
        tmp = Path(tmp_name)
        try:
            digest = hashlib.sha256()
            size = 0
            try:
                for chunk in chunks:
                    digest.update(chunk)
                    _write_all(fd, chunk)
                    size += len(chunk)
                os.fsync(fd)
            finally:
                os.close(fd)
            return self._place(tmp, study_uid, series_uid, sop_instance_uid, digest.hexdigest(), size)
        finally:
            tmp.unlink(missing_ok=True)

    def adopt(
        self, staged: Path, sha256: str, size: int, study_uid: str, series_uid: str, sop_instance_uid: str
    ) -> SpooledFile:
        """Give a file already written (and fsynced) in the staging folder its final name.

        The staged name is left for its owner to remove; the content stays reachable under
        the final name because it is hard-linked, not moved.
        """
        _require_uids(study_uid, series_uid, sop_instance_uid)
        if staged.parent.resolve() != self.staging:
            raise SpoolError("only files in the spool's staging folder can be adopted")
        return self._place(staged, study_uid, series_uid, sop_instance_uid, sha256, size)

    def _place(
        self, tmp: Path, study_uid: str, series_uid: str, sop_instance_uid: str, sha256: str, size: int
    ) -> SpooledFile:
        relative = relative_instance_path(study_uid, series_uid, sop_instance_uid, sha256)
        folder = _makedirs_durable(self.root, relative.parent)
        final = folder / relative.name
        already = self._link_into_place(tmp, final)
        if not already:
            _fsync_dir(folder)
        return SpooledFile(final, relative.as_posix(), sha256, size, already)

    @staticmethod
    def _link_into_place(tmp: Path, final: Path) -> bool:
        """Give `tmp` its final name without ever replacing an existing file; True if one existed."""
        try:
            os.link(tmp, final)
        except FileExistsError:
            return True
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
                raise
            # Filesystems without hard links: check, then rename (the name embeds the hash, so
            # a racing writer could only ever put identical bytes there).
            if final.exists():
                return True
            os.rename(tmp, final)
        return False

    def discard(self, stored: SpooledFile) -> None:
        """Remove a file we just wrote whose recording failed, so no unrecorded file is left.

        A file that was already present belongs to an earlier, recorded push and is kept.
        """
        if stored.already_present:
            return
        stored.path.unlink(missing_ok=True)
        _fsync_dir(stored.path.parent)

    def sweep_staging(self) -> int:
        """Delete temporary files left by a crash mid-write; returns how many."""
        removed = 0
        for leftover in self.staging.glob("*.part"):
            leftover.unlink(missing_ok=True)
            removed += 1
        return removed

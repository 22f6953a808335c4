"""DICOM UID validation: the only gate between a sender's strings and our file names.

Spool paths are built from Study, Series and SOP Instance UIDs, so a UID that is not a UID
(``../../x``, an absolute path, a NUL byte) must never reach the filesystem.  PS3.5 §9.1
allows digits and dots only, at most 64 characters, no empty component.  Leading zeros in a
component are forbidden by the standard but common in real equipment; they are harmless for
paths, so they are accepted rather than refusing a real patient's study.
"""

from __future__ import annotations

import re
from typing import Any

MAX_UID_LENGTH = 64
_UID_RE = re.compile(r"[0-9]+(?:\.[0-9]+)*")


class InvalidUIDError(ValueError):
    """A value that should be a UID is not one; the message names which UID, never its value's context."""


def is_valid_uid(value: object) -> bool:
    """True for a string of digit groups separated by single dots, 1-64 characters."""
    return isinstance(value, str) and 0 < len(value) <= MAX_UID_LENGTH and _UID_RE.fullmatch(value) is not None


def require_uid(value: object, what: str) -> str:
    """`value` unchanged if it is a valid UID, else InvalidUIDError naming `what` (e.g. 'Study Instance UID')."""
    if not is_valid_uid(value):
        shown = repr(value)[:80] if isinstance(value, str) else type(value).__name__
        raise InvalidUIDError(f"{what} is not a valid DICOM UID: {shown}")
    return str(value)


def uid_as_sent(element: Any) -> str | None:
    """A UI element's value as the sender encoded it, only its NUL/space padding removed.

    pydicom strips all surrounding whitespace when it converts a UID, so ``'1.2.3\\n'`` would
    read as the valid ``'1.2.3'`` while the stored bytes say otherwise; validation must see
    the raw value.  None when the element is absent or its bytes are not text.
    """
    if element is None:
        return None
    value = element.value
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str):
        return None
    return value.rstrip("\0 ")


def uid_text(element: Any) -> str | None:
    """The element's UID as sent when it is a valid UID, else None."""
    value = uid_as_sent(element)
    return value if is_valid_uid(value) else None

"""Passwords, CSRF tokens and the session secret: the few places where a mistake leaks access.

Passwords are hashed with argon2id (argon2-cffi's RFC 9106 defaults: salted, memory-hard,
slow on purpose).  CSRF protection is a per-session random token that every state-changing
request must echo (a form field or the ``X-CSRF-Token`` header); the session cookie alone,
which a browser attaches to cross-site requests, is never enough to change anything.
"""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_HASHER = PasswordHasher()
# Verified against when the user does not exist, so a wrong user name costs as long as a
# wrong password and the login form does not reveal which user names exist.
_DUMMY_HASH = _HASHER.hash("not a password: timing equaliser")
MIN_PASSWORD_LENGTH = 10
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "X-CSRF-Token"


def hash_password(password: str) -> str:
    return _HASHER.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """True when `password` matches; False (after the same work) for an unknown user or a bad hash."""
    try:
        return _HASHER.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def needs_rehash(password_hash: str) -> bool:
    return _HASHER.check_needs_rehash(password_hash)


def check_password_strength(password: str) -> None:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"password must have at least {MIN_PASSWORD_LENGTH} characters")


def new_csrf_token() -> str:
    return secrets.token_urlsafe(32)


def csrf_matches(expected: str | None, given: str | None) -> bool:
    return bool(expected) and bool(given) and hmac.compare_digest(str(expected), str(given))


def session_secret(configured: str | None, key_file: Path) -> str:
    """The configured key, else one created once in `key_file` (mode 0600) and reused.

    A key made fresh at every start would log every radiologist out at each restart; one in
    the configuration file would sit in backups and tickets.
    """
    if configured:
        return configured
    try:
        return key_file.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        pass
    key_file.parent.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(48)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(key)
    return key

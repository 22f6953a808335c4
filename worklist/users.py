"""Worklist users: created by `xray-triage user add`, authenticated by the login page and API."""

from __future__ import annotations

import re
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from db.models import Role, User
from worklist.security import check_password_strength, hash_password, needs_rehash, verify_password

_USERNAME_RE = re.compile(r"^[A-Za-z0-9._@-]{1,64}$")


@dataclass(frozen=True)
class CurrentUser:
    """What a request knows about who is asking (no password hash travels beyond this module)."""

    id: int
    username: str
    role: Role

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


def validate_username(username: str) -> str:
    if not _USERNAME_RE.match(username):
        raise ValueError("user name must be 1-64 characters: letters, digits, '.', '_', '@' or '-'")
    return username


def add_user(session: Session, username: str, password: str, role: Role | str) -> User:
    """Create a user; ValueError for a bad name, a weak password, an unknown role or a taken name."""
    validate_username(username)
    check_password_strength(password)
    try:
        role = Role(role)
    except ValueError:
        raise ValueError(f"unknown role {role!r}; choose from {[r.value for r in Role]}") from None
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise ValueError(f"user {username!r} already exists")
    user = User(username=username, password_hash=hash_password(password), role=role)
    session.add(user)
    session.flush()
    return user


def _user(session: Session, username: str) -> User:
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise ValueError(f"no user {username!r}")
    return user


def set_password(session: Session, username: str, password: str) -> int:
    """New hash for the user; returns the user's id (the caller ends the user's sessions)."""
    check_password_strength(password)
    user = _user(session, username)
    user.password_hash = hash_password(password)
    return user.id


def set_disabled(session: Session, username: str, disabled: bool) -> int:
    """Disable (or re-enable) an account; returns the user's id."""
    user = _user(session, username)
    user.disabled = disabled
    return user.id


def authenticate(session: Session, username: str, password: str) -> CurrentUser | None:
    """The user if the password matches and the account is enabled; rehashes outdated hashes."""
    user = session.scalar(select(User).where(User.username == username)) if _USERNAME_RE.match(username) else None
    ok = verify_password(user.password_hash if user else None, password)
    if user is None or not ok or user.disabled:
        return None
    if needs_rehash(user.password_hash):
        user.password_hash = hash_password(password)
    return CurrentUser(user.id, user.username, Role(user.role))

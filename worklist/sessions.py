"""Server-side sessions and login throttling.

The session cookie (signed by Starlette) carries a random token; the token's SHA-256 is the
key of a ``user_session`` row.  Logging out revokes the row, so a copied cookie stops
working at once instead of at its expiry; changing a password or disabling a user ends
every session of that user.  Failed logins are counted per attempted user name from the
audit trail, so a password cannot be guessed at the speed of the server.
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from db.models import AuditEvent, Role, User, UserSession
from worklist.users import CurrentUser, validate_username

LOGIN_FAILED = "login_failed"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii", "replace")).hexdigest()


def open_session(session: Session, user_id: int, now: datetime) -> str:
    """A new session for the user; returns the token for the cookie (never stored as such)."""
    token = secrets.token_urlsafe(32)
    session.add(UserSession(token_sha256=_digest(token), user_id=user_id, created_at=now))
    return token


def session_user(session: Session, token: object, now: datetime, max_age_s: float) -> CurrentUser | None:
    """The user of a live session: not revoked, not older than max_age_s, account enabled."""
    if not isinstance(token, str) or not token:
        return None
    row = session.execute(
        select(User.id, User.username, User.role)
        .join(UserSession, UserSession.user_id == User.id)
        .where(
            UserSession.token_sha256 == _digest(token),
            UserSession.revoked_at.is_(None),
            UserSession.created_at > now - timedelta(seconds=max_age_s),
            User.disabled.is_(False),
        )
    ).first()
    return CurrentUser(int(row[0]), str(row[1]), Role(row[2])) if row else None


def revoke(session: Session, token: object, now: datetime) -> None:
    if isinstance(token, str) and token:
        session.execute(
            update(UserSession)
            .where(UserSession.token_sha256 == _digest(token), UserSession.revoked_at.is_(None))
            .values(revoked_at=now)
        )


def revoke_all(session: Session, user_id: int, now: datetime) -> int:
    """End every session of a user (password changed, account disabled); returns how many."""
    result = session.execute(
        update(UserSession)
        .where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=now)
    )
    return int(result.rowcount or 0)  # type: ignore[attr-defined]


def throttle_name(username: str) -> str | None:
    """The name failures are counted under: the attempted user name when it is a valid one."""
    try:
        return validate_username(username)
    except ValueError:
        return None


def recent_failures(session: Session, username: str | None, now: datetime, window_min: float) -> int:
    if username is None:
        return 0
    return int(
        session.scalar(
            select(func.count())
            .select_from(AuditEvent)
            .where(
                AuditEvent.action == LOGIN_FAILED,
                AuditEvent.username == username,
                AuditEvent.at > now - timedelta(minutes=window_min),
            )
        )
        or 0
    )

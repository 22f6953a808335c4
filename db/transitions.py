"""Study state changes as conditional UPDATEs, each recorded in the audit trail.

The listener, the hand-off scanner and the workers run in different threads and processes
and may race for the same study.  Every state change is therefore one
``UPDATE ... WHERE state = <expected>``: exactly one contender sees rowcount 1 and writes the
StateTransition row, the others learn they lost and do nothing.  This works the same on
PostgreSQL (row locks, READ COMMITTED re-check) and SQLite (one writer at a time).
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import ColumnElement, update
from sqlalchemy.orm import Session

from db.models import StateTransition, Study, StudyState


def move_state(
    session: Session,
    study_id: int,
    from_state: StudyState,
    to_state: StudyState,
    now: datetime,
    *,
    reason: str | None = None,
    where: Sequence[ColumnElement[bool]] = (),
    values: dict[str, Any] | None = None,
) -> bool:
    """Move one study from `from_state` to `to_state` if it is still there; True if we won."""
    stmt = (
        update(Study)
        .where(Study.id == study_id, Study.state == from_state, *where)
        .values(state=to_state, state_reason=reason, state_changed_at=now, **(values or {}))
        .execution_options(synchronize_session=False)
    )
    won = session.execute(stmt).rowcount == 1  # type: ignore[attr-defined]
    if won:
        session.add(StateTransition(study_id=study_id, from_state=from_state, to_state=to_state, reason=reason, at=now))
        session.flush()
    return won

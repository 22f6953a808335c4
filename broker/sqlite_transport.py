"""kombu's SQLAlchemy transport for the embedded SQLite broker, polling ten times a second.

The transport has no way to be told that a message arrived, so an idle worker polls the
queue table; kombu's default (once a second) adds up to a second to every study's time to a
priority.  Its transport options all go to ``sqlalchemy.create_engine``, so the interval
cannot be passed as an option: it is this subclass's class attribute instead.  A poll is
one indexed SELECT on a local file.
"""

from __future__ import annotations

from kombu.transport import sqlalchemy as sqla

POLL_INTERVAL_S = 0.1


class Transport(sqla.Transport):
    polling_interval = POLL_INTERVAL_S

"""The Alembic migrations build exactly the schema the models declare, on both databases.

A column or index added to db/models.py without a migration (or the reverse) would work in
tests that create tables from the models and fail on a site that upgrades.
"""

from __future__ import annotations

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import create_engine

from db.models import Base
from db.session import upgrade


def test_migrations_match_the_models(backend) -> None:
    upgrade(backend.database_url)
    engine = create_engine(backend.database_url)
    try:
        with engine.connect() as conn:
            ctx = MigrationContext.configure(conn, opts={"compare_type": False})
            diff = compare_metadata(ctx, Base.metadata)
    finally:
        engine.dispose()
    assert diff == [], diff


def test_downgrade_to_the_first_revision_and_up_again(tmp_path) -> None:
    from alembic import command

    from db.session import alembic_config, current_revision

    url = f"sqlite:///{tmp_path / 'm.db'}"
    upgrade(url)
    head = current_revision(url)
    command.downgrade(alembic_config(url), "0001")
    assert current_revision(url) == "0001"
    upgrade(url)
    assert current_revision(url) == head

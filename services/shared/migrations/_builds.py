"""Index builds that run outside a migration's transaction (PostgreSQL's CONCURRENTLY)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from alembic import op
from sqlalchemy import text


@contextlib.contextmanager
def concurrent_build() -> Iterator[None]:
    """Outside the migration's transaction, with no lock timeout.

    A concurrent build waits for every transaction older than it; cut short by the
    migration's lock timeout it would leave an invalid index behind, which the next run,
    finding an index of that name, would keep. Its wait holds up no one's writes, so it
    may wait as long as it takes."""
    with op.get_context().autocommit_block():
        bind = op.get_bind()
        timeout = bind.execute(text("SHOW lock_timeout")).scalar_one()
        bind.execute(text("SET lock_timeout = 0"))
        try:
            yield
        finally:
            bind.execute(
                text("SELECT set_config('lock_timeout', :value, false)"), {"value": timeout}
            )

"""A database error says what failed, never the values its statement carried: a webhook's
signing secrets travel as one (the JSON of its secrets), and the error of a failed write is
logged whole."""

from __future__ import annotations

import pytest
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from services.shared import create_engine

_SECRET = "whsec_c2VjcmV0LXRoYXQtbXVzdC1uZXZlci1iZS1sb2dnZWQ="


async def test_a_failed_statement_names_none_of_its_values(database_url: str) -> None:
    engine = create_engine(database_url)
    try:
        with pytest.raises(SQLAlchemyError) as failed:
            async with engine.begin() as conn:
                await conn.execute(
                    text("UPDATE no_such_table SET secrets = :secrets"),
                    {"secrets": f'[{{"secret": "{_SECRET}"}}]'},
                )
    finally:
        await engine.dispose()
    assert _SECRET not in str(failed.value)
    assert "no_such_table" in str(failed.value), "it still says what failed"

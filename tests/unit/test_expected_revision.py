"""The migration a process expects is read once, from the code it was started with."""

from __future__ import annotations

from typing import Any

import pytest
from alembic.script import ScriptDirectory

from services.shared import _db, head_revision


def test_the_expected_head_is_read_from_the_migrations_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Files replaced under a running process (the next release unpacked in place) must
    not make it unready, and /readyz, asked every few seconds, reads no directory."""
    reads: list[Any] = []
    real = ScriptDirectory.from_config

    def counted(config: Any) -> ScriptDirectory:
        reads.append(config)
        return real(config)

    monkeypatch.setattr(ScriptDirectory, "from_config", staticmethod(counted))
    _db._scripts.cache_clear()
    try:
        heads = {head_revision() for _ in range(3)}
        assert _db._behind(next(iter(heads))) is False
        assert _db._behind("0001") is True
    finally:
        _db._scripts.cache_clear()
    assert len(heads) == 1
    assert len(reads) == 1

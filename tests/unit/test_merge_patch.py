"""Object PATCH bodies are JSON merge patches (RFC 7396), compared as JSON values."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from services.api.object_store import merge_patch


@pytest.mark.parametrize(
    ("current", "patch", "merged", "previous"),
    [
        # Nested objects merge: a sibling of the changed field survives.
        (
            {"addr": {"city": "A", "zip": "1"}},
            {"addr": {"city": "B"}},
            {"addr": {"city": "B", "zip": "1"}},
            {"addr": {"city": "A", "zip": "1"}},
        ),
        # A nested null removes that field only.
        (
            {"addr": {"city": "A", "zip": "1"}},
            {"addr": {"zip": None}},
            {"addr": {"city": "A"}},
            {"addr": {"city": "A", "zip": "1"}},
        ),
        # A top-level null removes; removing what is absent changes nothing.
        ({"a": 1, "b": 2}, {"a": None, "c": None}, {"b": 2}, {"a": 1}),
        # True is not 1, 0 is not false, 1.0 is not 1: each is a change.
        ({"v": 1}, {"v": True}, {"v": True}, {"v": 1}),
        ({"v": False}, {"v": 0}, {"v": 0}, {"v": False}),
        ({"v": [1, 0]}, {"v": [True, False]}, {"v": [True, False]}, {"v": [1, 0]}),
        ({"v": 1}, {"v": 1.0}, {"v": 1.0}, {"v": 1}),
        # The same value again, or the same object in another key order, is no change.
        ({"v": {"a": 1, "b": 2}}, {"v": {"b": 2, "a": 1}}, {"v": {"a": 1, "b": 2}}, {}),
        # An object patch over a non-object replaces it; a list replaces a list whole.
        ({"v": 3}, {"v": {"x": 1, "y": None}}, {"v": {"x": 1}}, {"v": 3}),
        ({"v": [1, 2]}, {"v": [2]}, {"v": [2]}, {"v": [1, 2]}),
        # A new field: its previous value is null.
        ({}, {"n": "x"}, {"n": "x"}, {"n": None}),
    ],
)
def test_merge_patch(
    current: dict[str, Any], patch: dict[str, Any], merged: dict[str, Any], previous: dict[str, Any]
) -> None:
    got_merged, got_previous = merge_patch(current, patch)
    # As JSON: in Python, True == 1 == 1.0.
    assert _json(got_merged) == _json(merged)
    assert _json(got_previous) == _json(previous)


def _json(value: Any) -> bytes:
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)

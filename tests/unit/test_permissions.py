"""The permission catalog and roles."""

from __future__ import annotations

from services.shared import PERMISSIONS, ROLES, effective_permissions, unknown_permissions


def test_catalog_has_every_documented_permission() -> None:
    """The seed catalog plus token:manage and event:publish."""
    for permission in (
        "object:force-delete",
        "object-type:read",
        "webhook:create",
        "team:manage-members",
        "audit-log:read",
        "backup:create",
        "upload",
        "token:manage",
        "event:publish",
    ):
        assert permission in PERMISSIONS
    assert len(PERMISSIONS) == 6 * 5 + 5 + 4 + 2


def test_roles_are_nested_subsets() -> None:
    """member ⊂ admin ⊂ owner = everything."""
    assert ROLES["owner"] == PERMISSIONS
    assert ROLES["member"] < ROLES["admin"] < ROLES["owner"]


def test_effective_permissions_intersect() -> None:
    """A token never gains what its user's role lacks; an unknown role grants nothing."""
    assert effective_permissions({"object:create", "team:billing"}, "admin") == {"object:create"}
    assert effective_permissions({"object:create"}, "nobody") == frozenset()


def test_unknown_permissions_are_reported() -> None:
    """Typos are named so the caller can fix them."""
    assert unknown_permissions(["object:create", "object:explode", "webhook:frob"]) == [
        "object:explode",
        "webhook:frob",
    ]

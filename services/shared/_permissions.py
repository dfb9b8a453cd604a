"""The permission catalog and the team roles built from it."""

from __future__ import annotations

from typing import Final

_CRUD = ("create", "read", "update", "delete", "force-delete")

PERMISSIONS: Final[frozenset[str]] = frozenset(
    [
        f"{resource}:{verb}"
        for resource in ("object", "object-type", "form", "view", "integration", "webhook")
        for verb in _CRUD
    ]
    + [
        "team:billing",
        "team:import",
        "team:manage-appearance",
        "team:manage-members",
        "team:update",
        "audit-log:read",
        "backup:read",
        "backup:create",
        "upload",
        "token:manage",
        "event:publish",
    ]
)

_ADMIN_EXCLUDED = frozenset({"team:billing"})
_MEMBER: Final[frozenset[str]] = frozenset(
    p
    for p in PERMISSIONS
    if p.split(":")[0] in {"object", "form", "view"} and not p.endswith("force-delete")
) | {"object-type:read", "integration:read", "webhook:read", "upload", "token:manage"}

ROLES: Final[dict[str, frozenset[str]]] = {
    "owner": PERMISSIONS,
    "admin": PERMISSIONS - _ADMIN_EXCLUDED,
    "member": _MEMBER,
}


def unknown_permissions(requested: list[str] | set[str]) -> list[str]:
    return sorted(set(requested) - PERMISSIONS)


def effective_permissions(token_permissions: set[str], role: str) -> frozenset[str]:
    return frozenset(token_permissions) & ROLES.get(role, frozenset())

"""Errors of the dispatcher."""

from __future__ import annotations

from services.shared import HookwireError


class InvalidSecret(HookwireError):
    code = "invalid_secret"

"""Errors of the auth service; each names why a token or request was refused."""

from __future__ import annotations

from services.shared import Conflict, NotFound, Unauthorized, ValidationFailed


class MalformedToken(Unauthorized):
    code = "malformed_token"


class InvalidServiceCredential(Unauthorized):
    code = "invalid_service_credential"


class DuplicateName(Conflict):
    code = "duplicate_name"


class UnknownPermission(ValidationFailed):
    code = "unknown_permission"


class UnknownEntity(NotFound):
    code = "not_found"


class ConcurrentChange(Conflict):
    code = "concurrent_change"


class TokenEnded(Conflict):
    code = "token_ended"

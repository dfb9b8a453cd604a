"""Errors of the api service."""

from __future__ import annotations

from services.shared import BadRequest, DependencyUnavailable, Unauthorized


class MissingToken(Unauthorized):
    code = "missing_token"


class InvalidToken(Unauthorized):
    code = "invalid_token"


class QueryKeyRefused(BadRequest):
    code = "query_key_refused"


class AuthUnavailable(DependencyUnavailable):
    code = "auth_unavailable"


class PublishUnavailable(DependencyUnavailable):
    code = "publish_unavailable"

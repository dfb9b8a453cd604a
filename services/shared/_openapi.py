"""Routes registered together with their OpenAPI description, so the two cannot drift."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from pydantic import BaseModel

from ._http import Handler, json_response

_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message", "details"],
            "properties": {
                "code": {"type": "string"},
                "message": {"type": "string"},
                "details": {},
            },
        }
    },
}
_ERROR_TEXT = {
    400: "Bad request: a NUL character in the path or query, a body that cannot be read as"
    " sent, or a token in the query string",
    401: "Missing, malformed, unknown, expired, revoked or inactive token",
    403: "The token lacks the permission",
    404: "Not found, or a team the token's user is not in",
    409: "Conflict (for example a duplicate name)",
    412: "If-Match does not match the current ETag: the resource changed since it was read",
    413: "Body larger than HOOKWIRE_MAX_BODY_BYTES",
    422: "Invalid body or parameters; details name each field",
    429: "The team re-sent too many deliveries this hour; retry after Retry-After",
    503: "A dependency (Kafka, auth) is unavailable; retry after Retry-After",
}


@dataclass
class OpenApi:
    """``tokens_checked_remotely``: the service asks auth about each token, so every route
    taking a token may answer 503 ``auth_unavailable``."""

    title: str
    version: str
    description: str = ""
    tokens_checked_remotely: bool = False
    _paths: dict[str, dict[str, Any]] = field(default_factory=dict)
    _models: dict[str, type[BaseModel]] = field(default_factory=dict)

    def route(
        self,
        app: web.Application,
        method: str,
        path: str,
        handler: Handler,
        *,
        summary: str,
        permission: str | None = None,
        body: type[BaseModel] | None = None,
        body_required: bool = True,
        query: type[BaseModel] | None = None,
        flags: tuple[str, ...] = (),
        headers: dict[str, str] | None = None,
        status: int = 200,
        errors: tuple[int, ...] = (401, 403, 422),
        auth: str = "token",
    ) -> None:
        app.router.add_route(method, path, handler)
        operation: dict[str, Any] = {
            "summary": summary,
            "operationId": f"{method.lower()}_{path.strip('/').replace('/', '_')}",
            "responses": {str(status): {"description": "Success"}},
        }
        if permission:
            operation["description"] = f"Needs the `{permission}` permission."
        if auth == "token":
            operation["security"] = [{"bearer": []}, {"key": []}]
        elif auth == "service":
            operation["security"] = [{"service": []}]
        parameters = [
            {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}
            for name in _path_parameters(path)
        ]
        if query is not None:
            parameters.extend(_query_parameters(query))
        parameters.extend(_flag_parameter(name) for name in flags)
        parameters.extend(
            {
                "name": name,
                "in": "header",
                "required": False,
                "description": text,
                "schema": {"type": "string"},
            }
            for name, text in (headers or {}).items()
        )
        if parameters:
            operation["parameters"] = parameters
        if body is not None:
            self._models[body.__name__] = body
            operation["requestBody"] = {
                "required": body_required,
                "content": {
                    "application/json": {
                        "schema": {"$ref": f"#/components/schemas/{body.__name__}"}
                    }
                },
            }
        # Every route refuses a NUL in its path or query and a body it cannot read.
        codes = {400, *errors}
        if auth == "token" and self.tokens_checked_remotely:
            codes.add(503)
        for code in sorted(codes):
            operation["responses"][str(code)] = {
                "description": _ERROR_TEXT[code],
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            }
        self._paths.setdefault(path, {})[method.lower()] = operation

    def document(self) -> dict[str, Any]:
        schemas: dict[str, Any] = {"Error": _ERROR_SCHEMA}
        for name, model in self._models.items():
            schema = model.model_json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        return {
            "openapi": "3.1.0",
            "info": {"title": self.title, "version": self.version, "description": self.description},
            "paths": self._paths,
            "components": {
                "schemas": schemas,
                "securitySchemes": {
                    "bearer": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "Authorization: Bearer <hwk_ token or access token>",
                    },
                    "key": {
                        "type": "apiKey",
                        "in": "header",
                        "name": "Authorization",
                        "description": "Authorization: Key=<hwk_ token>",
                    },
                    "service": {
                        "type": "http",
                        "scheme": "bearer",
                        "description": "The service credential (internal)",
                    },
                },
            },
        }

    def serve(self, app: web.Application) -> None:
        document = self.document()

        async def openapi(_: web.Request) -> web.Response:
            return json_response(document)

        app.router.add_get("/v1/openapi.json", openapi)


def _path_parameters(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{") and part.endswith("}")]


def _flag_parameter(name: str) -> dict[str, Any]:
    """A yes/no query parameter as ``query_flag`` reads it."""
    schema = {"type": "string", "enum": ["true", "false"], "default": "false"}
    return {"name": name, "in": "query", "required": False, "schema": schema}


def _query_parameters(model: type[BaseModel]) -> list[dict[str, Any]]:
    properties = model.model_json_schema()["properties"]
    parameters = []
    for name, info in model.model_fields.items():
        if info.exclude:
            continue
        schema = dict(properties[name])
        # Query parameters are absent rather than null.
        variants = [v for v in schema.pop("anyOf", []) if v.get("type") != "null"]
        if variants:
            schema.update(variants[0])
        schema.pop("default", None)
        parameters.append(
            {"name": name, "in": "query", "required": info.is_required(), "schema": schema}
        )
    return parameters

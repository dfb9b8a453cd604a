"""Each service's OpenAPI document lists every route it serves, kept true by this test."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from tests.conftest import Stack

_OPERATIONAL = {"/healthz", "/readyz", "/metrics", "/v1/openapi.json"}


def _served(app: web.Application) -> set[tuple[str, str]]:
    served = set()
    for route in app.router.routes():
        path = route.resource.canonical if route.resource is not None else ""
        if route.method in ("HEAD", "OPTIONS") or path in _OPERATIONAL:
            continue
        served.add((route.method.lower(), path))
    return served


def _refs(node: Any) -> set[str]:
    if isinstance(node, dict):
        found = {node["$ref"]} if "$ref" in node else set()
        for value in node.values():
            found |= _refs(value)
        return found
    if isinstance(node, list):
        return set().union(*(_refs(item) for item in node)) if node else set()
    return set()


async def test_every_route_is_documented(api_stack: Stack) -> None:
    """Routes and documented operations match exactly; every $ref resolves."""
    for base, service in ((api_stack.auth_url, api_stack.auth), (api_stack.api_url, api_stack.api)):
        async with api_stack.session.get(f"{base}/v1/openapi.json") as response:
            assert response.status == 200
            document = await response.json()
        assert document["openapi"].startswith("3.1")
        documented = {(method, path) for path, item in document["paths"].items() for method in item}
        assert service.app is not None
        assert documented == _served(service.app)
        schemas = document["components"]["schemas"]
        for ref in _refs(document):
            assert ref.removeprefix("#/components/schemas/") in schemas, ref
        for item in document["paths"].values():
            for operation in item.values():
                assert "400" in operation["responses"], operation["operationId"]


async def test_routes_document_the_refusals_they_give(api_stack: Stack) -> None:
    """Answers the review found missing from the documents: each is given by its route."""
    async with api_stack.session.get(f"{api_stack.api_url}/v1/openapi.json") as response:
        paths = (await response.json())["paths"]
    webhook = paths["/v1/teams/{team}/webhooks/{webhook_id}"]
    assert {"409", "422"} <= set(webhook["delete"]["responses"])  # a race; ?force=maybe
    assert "409" in webhook["patch"]["responses"]  # an edit racing a trash
    obj = paths["/v1/teams/{team}/objects/{object_type}/{object_id}"]
    assert "422" in obj["delete"]["responses"]


def _parameters(operation: dict[str, Any], place: str) -> set[str]:
    return {p["name"] for p in operation.get("parameters", ()) if p["in"] == place}


async def _document(stack: Stack, base: str) -> dict[str, Any]:
    async with stack.session.get(f"{base}/v1/openapi.json") as response:
        assert response.status == 200
        document: dict[str, Any] = await response.json()
    return document


async def test_routes_document_the_parameters_and_headers_they_read(api_stack: Stack) -> None:
    """Query parameters, yes/no flags and request headers the handlers read are declared."""
    auth = (await _document(api_stack, api_stack.auth_url))["paths"]
    audit = auth["/v1/audit-log"]["get"]
    assert _parameters(audit, "query") == {
        "since",
        "until",
        "actor",
        "action",
        "team_id",
        "limit",
        "cursor",
    }
    paths = (await _document(api_stack, api_stack.api_url))["paths"]
    webhook = paths["/v1/teams/{team}/webhooks/{webhook_id}"]
    obj = paths["/v1/teams/{team}/objects/{object_type}/{object_id}"]
    for delete in (webhook["delete"], obj["delete"]):
        (force,) = [p for p in delete["parameters"] if p["name"] == "force"]
        assert force["in"] == "query"
        assert force["required"] is False
        assert force["schema"]["enum"] == ["true", "false"]
    assert "If-Match" in _parameters(obj["patch"], "header")
    assert "Idempotency-Key" in _parameters(paths["/v1/teams/{team}/events"]["post"], "header")


async def test_api_routes_taking_a_token_document_auth_unavailable(api_stack: Stack) -> None:
    """Every api route checks its token with auth, so each may answer 503; a bad
    object_type is a 422 on reads too."""
    paths = (await _document(api_stack, api_stack.api_url))["paths"]
    for item in paths.values():
        for operation in item.values():
            if operation.get("security") == [{"bearer": []}, {"key": []}]:
                assert "503" in operation["responses"], operation["operationId"]
    one = paths["/v1/teams/{team}/objects/{object_type}/{object_id}"]["get"]
    assert {"503", "422"} <= set(one["responses"])
    assert "503" in paths["/v1/teams/{team}/webhooks"]["get"]["responses"]

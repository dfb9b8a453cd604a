"""A schema-driven fuzz run: requests generated from /v1/openapi.json never get a 5xx.

The api runs in the test's event loop; schemathesis drives it from a worker thread with
blocking HTTP, so both run at once. The number of examples is bounded to keep the suite
quick; raise ``HOOKWIRE_FUZZ_EXAMPLES`` for a longer hunt.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import hypothesis
import schemathesis
from hypothesis import HealthCheck, Phase

from tests.conftest import Stack

_EXAMPLES = int(os.environ.get("HOOKWIRE_FUZZ_EXAMPLES", "250"))


def _fuzz(
    document: dict[str, Any], base_url: str, team_id: str, token: str
) -> tuple[list[int], list[str]]:
    schema = schemathesis.openapi.from_dict(document)
    server_errors: list[str] = []
    statuses: list[int] = []

    @hypothesis.settings(
        max_examples=_EXAMPLES,
        deadline=None,
        database=None,
        derandomize=True,
        phases=[Phase.explicit, Phase.generate],
        suppress_health_check=list(HealthCheck),
    )
    @hypothesis.given(case=schema.as_strategy())
    def run(case: Any) -> None:
        # Aim at the caller's own team so requests get past ownership checks into the
        # handlers; every other part of the request is generated.
        if "team" in (case.path_parameters or {}):
            case.path_parameters["team"] = team_id
        response = case.call(
            base_url=base_url, headers={"authorization": f"Bearer {token}"}, timeout=10
        )
        statuses.append(response.status_code)
        if response.status_code >= 500:
            server_errors.append(
                f"{case.method} {case.formatted_path} query={case.query} body={case.body!r} "
                f"-> {response.status_code} {response.text[:200]}"
            )

    run()
    return statuses, server_errors


async def test_generated_requests_never_get_a_server_error(api_stack: Stack) -> None:
    async with api_stack.session.get(f"{api_stack.api_url}/v1/openapi.json") as response:
        document = await response.json()
    statuses, errors = await asyncio.to_thread(
        _fuzz, document, api_stack.api_url, api_stack.team_id, api_stack.token
    )
    assert errors == [], "\n".join(errors[:10])
    # The run really exercised the handlers: most requests were answered, some accepted.
    assert len(statuses) >= _EXAMPLES // 2
    assert any(status < 300 for status in statuses), sorted(set(statuses))

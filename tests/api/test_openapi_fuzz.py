"""Property-based requests to every operation of the OpenAPI document (schemathesis): none
may be answered with a server error, and every answer is one the document declares.

Cases are generated from the document, valid and invalid, with strings and integers drawn
now and then from a dictionary of values that break drivers and encoders (NUL, lone
surrogates, numbers past a column, forged ``$skipToken`` values). The account path of every
operation under an account is the test's own account, so requests get past the 404 to the
code that reads their parameters. Deterministic (derandomized) and bounded in examples.
"""

from __future__ import annotations

import base64
import json
import re
import traceback

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.generation import GenerationMode
from schemathesis.python.asgi import ASGIClient
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from app.api.event_stream import EventHub

EXAMPLES = 20  # per operation
BODY_EXAMPLES = 60  # per operation that takes a JSON body: most valid ones carry an unencodable string


def _token(position: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(position).encode()).decode().rstrip("=")


# Drawn now and then for any string or integer the document lets a client send.
STRINGS = ["\x00", "a\x00b", ".", "..", "../x", "a/b", "9" * 25, "9" * 5000, "-1", "²", " ", "W10"]
INTEGERS = [2**31, 2**63, 10**30, -1, -(2**63) - 1, 0]
# Drawn often for the parameters whose text the service parses itself.
SKIP_TOKENS = [
    _token({"n": "a", "v": 99999999999999999999999999999}),
    _token({"n": "a\x00", "v": 1}),
    _token({"n": "\ud800", "v": 1}),
    _token({"n": "a", "v": -1}),
    _token({"n": "a"}),
    _token({"e": 2**64}),
    _token({"e": "A" * 22}),  # shaped like an event id's token, made by no key
    _token({"e": "\x00"}),
    _token({"n": 1, "v": True}),
    "W1tbWw",
    "e30",
    "!!",
    "9" * 5000,
]
# Plain numbers (ids before they were tokens), and token-shaped text no key made.
EVENT_IDS = ["1", "0", "99999999999999999999999", "9" * 5000, "²", "-1", "1e3", " 7 "]
EVENT_IDS += ["A" * 22, "_" * 22, "A" * 21 + "B"]

CONFIG = SchemathesisConfig.from_dict(
    {
        "dictionaries": {
            "strings": {"values": STRINGS},
            "integers": {"values": INTEGERS},
            "skip-tokens": {"values": SKIP_TOKENS},
            "event-ids": {"values": EVENT_IDS},
        },
        "generation": {
            "dictionaries": {
                "string": {"dictionary": "strings", "probability": 0.1},
                "integer": {"dictionary": "integers", "probability": 0.2},
            }
        },
        "parameters": {
            "query.$skipToken": {"dictionary": "skip-tokens", "probability": 0.5},
            "query.lastEventId": {"dictionary": "event-ids", "probability": 0.5},
            "header.Last-Event-ID": {"dictionary": "event-ids", "probability": 0.5},
        },
        "max-stream-events": 1,  # the `ready` event; an event stream never ends by itself
    }
)

# Only a JSON body can carry these (as "\ud800" escapes), and the generator's schema checks cannot
# hold them, so they are put into bodies after generation.
UNENCODABLE = ["\ud800", "x\udfffy"]


def _string_slots(value: object) -> list[tuple[object, object]]:
    """(container, key) of every string in a JSON value under names a schema could declare
    (not the random extra members of a generated object, which the service ignores)."""
    if isinstance(value, dict):
        items = [(key, item) for key, item in value.items() if re.fullmatch(r"[A-Za-z_]\w*", key, re.ASCII)]
    elif isinstance(value, list):
        items = list(enumerate(value))
    else:
        return []
    slots = []
    for key, item in items:
        slots += [(value, key)] if isinstance(item, str) else _string_slots(item)
    return slots


def _unencodable(case, data: st.DataObject) -> None:
    """In most cases, one string of the case's JSON body becomes one no UTF-8 can carry."""
    slots = _string_slots(case.body) if (case.media_type or "").endswith("json") else []
    if slots and data.draw(st.integers(0, 3), label="replace a body string") > 0:
        container, key = data.draw(st.sampled_from(slots), label="which")
        container[key] = data.draw(st.sampled_from(UNENCODABLE), label="with")


def _takes_json(operation) -> bool:
    return any(body.media_type.endswith("json") for body in operation.body)


def _takes_input(operation) -> bool:
    return any(
        any(True for _ in part)
        for part in (operation.path_parameters, operation.query, operation.headers, operation.body)
    )


class QuietEventHub(EventHub):
    """The real hub without its background poller, which would share the test's connection."""

    async def start(self) -> None:
        return None


def test_no_operation_answers_a_server_error(client: TestClient, owner: dict[str, str], account: str) -> None:
    _fuzz(client, owner, account, checks=[not_a_server_error], examples=EXAMPLES, body_examples=BODY_EXAMPLES)


# What the document says of each answer: its status, content type, headers and body.
CONFORMANCE = [
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


def test_every_answer_is_the_one_the_document_declares(client: TestClient, owner: dict[str, str], account: str) -> None:
    """An Owner's requests, valid and invalid, to every operation: each answer's status,
    content type, headers and body are declared for that operation (fewer examples: the
    shapes of answers vary less than the inputs that break things)."""
    _fuzz(client, owner, account, checks=CONFORMANCE, examples=6, body_examples=12)


def _fuzz(
    client: TestClient, owner: dict[str, str], account: str, *, checks: list, examples: int, body_examples: int
) -> None:
    app = client.app
    app.state.event_hub = QuietEventHub(app.state.context.session_factory, interval=1.0)
    session = ASGIClient(app)  # not entered: the app's lifespan is not this test's
    schema = schemathesis.openapi.from_dict(client.get("/openapi.json").json(), config=CONFIG)
    _, _, subscription, _, group, _, name = account.strip("/").split("/")[:7]
    failures: dict[str, str] = {}
    operations = sorted(
        (result.ok() for result in schema.get_all_operations()), key=lambda op: (op.method.upper() == "DELETE", op.path)
    )
    for operation in operations:
        pinned = {"subscriptionId": subscription, "resourceGroup": group}
        if "{accountName}/" in operation.path:  # the account's own PUT, GET and DELETE take any name
            pinned["accountName"] = name
        pinned = {k: v for k, v in pinned.items() if "{" + k + "}" in operation.path}
        valid = operation.as_strategy(GenerationMode.POSITIVE, path_parameters=pinned).map(lambda c: (c, True))
        invalid = operation.as_strategy(GenerationMode.NEGATIVE, path_parameters=pinned).map(lambda c: (c, False))
        strategy = st.sampled_from([valid, valid, valid, invalid]).flatmap(lambda s: s)  # 3 valid to 1
        count = body_examples if _takes_json(operation) else examples if _takes_input(operation) else 1
        timeout = 1.0 if operation.path.endswith("/events") else 30.0  # a resumed stream waits for news

        @settings(
            max_examples=count,
            derandomize=True,
            database=None,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
        )
        @given(generated=strategy, data=st.data())
        # Called in this iteration only: the loop's variables are the ones it means.
        def check(generated, data: st.DataObject) -> None:
            case, valid = generated
            if valid:  # an invalid body is refused for what makes it invalid
                _unencodable(case, data)
            response = case.call(session=session, headers=owner, timeout=timeout)  # noqa: B023
            if operation.path == "/ready" and response.status_code == 503:  # noqa: B023
                return  # its answer when a dependency is down (SQLite: locked by the test's transaction)
            case.validate_response(response, checks=checks)

        try:
            check()
        except Exception:  # noqa: BLE001 - every operation's failure is reported at the end
            failures[operation.label] = traceback.format_exc()[-3000:]  # ends with the request to reproduce
    assert not failures, "\n\n".join(f"{label}:\n{error}" for label, error in failures.items())

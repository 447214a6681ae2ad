"""The account's event stream: its images' and web services' state changes, in one stream."""

from __future__ import annotations

from fastapi import APIRouter
from sse_starlette import EventSourceResponse

from app.api.deps import CallerDep, ContextDep, EventHubDep, ReadableAccountNow
from app.api.event_stream import LastEventIdHeader, LastEventIdQuery, stream_response
from app.api.routing import ApiRoute
from app.orm import SubjectKind

PREFIX = "/subscriptions/{subscriptionId}/resourceGroups/{resourceGroup}/accounts/{accountName}"
router = APIRouter(prefix=PREFIX, tags=["events"], route_class=ApiRoute)


@router.get(
    "/events",
    response_class=EventSourceResponse,
    responses={
        200: {
            "content": {"text/event-stream": {}},
            "description": "`ready`, then one `image` or `service` event per state change",
        }
    },
)
async def stream_events(
    account: ReadableAccountNow,
    caller: CallerDep,
    context: ContextDep,
    hub: EventHubDep,
    last_event_id_header: LastEventIdHeader = None,
    last_event_id_query: LastEventIdQuery = None,
) -> EventSourceResponse:
    """The account's image and web service state changes as Server-Sent Events, in one order;
    resume with Last-Event-ID (an id from any of the account's streams)."""
    return stream_response(
        account,
        caller=caller,
        context=context,
        hub=hub,
        kinds=frozenset(SubjectKind),
        last_event_id_header=last_event_id_header,
        last_event_id_query=last_event_id_query,
    )

"""Small helpers shared by the gRPC servicers."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

from services.common.errors import InvalidArgument

ACTOR_ID_HEADER = "x-actor-id"
ACTOR_ROLE_HEADER = "x-actor-role"


def timestamp(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


def from_timestamp(ts: Timestamp, field: str) -> datetime:
    """A protobuf Timestamp as an aware datetime, or INVALID_ARGUMENT when it
    lies outside what a datetime (and PostgreSQL) can hold."""
    try:
        return ts.ToDatetime(tzinfo=UTC)
    except (ValueError, OverflowError, OSError):
        raise InvalidArgument(
            f"{field} is out of range", reason="INVALID_TIMESTAMP", details={"field": field}
        ) from None


def optional_timestamp(message: Any, field: str) -> datetime | None:
    """The named Timestamp field of a message, or None when it is not set."""
    return from_timestamp(getattr(message, field), field) if message.HasField(field) else None


def _metadata(context: grpc.aio.ServicerContext, key: str) -> str:
    for item in context.invocation_metadata() or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return ""


def actor_id(context: grpc.aio.ServicerContext) -> str:
    """Who is acting, as the gateway (or a peer service) says: for audit."""
    return _metadata(context, ACTOR_ID_HEADER)


def actor_role(context: grpc.aio.ServicerContext) -> str:
    return _metadata(context, ACTOR_ROLE_HEADER)

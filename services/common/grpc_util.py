"""Small helpers shared by the gRPC servicers."""

from __future__ import annotations

from datetime import datetime

import grpc
from google.protobuf.timestamp_pb2 import Timestamp

ACTOR_ID_HEADER = "x-actor-id"
ACTOR_ROLE_HEADER = "x-actor-role"


def timestamp(at: datetime | None) -> Timestamp | None:
    if at is None:
        return None
    ts = Timestamp()
    ts.FromDatetime(at)
    return ts


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

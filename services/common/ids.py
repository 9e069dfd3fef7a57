"""Ids are UUID strings on the wire."""

from __future__ import annotations

import uuid

from services.common.errors import InvalidArgument


def parse_uuid(value: str, field: str) -> uuid.UUID:
    """A UUID, or INVALID_ARGUMENT with reason INVALID_ID naming the field."""
    try:
        return uuid.UUID(value)
    except (ValueError, AttributeError, TypeError):
        raise InvalidArgument(
            f"{field} must be a UUID", reason="INVALID_ID", details={"field": field}
        ) from None

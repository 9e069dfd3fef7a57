"""Cursor pagination (AIP-158): ``page_size``, opaque ``page_token``,
``next_page_token``.

A token carries the sort key of the last item returned, so that a list read
newest first stays correct while new items arrive: they sort before the
cursor and never shift the pages after it.
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TypeVar

from services.common.errors import InvalidArgument

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

K = TypeVar("K")


def page_size(requested: int) -> int:
    """The page size to use: the default for 0, at most MAX_PAGE_SIZE."""
    if requested < 0:
        raise InvalidArgument("page_size must not be negative", reason="INVALID_PAGE_SIZE")
    return min(requested or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def encode_cursor(at: datetime, key: object) -> str:
    raw = json.dumps([at.isoformat(), str(key)], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(token: str, key_type: Callable[[str], K]) -> tuple[datetime, K] | None:
    """The cursor in a page token, or None for the first page."""
    if not token:
        return None
    try:
        padded = token + "=" * (-len(token) % 4)
        at, key = json.loads(base64.urlsafe_b64decode(padded.encode()))
        moment = datetime.fromisoformat(at)
        if moment.tzinfo is None:
            raise ValueError("a cursor's time has a zone")
        moment = moment.astimezone(UTC)  # out of range in UTC raises here
        parsed = key_type(key)
        if isinstance(parsed, int) and not -(2**63) <= parsed < 2**63:
            raise ValueError("a cursor's key is an int64")
        return moment, parsed
    except (ValueError, TypeError, AttributeError, OverflowError, binascii.Error):
        raise InvalidArgument("page_token is not valid", reason="INVALID_PAGE_TOKEN") from None

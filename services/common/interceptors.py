"""gRPC interceptors: request ids, logs, metrics and error mapping on the
server; request-id propagation and deadlines on the client."""

from __future__ import annotations

import asyncio
import functools
import itertools
import logging
import operator
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import grpc
import structlog
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from prometheus_client import Counter, Histogram

from services.common.config import CommonSettings
from services.common.errors import (
    DeadlineExceeded,
    Internal,
    InvalidArgument,
    MonetaError,
    Unimplemented,
    to_grpc_status,
    unavailable_from,
)
from services.common.logging import accept_request_id, request_id_var
from services.common.tls import open_channel

# The caller's deadline, as event-loop time, for calls made on its behalf.
deadline_var: ContextVar[float | None] = ContextVar("deadline", default=None)
# The least time worth sending a call to a peer with.
_MIN_PEER_TIMEOUT = 0.005

REQUEST_ID_HEADER = "x-request-id"
_QUIET_METHODS = ("/grpc.health.v1.Health/", "/grpc.reflection.")
# A successful call slower than this is logged at INFO.
SLOW_RPC_SECONDS = 0.5

log = structlog.get_logger("moneta.rpc")

RPC_HANDLED = Counter(
    "moneta_grpc_server_handled_total",
    "gRPC calls handled, by method and status code.",
    ["method", "code"],
)
RPC_LATENCY = Histogram(
    "moneta_grpc_server_handling_seconds",
    "gRPC call latency, by method.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)


def _metadata_value(metadata: Any, key: str) -> str | None:
    for item in metadata or ():
        if item[0] == key:
            value = item[1]
            return value.decode() if isinstance(value, bytes) else str(value)
    return None


# A call that brings no request id gets one made of a random per-process
# prefix and a counter: 32 hex digits like a uuid4's, unique across
# processes, without a getrandom(2) call on every call.
_REQUEST_ID_PREFIX = secrets.token_hex(8)
_request_ids = itertools.count()


def _request_id(metadata: Any) -> str:
    sent = _metadata_value(metadata, REQUEST_ID_HEADER)
    if sent is not None:
        return accept_request_id(sent)
    return f"{_REQUEST_ID_PREFIX}{next(_request_ids):016x}"


_stdlib_log = logging.getLogger("moneta.rpc")


def _debug_dropped() -> bool:
    """True when a DEBUG event would be dropped by the level filter anyway:
    then the routine "rpc" line is not built at all (structlog's bound
    logger copies its context and runs the filter only to drop it, about
    5 us a call). Tests that capture logs replace the filter and still see
    the line."""
    processors = structlog.get_config()["processors"]
    return (
        bool(processors)
        and processors[0] is structlog.stdlib.filter_by_level
        and not _stdlib_log.isEnabledFor(logging.DEBUG)
    )


class ServerInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Wraps every unary-unary method of the service.

    Takes ``x-request-id`` from the metadata (or makes one), logs the call
    with method, duration and status, counts it, and turns domain errors into
    rich statuses. An unexpected exception is logged with its traceback and
    answered as INTERNAL carrying only the request id.

    Each method is wrapped once and the wrapper reused for every call: the
    per-call cost is the call's own work, not building handlers.
    """

    def __init__(self) -> None:
        self._wrapped: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        method: str = handler_call_details.method
        wrapped = self._wrapped.get(method)
        if wrapped is not None:
            return wrapped
        handler = await continuation(handler_call_details)
        if handler is None or handler.unary_unary is None:
            return handler
        wrapped = self._wrapped[method] = _observed_handler(method, handler)
        return wrapped


def _observed_handler(method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
    quiet = method.startswith(_QUIET_METHODS)
    inner = handler.unary_unary
    latency = RPC_LATENCY.labels(method)
    handled: dict[grpc.StatusCode, Any] = {}

    async def observed(request: Any, context: grpc.aio.ServicerContext) -> Any:
        request_id = _request_id(context.invocation_metadata())
        token = request_id_var.set(request_id)
        remaining = context.time_remaining()
        deadline_token = deadline_var.set(
            asyncio.get_running_loop().time() + remaining if remaining is not None else None
        )
        started = time.perf_counter()
        code = grpc.StatusCode.OK
        reason: str | None = None
        try:
            if isinstance(request, Message):
                reject_control_characters(request)
            return await inner(request, context)
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED  # the caller gave up or the deadline passed
            raise
        except MonetaError as exc:
            code, reason = exc.status_code, exc.reason
            await _abort(context, exc)
        except NotImplementedError:
            # A method of the contract whose behaviour has not landed yet.
            code, reason = grpc.StatusCode.UNIMPLEMENTED, "NOT_IMPLEMENTED"
            await _abort(context, Unimplemented(f"{method} is not implemented yet"))
        except Exception as exc:
            if _is_abort(exc, context):
                code = context.code() or grpc.StatusCode.UNKNOWN
                raise
            failure: MonetaError | None = unavailable_from(exc)
            if failure is not None:  # a dependency is down: retry later, not a bug
                log.warning("rpc_dependency_unavailable", method=method, error=repr(exc)[:300])
            else:
                log.exception("rpc_failed", method=method)
                failure = Internal(f"internal error (request id {request_id})", reason="INTERNAL")
            code, reason = failure.status_code, failure.reason
            await _abort(context, failure)
        finally:
            elapsed = time.perf_counter() - started
            counter = handled.get(code)
            if counter is None:
                counter = handled[code] = RPC_HANDLED.labels(method, code.name)
            counter.inc()
            latency.observe(elapsed)
            # A successful call is counted and timed above; its log line
            # (a JSON render and a write(2) on every call in every service)
            # is kept for DEBUG. Refusals, failures and slow calls are logged.
            routine = code == grpc.StatusCode.OK and elapsed < SLOW_RPC_SECONDS
            if not ((quiet or routine) and _debug_dropped()):
                log_at = log.debug if quiet or routine else log.info
                log_at(
                    "rpc",
                    method=method,
                    code=code.name,
                    reason=reason,
                    duration_ms=round(elapsed * 1000, 3),
                )
            request_id_var.reset(token)
            deadline_var.reset(deadline_token)

    return grpc.unary_unary_rpc_method_handler(
        observed,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )


# NUL and the other C0 controls (tab, newline and carriage return aside)
# have no place in any field; PostgreSQL cannot even store NUL.
_CONTROL_RE = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f]")


@dataclass(frozen=True)
class _StringPlan:
    """Where a message type keeps text: its string fields (single and
    repeated), its maps with string keys or values, and the message fields
    that may hold more of it. Worked out once per type."""

    # The single string fields' values, read at once as a tuple (one C call).
    read_strings: Callable[[Message], tuple[str, ...]]
    repeated_strings: tuple[str, ...]
    maps: tuple[str, ...]
    messages: tuple[str, ...]
    repeated_messages: tuple[str, ...]


def _tuple_getter(names: tuple[str, ...]) -> Callable[[Message], tuple[str, ...]]:
    if len(names) == 1:
        (name,) = names
        return lambda message: (getattr(message, name),)
    if not names:
        return lambda message: ()
    return operator.attrgetter(*names)


@functools.cache
def _plan(descriptor: Descriptor) -> _StringPlan | None:
    strings: list[str] = []
    repeated_strings: list[str] = []
    maps: list[str] = []
    messages: list[str] = []
    repeated_messages: list[str] = []
    for field in descriptor.fields:
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            key, value = (
                field.message_type.fields_by_name["key"],
                field.message_type.fields_by_name["value"],
            )
            if FieldDescriptor.TYPE_STRING in (key.type, value.type):
                maps.append(field.name)
        elif field.type == FieldDescriptor.TYPE_STRING:
            (repeated_strings if field.is_repeated else strings).append(field.name)
        elif field.message_type is not None and _holds_text(field.message_type, set()):
            (repeated_messages if field.is_repeated else messages).append(field.name)
    if not (strings or repeated_strings or maps or messages or repeated_messages):
        return None
    return _StringPlan(
        _tuple_getter(tuple(strings)), tuple(repeated_strings), tuple(maps), tuple(messages),
        tuple(repeated_messages),
    )  # fmt: skip


def _holds_text(descriptor: Descriptor, seen: set[str]) -> bool:
    if descriptor.full_name in seen:
        return True  # recursive types: assume they may
    seen.add(descriptor.full_name)
    return any(
        f.type == FieldDescriptor.TYPE_STRING
        or (f.message_type is not None and _holds_text(f.message_type, seen))
        for f in descriptor.fields
    )


def reject_control_characters(message: Message, path: str = "") -> None:
    """INVALID_ARGUMENT naming the first string field that holds a control
    character, anywhere in the message.

    Every call's request goes through this, so the common case is one
    regex search over all the message's text joined; only a hit walks the
    message again, field by field, to name the culprit."""
    texts: list[str] = []
    _collect_text(message, texts)
    if texts and _CONTROL_RE.search("".join(texts)):
        _name_the_first_field(message, path)


def _collect_text(message: Message, texts: list[str]) -> None:
    plan = _plan(message.DESCRIPTOR)
    if plan is None:
        return
    texts.extend(plan.read_strings(message))
    for name in plan.repeated_strings:
        texts.extend(getattr(message, name))
    for name in plan.maps:
        mapping = getattr(message, name)
        if mapping:  # most are empty: iterating even those costs a microsecond
            for key, value in mapping.items():
                texts.extend(t for t in (key, value) if isinstance(t, str))
    for name in plan.messages:
        if message.HasField(name):
            _collect_text(getattr(message, name), texts)
    for name in plan.repeated_messages:
        for item in getattr(message, name):
            _collect_text(item, texts)


def _name_the_first_field(message: Message, path: str) -> None:
    """Raises for the first field holding a control character: the
    message's own text fields first, then its messages, in field order."""
    plan = _plan(message.DESCRIPTOR)
    if plan is None:
        return
    _name_the_field(message, path)
    for name in plan.messages:
        if message.HasField(name):
            _name_the_first_field(getattr(message, name), f"{path}{name}.")
    for name in plan.repeated_messages:
        for item in getattr(message, name):
            _name_the_first_field(item, f"{path}{name}.")


def _name_the_field(message: Message, path: str) -> None:
    for field, value in message.ListFields():
        if field.message_type is not None and field.message_type.GetOptions().map_entry:
            items: list[object] = [v for kv in value.items() for v in kv]
        elif field.is_repeated:
            items = list(value)
        else:
            items = [value]
        if any(isinstance(i, str) and _CONTROL_RE.search(i) for i in items):
            name = f"{path}{field.name}"
            raise InvalidArgument(
                f"{name} holds a control character",
                reason="INVALID_CHARACTERS",
                details={"field": name},
            )


def _is_abort(exc: Exception, context: grpc.aio.ServicerContext) -> bool:
    # grpc.aio raises a private AbortError from context.abort(); by then the
    # status is already set on the context.
    return type(exc).__name__ == "AbortError" or (
        context.code() is not None and context.code() != grpc.StatusCode.OK
    )


async def _abort(context: grpc.aio.ServicerContext, error: MonetaError) -> None:
    status = to_grpc_status(error)
    await context.abort(status.code, status.details, status.trailing_metadata)


class _ClientCallDetails(grpc.aio.ClientCallDetails):  # type: ignore[misc]
    pass


class ClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor):  # type: ignore[misc]
    """Passes the current request id on, and puts a deadline on every call."""

    def __init__(self, default_timeout: float) -> None:
        self._default_timeout = default_timeout

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, Any], Any],
        client_call_details: grpc.aio.ClientCallDetails,
        request: Any,
    ) -> Any:
        metadata = list(client_call_details.metadata or ())
        request_id = request_id_var.get()
        if request_id and not any(k == REQUEST_ID_HEADER for k, _ in metadata):
            metadata.append((REQUEST_ID_HEADER, request_id))
        timeout = (
            client_call_details.timeout
            if client_call_details.timeout is not None
            else self._default_timeout
        )
        deadline = deadline_var.get()
        if deadline is not None:
            # Never wait longer for a peer than our own caller waits for us.
            left = deadline - asyncio.get_running_loop().time()
            if left < _MIN_PEER_TIMEOUT:
                raise DeadlineExceeded("the request's deadline passed", reason="DEADLINE_EXCEEDED")
            timeout = min(timeout, left)
        details = _ClientCallDetails(
            method=client_call_details.method,
            timeout=timeout,
            metadata=grpc.aio.Metadata(*metadata),
            credentials=client_call_details.credentials,
            wait_for_ready=client_call_details.wait_for_ready,
        )
        return await continuation(details, request)


def peer_channel(
    address: str, timeout: float, settings: CommonSettings | None = None
) -> grpc.aio.Channel:
    """A channel to a peer service, with request-id propagation and
    deadlines; over TLS (mutual with a CA bundle) when ``settings`` name a
    certificate, plaintext otherwise."""
    return open_channel(
        address,
        settings,
        interceptors=[ClientInterceptor(timeout)],
        options=[
            ("grpc.keepalive_time_ms", 30_000),
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )

"""What every route of the gateway shares: upstream channels, calls as the
caller, the caller from their token, error bodies, exact amounts."""

import uuid
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC
from decimal import Decimal
from typing import Annotated, Any, TypeVar, cast

import grpc
import orjson
import structlog
from fastapi import Depends, Header, Request, Response
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, Field, StrictFloat, StrictInt, StrictStr

from moneta.budget.v1 import budget_pb2, budget_pb2_grpc
from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2, fraud_pb2_grpc
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common import tls
from services.common.errors import (
    InvalidArgument,
    MonetaError,
    NotFound,
    PermissionDenied,
    Unauthenticated,
    from_rpc_error,
)
from services.common.grpc_util import ACTOR_ID_HEADER, ACTOR_ROLE_HEADER
from services.common.logging import request_id_var
from services.common.money import to_major_units, to_minor_units
from services.gateway.auth import Principal, TokenVerifier
from services.gateway.config import GatewaySettings
from services.gateway.idempotency import Answer, ReplayCache, fingerprint
from services.gateway.ratelimit import RateLimiter
from services.gateway.resilience import CircuitBreaker, GuardedChannel

log = structlog.get_logger("moneta.gateway")
T = TypeVar("T")

HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.FAILED_PRECONDITION: 422,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
STATUS_NAMES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    405: "INVALID_ARGUMENT",
    409: "ALREADY_EXISTS",
    413: "INVALID_ARGUMENT",
    415: "INVALID_ARGUMENT",
    422: "FAILED_PRECONDITION",
    429: "RESOURCE_EXHAUSTED",
    500: "INTERNAL",
}


class JsonResponse(Response):
    """A JSON answer serialised with orjson."""

    media_type = "application/json"

    def __init__(self, body: Any, status_code: int = 200) -> None:
        super().__init__(orjson.dumps(body), status_code=status_code)


class RawJsonResponse(Response):
    """A JSON answer already serialised (a replayed one)."""

    media_type = "application/json"


def error_body(
    http_status: int,
    grpc_status: str,
    reason: str,
    message: str,
    details: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "error": {
            "code": http_status,
            "status": grpc_status,
            "reason": reason,
            "message": message,
            "details": details or {},
        }
    }


# 409s that a retry with the same idempotency key may get past, with the
# seconds worth waiting first. Other 409s (a reused key, a quote used
# already) are final.
RETRY_AFTER_REASONS = {
    "REQUEST_IN_PROGRESS": 1,  # the same request is still at work
    "ATTEMPT_EXPIRED": 1,  # an attempt that stalled moved nothing
    "QUOTE_IN_USE": 1,  # another request is executing the quote
}


def error_response(exc: MonetaError) -> JsonResponse:
    """The HTTP answer for a refusal: the envelope, and Retry-After on 429,
    503 and the 409s a retry may get past. A 500 says only the request id,
    never what went wrong."""
    status = HTTP_STATUS.get(exc.status_code, 500)
    message, details = exc.message, exc.details
    if status >= 500 and status not in (503, 504):
        message, details = f"internal error (request id {request_id_var.get() or '-'})", {}
    response = JsonResponse(
        error_body(status, exc.status_code.name, exc.reason, message, details), status_code=status
    )
    retry_after = getattr(exc, "retry_after", None) or RETRY_AFTER_REASONS.get(exc.reason)
    if retry_after is not None or status in (429, 503):
        response.headers["Retry-After"] = str(retry_after or 1)
    return response


class ErrorDetail(BaseModel):
    code: int = Field(description="The HTTP status.")
    status: str = Field(description="The gRPC status name, e.g. FAILED_PRECONDITION.")
    reason: str = Field(description="What went wrong, UPPER_SNAKE, e.g. INSUFFICIENT_FUNDS.")
    message: str = Field(description="For people.")
    details: dict[str, str] = Field(description="e.g. the field at fault.")


class ErrorResponse(BaseModel):
    """Every error answer."""

    error: ErrorDetail


_RETRY_AFTER = {"Retry-After": {"description": "Seconds to wait.", "schema": {"type": "integer"}}}
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc, **extra}
    for code, desc, extra in (
        (400, "Invalid request (reason says which field and why)", {}),
        (401, "Missing, invalid or expired token", {}),
        (403, "The caller's role may not do this", {}),
        (404, "Not found, or not yours", {}),
        (409, "Conflict: an idempotency key reused for another request, or a duplicate", {}),
        (413, "The body is too large", {}),
        (
            422,
            "Business refusal: INSUFFICIENT_FUNDS, BUDGET_EXCEEDED, WALLET_FROZEN, "
            "WALLET_CLOSED, TRANSACTION_DECLINED …",
            {},
        ),
        (429, "Rate limited (per user and per IP)", {"headers": _RETRY_AFTER}),
        (500, "A bug; the message holds only the request id", {}),
        (501, "The upstream does not implement this yet", {}),
        (503, "An upstream service is unavailable", {"headers": _RETRY_AFTER}),
        (504, "An upstream service timed out", {}),
    )
}


# ---------------------------------------------------------------- upstreams

# Each upstream's channel. One small function, so that the transport (TLS
# or not) is chosen in one place.
CHANNEL_OPTIONS = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
]


def open_channel(target: str, settings: GatewaySettings) -> grpc.aio.Channel:
    return tls.open_channel(target, settings, options=CHANNEL_OPTIONS)


class Upstreams:
    """One channel per upstream, each behind its own circuit breaker; the
    stubs call through it (deadline, request id, retried reads)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.addresses = {
            "ledger": settings.ledger_addr,
            "wallet": settings.wallet_addr,
            "budget": settings.budget_addr,
            "fraud": settings.fraud_addr,
        }
        self.channels = {
            name: open_channel(addr, settings) for name, addr in self.addresses.items()
        }
        self.breakers = {
            name: CircuitBreaker(
                name, settings.breaker_failure_threshold, settings.breaker_cooldown_seconds
            )
            for name in self.addresses
        }
        guarded = {
            name: cast(
                grpc.aio.Channel,
                GuardedChannel(
                    channel,
                    self.breakers[name],
                    settings.peer_timeout_seconds,
                    settings.upstream_read_attempts,
                ),
            )
            for name, channel in self.channels.items()
        }
        self.wallet = wallet_pb2_grpc.WalletServiceStub(guarded["wallet"])
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(guarded["ledger"])
        self.budget = budget_pb2_grpc.BudgetServiceStub(guarded["budget"])
        self.fraud = fraud_pb2_grpc.FraudServiceStub(guarded["fraud"])
        self.service_names = {
            "ledger": ledger_pb2.DESCRIPTOR.services_by_name["LedgerService"].full_name,
            "wallet": wallet_pb2.DESCRIPTOR.services_by_name["WalletService"].full_name,
            "budget": budget_pb2.DESCRIPTOR.services_by_name["BudgetService"].full_name,
            "fraud": fraud_pb2.DESCRIPTOR.services_by_name["FraudService"].full_name,
        }

    async def close(self) -> None:
        for channel in self.channels.values():
            await channel.close()

    async def ready(self, name: str) -> str | None:
        """None when the upstream reports SERVING on its service name."""
        stub = health_pb2_grpc.HealthStub(self.channels[name])
        try:
            response = await stub.Check(
                health_pb2.HealthCheckRequest(service=self.service_names[name]), timeout=1.0
            )
        except grpc.aio.AioRpcError as exc:
            return str(exc.code().name)
        if response.status != health_pb2.HealthCheckResponse.SERVING:
            return str(health_pb2.HealthCheckResponse.ServingStatus.Name(response.status))
        return None


async def call(
    principal: Principal | None,
    rpc: Callable[..., Awaitable[T]],
    request: Any,
    timeout: float | None = None,  # noqa: ASYNC109 - the upstream call's own deadline
) -> T:
    """Calls an upstream as the principal (within the upstream's deadline,
    or ``timeout``); a failed call becomes its domain error."""
    metadata: list[tuple[str, str]] = []
    if principal is not None:
        metadata = [(ACTOR_ID_HEADER, principal.user_id), (ACTOR_ROLE_HEADER, principal.role)]
    try:
        if timeout is None:
            return await rpc(request, metadata=metadata)
        return await rpc(request, metadata=metadata, timeout=timeout)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None


Amount = StrictStr | StrictInt | StrictFloat
# The payer's PIN on a payment that cannot wait for a fraud review.
StepUpPin = Annotated[
    str | None,
    Field(
        pattern=r"^[0-9]{4,6}$",
        description="The payer's PIN (4 to 6 digits). Needed only when fraud sends the payment "
        "to review: without it such a payment is refused (422 PIN_REQUIRED; send it again with a "
        "new idempotency key and the PIN); a wrong one is 403 PIN_INCORRECT, and after five "
        "wrong ones 422 PIN_LOCKED. 422 PIN_NOT_SET: the payer has no PIN yet (PUT "
        "/api/v1/wallet/pin).",
        json_schema_extra={"format": "password", "writeOnly": True},
    ),
]


def parse_amount(value: Amount, currency: str, field: str = "amount") -> int:
    """Minor units from a decimal string or a JSON number, exactly."""
    # A JSON number arrives as a float; its shortest repr is the decimal the
    # client wrote (for anything money-sized), so no binary rounding leaks in.
    exact = Decimal(repr(value)) if isinstance(value, float) else value
    try:
        return to_minor_units(exact, currency)
    except InvalidArgument as exc:
        exc.details.setdefault("field", field)
        raise


# Dependencies are coroutines: FastAPI runs a plain function in a thread.


async def get_upstreams(request: Request) -> Upstreams:
    return request.app.state.upstreams  # type: ignore[no-any-return]


def client_ip(request: Request) -> str | None:
    return request.client.host if request.client else None


async def get_principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    """The caller from their token, within their rate limits. Refused
    tokens count against the client's IP, so that guessing is throttled."""
    state = request.app.state
    verifier: TokenVerifier = state.verifier
    limiter: RateLimiter | None = state.limiter
    try:
        who = await verifier.authenticate(authorization)
    except Unauthenticated:
        if limiter is not None:
            await limiter.check(None, client_ip(request))
        raise
    if limiter is not None:
        await limiter.check(who.user_id, client_ip(request))
    return who


async def limit_by_ip(request: Request) -> None:
    """Rate limits for requests without a token (the bank's webhooks)."""
    limiter: RateLimiter | None = request.app.state.limiter
    if limiter is not None:
        await limiter.check(None, client_ip(request))


async def get_replays(request: Request) -> ReplayCache:
    return request.app.state.replays  # type: ignore[no-any-return]


Caller = Annotated[Principal, Depends(get_principal)]
Peers = Annotated[Upstreams, Depends(get_upstreams)]
Replays = Annotated[ReplayCache, Depends(get_replays)]
IdempotencyKeyHeader = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        min_length=1,
        max_length=200,
        description="The idempotency key, when it is not in the body.",
    ),
]


async def replay_once(
    replays: ReplayCache,
    who: Principal,
    key: str,
    upstream_request: Message,
    run: Callable[[], Awaitable[BaseModel]],
    status_code: int = 200,
) -> Response:
    """Runs a money-moving request once per caller and key: a repeat with
    the same request replays the first answer (status and body), one with
    another request is 409 IDEMPOTENCY_KEY_REUSED."""

    async def answer() -> Answer:
        return Answer(status_code, orjson.dumps((await run()).model_dump()))

    def refusal(exc: MonetaError) -> Answer:
        response = error_response(exc)
        return Answer(response.status_code, bytes(response.body))

    result = await replays.once(who.user_id, key, fingerprint(upstream_request), answer, refusal)
    response = RawJsonResponse(result.body, status_code=result.status)
    if result.replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def same_id(a: str, b: str) -> bool:
    """Whether two ids name the same thing: UUIDs compare in canonical form
    (case, braces and hyphens aside), anything else as written."""
    try:
        return uuid.UUID(a) == uuid.UUID(b)
    except ValueError:
        return a == b


def is_self(who: Principal, user_id: str) -> bool:
    return same_id(who.user_id, user_id)


def require_person(who: Principal) -> None:
    """A person acting for themselves: not an internal service."""
    require_role(who, "user", "manager", "admin")


def require_self(who: Principal, user_id: str) -> None:
    """Money moves only from the caller's own wallet; anyone else's does not
    exist, as far as the caller knows."""
    require_person(who)
    if not is_self(who, user_id):
        raise NotFound("not found", reason="WALLET_NOT_FOUND")


def require_idempotency_key(body_key: str | None, header_key: str | None) -> str:
    """A money-moving request's key: in the body, or the Idempotency-Key header."""
    key = body_key or header_key
    if not key:
        raise InvalidArgument(
            "idempotency_key is required (body or Idempotency-Key header)",
            reason="IDEMPOTENCY_KEY_REQUIRED",
        )
    return key


async def authorize_user_access(ups: Upstreams, who: Principal, user_id: str, reason: str) -> None:
    """Self, admin, or a manager of the user's company; anyone else is told
    the thing does not exist, so that ids cannot be probed."""
    require_person(who)
    if who.role == "admin" or is_self(who, user_id):
        return
    await user_in_reach(ups, who, user_id, reason)


async def user_in_reach(
    ups: Upstreams, who: Principal, user_id: str, reason: str
) -> wallet_pb2.User:
    """The user, when the caller is them, an admin, or a manager of their
    company (the wallet knows each user's company); NOT_FOUND otherwise."""
    require_person(who)
    hidden = NotFound("not found", reason=reason)
    if who.role == "user" and not is_self(who, user_id):
        raise hidden
    try:
        found: wallet_pb2.GetUserResponse = await call(
            who, ups.wallet.GetUser, wallet_pb2.GetUserRequest(user_id=user_id)
        )
    except (NotFound, InvalidArgument):
        raise hidden from None
    user = found.user
    if who.role == "admin" or is_self(who, user.user_id):
        return user
    same_company = bool(who.company_id and user.company_id) and same_id(
        user.company_id, who.company_id
    )
    if who.role == "manager" and same_company:
        return user
    raise hidden


def require_role(who: Principal, *roles: str) -> None:
    if who.role not in roles:
        raise PermissionDenied(f"{' or '.join(roles)} only", reason="ROLE_REQUIRED")


def require_positive_amount(amount: int, field: str = "amount") -> int:
    if amount <= 0:
        raise InvalidArgument(
            "amount must be greater than zero", reason="INVALID_AMOUNT", details={"field": field}
        )
    return amount


async def positive_money(
    ups: Upstreams, who: Principal, amount: Amount, currency: str | None, user_id: str
) -> Money:
    """A positive amount in minor units of ``currency``, by default the
    currency of the user's wallet."""
    if currency is None:
        found: wallet_pb2.GetWalletResponse = await call(
            who, ups.wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=user_id)
        )
        currency = found.wallet.currency
    return Money(amount=require_positive_amount(parse_amount(amount, currency)), currency=currency)


def status_name(value: wallet_pb2.TransactionStatus.ValueType) -> str:
    return wallet_pb2.TransactionStatus.Name(value).removeprefix("TRANSACTION_STATUS_")


def type_name(value: wallet_pb2.TransactionType.ValueType) -> str:
    return wallet_pb2.TransactionType.Name(value).removeprefix("TRANSACTION_TYPE_")


def iso(ts: Timestamp) -> str:
    """A protobuf Timestamp as ISO 8601 in UTC."""
    return ts.ToDatetime(tzinfo=UTC).isoformat()


def enum_value(enum: Any, prefix: str, name: str, field: str) -> Any:
    """The wire value of an enum member named without its prefix, or
    INVALID_<FIELD>."""
    try:
        return enum.Value(prefix + name.upper())
    except ValueError:
        raise InvalidArgument(
            f"unknown {field} {name[:32]!r}",
            reason=f"INVALID_{field.upper()}",
            details={"field": field},
        ) from None


class BalanceAnswer(BaseModel):
    currency: str
    available: str
    pending: str
    posted: str


def balance_answers(balances: Iterable[wallet_pb2.CurrencyBalance]) -> list[BalanceAnswer]:
    return [
        BalanceAnswer(
            currency=b.currency,
            available=to_major_units(b.available, b.currency),
            pending=to_major_units(b.pending, b.currency),
            posted=to_major_units(b.posted, b.currency),
        )
        for b in balances
    ]

"""What every route of the gateway shares: upstream channels, calls as the
caller, the caller from their token, error bodies, exact amounts."""

import uuid
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import grpc
import orjson
import structlog
from fastapi import Depends, Header, Request, Response
from grpc_health.v1 import health_pb2, health_pb2_grpc
from pydantic import BaseModel, StrictFloat, StrictInt, StrictStr

from moneta.budget.v1 import budget_pb2
from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.errors import (
    InvalidArgument,
    NotFound,
    PermissionDenied,
    from_rpc_error,
)
from services.common.grpc_util import ACTOR_ID_HEADER, ACTOR_ROLE_HEADER
from services.common.interceptors import peer_channel
from services.common.money import to_minor_units
from services.gateway.auth import Principal, TokenVerifier
from services.gateway.config import GatewaySettings

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
    500: "INTERNAL",
}


class JsonResponse(Response):
    """A JSON answer serialised with orjson."""

    media_type = "application/json"

    def __init__(self, body: Any, status_code: int = 200) -> None:
        super().__init__(orjson.dumps(body), status_code=status_code)


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


class ErrorResponse(BaseModel):
    """Every error answer: {"error": {...}}."""

    error: dict[str, Any]


ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse, "description": desc}
    for code, desc in {
        400: "Invalid request (reason says which field and why)",
        401: "Missing, invalid or expired token",
        403: "The caller's role may not do this",
        404: "Not found, or not yours",
        409: "Conflict: an idempotency key reused with another request, or a duplicate",
        422: "Business refusal: INSUFFICIENT_FUNDS, BUDGET_EXCEEDED, WALLET_FROZEN, TRANSACTION_DECLINED …",
        503: "An upstream service is unavailable",
        504: "An upstream service timed out",
    }.items()
}


# ---------------------------------------------------------------- upstreams


class Upstreams:
    def __init__(self, settings: GatewaySettings) -> None:
        timeout = settings.peer_timeout_seconds
        self.addresses = {
            "ledger": settings.ledger_addr,
            "wallet": settings.wallet_addr,
            "budget": settings.budget_addr,
            "fraud": settings.fraud_addr,
        }
        self.channels = {name: peer_channel(addr, timeout) for name, addr in self.addresses.items()}
        self.wallet = wallet_pb2_grpc.WalletServiceStub(self.channels["wallet"])
        self.ledger = ledger_pb2_grpc.LedgerServiceStub(self.channels["ledger"])
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


async def call(principal: Principal | None, rpc: Callable[..., Awaitable[T]], request: Any) -> T:
    """Calls an upstream as the principal; a failed call becomes its domain error."""
    metadata: list[tuple[str, str]] = []
    if principal is not None:
        metadata = [(ACTOR_ID_HEADER, principal.user_id), (ACTOR_ROLE_HEADER, principal.role)]
    try:
        return await rpc(request, metadata=metadata)
    except grpc.aio.AioRpcError as exc:
        raise from_rpc_error(exc) from None


Amount = StrictStr | StrictInt | StrictFloat


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


def get_upstreams(request: Request) -> Upstreams:
    return request.app.state.upstreams  # type: ignore[no-any-return]


async def get_principal(
    request: Request, authorization: Annotated[str | None, Header()] = None
) -> Principal:
    verifier: TokenVerifier = request.app.state.verifier
    return verifier.verify(authorization)


Caller = Annotated[Principal, Depends(get_principal)]
Peers = Annotated[Upstreams, Depends(get_upstreams)]


def same_id(a: str, b: str) -> bool:
    """Whether two ids name the same thing: UUIDs compare in canonical form
    (case, braces and hyphens aside), anything else as written."""
    try:
        return uuid.UUID(a) == uuid.UUID(b)
    except ValueError:
        return a == b


def is_self(who: Principal, user_id: str) -> bool:
    return same_id(who.user_id, user_id)


def require_self(who: Principal, user_id: str) -> None:
    """Money moves only from the caller's own wallet; anyone else's does not
    exist, as far as the caller knows."""
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
    if who.role == "admin" or (who.role in ("user", "manager") and is_self(who, user_id)):
        return
    if who.role == "manager" and who.company_id:
        try:
            target = await call(who, ups.wallet.GetUser, wallet_pb2.GetUserRequest(user_id=user_id))
        except (NotFound, InvalidArgument):
            raise NotFound("not found", reason=reason) from None
        if target.user.company_id == who.company_id:
            return
    raise NotFound("not found", reason=reason)


def require_role(who: Principal, *roles: str) -> None:
    if who.role not in roles:
        raise PermissionDenied(f"{' or '.join(roles)} only", reason="ROLE_REQUIRED")

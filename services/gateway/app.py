"""The gateway's FastAPI application."""

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from decimal import Decimal
from typing import Annotated, Any, TypeVar

import grpc
import orjson
import structlog
from fastapi import Depends, FastAPI, Header, Request, Response
from fastapi.exceptions import RequestValidationError
from grpc_health.v1 import health_pb2, health_pb2_grpc
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from moneta.budget.v1 import budget_pb2
from moneta.common.v1.money_pb2 import Money
from moneta.fraud.v1 import fraud_pb2
from moneta.ledger.v1 import ledger_pb2, ledger_pb2_grpc
from moneta.wallet.v1 import wallet_pb2, wallet_pb2_grpc
from services.common.errors import (
    InvalidArgument,
    MonetaError,
    NotFound,
    PermissionDenied,
    from_rpc_error,
)
from services.common.grpc_util import ACTOR_ID_HEADER, ACTOR_ROLE_HEADER
from services.common.infra import redis_client
from services.common.interceptors import REQUEST_ID_HEADER, peer_channel
from services.common.logging import accept_request_id, request_id_var
from services.common.money import to_major_units, to_minor_units
from services.gateway.auth import Principal, TokenVerifier
from services.gateway.config import GatewaySettings

log = structlog.get_logger("moneta.gateway")
T = TypeVar("T")

HTTP_REQUESTS = Counter(
    "moneta_http_requests_total",
    "HTTP requests, by route and status.",
    ["method", "route", "status"],
)
HTTP_LATENCY = Histogram(
    "moneta_http_request_seconds",
    "HTTP request latency, by route.",
    ["method", "route"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)

_HTTP_STATUS = {
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
_STATUS_NAMES = {
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


# ---------------------------------------------------------------- bodies

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


class TransferBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    sender_id: str = Field(min_length=1, max_length=64)
    recipient: str = Field(
        min_length=1, max_length=320, description="User id, email, phone (E.164) or username."
    )
    amount: Amount = Field(description='Decimal string or number, in major units, e.g. "12.50".')
    currency: str | None = Field(default=None, min_length=3, max_length=4)
    idempotency_key: str | None = Field(default=None, min_length=1, max_length=200)
    note: str = Field(default="", max_length=500)
    device_id: str = Field(default="", max_length=200)


class TransferAnswer(BaseModel):
    transfer_id: str
    status: str
    sender_balance: str
    currency: str


class CreateWalletBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    user_id: str = Field(min_length=1, max_length=64)
    currency: str = Field(min_length=3, max_length=4)
    initial_balance: Amount | None = None


class BalanceAnswer(BaseModel):
    currency: str
    available: str
    pending: str
    posted: str


class WalletAnswer(BaseModel):
    wallet_id: str
    user_id: str
    balance: str
    currency: str
    status: str
    balances: list[BalanceAnswer]
    created_at: str
    updated_at: str


class VerifyAnswer(BaseModel):
    ok: bool
    discrepancies: list[dict[str, Any]]
    accounts_checked: int
    transfers_checked: int
    entries_checked: int


def recipient_of(value: str) -> wallet_pb2.Recipient:
    value = value.strip()
    try:
        return wallet_pb2.Recipient(user_id=str(uuid.UUID(value)))
    except ValueError:
        pass
    if "@" in value:
        return wallet_pb2.Recipient(email=value)
    if value.startswith("+"):
        return wallet_pb2.Recipient(phone=value)
    return wallet_pb2.Recipient(username=value)


def wallet_answer(w: wallet_pb2.Wallet) -> WalletAnswer:
    return WalletAnswer(
        wallet_id=w.wallet_id,
        user_id=w.user_id,
        balance=to_major_units(w.balance, w.currency),
        currency=w.currency,
        status=wallet_pb2.WalletStatus.Name(w.status).removeprefix("WALLET_STATUS_"),
        balances=[
            BalanceAnswer(
                currency=b.currency,
                available=to_major_units(b.available, b.currency),
                pending=to_major_units(b.pending, b.currency),
                posted=to_major_units(b.posted, b.currency),
            )
            for b in w.balances
        ],
        created_at=w.created_at.ToDatetime().isoformat() + "Z",
        updated_at=w.updated_at.ToDatetime().isoformat() + "Z",
    )


# ---------------------------------------------------------------- the app


def create_app(settings: GatewaySettings) -> FastAPI:
    verifier = TokenVerifier(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)
    state: dict[str, Any] = {}

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        if settings.uses_dev_secret:
            log.warning(
                "dev_jwt_secret_in_use",
                detail="MONETA_JWT_SECRET is the development default; set a real secret",
            )
        state["upstreams"] = Upstreams(settings)
        state["redis"] = redis_client(settings.redis_url)
        yield
        await state["upstreams"].close()
        await state["redis"].aclose()

    app = FastAPI(
        title="Moneta API",
        version="1.0.0",
        description="The public HTTP API of Moneta, an open money core. Amounts are decimal "
        'strings in major units; errors are {"error": {code, status, reason, message, details}}.',
        lifespan=lifespan,
    )

    def upstreams() -> Upstreams:
        return state["upstreams"]  # type: ignore[no-any-return]

    async def principal(authorization: Annotated[str | None, Header()] = None) -> Principal:
        return verifier.verify(authorization)

    # -- middleware and errors

    @app.middleware("http")
    async def observe(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        request_id = accept_request_id(request.headers.get(REQUEST_ID_HEADER))
        token = request_id_var.set(request_id)
        started = time.perf_counter()
        length = request.headers.get("content-length")
        try:
            if length and length.isdigit() and int(length) > settings.max_body_bytes:
                response: Response = JsonResponse(
                    error_body(
                        413,
                        "INVALID_ARGUMENT",
                        "BODY_TOO_LARGE",
                        f"the body is larger than {settings.max_body_bytes} bytes",
                    ),
                    status_code=413,
                )
            else:
                response = await call_next(request)
        finally:
            request_id_var.reset(token)
        route = request.scope.get("route")
        path = getattr(route, "path", "unmatched")
        elapsed = time.perf_counter() - started
        HTTP_REQUESTS.labels(request.method, path, str(response.status_code)).inc()
        HTTP_LATENCY.labels(request.method, path).observe(elapsed)
        response.headers["X-Request-ID"] = request_id
        if path not in ("/health", "/ready", "/metrics"):
            log.info(
                "http",
                method=request.method,
                route=path,
                status=response.status_code,
                duration_ms=round(elapsed * 1000, 3),
                request_id=request_id,
            )
        return response

    @app.exception_handler(MonetaError)
    async def on_domain_error(request: Request, exc: MonetaError) -> JsonResponse:
        status = _HTTP_STATUS.get(exc.status_code, 500)
        message = exc.message
        if status == 500:
            message = f"internal error (request id {request_id_var.get() or '-'})"
        return JsonResponse(
            error_body(status, exc.status_code.name, exc.reason, message, exc.details),
            status_code=status,
        )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JsonResponse:
        first = exc.errors()[0] if exc.errors() else {}
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JsonResponse(
            error_body(
                400,
                "INVALID_ARGUMENT",
                "VALIDATION_ERROR",
                f"{field or 'body'}: {first.get('msg', 'invalid')}",
                {"field": field},
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JsonResponse:
        status = exc.status_code
        reason = {404: "ROUTE_NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(status, "HTTP_ERROR")
        return JsonResponse(
            error_body(status, _STATUS_NAMES.get(status, "UNKNOWN"), reason, str(exc.detail)),
            status_code=status,
        )

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JsonResponse:
        log.exception("unhandled_error")
        return JsonResponse(
            error_body(
                500,
                "INTERNAL",
                "INTERNAL",
                f"internal error (request id {request_id_var.get() or '-'})",
            ),
            status_code=500,
        )

    # -- operations

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """The process runs."""
        return {"status": "ok"}

    @app.get("/ready", tags=["operations"], responses={503: {"description": "Not ready"}})
    async def ready() -> JsonResponse:
        """Every upstream answers its health check, and Redis answers."""
        ups = upstreams()
        names = list(ups.addresses)
        results = await asyncio.gather(*(ups.ready(n) for n in names))
        checks: dict[str, str] = {n: r or "SERVING" for n, r in zip(names, results, strict=True)}
        try:
            await asyncio.wait_for(state["redis"].ping(), 1.0)
            checks["redis"] = "SERVING"
        except Exception as exc:
            checks["redis"] = type(exc).__name__
        failing = sorted(n for n, c in checks.items() if c != "SERVING")
        body = {"status": "not_ready" if failing else "ready", "checks": checks, "failing": failing}
        return JsonResponse(body, status_code=503 if failing else 200)

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    # -- wallets

    async def authorize_user_access(who: Principal, user_id: str, reason: str) -> None:
        """Self, admin, or a manager of the user's company; anyone else is
        told the thing does not exist, so ids cannot be probed."""
        if who.role == "admin" or (who.role in ("user", "manager") and who.user_id == user_id):
            return
        if who.role == "manager" and who.company_id:
            try:
                target = await call(
                    who, upstreams().wallet.GetUser, wallet_pb2.GetUserRequest(user_id=user_id)
                )
            except (NotFound, InvalidArgument):
                raise NotFound("not found", reason=reason) from None
            if target.user.company_id == who.company_id:
                return
        raise NotFound("not found", reason=reason)

    @app.post("/api/v1/wallets", status_code=201, tags=["wallets"], responses=ERROR_RESPONSES)
    async def create_wallet(
        body: CreateWalletBody, who: Annotated[Principal, Depends(principal)]
    ) -> WalletAnswer:
        """Creates a user's wallet, funded from their company when an initial
        balance is given. Managers (own company) and admins."""
        if who.role not in ("manager", "admin"):
            raise PermissionDenied("managers and admins create wallets", reason="ROLE_REQUIRED")
        await authorize_user_access(who, body.user_id, "USER_NOT_FOUND")
        initial = (
            parse_amount(body.initial_balance, body.currency, "initial_balance")
            if body.initial_balance is not None
            else 0
        )
        if initial and who.role != "admin" and body.user_id == who.user_id:
            raise PermissionDenied(
                "a manager cannot fund their own wallet", reason="SELF_FUNDING_FORBIDDEN"
            )
        response = await call(
            who,
            upstreams().wallet.CreateWallet,
            wallet_pb2.CreateWalletRequest(
                user_id=body.user_id, currency=body.currency, initial_balance=initial
            ),
        )
        return wallet_answer(response.wallet)

    @app.get("/api/v1/wallets/{user_id}", tags=["wallets"], responses=ERROR_RESPONSES)
    async def get_wallet(
        user_id: str, who: Annotated[Principal, Depends(principal)]
    ) -> WalletAnswer:
        """A user's wallet with its balance in every currency."""
        await authorize_user_access(who, user_id, "WALLET_NOT_FOUND")
        response = await call(
            who, upstreams().wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=user_id)
        )
        return wallet_answer(response.wallet)

    # -- transfers

    @app.post("/api/v1/transfers", tags=["transfers"], responses=ERROR_RESPONSES)
    async def create_transfer(
        body: TransferBody,
        who: Annotated[Principal, Depends(principal)],
        idempotency_key: Annotated[str | None, Header(max_length=200)] = None,
    ) -> TransferAnswer:
        """A P2P transfer from the caller's wallet to a user found by id, email,
        phone or username. Retrying with the same idempotency key returns the
        first result and moves nothing again."""
        if body.sender_id != who.user_id:
            # Someone else's wallet does not exist, as far as the caller knows.
            raise NotFound("not found", reason="WALLET_NOT_FOUND")
        key = body.idempotency_key or idempotency_key
        if not key:
            raise InvalidArgument(
                "idempotency_key is required (body or Idempotency-Key header)",
                reason="IDEMPOTENCY_KEY_REQUIRED",
            )
        currency = body.currency
        if currency is None:
            sender = await call(
                who, upstreams().wallet.GetWallet, wallet_pb2.GetWalletRequest(user_id=who.user_id)
            )
            currency = sender.wallet.currency
        amount = parse_amount(body.amount, currency)
        if amount <= 0:
            raise InvalidArgument(
                "amount must be greater than zero",
                reason="INVALID_AMOUNT",
                details={"field": "amount"},
            )
        response = await call(
            who,
            upstreams().wallet.Transfer,
            wallet_pb2.TransferRequest(
                sender_id=body.sender_id,
                recipient=recipient_of(body.recipient),
                amount=Money(amount=amount, currency=currency),
                idempotency_key=key,
                note=body.note,
                device_id=body.device_id,
            ),
        )
        balance = response.sender_balance
        return TransferAnswer(
            transfer_id=response.transfer_id,
            status=wallet_pb2.TransactionStatus.Name(response.status).removeprefix(
                "TRANSACTION_STATUS_"
            ),
            sender_balance=to_major_units(balance.amount, balance.currency),
            currency=balance.currency,
        )

    # -- admin

    @app.get("/api/v1/admin/ledger/verify", tags=["admin"], responses=ERROR_RESPONSES)
    async def verify_ledger(who: Annotated[Principal, Depends(principal)]) -> VerifyAnswer:
        """Proves that no money was created or lost. Admins."""
        if who.role != "admin":
            raise PermissionDenied("admins only", reason="ROLE_REQUIRED")
        r = await call(who, upstreams().ledger.VerifyLedger, ledger_pb2.VerifyLedgerRequest())
        return VerifyAnswer(
            ok=r.ok,
            discrepancies=[
                {
                    "kind": d.kind,
                    "account_id": d.account_id,
                    "currency": d.currency,
                    "expected": d.expected,
                    "actual": d.actual,
                    "detail": d.detail,
                }
                for d in r.discrepancies
            ],
            accounts_checked=r.accounts_checked,
            transfers_checked=r.transfers_checked,
            entries_checked=r.entries_checked,
        )

    return app

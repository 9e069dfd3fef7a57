"""The gateway's FastAPI application: the edge (request ids, body limits,
metrics, access log), error mapping, operations endpoints, and the routers
of each area."""

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.common.errors import MonetaError
from services.common.infra import redis_client
from services.common.interceptors import REQUEST_ID_HEADER
from services.common.logging import accept_request_id, request_id_var
from services.gateway import (
    routes_admin,
    routes_banking,
    routes_budgets,
    routes_payments,
    routes_wallets,
)
from services.gateway.auth import TokenVerifier
from services.gateway.config import GatewaySettings
from services.gateway.deps import (
    STATUS_NAMES,
    JsonResponse,
    Upstreams,
    error_body,
    error_response,
)
from services.gateway.idempotency import ReplayCache
from services.gateway.ratelimit import RateLimiter
from services.gateway.resilience import CircuitBreaker

log = structlog.get_logger("moneta.gateway")

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

ROUTERS = [
    routes_wallets.router,
    routes_banking.router,
    routes_payments.router,
    routes_budgets.router,
    routes_admin.router,
]
QUIET_ROUTES = frozenset({"/health", "/ready", "/metrics"})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})


def json_depth_exceeds(body: bytes, limit: int) -> bool:
    """Whether JSON nests objects and arrays deeper than ``limit`` (brackets
    inside strings do not count). Cheap when the body has few brackets."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    in_string = escaped = False
    for byte in body:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):  # ] }
            depth -= 1
    return False


class Edge:
    """The outermost layer (plain ASGI, so that it costs little): a request
    id on every request and answer, bodies read up to the size limit and
    refused beyond it or when nested too deep, a 500 envelope for a bug,
    and metrics and an access log line for every request."""

    def __init__(self, app: ASGIApp, max_body_bytes: int, max_json_depth: int) -> None:
        self.app = app
        self.max_body = max_body_bytes
        self.max_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        headers = dict(scope["headers"])
        request_id = accept_request_id(
            headers.get(REQUEST_ID_HEADER.encode(), b"").decode("latin-1") or None
        )
        token = request_id_var.set(request_id)
        status = 500
        sent = False

        async def send_with_id(message: Message) -> None:
            nonlocal status, sent
            if message["type"] == "http.response.start":
                status = message["status"]
                sent = True
                message["headers"] = [
                    *message.get("headers", ()),
                    (b"x-request-id", request_id.encode()),
                ]
            await send(message)

        try:
            refusal, receive = await self._read_body(scope, headers, receive)
            if refusal is not None:
                await refusal(scope, receive, send_with_id)
            else:
                await self.app(scope, receive, send_with_id)
        except Exception:
            log.exception("unhandled_error", request_id=request_id)
            if not sent:
                await _internal_error(request_id)(scope, receive, send_with_id)
        finally:
            request_id_var.reset(token)
            route = getattr(scope.get("route"), "path", "unmatched")
            elapsed = time.perf_counter() - started
            method = scope["method"]
            HTTP_REQUESTS.labels(method, route, str(status)).inc()
            HTTP_LATENCY.labels(method, route).observe(elapsed)
            if route not in QUIET_ROUTES:
                log.info(
                    "http",
                    method=method,
                    route=route,
                    status=status,
                    duration_ms=round(elapsed * 1000, 3),
                    request_id=request_id,
                )

    async def _read_body(
        self, scope: Scope, headers: dict[bytes, bytes], receive: Receive
    ) -> tuple[JsonResponse | None, Receive]:
        """Reads a request's body whole (up to the limit), and hands the app
        a receive that replays it."""
        if scope["method"] not in _BODY_METHODS:
            return None, receive
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return self._too_large(), receive
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return self._too_large(), receive
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if json_depth_exceeds(body, self.max_depth):
            return JsonResponse(
                error_body(
                    400,
                    "INVALID_ARGUMENT",
                    "JSON_TOO_DEEP",
                    f"the body nests more than {self.max_depth} levels deep",
                ),
                status_code=400,
            ), receive
        delivered = False

        async def replay() -> Message:
            nonlocal delivered
            if not delivered:
                delivered = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return None, replay

    def _too_large(self) -> JsonResponse:
        return JsonResponse(
            error_body(
                413,
                "INVALID_ARGUMENT",
                "BODY_TOO_LARGE",
                f"the body is larger than {self.max_body} bytes",
            ),
            status_code=413,
        )


def _internal_error(request_id: str) -> JsonResponse:
    return JsonResponse(
        error_body(500, "INTERNAL", "INTERNAL", f"internal error (request id {request_id})"),
        status_code=500,
    )


class ReadyAnswer(BaseModel):
    status: str
    checks: dict[str, str]
    failing: list[str]


def create_app(settings: GatewaySettings) -> FastAPI:
    verifier = TokenVerifier.from_settings(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.uses_dev_secret:
            log.warning(
                "dev_jwt_secret_in_use",
                detail="MONETA_JWT_SECRET is the development default; set a real secret",
            )
        redis = redis_client(settings.redis_url)
        # Redis holds caches and counters only: while it does not answer, the
        # gateway stops waiting for it (a few requests) and serves without it.
        redis_breaker = CircuitBreaker("redis", threshold=3, cooldown=2.0)
        app.state.settings = settings
        app.state.verifier = verifier
        app.state.upstreams = Upstreams(settings)
        app.state.redis = redis
        app.state.limiter = (
            RateLimiter(
                redis,
                settings.redis_prefix,
                settings.rate_limit_user_per_second,
                settings.rate_limit_user_burst,
                settings.rate_limit_ip_per_second,
                settings.rate_limit_ip_burst,
                redis_breaker,
            )
            if settings.rate_limit_enabled
            else None
        )
        app.state.replays = ReplayCache(
            redis,
            settings.redis_prefix,
            settings.idempotency_ttl_seconds,
            settings.idempotency_lease_seconds,
            settings.idempotency_wait_seconds,
            redis_breaker,
        )
        yield
        await app.state.upstreams.close()
        await app.state.replays.close()
        if app.state.limiter is not None:
            await app.state.limiter.close()
        await redis.aclose()

    app = FastAPI(
        title="Moneta API",
        version="1.0.0",
        description=(
            "The public HTTP API of Moneta, an open money core. Amounts are decimal strings "
            "in major units; errors are "
            '{"error": {code, status, reason, message, details}} with an X-Request-ID header. '
            "Authenticate with `Authorization: Bearer <JWT>`. Money-moving requests take an "
            "idempotency key (body or Idempotency-Key header): the same key and request "
            "replay the first answer for 24 hours."
        ),
        lifespan=lifespan,
    )
    app.add_middleware(
        Edge, max_body_bytes=settings.max_body_bytes, max_json_depth=settings.max_json_depth
    )

    # -- errors

    @app.exception_handler(MonetaError)
    async def on_domain_error(request: Request, exc: MonetaError) -> JsonResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JsonResponse:
        first = exc.errors()[0] if exc.errors() else {}
        if first.get("type") == "json_invalid":
            return JsonResponse(
                error_body(400, "INVALID_ARGUMENT", "INVALID_JSON", "the body is not valid JSON"),
                status_code=400,
            )
        field = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return JsonResponse(
            error_body(
                400,
                "INVALID_ARGUMENT",
                "VALIDATION_ERROR",
                f"{field or 'body'}: {first.get('msg', 'invalid')}"[:500],
                {"field": field[:200]},
            ),
            status_code=400,
        )

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(request: Request, exc: StarletteHTTPException) -> JsonResponse:
        status = exc.status_code
        reason = {400: "INVALID_JSON", 404: "ROUTE_NOT_FOUND", 405: "METHOD_NOT_ALLOWED"}.get(
            status, "HTTP_ERROR"
        )
        response = JsonResponse(
            error_body(status, STATUS_NAMES.get(status, "UNKNOWN"), reason, str(exc.detail)),
            status_code=status,
        )
        for name, value in (exc.headers or {}).items():
            response.headers[name] = value
        return response

    # -- operations

    @app.get("/health", tags=["operations"])
    async def health() -> dict[str, str]:
        """The process runs."""
        return {"status": "ok"}

    @app.get(
        "/ready",
        tags=["operations"],
        response_model=ReadyAnswer,
        responses={503: {"model": ReadyAnswer, "description": "Not ready: the failing named"}},
    )
    async def ready() -> JsonResponse:
        """Every upstream answers its health check, and Redis answers."""
        ups: Upstreams = app.state.upstreams
        names = list(ups.addresses)
        results = await asyncio.gather(*(ups.ready(n) for n in names))
        checks: dict[str, str] = {n: r or "SERVING" for n, r in zip(names, results, strict=True)}
        try:
            await asyncio.wait_for(app.state.redis.ping(), 1.0)
            checks["redis"] = "SERVING"
        except Exception as exc:
            checks["redis"] = type(exc).__name__
        failing = sorted(n for n, c in checks.items() if c != "SERVING")
        body = {"status": "not_ready" if failing else "ready", "checks": checks, "failing": failing}
        return JsonResponse(body, status_code=503 if failing else 200)

    @app.get(
        "/metrics",
        tags=["operations"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}},
    )
    async def metrics() -> Response:
        """Prometheus text: requests by route and status, latency histograms,
        circuit breakers, rate limiting and the replay cache."""
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in ROUTERS:
        app.include_router(router)
    return app


def openapi_document(settings: GatewaySettings | None = None) -> dict[str, Any]:
    """The OpenAPI document, without starting anything."""
    document: dict[str, Any] = create_app(settings or GatewaySettings()).openapi()
    return document

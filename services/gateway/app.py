"""The gateway's FastAPI application: middleware, error mapping, operations
endpoints, and the routers of each area."""

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST, Counter, Histogram, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from services.common.errors import MonetaError
from services.common.infra import redis_client
from services.common.interceptors import REQUEST_ID_HEADER
from services.common.logging import accept_request_id, request_id_var
from services.gateway import routes_banking, routes_payments, routes_wallets
from services.gateway.auth import TokenVerifier
from services.gateway.config import GatewaySettings
from services.gateway.deps import (
    HTTP_STATUS,
    STATUS_NAMES,
    JsonResponse,
    Upstreams,
    error_body,
)

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

ROUTERS = [routes_wallets.router, routes_banking.router, routes_payments.router]


def create_app(settings: GatewaySettings) -> FastAPI:
    verifier = TokenVerifier(settings.jwt_secret, settings.jwt_issuer, settings.jwt_audience)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if settings.uses_dev_secret:
            log.warning(
                "dev_jwt_secret_in_use",
                detail="MONETA_JWT_SECRET is the development default; set a real secret",
            )
        app.state.verifier = verifier
        app.state.upstreams = Upstreams(settings)
        app.state.redis = redis_client(settings.redis_url)
        yield
        await app.state.upstreams.close()
        await app.state.redis.aclose()

    app = FastAPI(
        title="Moneta API",
        version="1.0.0",
        description="The public HTTP API of Moneta, an open money core. Amounts are decimal "
        'strings in major units; errors are {"error": {code, status, reason, message, details}}.',
        lifespan=lifespan,
    )

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
        status = HTTP_STATUS.get(exc.status_code, 500)
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
            error_body(status, STATUS_NAMES.get(status, "UNKNOWN"), reason, str(exc.detail)),
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

    @app.get("/metrics", tags=["operations"], response_class=Response)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    for router in ROUTERS:
        app.include_router(router)
    return app

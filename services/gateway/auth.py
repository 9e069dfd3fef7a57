"""Bearer JWTs: signature, expiry, not-before, issuer and audience checked;
only the configured algorithms accepted (so never ``alg: none``).

HMAC algorithms (HS256 …) verify with the shared secret; public-key ones
(RS256, ES256 …) with the key the token's ``kid`` names in a JWKS, read from
a file or fetched from a URL. A key's algorithm is bound to it, so a token
cannot pick another one (an HS256 token "signed" with a public key is
refused)."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import structlog

from services.common.errors import Unauthenticated
from services.gateway.config import HMAC_ALGORITHMS, GatewaySettings

log = structlog.get_logger("moneta.gateway")

ROLES = frozenset({"user", "manager", "admin", "service"})
# A token naming an unknown key id fetches the key set again at most this often.
REFETCH_SECONDS = 30.0
# A verified token is trusted again without checking until it expires, for at
# most this long (so that a key removed from the JWKS stops working soon).
VERIFIED_CACHE_SECONDS = 60.0
VERIFIED_CACHE_SIZE = 10_000


@dataclass(frozen=True)
class Principal:
    user_id: str
    role: str
    company_id: str


class UnknownSigningKey(Exception):
    """The token names a key id the key set does not hold (yet)."""


class JwksKeys:
    """Public keys from a JWKS document, by key id. ``load`` reads the
    document (a file, or a URL: blocking, so it runs in a thread)."""

    def __init__(self, load: Callable[[], dict[str, Any]], refresh_seconds: float) -> None:
        self._load = load
        self._refresh_seconds = refresh_seconds
        self._keys: dict[str, jwt.PyJWK] = {}
        self._unnamed: list[jwt.PyJWK] = []
        self._loaded_at = float("-inf")
        self._lock = threading.Lock()

    @classmethod
    def from_file(cls, path: str) -> JwksKeys:
        keys = cls(lambda: json.loads(Path(path).read_text()), refresh_seconds=float("inf"))
        keys.reload()
        return keys

    @classmethod
    def from_url(cls, url: str, refresh_seconds: float) -> JwksKeys:
        client = jwt.PyJWKClient(url, cache_jwk_set=False, timeout=5)
        return cls(lambda: dict(client.fetch_data()), refresh_seconds)

    def reload(self) -> None:
        document = self._load()
        keys: dict[str, jwt.PyJWK] = {}
        unnamed: list[jwt.PyJWK] = []
        for entry in document.get("keys", []):
            if entry.get("use") not in (None, "sig"):
                continue
            try:
                key = jwt.PyJWK(entry)
            except jwt.PyJWTError as exc:
                log.warning("jwks_key_skipped", kid=entry.get("kid"), error=str(exc))
                continue
            if key.key_id:
                keys[key.key_id] = key
            else:
                unnamed.append(key)
        with self._lock:
            self._keys, self._unnamed = keys, unnamed
            self._loaded_at = time.monotonic()
        log.info("jwks_loaded", keys=len(keys) + len(unnamed))

    @property
    def age(self) -> float:
        """Seconds since the set was last loaded (or a load was last tried)."""
        return time.monotonic() - self._loaded_at

    @property
    def loaded(self) -> bool:
        return self._loaded_at != float("-inf")

    @property
    def refresh_seconds(self) -> float:
        return self._refresh_seconds

    def tried(self) -> None:
        """A load failed: the old keys stay, and the next try waits."""
        self._loaded_at = time.monotonic()

    def key_for(self, kid: object, algorithm: str) -> jwt.PyJWK:
        with self._lock:
            if isinstance(kid, str) and kid:
                if kid in self._keys:
                    return self._keys[kid]
                raise UnknownSigningKey(kid)
            # No kid: only a set with a single key for the algorithm decides.
            candidates = [
                k for k in [*self._keys.values(), *self._unnamed] if k.algorithm_name == algorithm
            ]
        if len(candidates) == 1:
            return candidates[0]
        raise UnknownSigningKey("")


class TokenVerifier:
    def __init__(
        self,
        secret: str,
        issuer: str,
        audience: str,
        algorithms: Iterable[str] = ("HS256",),
        keys: JwksKeys | None = None,
        leeway_seconds: int = 0,
    ) -> None:
        self._secret = secret
        self._issuer = issuer
        self._audience = audience
        self._algorithms = frozenset(algorithms) - {"none"}
        self._keys = keys
        self._leeway = leeway_seconds
        self._refreshing: asyncio.Task[None] | None = None
        # Tokens verified lately: a client sends the same one many times.
        self._verified: dict[str, tuple[Principal, float]] = {}

    @classmethod
    def from_settings(cls, settings: GatewaySettings) -> TokenVerifier:
        keys = None
        if settings.jwt_jwks_file:
            keys = JwksKeys.from_file(settings.jwt_jwks_file)
        elif settings.jwt_jwks_url:
            keys = JwksKeys.from_url(settings.jwt_jwks_url, settings.jwt_jwks_refresh_seconds)
        return cls(
            settings.jwt_secret,
            settings.jwt_issuer,
            settings.jwt_audience,
            settings.algorithms,
            keys,
            settings.jwt_leeway_seconds,
        )

    async def authenticate(self, authorization: str | None) -> Principal:
        """``verify``, with the key set fetched again (in a thread) when it is
        due, and when a token names a key id the set lacks: a rotated key is
        picked up at once, yet forged key ids cause at most one fetch per
        REFETCH_SECONDS."""
        keys = self._keys
        if keys is not None:
            if not keys.loaded:
                await self._refresh()
            elif keys.age >= keys.refresh_seconds:
                self._start_refresh()
        try:
            return self.verify(authorization)
        except UnknownSigningKey:
            if keys is None or keys.age < REFETCH_SECONDS:
                raise _invalid() from None
        await self._refresh()
        try:
            return self.verify(authorization)
        except UnknownSigningKey:
            raise _invalid() from None

    def _start_refresh(self) -> asyncio.Task[None]:
        # Concurrent requests share one fetch.
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.create_task(self._reload())
        return self._refreshing

    async def _refresh(self) -> None:
        await asyncio.shield(self._start_refresh())

    async def _reload(self) -> None:
        assert self._keys is not None
        try:
            await asyncio.to_thread(self._keys.reload)
        except Exception as exc:
            log.warning("jwks_refresh_failed", error=type(exc).__name__)
            self._keys.tried()

    def verify(self, authorization: str | None) -> Principal:
        """The principal of a valid bearer token; UNAUTHENTICATED otherwise.
        Raises UnknownSigningKey when the token names a key not in the set."""
        if not authorization:
            raise Unauthenticated("a bearer token is required", reason="TOKEN_MISSING")
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated("use 'Authorization: Bearer <token>'", reason="TOKEN_MISSING")
        token = token.strip()
        now = time.time()
        cached = self._verified.get(token)
        if cached is not None and now < cached[1]:
            return cached[0]
        principal, expires = self._decode(token)
        if len(self._verified) >= VERIFIED_CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = (principal, min(expires, now + VERIFIED_CACHE_SECONDS))
        return principal

    def _decode(self, token: str) -> tuple[Principal, float]:
        """The principal of a token and when it expires, every check made."""
        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._algorithms:
                raise _invalid()
            key: jwt.PyJWK | str
            if algorithm in HMAC_ALGORITHMS:
                key = self._secret
            else:
                if self._keys is None:
                    raise _invalid()
                key = self._keys.key_for(header.get("kid"), algorithm)
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options={"require": ["exp", "sub", "iss", "aud"]},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("the token has expired", reason="TOKEN_EXPIRED") from None
        except jwt.InvalidTokenError:
            raise _invalid() from None
        return _principal(claims), float(claims["exp"])

    def issue(self, user_id: str, role: str, company_id: str = "", ttl_seconds: int = 3600) -> str:
        """Mints an HS256 token with the shared secret, for development and tests."""
        now = int(time.time())
        claims: dict[str, Any] = {
            "sub": user_id,
            "role": role,
            "iss": self._issuer,
            "aud": self._audience,
            "iat": now,
            "nbf": now,
            "exp": now + ttl_seconds,
        }
        if company_id:
            claims["company_id"] = company_id
        return jwt.encode(claims, self._secret, algorithm="HS256")


def _invalid() -> Unauthenticated:
    return Unauthenticated("the token is not valid", reason="TOKEN_INVALID")


def _principal(claims: dict[str, Any]) -> Principal:
    role = claims.get("role", "user")
    subject = claims.get("sub")
    company = claims.get("company_id")
    if (
        not isinstance(role, str)
        or role not in ROLES
        or not isinstance(subject, str)
        or not subject.strip()
        or not (company is None or isinstance(company, str))
    ):
        raise Unauthenticated("the token's claims are not valid", reason="TOKEN_INVALID")
    return Principal(user_id=subject, role=role, company_id=company or "")

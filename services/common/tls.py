"""TLS in transit for gRPC, from the settings ``MONETA_TLS_CERT_FILE``,
``MONETA_TLS_KEY_FILE`` and ``MONETA_TLS_CA_FILE`` (PEM files).

- none set: plaintext, as on a developer's machine;
- certificate and key: the server speaks TLS; a client presents them and
  checks its peer against the system's roots;
- with a CA bundle too: mutual TLS. The server requires a client
  certificate signed by that CA and refuses the handshake otherwise; a
  client checks the server's certificate against the same CA.

In Kubernetes the files come from a Secret that cert-manager keeps renewed
(``tls.crt``, ``tls.key``, ``ca.crt``). They are read when the server or the
channel is made: a renewed certificate is taken up by the next start.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import grpc

from services.common.config import CommonSettings

ChannelOptions = Sequence[tuple[str, Any]]


def mutual_tls(settings: CommonSettings | None) -> bool:
    """Whether peers must present a certificate signed by the CA."""
    return settings is not None and bool(settings.tls_cert_file and settings.tls_ca_file)


def _read(path: str) -> bytes | None:
    return Path(path).read_bytes() if path else None


def server_credentials(settings: CommonSettings | None) -> grpc.ServerCredentials | None:
    """The server's credentials, or None for plaintext. With a CA bundle the
    client's certificate is required and verified (mutual TLS)."""
    if settings is None or not settings.tls_cert_file:
        return None
    return grpc.ssl_server_credentials(
        [(_read(settings.tls_key_file), _read(settings.tls_cert_file))],
        root_certificates=_read(settings.tls_ca_file),
        require_client_auth=mutual_tls(settings),
    )


def channel_credentials(settings: CommonSettings | None) -> grpc.ChannelCredentials | None:
    """A client's credentials, or None for plaintext: its own certificate
    and key for the server to verify, and the CA to verify the server by
    (the system's roots when no CA bundle is set)."""
    if settings is None or not settings.tls_cert_file:
        return None
    return grpc.ssl_channel_credentials(
        root_certificates=_read(settings.tls_ca_file),
        private_key=_read(settings.tls_key_file),
        certificate_chain=_read(settings.tls_cert_file),
    )


def open_channel(
    target: str,
    settings: CommonSettings | None,
    options: ChannelOptions | None = None,
    interceptors: Sequence[grpc.aio.ClientInterceptor] | None = None,
) -> grpc.aio.Channel:
    """A channel to ``target``, balanced round robin: TLS (mutual with a CA
    bundle) when the settings name a certificate, plaintext otherwise (or
    without settings). The server's name is checked against the host part
    of ``target`` (``ledger`` in ``ledger:50051``), so certificates carry
    the services' DNS names."""
    # Calls spread over every address the target's name resolves to (in
    # Kubernetes, a headless Service: every ready replica).
    options = [("grpc.lb_policy_name", "round_robin"), *(options or ())]
    credentials = channel_credentials(settings)
    if credentials is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, credentials, options=options, interceptors=interceptors)

"""python -m services.gateway"""

from __future__ import annotations

import uvicorn

from services.common.config import load_settings
from services.common.logging import configure_logging
from services.gateway.app import create_app
from services.gateway.config import GatewaySettings


def main() -> None:
    settings = load_settings(GatewaySettings, "moneta-gateway")
    configure_logging("gateway", settings.log_level, settings.log_format)
    uvicorn.run(
        create_app(settings),
        host=settings.http_host,
        port=settings.gateway_port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        proxy_headers=True,
        forwarded_allow_ips=settings.forwarded_allow_ips,
        timeout_graceful_shutdown=int(settings.shutdown_grace_seconds),
    )


if __name__ == "__main__":
    main()

"""`xray-triage web`: the worklist app under uvicorn, bound where the configuration says."""

from __future__ import annotations

import logging
import socket

from settings import Settings


def serve(settings: Settings) -> None:
    import uvicorn

    from worklist.app import create_app

    web = settings.web
    _check_bindable(web.bind_address, web.port)
    logging.getLogger("xray_triage.web").info(
        "worklist on http://%s:%d/ (decision support - not for diagnostic use)", web.bind_address, web.port
    )
    # Uvicorn's access log prints paths only: study UIDs, never patient data (none is in a URL).
    uvicorn.run(
        create_app(settings),
        host=web.bind_address,
        port=web.port,
        log_level=settings.log_level.lower(),
        proxy_headers=False,
        server_header=False,
    )


def _check_bindable(host: str, port: int) -> None:
    """Uvicorn's bind error names the address but not what wanted it; say both, before anything starts."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            raise OSError(exc.errno, f"worklist web app cannot listen on {host}:{port}: {exc.strerror}") from None

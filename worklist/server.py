"""`xray-triage web`: the worklist app under uvicorn, bound where the configuration says."""

from __future__ import annotations

import logging

from settings import Settings


def serve(settings: Settings) -> None:
    import uvicorn

    from worklist.app import create_app

    web = settings.web
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

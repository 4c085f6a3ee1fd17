"""GET /openapi.json, /docs and /redoc: the API description, behind the API key like the API itself.

FastAPI serves these without any dependency; the app turns its own copies off and mounts these
instead, so a service with keys describes its endpoints only to callers that may use them.

FastAPI's pages load Swagger UI and ReDoc from a public CDN, so on a factory box without internet
access they stay blank. These load the copies that the `fastapi-offline` package ships, served by
the app itself under `ASSETS_URL` (plain library code, no data: no API key needed, like `/static`).
"""

from __future__ import annotations

from pathlib import Path

import fastapi_offline
from fastapi import APIRouter, Depends, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse

from service.app.security import require_api_key

OPENAPI_URL = "/openapi.json"
ASSETS_URL = "/docs-assets"
# swagger-ui-bundle.js, swagger-ui.css, redoc.standalone.js, favicon.png
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"

router = APIRouter(include_in_schema=False, dependencies=[Depends(require_api_key)])


def _url(request: Request, path: str) -> str:
    """`path` under the app's root path, so the pages also work behind a reverse proxy's prefix."""
    return request.scope.get("root_path", "").rstrip("/") + path


@router.get(OPENAPI_URL)
async def openapi(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


@router.get("/docs")
async def swagger_ui(request: Request) -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url=_url(request, OPENAPI_URL),
        title=f"{request.app.title} - Swagger UI",
        swagger_js_url=_url(request, f"{ASSETS_URL}/swagger-ui-bundle.js"),
        swagger_css_url=_url(request, f"{ASSETS_URL}/swagger-ui.css"),
        swagger_favicon_url=_url(request, f"{ASSETS_URL}/favicon.png"),
    )


@router.get("/redoc")
async def redoc(request: Request) -> HTMLResponse:
    return get_redoc_html(
        openapi_url=_url(request, OPENAPI_URL),
        title=f"{request.app.title} - ReDoc",
        redoc_js_url=_url(request, f"{ASSETS_URL}/redoc.standalone.js"),
        redoc_favicon_url=_url(request, f"{ASSETS_URL}/favicon.png"),
        with_google_fonts=False,
    )

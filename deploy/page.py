"""The try-it page at ``/`` and the offline API docs at ``/docs`` and ``/redoc``.

The page (``deploy/static/``: one HTML file, its script and style sheet, no framework) picks or
takes dropped images, sends them to ``/model/predict`` with the chosen threshold, and draws the
answer. Swagger UI and ReDoc come from the ``fastapi-offline`` package's copies of their assets.
Every asset is served by the app itself: the pages work on a machine without internet. A
Content-Security-Policy header on every answer makes the browser refuse anything from elsewhere:
ReDoc's bundle links its footer logo from its vendor's CDN, and that request is never sent.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")


# Swagger UI's page starts it with an inline script and ReDoc styles inline and runs a blob: worker.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; script-src 'self' 'unsafe-inline'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data: blob:; font-src 'self' data:; worker-src 'self' blob:; connect-src 'self'"
)


class ContentSecurityPolicy:
    """ASGI middleware: the policy above on every HTTP answer."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_policy(message):
            if message["type"] == "http.response.start":
                headers = [h for h in message.get("headers", []) if h[0].lower() != b"content-security-policy"]
                message = {**message, "headers": [*headers,
                                                  (b"content-security-policy", CONTENT_SECURITY_POLICY.encode())]}
            await send(message)

        await self.app(scope, receive, with_policy)


def add_page(app: FastAPI) -> None:
    app.add_middleware(ContentSecurityPolicy)
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

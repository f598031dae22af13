"""The try-it page at ``/`` and the offline API docs at ``/docs`` and ``/redoc``.

The page (``deploy/static/``: one HTML file, its script and style sheet, no framework) picks or
takes dropped images, sends them to ``/model/predict`` with the chosen threshold, and draws the
answer. Swagger UI and ReDoc come from the ``fastapi-offline`` package's copies of their assets.
Every asset is served by the app itself: the pages work on a machine without internet, and a
browser opening them contacts nothing but this server.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

STATIC_DIR = Path(__file__).with_name("static")


def add_page(app: FastAPI) -> None:
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    @app.get("/", include_in_schema=False)
    def index() -> FileResponse:
        return FileResponse(STATIC_DIR / "index.html", media_type="text/html")

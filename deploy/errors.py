"""One error shape for every answer of the REST app that is not a success.

``{"status": "error", "message": "..."}`` with the status that says whose fault it was:

- 400: a ``DetrError`` (an image that does not decode, too many images, ...), a body that is not
  valid multipart, a query parameter the route does not take (the message names the accepted ones);
- 404 / 405: an unknown path, a method the path does not answer (with ``Allow``);
- 413: a body over the limit (``deploy.app.BodySizeLimit`` answers it before the app);
- 422: a parameter or field that fails its declared type or range (the message names each);
- 500: a bug. The client gets a fixed message and no traceback; the log gets the traceback.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from detr.errors import DetrError, InvalidInputError

logger = logging.getLogger("deploy.app")

INTERNAL_ERROR_MESSAGE = "internal server error: the request could not be answered (the server log has the details)"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"status": "error", "message": message}, status_code=status, headers=headers)


def check_query_params(request: Request) -> None:
    """A dependency of every route: a query parameter the route does not declare is a 400.

    A misspelled ``?treshold=0.2`` would otherwise be ignored silently and the default applied.
    """
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    accepted = sorted({p.alias for p in dependant.query_params}) if dependant is not None else []
    unknown = sorted(set(request.query_params) - set(accepted))
    if unknown:
        listed = ", ".join(accepted) if accepted else "none"
        raise InvalidInputError(f"unknown query parameter(s) {', '.join(map(repr, unknown))}; accepted: {listed}")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DetrError)
    async def _detr_error(request: Request, exc: DetrError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_describe(e) for e in exc.errors())
        return error_response(422, problems or "the request does not match the API (see /docs)")

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404 and exc.detail == "Not Found":
            message = f"no such path: {request.url.path} (the API is listed at /docs)"
        elif exc.status_code == 405:
            allowed = (exc.headers or {}).get("allow") or (exc.headers or {}).get("Allow", "")
            message = f"{request.method} is not allowed on {request.url.path}" + (f"; use {allowed}" if allowed else "")
        elif exc.status_code == 400:  # only the body parser raises these (our own 400s are DetrErrors)
            cause = exc.__cause__ if exc.__cause__ is not None and str(exc.__cause__) else exc.detail
            message = (f"the body is not valid multipart/form-data ({cause}): send the images as form fields "
                       "named 'image'")
        else:
            message = str(exc.detail)
        return error_response(exc.status_code, message, headers=exc.headers)

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
        logger.error("%s %s failed", request.method, request.url.path, exc_info=exc)
        return error_response(500, INTERNAL_ERROR_MESSAGE)


def _describe(error: dict) -> str:
    location = ".".join(str(part) for part in error.get("loc", ()))
    return f"{location}: {error.get('msg', 'invalid')}"

"""A small REST app around one detector, in the style of the Model Asset eXchange (MAX) servers.

    GET  /ping             liveness
    GET  /model/metadata   what the model is: architecture, classes, preprocessing, limits, source
    GET  /model/labels     the label map: [{"id": 0, "name": "circle"}, ...]
    POST /model/predict    multipart upload, one or more ``image`` files (JPEG, PNG, ...);
                           query: score_threshold, max_detections, box_format
    GET  /docs, /openapi.json   interactive docs and the OpenAPI schema (FastAPI)

The model is a checkpoint file or any MLflow model URI (``models:/shapes@champion``, ``runs:/...``,
a local model directory). Each prediction record is the pyfunc model's (``Detector.detect``).
Every bad request is a 4xx with ``{"status": "error", "message": ...}``; the server stays up. The
request body is capped (413 beyond), each image by its encoded size and pixel count.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import FastAPI, File, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from deploy.detector import Detector
from deploy.images import ImageLimits, decode_image_bytes
from detr.errors import DetrError, InvalidInputError
from detr.models.detection_params import BOX_FORMATS, MAX_DETECTIONS_LIMIT, SCORE_THRESHOLD_RANGE, DetectionParams

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_IMAGES = 16
_DEFAULTS = DetectionParams()


def load_detector(source: str | Path, *, device: str = "cpu") -> Detector:
    """A checkpoint file, or an MLflow model URI / directory of a model logged by ``deploy.packaging``."""
    path = Path(source)
    if path.is_file():
        return Detector.from_checkpoint(path, device=device)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        python_model = mlflow.pyfunc.load_model(str(source)).unwrap_python_model()
    except (MlflowException, OSError) as e:
        raise InvalidInputError(
            f"cannot load model {source!s}: {str(e).splitlines()[0]} (expected a checkpoint file, or an "
            "MLflow model URI such as models:/<name>@<alias> logged by `detr register`)"
        ) from None
    detector = getattr(python_model, "detector", None)
    if not isinstance(detector, Detector):
        raise InvalidInputError(f"model {source!s} is not an mlflow-detr model (log it with `detr register`)")
    return detector


class BodySizeLimit:
    """ASGI middleware: answer 413 to a request body over ``max_bytes`` (declared or streamed)."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large(send)
            return
        received = 0
        exceeded = False
        answered = False

        async def limited_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    exceeded = True
                    raise _BodyTooLarge
            return message

        async def checked_send(message):
            # Once the body overflowed, whatever the app answers (its body parser turns our
            # exception into a 400) is replaced by the 413.
            nonlocal answered
            if not exceeded:
                await send(message)
            elif not answered:
                answered = True
                await self._too_large(send)

        try:
            await self.app(scope, limited_receive, checked_send)
        except _BodyTooLarge:
            pass
        if exceeded and not answered:
            await self._too_large(send)

    async def _too_large(self, send) -> None:
        body = json.dumps({"status": "error", "message": f"request body is larger than {self.max_bytes} bytes"})
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body.encode()})


class _BodyTooLarge(Exception):
    pass


def create_app(
    detector: Detector,
    *,
    source: str = "",
    limits: ImageLimits = ImageLimits(),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_images: int = DEFAULT_MAX_IMAGES,
) -> FastAPI:
    app = FastAPI(
        title="mlflow-detr object detector",
        description="Detects objects of the model's classes in uploaded images (DETR / Deformable DETR).",
        version="1",
    )

    @app.exception_handler(DetrError)
    async def _detr_error(request: Request, exc: DetrError) -> JSONResponse:
        return JSONResponse({"status": "error", "message": str(exc)}, status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse({"status": "error", "message": problems}, status_code=422)

    @app.get("/ping", summary="liveness")
    def ping() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/model/metadata", summary="the model: architecture, classes, preprocessing, limits")
    def metadata() -> dict[str, Any]:
        return {
            **detector.metadata(),
            "source": source,
            "limits": {"max_body_bytes": max_body_bytes, "max_images": max_images,
                       "max_image_bytes": limits.max_bytes, "max_image_pixels": limits.max_pixels},
        }

    @app.get("/model/labels", summary="the label map")
    def labels() -> dict[str, Any]:
        names = detector.label_map.names
        return {"count": len(names), "labels": [{"id": i, "name": name} for i, name in enumerate(names)]}

    @app.post("/model/predict", summary="detect objects in one or more uploaded images")
    def predict(
        image: Annotated[list[UploadFile], File(description="image files (JPEG, PNG, ...); repeat for several")],
        # The bounds come from DetectionParams' rule: declared here, they appear in the OpenAPI schema.
        score_threshold: Annotated[float, Query(ge=SCORE_THRESHOLD_RANGE[0], le=SCORE_THRESHOLD_RANGE[1])] = (
            _DEFAULTS.score_threshold),
        max_detections: Annotated[int, Query(ge=1, le=MAX_DETECTIONS_LIMIT)] = _DEFAULTS.max_detections,
        box_format: Annotated[Literal[BOX_FORMATS], Query()] = _DEFAULTS.box_format,
    ) -> dict[str, Any]:
        if len(image) > max_images:
            raise InvalidInputError(f"{len(image)} images in one request; at most {max_images}")
        params = DetectionParams(score_threshold=score_threshold, max_detections=max_detections,
                                 box_format=box_format)
        pixels = [decode_image_bytes(upload.file.read(), where=f"image {i} ({upload.filename!r})", limits=limits)
                  for i, upload in enumerate(image)]
        return {"status": "ok", "predictions": detector.detect(pixels, params)}

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    return app

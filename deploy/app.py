"""A small REST app around one detector, in the style of the Model Asset eXchange (MAX) servers.

    GET  /                 a page to try the model: pick or drop images, see the detections drawn
    GET  /health/live      the process answers (also /ping)
    GET  /health/ready     200 once the model is loaded and a warm-up prediction ran, else 503
    GET  /metrics          Prometheus metrics (deploy.metrics)
    GET  /model/metadata   what the model is: architecture, classes, preprocessing, limits, source
    GET  /model/labels     the label map: [{"id": 0, "name": "circle"}, ...]
    POST /model/predict    multipart upload, one or more ``image`` files (JPEG, PNG, ...);
                           query: score_threshold, max_detections, box_format
    GET  /docs, /redoc, /openapi.json   API docs (assets served by the app) and the OpenAPI schema

The model is a checkpoint file or any MLflow model URI (``models:/shapes@champion``, ``runs:/...``,
a local model directory). Each prediction record is the pyfunc model's (``Detector.detect``).
Concurrent requests share forward passes (``deploy.batching``) unless batching is off.
Every answer that is not a success is ``{"status": "error", "message": ...}`` (``deploy.errors``);
the server stays up. The request body is capped (413 beyond), each image by its encoded size and
pixel count, and the number of images per request, the same limits as the pyfunc model's.
"""

from __future__ import annotations

import json
import logging
import threading
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from fastapi import Depends, File, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response
from fastapi_offline import FastAPIOffline

from deploy.batching import DEFAULT_MAX_BATCH_SIZE, DEFAULT_MAX_WAIT_S, DEFAULT_WORKERS, Batcher
from deploy.detector import Detector
from deploy.errors import check_query_params, error_response, install_error_handlers
from deploy.images import DEFAULT_MAX_IMAGES, ImageLimits, decode_image_bytes
from deploy.metrics import MetricsMiddleware, ServingMetrics
from deploy.page import add_page
from detr.errors import InvalidInputError
from detr.models.detection_params import BOX_FORMATS, MAX_DETECTIONS_LIMIT, SCORE_THRESHOLD_RANGE, DetectionParams

DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
_DEFAULTS = DetectionParams()
logger = logging.getLogger("deploy.app")


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
    model_info: dict[str, str] | None = None,
    limits: ImageLimits = ImageLimits(),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_images: int = DEFAULT_MAX_IMAGES,
    batching: bool = True,
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE,
    max_batch_wait_s: float = DEFAULT_MAX_WAIT_S,
    batch_workers: int = DEFAULT_WORKERS,
) -> FastAPI:
    """Args:
        model_info: ``name`` and ``version`` of the model for ``/metrics`` (``deploy.metrics.model_identity``).
        batching: share forward passes across concurrent requests (at most ``max_batch_size``
            images, the first waiting at most ``max_batch_wait_s`` for others, ``batch_workers``
            batches at once); without it each request runs on its own, its images batched together.
    """
    mc = detector.metadata()
    metrics = ServingMetrics({"name": "", "version": "", **(model_info or {}), "arch": str(mc["arch"]),
                              "source": source})
    batcher = Batcher(detector, max_batch_size=max_batch_size, max_wait_s=max_batch_wait_s,
                      on_batch=metrics.batch_size.observe, workers=batch_workers) if batching else None
    ready = threading.Event()

    def warm_up() -> None:
        """One prediction before /health/ready says yes: the first forward pass allocates and
        (with the native kernels) loads what later ones reuse."""
        try:
            detector.detect([torch.zeros((3, 64, 64), dtype=torch.uint8)])
        except Exception:  # noqa: BLE001 - the server stays not ready, and the log says why
            logger.exception("warm-up prediction failed: /health/ready stays 503")
            return
        ready.set()

    @asynccontextmanager
    async def lifespan(app):
        if batcher is not None:
            batcher.start()
        threading.Thread(target=warm_up, name="detr-warm-up", daemon=True).start()
        yield
        if batcher is not None:
            batcher.stop()

    app = FastAPIOffline(
        title="mlflow-detr object detector",
        description="Detects objects of the model's classes in uploaded images (DETR / Deformable DETR). "
                    "Errors are {\"status\": \"error\", \"message\": ...} with a 4xx status.",
        version="1",
        lifespan=lifespan,
        dependencies=[Depends(check_query_params)],
    )
    install_error_handlers(app)
    add_page(app)

    @app.get("/ping", summary="liveness (the same as /health/live)")
    def ping() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/live", summary="liveness: the process answers")
    def live() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/health/ready", summary="readiness: 200 once the model is loaded and warmed up, else 503",
             responses={503: {"description": "still warming up"}})
    def health_ready() -> JSONResponse:
        if ready.is_set():
            return JSONResponse({"status": "ok"})
        return error_response(503, "not ready: the model is warming up")

    @app.get("/metrics", summary="Prometheus metrics", response_class=Response)
    def prometheus() -> Response:
        body, content_type = metrics.exposition()
        return Response(body, media_type=content_type)

    @app.get("/model/metadata", summary="the model: architecture, classes, preprocessing, limits")
    def metadata() -> dict[str, Any]:
        return {
            **detector.metadata(),
            "source": source,
            "limits": {"max_body_bytes": max_body_bytes, "max_images": max_images,
                       "max_image_bytes": limits.max_bytes, "max_image_pixels": limits.max_pixels},
            "batching": {"enabled": batching, "max_batch_size": max_batch_size,
                         "max_wait_ms": max_batch_wait_s * 1000, "workers": batch_workers},
        }

    @app.get("/model/labels", summary="the label map")
    def labels() -> dict[str, Any]:
        names = detector.label_map.names
        return {"count": len(names), "labels": [{"id": i, "name": name} for i, name in enumerate(names)]}

    @app.post("/model/predict", summary="detect objects in one or more uploaded images",
              responses={400: {"description": "an image that does not decode, too many images, ..."},
                         413: {"description": "body over the limit"}, 422: {"description": "bad parameter"}})
    async def predict(
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
        metrics.images_per_request.observe(len(image))
        if batcher is not None:
            with batcher.expecting():
                pixels = await run_in_threadpool(_decode_all, image, limits)
            predictions = await batcher.submit(pixels, params)
        else:
            pixels = await run_in_threadpool(_decode_all, image, limits)
            metrics.batch_size.observe(len(pixels))
            predictions = await run_in_threadpool(detector.detect, pixels, params)
        return {"status": "ok", "predictions": predictions}

    app.add_middleware(BodySizeLimit, max_bytes=max_body_bytes)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.ready = ready
    return app


def _decode_all(uploads: list[UploadFile], limits: ImageLimits) -> list[torch.Tensor]:
    return [decode_image_bytes(upload.file.read(), where=f"image {i} ({upload.filename!r})", limits=limits)
            for i, upload in enumerate(uploads)]

"""Prometheus metrics of the REST app (``GET /metrics``, text exposition by prometheus-client).

=====================================  =========  =============================================
``detr_http_requests_total``           counter    requests by ``route`` (the path template, or
                                                  ``unmatched``), ``method`` and ``status``
``detr_http_request_duration_seconds`` histogram  latency by ``route`` and ``method``
``detr_images_per_request``            histogram  images in each ``/model/predict`` request
``detr_batch_size``                    histogram  images in each batch handed to the detector
                                                  (across requests when batching is on)
``detr_model_info``                    info       model ``name``, ``version``, ``arch``, ``source``
=====================================  =========  =============================================

Each app has its own registry, so several apps in one process (tests) do not share counts.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, Info, generate_latest

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0, 30.0)
COUNT_BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class ServingMetrics:
    def __init__(self, model_info: dict[str, str]) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("detr_http_requests", "HTTP requests by route, method and status",
                                ("route", "method", "status"), registry=self.registry)
        self.latency = Histogram("detr_http_request_duration_seconds", "time to answer a request",
                                 ("route", "method"), buckets=LATENCY_BUCKETS, registry=self.registry)
        self.images_per_request = Histogram("detr_images_per_request", "images in one predict request",
                                            buckets=COUNT_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("detr_batch_size", "images in one batch handed to the detector",
                                    buckets=COUNT_BUCKETS, registry=self.registry)
        Info("detr_model", "the served model", registry=self.registry).info(model_info)

    def exposition(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware: counts and times every HTTP request, including those answered by the
    middlewares inside it (413) and those that fail (500)."""

    def __init__(self, app, metrics: ServingMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def recording_send(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            method = scope.get("method", "")
            self.metrics.requests.labels(template, method, str(status)).inc()
            self.metrics.latency.labels(template, method).observe(time.perf_counter() - start)


def model_identity(source: str) -> dict[str, str]:
    """(name, version) of what ``detr serve`` was given: a registered model's name and version
    (an alias resolved through the registry), a run's model, or a checkpoint file and its digest."""
    path = Path(source)
    if path.is_file():
        digest = hashlib.sha256()
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return {"name": path.name, "version": f"sha256:{digest.hexdigest()[:12]}"}
    if source.startswith("models:/"):
        rest = source.removeprefix("models:/")
        if "@" in rest:
            name, alias = rest.split("@", 1)
            import mlflow
            from mlflow.exceptions import MlflowException

            try:
                version = mlflow.MlflowClient().get_model_version_by_alias(name, alias).version
            except MlflowException:  # the alias moved since the model loaded: keep the alias as the label
                version = f"@{alias}"
            return {"name": name, "version": str(version)}
        name, _, version = rest.partition("/")
        return {"name": name, "version": version or "latest"}
    if source.startswith("runs:/"):
        run_id, _, name = source.removeprefix("runs:/").partition("/")
        return {"name": name or "model", "version": f"run:{run_id}"}
    return {"name": source, "version": "unknown"}

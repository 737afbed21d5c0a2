"""``/metrics`` in Prometheus' text format (prometheus-client), one registry per app.

Requests and their latency are counted by an outer ASGI middleware, so refusals (400 host, 401, 413, 408,
503) are counted too, and a client that disconnects before its answer as status 499. Paths are reduced
to the app's own endpoints ("other" for anything else), so a scanner's random paths cannot grow the label
set without bound.
"""
from __future__ import annotations

import time

ENDPOINTS = ("/predict", "/predict/batch", "/health", "/model", "/metrics", "/admin/reload", "/")
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
SCORE_BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 10))
DRIFT_LEVELS = {"ok": 0, "warning": 1, "drift": 2}


class ServiceMetrics:
    def __init__(self):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics
        disable_created_metrics()  # the *_created series double the output and say nothing a scraper needs
        self.registry = registry = CollectorRegistry()
        prefix = "pneumonia_cnn_"
        self.requests = Counter(prefix + "http_requests", "HTTP requests by endpoint and status code",
                                ["endpoint", "status"], registry=registry)
        self.latency = Histogram(prefix + "http_request_seconds", "Time from request to response",
                                 ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self.rejected = Counter(prefix + "rejected_uploads", "Uploads refused before reading them whole",
                                ["reason"], registry=registry)
        self.batch_size = Histogram(prefix + "batch_size", "Images per forward pass of the micro-batcher",
                                    buckets=BATCH_BUCKETS, registry=registry)
        self.predictions = Counter(prefix + "predictions", "Images scored, by label (none: no chest X-ray)", ["label"],
                                   registry=registry)
        self.ood_flags = Counter(prefix + "ood_flags", "Images flagged as outside the intended use",
                                 registry=registry)
        self.probability = Histogram(prefix + "probability", "Pneumonia probabilities served",
                                     buckets=SCORE_BUCKETS, registry=registry)
        self.errors = Counter(prefix + "image_errors", "Uploads that could not be read as an X-ray",
                              registry=registry)
        self.gradcam_seconds = Histogram(prefix + "gradcam_seconds", "Time to compute a Grad-CAM map",
                                         buckets=LATENCY_BUCKETS, registry=registry)
        self.reloads = Counter(prefix + "model_reloads", "Model reloads by outcome", ["outcome"], registry=registry)
        self.drift_status = Gauge(prefix + "drift_status", "0 ok, 1 warning, 2 drift, -1 not judged yet",
                                  registry=registry)
        self.drift_psi = Gauge(prefix + "drift_psi", "Population stability index of the window vs the reference",
                               ["score"], registry=registry)
        self.drift_ks = Gauge(prefix + "drift_ks_pvalue", "KS test p-value of the window vs the reference",
                              ["score"], registry=registry)
        self.drift_window = Gauge(prefix + "drift_window_images", "Images in the drift window", registry=registry)
        self.model_info = Gauge(prefix + "model_info", "The model being served (value 1)", ["model_id"],
                                registry=registry)

    def observe_prediction(self, entry: dict) -> None:
        self.predictions.labels(entry["label"] or "none").inc()  # none: not an X-ray, given no label
        self.probability.observe(entry["probability"])
        if entry.get("in_distribution") is False:
            self.ood_flags.inc()

    def set_model(self, model_id: str) -> None:
        self.model_info.clear()
        self.model_info.labels(model_id).set(1)

    def set_drift(self, report: dict) -> None:
        self.drift_status.set(DRIFT_LEVELS.get(report["status"], -1))
        self.drift_window.set(report["images"])
        for name in ("raw_scores", "ood_scores"):
            if name in report:
                self.drift_psi.labels(name).set(report[name]["psi"])
                self.drift_ks.labels(name).set(report[name]["ks_pvalue"])

    def exposition(self) -> bytes:
        from prometheus_client import generate_latest
        return generate_latest(self.registry)


class RequestMetricsMiddleware:
    """ASGI, outermost: counts every request and its latency by endpoint and status."""

    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = scope["path"] if scope["path"] in ENDPOINTS else "other"
        start, status, started, gone = time.perf_counter(), [500], [False], [False]

        async def counting_send(message):
            if message["type"] == "http.response.start":
                status[0], started[0] = message["status"], True
            await send(message)

        async def watching_receive():
            message = await receive()
            gone[0] = gone[0] or (message["type"] == "http.disconnect" and not started[0])
            return message
        try:
            await self.app(scope, watching_receive, counting_send)
        finally:
            # a client that left before any answer is nginx's 499, not the 400 the app then sends to no one; one
            # that left after its answer was audited (the app marks it) counts as answered, as the audit log does
            left = gone[0] and not (scope.get("state") or {}).get("answered")
            self.metrics.requests.labels(endpoint, "499" if left else str(status[0])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - start)

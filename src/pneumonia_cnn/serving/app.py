"""FastAPI app: ``POST /predict``, ``GET /health``, ``GET /model``, the web page at ``/`` and docs at ``/docs``.

No ``from __future__ import annotations`` here: FastAPI must resolve the endpoint parameter types.

Uploads are decoded in memory by content (never by extension, never saved under the client's name);
bodies above the limit get 413. Concurrent requests are gathered into batches by a micro-batcher: one
forward pass for many requests raises throughput on both CPU and GPU.
"""

import asyncio
import base64
import logging
import threading
from contextlib import asynccontextmanager
from importlib import resources

import numpy as np

from ..errors import ImageReadError
from ..explanation import grad_cam, overlay_png
from ..inference import Predictor

log = logging.getLogger(__name__)


class MicroBatcher:
    """Collect requests for up to ``max_wait`` seconds (or ``max_batch`` of them) and predict them together."""

    def __init__(self, predictor: Predictor, max_batch: int = 16, max_wait: float = 0.004):
        self.predictor, self.max_batch, self.max_wait = predictor, max_batch, max_wait
        self.queue: asyncio.Queue | None = None
        self.task = None

    async def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self):
        if self.task:
            self.task.cancel()

    async def submit(self, pixels: np.ndarray, meta) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((pixels, meta, future))
        return await future

    def _predict(self, items):
        entries, _ = self.predictor.assess(np.stack([item[0] for item in items]), [item[1] for item in items])
        return entries

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            items = [await self.queue.get()]
            deadline = loop.time() + self.max_wait
            while len(items) < self.max_batch:
                timeout = deadline - loop.time()
                if timeout <= 0:
                    break
                try:
                    items.append(await asyncio.wait_for(self.queue.get(), timeout))
                except asyncio.TimeoutError:
                    break
            try:
                entries = await loop.run_in_executor(None, self._predict, items)
                for (_, _, future), entry in zip(items, entries):
                    if not future.done():
                        future.set_result(entry)
            except Exception as error:  # never leave a request hanging
                for _, _, future in items:
                    if not future.done():
                        future.set_exception(error)


def create_app(checkpoint, device: str = "auto", max_upload_mb: float = 20, max_batch: int = 16,
               engine: str = "auto"):
    from fastapi import FastAPI, File, HTTPException, Request, UploadFile
    from fastapi.responses import HTMLResponse, JSONResponse

    predictor = Predictor(checkpoint, device, engine=engine)
    batcher = MicroBatcher(predictor, max_batch=max_batch)
    max_bytes = int(max_upload_mb * 1024 * 1024)
    gradcam_model = predictor.bundle.explain_model().to(predictor.device)  # private: batched forwards never see its hooks
    gradcam_lock = threading.Lock()  # Grad-CAM calls share that copy's hooks and gradients

    @asynccontextmanager
    async def lifespan(_app):
        await batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title="pneumonia-cnn", version="0.1.0", lifespan=lifespan,
                  description="Pneumonia probability for a chest X-ray (image or DICOM). Research use only: "
                              "not a medical device.")

    @app.middleware("http")
    async def limit_upload_size(request: Request, call_next):
        length = request.headers.get("content-length")
        if request.method == "POST" and length and length.isdigit() and int(length) > max_bytes + 4096:
            return JSONResponse({"detail": f"upload too large: {int(length):,} bytes, limit {max_bytes:,}"},
                                status_code=413)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": predictor.model_id}

    @app.get("/model")
    async def model_metadata():
        return predictor.metadata()

    @app.get("/", response_class=HTMLResponse)
    async def page():
        return resources.files("pneumonia_cnn.serving").joinpath("static/index.html").read_text(encoding="utf-8")

    @app.post("/predict")
    async def predict(file: UploadFile = File(...), gradcam: bool = False):
        data = await file.read(max_bytes + 1)
        if len(data) > max_bytes:
            raise HTTPException(413, f"upload too large: limit {max_bytes:,} bytes")
        name = (file.filename or "upload")[:200]
        try:
            pixels, meta = await asyncio.get_running_loop().run_in_executor(None, predictor.preprocess_bytes,
                                                                            data, name)
        except ImageReadError as error:
            raise HTTPException(400, f"{name}: {error.reason}") from None
        result = await batcher.submit(pixels, meta)
        response = {"filename": name, "probability": result["probability"], "label": result["label"],
                    "threshold": result["threshold"], "in_distribution": result.get("in_distribution"),
                    "ood_score": result.get("ood_score"), "warnings": result.get("warnings", []),
                    "model": predictor.model_id}
        if gradcam:
            def heat():
                with gradcam_lock:
                    cam = grad_cam(gradcam_model, pixels, predictor.device)
                return base64.b64encode(overlay_png(pixels, cam)).decode("ascii")
            response["gradcam_png_base64"] = await asyncio.get_running_loop().run_in_executor(None, heat)
        return response

    app.state.predictor = predictor
    return app


def run_server(checkpoint, host: str = "127.0.0.1", port: int = 8000, max_upload_mb: float = 20,
               device: str = "auto", max_batch: int = 16, engine: str = "auto"):
    import uvicorn
    app = create_app(checkpoint, device, max_upload_mb, max_batch, engine)
    log.info("serving %s on http://%s:%d (docs at /docs)", app.state.predictor.model_id, host, port)
    uvicorn.run(app, host=host, port=port, log_level="warning")

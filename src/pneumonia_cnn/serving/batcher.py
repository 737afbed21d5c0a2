"""The micro-batcher: concurrent single-image requests scored in one forward pass, and the model they run on.

Every request keeps the ``ServedModel`` it was read with until it is answered, so a reload swaps the model
between requests, never under one: items of the old and the new model in the same gathering are scored in
separate passes.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone

import numpy as np

from ..monitoring import NO_REFERENCE

log = logging.getLogger(__name__)


@dataclass
class ServedModel:
    """What one loaded checkpoint serves with."""
    checkpoint: str
    predictor: object  # inference.Predictor for single images: no batch-level steps across strangers' images
    batch_predictor: object  # for /predict/batch: one site's batch, so --adapt-batch and estimated prevalence
    gradcam_model: object  # a private copy: Grad-CAM's hooks and gradients never touch a model the scorer runs
    reference: dict | None
    torch_threads: int  # torch's threads in each thread that runs this model's torch work (torch_threads_beside)
    no_reference: str = NO_REFERENCE  # why there is none, from what the checkpoint is (no_reference_reason)
    loaded_at: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(timespec="seconds"))

    @property
    def model_id(self) -> str:
        return self.predictor.model_id


def load_served_model(checkpoint, device: str = "auto", engine: str = "auto", prevalence=None,
                      adapt_batch: bool = False) -> ServedModel:
    from ..inference import Predictor
    from ..inference.bundle import load_bundle
    from ..monitoring import no_reference_reason, reference_of
    use_torch_threads(process_torch_threads())  # the engines size their own thread pools from it (OpenVINO)
    bundle = load_bundle(checkpoint)
    single = Predictor(bundle, device, engine=engine, prevalence=None if prevalence == "estimate" else prevalence)
    batch = single
    if adapt_batch or prevalence == "estimate":
        batch = Predictor(bundle, device, engine=engine, prevalence=prevalence, adapt_batch=adapt_batch)
    gradcam = bundle.explain_model().to(single.device)  # a deep copy of the first member
    first = bundle.checkpoints[0]
    return ServedModel(str(checkpoint), single, batch, gradcam, reference_of(first), torch_threads_beside(single),
                       no_reference_reason(first))


@functools.cache
def process_torch_threads() -> int:
    """torch's thread count before the server changed any (the first model's load, on the main thread)."""
    import torch
    return torch.get_num_threads()


def torch_threads_beside(predictor) -> int:
    """Where a CPU's scoring runs in ONNX Runtime or OpenVINO, torch only makes the Grad-CAM maps (and AdaBN's
    batch statistics) beside it: one thread, unless the operator's OMP_NUM_THREADS says otherwise. Two full
    thread teams on the same cores kept waiting for each other (docs/hospital.md, "Sharing the cores"). Decided
    for each model loaded: a reload whose ``auto`` engine fell back to torch scores with every thread."""
    if predictor.device.type == "cpu" and predictor.scorer.engine.name != "torch" and \
            "OMP_NUM_THREADS" not in os.environ:
        return 1
    return process_torch_threads()


def use_torch_threads(count: int) -> None:
    """Set the calling thread's torch thread count: torch keeps one per thread (a new thread starts with the
    last count set anywhere), so each job sets its own before it runs torch."""
    import torch
    if torch.get_num_threads() != count:
        torch.set_num_threads(count)


class MicroBatcher:
    """Collect requests for up to ``max_wait`` seconds (or ``max_batch`` of them) and score them together."""

    def __init__(self, max_batch: int = 16, max_wait: float = 0.004, on_batch=None):
        self.max_batch, self.max_wait = max_batch, max_wait
        self.on_batch = on_batch or (lambda size: None)
        self.executor = ThreadPoolExecutor(1, thread_name_prefix="scorer")  # one pass at a time, in order
        self.queue: asyncio.Queue | None = None
        self.task = None

    async def start(self):
        self.queue = asyncio.Queue()
        self.task = asyncio.create_task(self._run())

    async def stop(self):
        if self.task:
            self.task.cancel()
        self.executor.shutdown(wait=True)

    async def submit(self, served: ServedModel, pixels: np.ndarray, meta) -> dict:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put((served, pixels, meta, future))
        return await future

    async def _gather(self, loop) -> list:
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
        return items

    async def _run(self):
        loop = asyncio.get_running_loop()
        while True:
            items = await self._gather(loop)
            for served in {id(item[0]): item[0] for item in items}.values():
                group = [item for item in items if item[0] is served]
                self.on_batch(len(group))
                try:
                    entries = await loop.run_in_executor(self.executor, _assess, served, group)
                    for item, entry in zip(group, entries):
                        if not item[3].done():
                            item[3].set_result(entry)
                except Exception as error:  # never leave a request hanging
                    log.exception("scoring a batch of %d failed", len(group))
                    for item in group:
                        if not item[3].done():
                            item[3].set_exception(error)


def _assess(served: ServedModel, group) -> list[dict]:
    use_torch_threads(served.torch_threads)
    entries, _ = served.predictor.assess(np.stack([item[1] for item in group]), [item[2] for item in group])
    return entries

"""Batches from a cached split: index order, gather from the memory map, overlap with compute.

A background thread prepares the next batches (gather + optional JPEG re-compression + pinning) while
the model works on the current one; the device does the rest (float conversion and augmentation).
"""
from __future__ import annotations

import queue
import threading

import numpy as np
import torch

from .augment import AugmentConfig, jpeg_batch


class BatchLoader:
    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, shuffle: bool = False,
                 seed: int = 0, sample_weights: np.ndarray | None = None, rank: int = 0, world_size: int = 1,
                 augment: AugmentConfig | None = None, prefetch: int = 2, pin_memory: bool = False,
                 drop_last: bool = False, max_batches: int | None = None):
        self.images, self.labels = images, labels
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.sample_weights = sample_weights
        self.rank, self.world_size = rank, world_size
        self.augment, self.prefetch, self.pin_memory = augment, prefetch, pin_memory
        self.drop_last, self.max_batches = drop_last, max_batches
        self.epoch = 0

    def set_epoch(self, epoch: int):
        self.epoch = epoch

    def indices(self) -> np.ndarray:
        count = len(self.labels)
        rng = np.random.default_rng([self.seed, self.epoch])
        if self.sample_weights is not None:
            probabilities = self.sample_weights / self.sample_weights.sum()
            order = rng.choice(count, size=count, replace=True, p=probabilities)
        elif self.shuffle:
            order = rng.permutation(count)
        else:
            order = np.arange(count)
        if self.world_size > 1:
            # every rank gets the same number of samples (padding by wrap-around, as DistributedSampler)
            per_rank = -(-len(order) // self.world_size)
            order = np.resize(order, per_rank * self.world_size)[self.rank::self.world_size]
        return order

    def __len__(self):
        count = len(self.indices())
        batches = count // self.batch_size if self.drop_last else -(-count // self.batch_size)
        return min(batches, self.max_batches) if self.max_batches else batches

    def batch_slices(self, order: np.ndarray):
        """(start, indices) of each batch of this epoch's ``order``: ``max_batches`` and ``drop_last`` applied."""
        for number, start in enumerate(range(0, len(order), self.batch_size)):
            chosen = order[start:start + self.batch_size]
            if (self.max_batches and number >= self.max_batches) or (self.drop_last and len(chosen) < self.batch_size):
                return
            yield start, chosen

    def _batches(self):
        order = self.indices()
        rng = np.random.default_rng([self.seed, self.epoch, 7])
        for _, chosen in self.batch_slices(order):
            sorted_positions = np.argsort(chosen, kind="stable")
            gathered = np.empty((len(chosen), *self.images.shape[1:]), dtype=np.uint8)
            gathered[sorted_positions] = self.images[chosen[sorted_positions]]  # sorted reads from the memmap
            if self.augment is not None:
                gathered = jpeg_batch(gathered, self.augment, rng)
            pixels = torch.from_numpy(gathered)
            labels = torch.from_numpy(self.labels[chosen].astype(np.float32))
            if self.pin_memory:
                pixels, labels = pixels.pin_memory(), labels.pin_memory()
            yield pixels, labels, chosen

    def __iter__(self):
        if self.prefetch <= 0:
            yield from self._batches()
            return
        buffer: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        stop = threading.Event()

        def produce():
            try:
                for item in self._batches():
                    if stop.is_set():
                        return
                    buffer.put(item)
                buffer.put(done)
            except BaseException as error:  # hand the error to the consumer instead of hanging it
                buffer.put(error)

        thread = threading.Thread(target=produce, daemon=True)
        thread.start()
        try:
            while True:
                item = buffer.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            while thread.is_alive():
                try:
                    buffer.get_nowait()
                except queue.Empty:
                    thread.join(timeout=0.05)


class DeviceBatchLoader(BatchLoader):
    """The cached split copied to the device once; each epoch's order goes there in one copy and batches are
    gathered on the device: no loader thread, no host-to-device copy per step (a GPU step is then bound by
    the GPU, not by the host). The same batches, in the same order, as ``BatchLoader``; no JPEG
    re-compression (that runs on the host)."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, batch_size: int, device, **options):
        super().__init__(images, labels, batch_size, **options)
        if self.augment is not None and self.augment.jpeg_quality and self.augment.jpeg_p:
            raise ValueError("JPEG re-compression runs on the host: use BatchLoader")
        self.device = torch.device(device)
        self.device_images = torch.from_numpy(np.ascontiguousarray(images)).to(self.device)
        self.device_labels = torch.from_numpy(np.asarray(labels, dtype=np.float32)).to(self.device)

    def __iter__(self):
        order = self.indices()
        on_device = torch.from_numpy(order.astype(np.int64)).to(self.device)
        for start, chosen in self.batch_slices(order):
            index = on_device[start:start + self.batch_size]
            yield self.device_images.index_select(0, index), self.device_labels.index_select(0, index), chosen


def fits_on_device(images: np.ndarray, device, share: float = 0.25) -> bool:
    """Whether the cached split takes at most ``share`` of the device's free memory (CUDA only)."""
    device = torch.device(device)
    if device.type != "cuda":
        return False
    free, _ = torch.cuda.mem_get_info(device)
    return images.nbytes <= share * free


def to_model_input(pixels: torch.Tensor, device, dtype=torch.float32) -> torch.Tensor:
    """uint8 (B, H, W) -> float (B, 1, H, W) in [0, 1] on ``device``; 3-channel models take it as gray RGB."""
    return pixels.to(device, non_blocking=True).unsqueeze(1).to(dtype).div_(255.0)

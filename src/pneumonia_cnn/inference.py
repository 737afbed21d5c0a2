"""The one path from a file (or a cached array) to a probability. ``evaluate``, ``predict``, ``serve``,
``explain``, ``export`` and the report all go through ``Predictor``, so preprocessing cannot drift."""
from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import build_model, load_checkpoint
from .data.loader import to_model_input
from .data.readers import read_image
from .data.intensity import standardise_intensity
from .device import autocast, autocast_dtype, keep_freed_memory_for_reuse, resolve_device
from .errors import ImageReadError, PneumoniaCNNError
from .fileio import display_path

log = logging.getLogger(__name__)


@dataclass
class Prediction:
    path: str
    probability: float | None = None
    label: str | None = None
    threshold: float | None = None
    in_distribution: bool | None = None
    ood_score: float | None = None
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    model: str = ""

    def to_dict(self) -> dict:
        return asdict(self)


def _onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
        import onnx  # noqa: F401
    except ImportError:
        return False
    return True


class Predictor:
    """One checkpoint, or several averaged (an ensemble), ready to turn pixels into probabilities."""

    def __init__(self, checkpoints, device: str = "auto", amp: str = "off", engine: str = "auto"):
        if isinstance(checkpoints, (str, Path, dict)):
            checkpoints = [checkpoints]
        self.checkpoints = [c if isinstance(c, dict) else load_checkpoint(c) for c in checkpoints]
        if not self.checkpoints:
            raise PneumoniaCNNError("no checkpoint given")
        first = self.checkpoints[0]
        self.preprocessing = dict(first["preprocessing"])
        for other in self.checkpoints[1:]:
            if other["preprocessing"] != self.preprocessing:
                raise PneumoniaCNNError(f"{display_path(other['path'])}: preprocessing differs from "
                                        f"{display_path(first['path'])}; an ensemble needs the same input")
        self.device = resolve_device(device)
        self.amp_dtype = autocast_dtype(self.device, amp)
        if self.device.type == "cpu":
            keep_freed_memory_for_reuse()  # measured: the torch engine predicts 2x faster (91 -> 188 img/s)
        self.models = [build_model(c).to(self.device).to(memory_format=torch.channels_last).eval()
                       for c in self.checkpoints]
        self.class_names = tuple(first.get("class_names", ("NORMAL", "PNEUMONIA")))
        self.threshold = float(first.get("threshold", 0.5)) if len(self.checkpoints) == 1 else \
            float(np.mean([c.get("threshold", 0.5) for c in self.checkpoints]))
        self.temperatures = [float(c.get("temperature", 1.0)) for c in self.checkpoints]
        self.tta = bool(first.get("tta", False))
        self.ood = None
        if len(self.checkpoints) == 1 and first.get("ood"):
            from .ood import OODDetector
            self.ood = OODDetector.from_state(first["ood"])
        self.model_id = "+".join(c.get("run_id", Path(c["path"]).stem) for c in self.checkpoints)
        if engine not in ("auto", "torch", "onnx"):
            raise PneumoniaCNNError(f"--engine {engine}: choose auto, torch or onnx")
        if engine == "onnx" and self.amp_dtype is not None:
            raise PneumoniaCNNError(f"--amp {amp} runs on the torch engine; use --engine torch or auto")
        if engine == "auto":  # measured on 2 cores, seed model: ONNX Runtime 205 img/s, torch fp32 180, bf16 313
            engine = "onnx" if self.device.type == "cpu" and self.amp_dtype is None and _onnxruntime_available() \
                else "torch"
        self.engine = engine
        self.sessions = [self._onnx_session(model) for model in self.models] if engine == "onnx" else None

    def _onnx_session(self, model):
        """The same network as an in-memory ONNX Runtime session taking the gray (B, 1, H, W) input; the
        torch model stays for Grad-CAM and the out-of-distribution features."""
        import io
        import warnings
        try:
            import onnxruntime
        except ImportError:
            raise PneumoniaCNNError("--engine onnx needs onnxruntime (pip install 'pneumonia-cnn[export]')") from None
        buffer = io.BytesIO()
        cpu_model = build_model(self.checkpoints[self.models.index(model)]).eval()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(cpu_model, (torch.rand(2, 1, *self.size),), buffer, dynamo=False, opset_version=17,
                              input_names=["image"], output_names=["logit"],
                              dynamic_axes={"image": {0: "batch"}, "logit": {0: "batch"}})
        options = onnxruntime.SessionOptions()
        options.log_severity_level = 3
        return onnxruntime.InferenceSession(buffer.getvalue(), options, providers=["CPUExecutionProvider"])

    # ---------- properties of the expected input
    @property
    def size(self) -> tuple[int, int]:
        return tuple(self.preprocessing["size"])

    @property
    def channels(self) -> int:
        return int(self.preprocessing.get("channels", 3))

    def metadata(self) -> dict:
        first = self.checkpoints[0]
        return {"model": [c["model"]["name"] for c in self.checkpoints], "run_id": self.model_id,
                "preprocessing": self.preprocessing, "class_names": list(self.class_names),
                "threshold": self.threshold, "temperature": self.temperatures, "tta": self.tta,
                "ood": bool(self.ood), "intended_use": first.get("intended_use", {})}

    # ---------- pixels -> probabilities
    def preprocess_path(self, path) -> tuple[np.ndarray, object]:
        gray, meta = read_image(path, self.size, self.preprocessing.get("interpolation", "bilinear"))
        return standardise_intensity(gray, self.preprocessing.get("intensity", "none")), meta

    def preprocess_bytes(self, data: bytes, name: str = "upload") -> tuple[np.ndarray, object]:
        from .data.readers import read_image_bytes
        gray, meta = read_image_bytes(data, name, self.size, self.preprocessing.get("interpolation", "bilinear"))
        return standardise_intensity(gray, self.preprocessing.get("intensity", "none")), meta

    def preprocess_array(self, gray: np.ndarray) -> np.ndarray:
        from .data.readers import resize_gray
        if gray.shape != self.size:
            gray = resize_gray(gray, self.size, self.preprocessing.get("interpolation", "bilinear"))
        return standardise_intensity(gray, self.preprocessing.get("intensity", "none"))

    def logits(self, pixels_uint8: torch.Tensor) -> torch.Tensor:
        """(B, H, W) uint8 -> (n_models, B) calibrated logits (TTA averaged in logit space)."""
        if self.sessions is not None:
            x = pixels_uint8.numpy()[:, None].astype(np.float32) / 255.0
            outputs = []
            for session, temperature in zip(self.sessions, self.temperatures):
                out = session.run(None, {"image": x})[0]
                if self.tta:
                    out = (out + session.run(None, {"image": np.ascontiguousarray(x[..., ::-1])})[0]) / 2
                outputs.append(torch.from_numpy(out.astype(np.float32)) / temperature)
            return torch.stack(outputs)
        x = to_model_input(pixels_uint8, self.device)
        if self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        x = x.contiguous(memory_format=torch.channels_last)
        outputs = []
        with torch.inference_mode(), autocast(self.device, self.amp_dtype):
            for model, temperature in zip(self.models, self.temperatures):
                out = model(x).float()
                if self.tta:
                    out = (out + model(torch.flip(x, dims=[3])).float()) / 2
                outputs.append(out / temperature)
        return torch.stack(outputs)

    def probabilities_from_pixels(self, pixels_uint8) -> np.ndarray:
        if isinstance(pixels_uint8, np.ndarray):
            pixels_uint8 = torch.from_numpy(np.array(pixels_uint8, copy=True))
        return torch.sigmoid(self.logits(pixels_uint8)).mean(0).cpu().numpy().astype(np.float64)

    def predict_arrays(self, images: np.ndarray, batch_size: int = 64, progress: bool = False) -> np.ndarray:
        """Probabilities for preprocessed uint8 images (N, H, W) such as a cached split."""
        out = np.empty(len(images), dtype=np.float64)
        starts = range(0, len(images), batch_size)
        if progress:
            from tqdm import tqdm
            starts = tqdm(starts, desc="predicting", unit="batch", leave=False, disable=None)
        for start in starts:
            out[start:start + batch_size] = self.probabilities_from_pixels(np.array(images[start:start + batch_size]))
        return out

    def label_for(self, probability: float) -> str:
        return self.class_names[1] if probability >= self.threshold else self.class_names[0]

    def predict_files(self, paths, batch_size: int = 32, progress: bool = False) -> list[Prediction]:
        """Read, preprocess and predict files; unreadable files get ``error`` and the rest go on."""
        from concurrent.futures import ThreadPoolExecutor
        import os
        results: list[Prediction] = []
        paths = [str(p) for p in paths]
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=len(paths), desc="predicting", unit="img", leave=False, disable=None)

        def read(path):
            try:
                return self.preprocess_path(path), None
            except ImageReadError as error:
                return None, error.reason

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
            for start in range(0, len(paths), batch_size):
                chunk = paths[start:start + batch_size]
                decoded = list(pool.map(read, chunk))
                good = [(p, d[0]) for p, d in zip(chunk, decoded) if d[0] is not None]
                predictions = {}
                if good:
                    pixels = np.stack([g[1][0] for g in good])
                    probabilities = self.probabilities_from_pixels(pixels)
                    checks = self.check_inputs(pixels, [g[1][1] for g in good])
                    for (path, _), probability, check in zip(good, probabilities, checks):
                        predictions[path] = Prediction(path, float(probability), self.label_for(probability),
                                                       self.threshold, model=self.model_id, **check)
                for path, (_, reason) in zip(chunk, decoded):
                    results.append(predictions.get(path) or Prediction(path, error=reason, model=self.model_id))
                if bar:
                    bar.update(len(chunk))
        if bar:
            bar.close()
        return results

    def check_inputs(self, pixels: np.ndarray, metas=None) -> list[dict]:
        """Out-of-distribution score and model-free input checks, one dict per image."""
        from .ood import input_warnings
        metas = metas or [None] * len(pixels)
        scores = self.ood.score(self.models[0], pixels, self.device) if self.ood else None
        out = []
        for index, gray in enumerate(pixels):
            warnings = input_warnings(gray, metas[index], self.checkpoints[0].get("intended_use", {}))
            entry = {"warnings": warnings}
            if scores is not None:
                entry["ood_score"] = float(scores[index])
                entry["in_distribution"] = bool(scores[index] <= self.ood.threshold) and not any(
                    w.startswith("not an X-ray") for w in warnings)
                if not entry["in_distribution"]:
                    entry["warnings"] = warnings + ["outside the intended use: the image is unlike the training "
                                                    "X-rays; treat the probability with caution"]
            elif warnings:
                entry["in_distribution"] = False
            out.append(entry)
        return out


def predict(checkpoint, paths, device: str = "auto", batch_size: int = 32, engine: str = "auto") -> list[Prediction]:
    """Library form of ``pneumonia-cnn predict``."""
    return Predictor(checkpoint, device, engine=engine).predict_files(paths, batch_size)


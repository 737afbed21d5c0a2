"""Device and precision choices shared by training and inference."""
from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading

# OpenMP threads that wait for work spin for a while (GNU libgomp: 300,000 turns) before they sleep. When
# another process shares the cores, a spinning thread takes the core its descheduled partner needs to reach
# the same barrier, and a two-thread step runs slower than one thread (README, "Speed"). A short spin keeps
# the wake-up fast on an idle machine and yields under load. libgomp reads this once, when torch loads it:
# ``pneumonia_cnn/__init__.py`` imports this module first; a value already set is kept.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "10000")

import torch  # noqa: E402

from .errors import PneumoniaCNNError


def resolve_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise PneumoniaCNNError(f"--device {name}: CUDA is not available on this machine (use --device auto or cpu)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise PneumoniaCNNError(f"--device {name}: not a device (use auto, cpu or cuda)") from None
    if device.type not in ("cpu", "cuda"):  # mps, xla, meta...: torch parses them, then fails deep inside
        raise PneumoniaCNNError(f"--device {name}: pneumonia-cnn runs on auto, cpu, cuda or cuda:N")
    return device


def autocast_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """``amp``: off | bf16 | fp16 | auto (CUDA: bf16 when supported, else fp16; CPU: bf16 where the CPU has
    native bf16 instructions (AVX512-BF16 or AMX), else off)."""
    if amp == "off":
        return None
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp16":
        return torch.float16
    if amp == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # native bf16 instructions make training faster; emulated bf16 would be slower than fp32
        return torch.bfloat16 if cpu_has_native_bf16() else None
    raise PneumoniaCNNError(f"--amp {amp}: choose auto, off, bf16 or fp16")


def cpu_has_native_bf16() -> bool:
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, probe, lambda: False)() for probe in probes)


def fused_optimizer_supported(device: torch.device) -> bool:
    """Fused Adam/AdamW/SGD kernels exist for CPU and CUDA parameters (torch >= 2.4)."""
    return device.type in ("cpu", "cuda")


def autocast(device: torch.device, dtype: torch.dtype | None, cache_enabled: bool = True):
    """``cache_enabled=False`` while capturing a CUDA graph: cached casts would outlive the capture."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype, cache_enabled=cache_enabled)


def keep_freed_memory_for_reuse() -> bool:
    """Make glibc keep freed memory in the process instead of returning it to the OS.

    Activations of a CPU training step are tens to hundreds of MB each; glibc serves blocks over 32 MB with
    mmap and unmaps them on free, so every step page-faults all of them in again (zero-filled by the kernel).
    Keeping the blocks trades a little peak memory for much faster CPU training (README, "Speed").
    Process-wide and lasting; ``PNEUMONIA_CNN_MALLOC=default`` opts out. Returns whether it was applied."""
    if os.environ.get("PNEUMONIA_CNN_MALLOC", "").lower() == "default" or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # not glibc (musl, ...): nothing to tune
        return False
    m_trim_threshold, m_mmap_max = -1, -4
    return bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


_full_float32_lock = threading.Lock()
_full_float32_users = 0
_tf32_before: tuple[str, tuple] = ("legacy", (True, False))
_TF32_OFF = {"legacy": (False, False), "precision": ("ieee", "ieee")}


def _tf32_flags() -> tuple[str, tuple]:
    """torch's TF32 flags for cuDNN and cuBLAS: the legacy booleans, or, once a caller has set torch's newer
    ``fp32_precision`` settings (reading the legacy flags then raises), those."""
    try:
        return "legacy", (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    except RuntimeError:
        return "precision", (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)


def _set_tf32_flags(kind: str, values: tuple) -> None:
    if kind == "legacy":
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = values
    else:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = values


@contextlib.contextmanager
def full_float32(device: torch.device):
    """TF32 off for cuDNN convolutions and cuBLAS products while scoring on a GPU: thresholds and calibration
    are fitted in float32, and TF32 rounding made an image's probability depend on the batch it was scored in
    (README, "From score to decision"). The flags are process-wide, so concurrent scoring threads (``serve``)
    share one switch: the first to enter turns TF32 off, the last to leave restores what it was."""
    global _full_float32_users, _tf32_before
    if device.type != "cuda":
        yield
        return
    with _full_float32_lock:
        if _full_float32_users == 0:
            _tf32_before = _tf32_flags()
            _set_tf32_flags(_tf32_before[0], _TF32_OFF[_tf32_before[0]])
        _full_float32_users += 1
    try:
        yield
    finally:
        with _full_float32_lock:
            _full_float32_users -= 1
            if _full_float32_users == 0:
                _set_tf32_flags(*_tf32_before)

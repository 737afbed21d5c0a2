import subprocess
import sys

import numpy as np
import pytest
import torch

from pneumonia_cnn.device import autocast_dtype, full_float32, resolve_device
from pneumonia_cnn.errors import PneumoniaCNNError

# Allocates, touches and frees a 256 MB buffer twice and prints the page faults of the second round: a
# process that returned the first buffer to the OS must fault every page of the second one in again.
SECOND_ALLOCATION_FAULTS = """
import resource, sys
import numpy as np
from pneumonia_cnn.device import keep_freed_memory_for_reuse
applied = keep_freed_memory_for_reuse()
def touch():
    buffer = np.empty(256 * 2**20, dtype=np.uint8)
    buffer[::4096] = 1
    del buffer
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(applied, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def second_allocation_faults(env_value: str) -> tuple[bool, int]:
    import os
    env = dict(os.environ, PNEUMONIA_CNN_MALLOC=env_value)
    output = subprocess.run([sys.executable, "-c", SECOND_ALLOCATION_FAULTS], env=env, capture_output=True,
                            text=True, check=True).stdout.split()
    return output[0] == "True", int(output[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator is tuned on Linux only")
def test_freed_activations_stay_in_the_process_unless_opted_out():
    applied, faults = second_allocation_faults("")
    default_applied, default_faults = second_allocation_faults("default")
    assert applied and not default_applied
    # 256 MB is at least 128 faults even with 2 MB transparent huge pages
    assert default_faults >= 128           # the untuned allocator unmapped the buffer: it faults in again
    assert faults <= default_faults // 10  # kept: the second buffer reuses the first one's pages


def test_device_and_precision_choices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert autocast_dtype(torch.device("cpu"), "off") is None
    assert autocast_dtype(torch.device("cpu"), "bf16") is torch.bfloat16
    assert autocast_dtype(torch.device("cuda"), "fp16") is torch.float16
    with pytest.raises(PneumoniaCNNError, match="--amp fast"):
        autocast_dtype(torch.device("cpu"), "fast")
    with pytest.raises(PneumoniaCNNError, match="not a device"):
        resolve_device("tpu:x")
    for other in ("mps", "xla", "meta"):  # torch parses them; they failed later with a RuntimeError traceback
        with pytest.raises(PneumoniaCNNError, match=f"^--device {other}: pneumonia-cnn runs on auto, cpu, cuda or "
                                                    f"cuda:N$"):
            resolve_device(other)
    if not torch.cuda.is_available():
        with pytest.raises(PneumoniaCNNError, match="CUDA is not available"):
            resolve_device("cuda")


def tf32_flags():
    return torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32


def test_scoring_on_a_gpu_turns_tf32_off_until_the_last_scoring_thread_leaves():
    import threading
    before = tf32_flags()
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = True, True
    try:
        with full_float32(torch.device("cpu")):
            assert tf32_flags() == (True, True)  # nothing to do off the GPU
        first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
        seen = {}

        def first():
            with full_float32(torch.device("cuda")):
                first_in.set()
                second_in.wait(10)
            first_out.set()

        def second():
            first_in.wait(10)
            with full_float32(torch.device("cuda")):
                second_in.set()
                first_out.wait(10)
                seen["after the first left"] = tf32_flags()
        threads = [threading.Thread(target=first), threading.Thread(target=second)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert seen == {"after the first left": (False, False)}
        assert tf32_flags() == (True, True)  # restored when the second left
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def test_the_switch_works_after_a_caller_set_torchs_newer_precision_settings():
    """Once ``fp32_precision`` is set, reading the legacy flags raises ("a mix of the legacy and new APIs"):
    every scoring on a GPU would then have failed."""
    before = (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision)
    torch.backends.cuda.matmul.fp32_precision = "tf32"
    try:
        with full_float32(torch.device("cuda")):
            assert (torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision) == (
                "ieee", "ieee")
        assert torch.backends.cuda.matmul.fp32_precision == "tf32"
    finally:
        torch.backends.cudnn.conv.fp32_precision, torch.backends.cuda.matmul.fp32_precision = before


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and PNEUMONIA_CNN_TEST_CUDA=1")
def test_an_image_scored_on_the_gpu_gets_the_probability_it_gets_on_the_cpu_whatever_its_batch():
    """With TF32 (torch's default for cuDNN convolutions) the built-in model's probabilities on the shared
    test images moved by up to 9e-4 between batch 1 and batch 64 on an H100; in float32, by about 1e-6."""
    from pneumonia_cnn.inference.predictor import Predictor
    from tests.conftest import SHARED_DATA
    paths = sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:64]
    on_cpu = Predictor("builtin", "cpu", engine="torch")
    on_gpu = Predictor("builtin", "cuda")
    pixels = np.stack([on_cpu.preprocess_path(path)[0] for path in paths])
    reference = on_cpu.probabilities_from_pixels(pixels)
    batched = on_gpu.probabilities_from_pixels(pixels)
    alone = np.concatenate([on_gpu.probabilities_from_pixels(pixels[i:i + 1]) for i in range(len(paths))])
    assert np.abs(batched - reference).max() < 2e-5 and np.abs(alone - reference).max() < 2e-5


def test_training_never_steps_in_float16_without_loss_scaling(monkeypatch, capsys):
    """--amp auto on a GPU without bf16 trained in float16 with no GradScaler (gradients underflow); --amp fp16 was
    offered to train, and on a CPU ran emulated, 132 s for a one-step epoch against 1 s in float32 in a review."""
    from pneumonia_cnn.cli import main
    from pneumonia_cnn.errors import ConfigError
    from pneumonia_cnn.training import make_config
    from pneumonia_cnn.training.setup import training_autocast
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    assert autocast_dtype(torch.device("cuda"), "auto") is torch.float16  # inference keeps it
    assert training_autocast(torch.device("cuda"), "auto") is None
    assert training_autocast(torch.device("cpu"), "bf16") is torch.bfloat16
    with pytest.raises(ConfigError, match="amp"):
        make_config(amp="fp16")
    with pytest.raises(SystemExit):
        main(["train", "--data", "nowhere", "--amp", "fp16"])
    assert "invalid choice: 'fp16'" in capsys.readouterr().err

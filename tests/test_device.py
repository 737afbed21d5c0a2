import subprocess
import sys

import pytest
import torch

from pneumonia_cnn.device import autocast_dtype, resolve_device
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

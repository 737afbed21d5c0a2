"""The library's ``predict`` as the README shows it: a single path is one file (a ``str`` had been read as a list of
one-letter files, each "No such file or directory"), and a batch size below 1 is refused in one line (it was
``range() arg 3 must not be zero``)."""
from pathlib import Path

import pytest

from tests.conftest import SHARED_DATA, require_shared


def test_predict_takes_one_path_or_a_list_and_refuses_a_batch_size_below_one():
    import pneumonia_cnn
    from pneumonia_cnn.errors import ConfigError
    require_shared()
    image = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[0]
    listed = pneumonia_cnn.predict("builtin", [str(image)], device="cpu")
    for one in (str(image), image, bytes(image)):  # bytes: as os.fsencode gives a path
        predictions = pneumonia_cnn.predict("builtin", one, device="cpu")
        assert [(p.path, p.probability, p.error) for p in predictions] == \
            [(str(image), listed[0].probability, None)]
    assert listed[0].label == "NORMAL" and listed[0].ood_threshold is not None
    import numpy as np
    assert pneumonia_cnn.predict("builtin", [image], batch_size=np.int64(4))[0].probability == listed[0].probability
    for size in (0, -1, 2.5, True):
        with pytest.raises(ConfigError, match=rf"^batch_size: {size!r} must be a whole number of at least 1$"):
            pneumonia_cnn.predict("builtin", [Path(image)], batch_size=size)


def test_a_given_rate_at_either_end_is_printed_with_its_digits():
    """--prevalence 1e-6 was said as "a pneumonia rate of 0.000 (given)", and 0.999999 as "1.000"."""
    from pneumonia_cnn.calibration import shown_rate
    assert [shown_rate(rate) for rate in (1e-6, 0.0005, 0.001, 0.3, 0.75134, 0.999, 0.999999)] == [
        "1e-06", "0.0005", "0.001", "0.300", "0.751", "0.999", "0.999999"]

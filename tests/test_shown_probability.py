"""README (From score to decision): a probability is printed with as many decimals as it takes to differ from the
threshold printed alike, so that its label never looks wrong beside it (0.93116 NORMAL was printed 0.9312, the
threshold's own four decimals)."""
import json
from types import SimpleNamespace

import pytest

from pneumonia_cnn import builtin
from pneumonia_cnn.cli import main
from pneumonia_cnn.cli.interop import print_pacs_result
from pneumonia_cnn.predict_io import shown_probability
from tests.conftest import SHARED_DATA, require_shared


@pytest.mark.parametrize("probability, threshold, shown", [
    (0.0336, 0.9311816869821408, "0.0336"),  # far from it: four decimals
    (0.93116, 0.93118, "0.93116"),  # 0.9312 both at four
    (0.93118170, 0.9311816869821408, "0.93118170"),  # 0.9311817 both at seven
    (0.95, 0.95, "0.9500"),  # on the threshold: nothing to tell apart
    (0.5, None, "0.5000"),  # no threshold known
    (0.1 + 1e-13, 0.1, "0.1000000000"),  # at most ten decimals
])
def test_shown_probability(probability, threshold, shown):
    assert shown_probability(probability, threshold) == shown


def test_predict_explain_and_pacs_lines_show_a_probability_apart_from_the_threshold(capsys, tmp_path):
    import torch
    require_shared()
    image = SHARED_DATA / "val" / "PNEUMONIA" / "person412_bacteria_1827.jpeg"
    assert main(["predict", str(image), "--format", "json"]) == 0
    here = json.loads(capsys.readouterr().out)[0]["probability"]
    checkpoint = torch.load(builtin.checkpoint_path(), weights_only=True)
    checkpoint["threshold"] = here + 3e-6  # NORMAL, with the probability and the threshold alike at four decimals
    above = tmp_path / "above.pt"
    torch.save(checkpoint, above)

    def apart(shown: str, label: str) -> None:
        decimals = len(shown.split(".")[1])
        assert decimals > 4 and label == "NORMAL"
        assert float(shown) < float(f"{checkpoint['threshold']:.{decimals}f}")

    assert main(["predict", str(above), str(image)]) == 0
    row = capsys.readouterr().out.splitlines()[1].split()
    apart(row[1], row[2])
    assert main(["explain", str(above), str(image), "--out", str(tmp_path / "maps")]) == 0
    line = capsys.readouterr().out.splitlines()[0]  # "...jpeg: p=0.93118 NORMAL -> ..."
    apart(line.split(" p=")[1].split()[0], line.split(" p=")[1].split()[1])
    entry = {"probability": here, "threshold": checkpoint["threshold"], "label": "NORMAL", "in_distribution": True,
             "warnings": []}
    print_pacs_result(SimpleNamespace(entry=entry, sop_instance_uid="1.2.3", report_uid="1.2.4", overlay_uid=None,
                                      overlay_refused=None, overlay_error=None))
    words = capsys.readouterr().out.split()
    apart(words[1].removeprefix("p="), words[2])

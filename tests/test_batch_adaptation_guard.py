"""--adapt-batch redraws a batch at the validation images' class mix before re-estimating batch-norm statistics. A
probe sent 39 normal children's X-rays (no image scored PNEUMONIA before adaptation): the batch was re-estimated as
it was, all NORMAL, and 30 of the 39 were then labelled PNEUMONIA (specificity 1.00 -> 0.23), while the note said
"AdaBN at the validation images' class mix"."""
import json
import shutil

import pytest

from pneumonia_cnn.cli import main
from tests.conftest import SHARED_DATA, require_shared


def batch(folder, normal: int, pneumonia: int):
    require_shared()
    folder.mkdir()
    for label, count in (("NORMAL", normal), ("PNEUMONIA", pneumonia)):
        for source in sorted((SHARED_DATA / "test" / label).iterdir())[:count]:
            shutil.copyfile(source, folder / source.name)
    return folder


def rows(capsys, *arguments):
    assert main(["predict", *map(str, arguments), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def test_a_batch_without_pneumonia_is_not_adapted_and_keeps_its_labels(tmp_path, capsys):
    normal = batch(tmp_path / "normal", 40, 0)
    plain = rows(capsys, normal)
    adapted = rows(capsys, normal, "--adapt-batch")
    assert [r["probability"] for r in adapted] == [r["probability"] for r in plain]
    assert sum(r["label"] == "PNEUMONIA" for r in adapted) == sum(r["label"] == "PNEUMONIA" for r in plain) == 0
    inside = sum(r["in_distribution"] is not False for r in plain)
    assert {(r["batch_adapted"], r["batch_adaptation"]) for r in adapted} == {
        (False, f"not adapted: 0 of the {inside} in-distribution images scored PNEUMONIA before adaptation, fewer "
                f"than 8: the validation images' class mix cannot be drawn from this batch")}


@pytest.mark.parametrize("pneumonia, adapted", [(7, False), (12, True)])
def test_a_batch_is_adapted_once_it_holds_eight_of_each_class(tmp_path, capsys, pneumonia, adapted):
    mixed = batch(tmp_path / "mixed", 40, pneumonia)
    found = rows(capsys, mixed, "--adapt-batch")
    assert {r["batch_adapted"] for r in found} == {adapted}
    positives = sum(r["label"] == "PNEUMONIA" for r in rows(capsys, mixed))
    assert (positives < 8) is not adapted  # the pre-adaptation labels decide (the ones plain predict gives)


def test_a_batch_mostly_out_of_distribution_says_so_once(tmp_path, capsys, caplog):
    """174 of 208 images flagged (adults among children): the rate estimate and AdaBN went ahead on the 34 others
    (9 of them adults) with no word about the batch as a whole."""
    import logging

    from tests.conftest import SHARED
    caplog.set_level(logging.INFO, logger="pneumonia_cnn")
    children = batch(tmp_path / "mixed", 20, 20)
    for source in sorted((SHARED / "data" / "adult_xray_dev" / "covid_collection").glob("*.jpeg"))[:60]:
        shutil.copyfile(source, children / f"adult_{source.name}")
    assert main(["predict", str(children), "--format", "json", "--prevalence", "estimate"]) == 0
    found = json.loads(capsys.readouterr().out)
    flagged = sum(r["in_distribution"] is False for r in found)
    assert flagged > 50
    assert (f"{flagged} of the batch's 100 images are flagged out of distribution: the batch steps use only the "
            f"{100 - flagged} others (each distinct image once)") in caplog.text
    assert caplog.text.count("flagged out of distribution: the batch steps") == 1  # once, not per row or step
    caplog.clear()
    assert main(["predict", str(batch(tmp_path / "children", 20, 20)), "--format", "json", "--prevalence",
                 "estimate"]) == 0
    assert "flagged out of distribution: the batch steps" not in caplog.text


def test_a_fitted_adapted_decision_draws_by_labels_when_pseudo_labels_hold_too_few_of_a_class():
    """Training's end and evaluate's refit fit --adapt-batch's decision on labelled images: by pseudo-labels, as it
    is served, while they hold 8 distinct images of each class; by the images' own labels otherwise (a copy of an
    image counts once, as in serving)."""
    import numpy as np
    from PIL import Image

    from pneumonia_cnn.inference.adabn import fit_class_mix
    require_shared()
    files = [sorted((SHARED_DATA / "test" / label).iterdir())[:10] for label in ("NORMAL", "PNEUMONIA")]
    pixels = np.stack([np.asarray(Image.open(f).convert("L").resize((64, 64))) for f in files[0] + files[1]])
    labels = np.repeat([0, 1], 10)
    pseudo = labels.astype(bool)
    drawn, why = fit_class_mix(pixels, pseudo, labels)
    assert why == "" and drawn.tolist() == pseudo.tolist()
    pseudo[10:13] = False  # 7 of the 20 scored PNEUMONIA
    drawn, why = fit_class_mix(pixels, pseudo, labels)
    assert drawn.tolist() == labels.astype(bool).tolist()
    assert why == ("the class mix drawn by the images' labels: only 7 of the 20 distinct in-distribution images "
                   "scored PNEUMONIA before adaptation, fewer than 8")
    copies = pixels.copy()
    copies[11:18] = copies[10]  # 10 scored PNEUMONIA, but 8 of them are one image: 3 distinct
    assert fit_class_mix(copies, labels.astype(bool), labels, ("N", "P"))[1] == (
        "the class mix drawn by the images' labels: only 3 of the 13 distinct in-distribution images scored P "
        "before adaptation, fewer than 8")
    pseudo = ~labels.astype(bool)
    pseudo[:2] = False  # 8 of each class, the other way round than the labels: kept as served
    assert fit_class_mix(pixels, pseudo, labels)[0].tolist() == pseudo.tolist()

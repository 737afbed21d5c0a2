"""``train`` trained on a blank or noise PNG in a class folder without a word, and fitted its decision on a colour
photograph in val, where ``predict`` flags each as not an X-ray and ``adapt`` leaves them out."""
import logging

import numpy as np
import torch

from tests.conftest import SHARED_DATA, link_subset, require_shared, write_image


def test_train_leaves_out_the_images_the_input_checks_flag_and_says_so(tmp_path, caplog):
    from pneumonia_cnn.cli import main
    require_shared()
    caplog.set_level(logging.INFO)
    root = link_subset(tmp_path / "data", {"train": 12, "val": 6})
    write_image(root / "train" / "PNEUMONIA" / "blank.png", np.full((224, 224), 128, np.uint8))
    write_image(root / "train" / "NORMAL" / "noise.png",
                np.random.default_rng(0).integers(0, 256, (224, 224), dtype=np.uint8))
    colour = np.zeros((224, 224, 3), np.uint8)
    colour[..., 0], colour[..., 1] = np.linspace(0, 255, 224).astype(np.uint8)[None], 200
    write_image(root / "val" / "PNEUMONIA" / "colour.png", colour)
    out = tmp_path / "run"
    assert main(["train", "--data", str(root), "--out", str(out), "--epochs", "1", "--size", "32", "--batch-size",
                 "8", "--min-val-images", "13", "--no-progress"]) == 0
    err = [record.getMessage() for record in caplog.records]
    assert (f"train leaves out 2 of the 26 training image(s) in {root / 'train'} that the input checks flag (1: not "
            "an X-ray: the image looks like noise, not anatomy; 1: not an X-ray: the image is blank (almost "
            f"uniform); first: {root / 'train' / 'NORMAL' / 'noise.png'})") in err
    assert (f"train leaves out 1 of the 13 validation image(s) in {root / 'val'} that the input checks flag (1: not "
            "an X-ray: the image is in colour (X-rays are grayscale); first: "
            f"{root / 'val' / 'PNEUMONIA' / 'colour.png'})") in err
    assert "train: 24 images (NORMAL 12, PNEUMONIA 12; 24 patients); val: 12 images (NORMAL 6, PNEUMONIA 6; " \
           "12 patients)" in err
    # val had 13, as many as --min-val-images asks: 12 are left, and the decision is fitted on them (said)
    assert (f"{root / 'val'}: 12 validation image(s) left, fewer than --min-val-images 13: the decision is fitted on "
            "them (give more, or --val-from-train)") in err
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["intended_use"]["trained_on"]["images"] == 24 and best["decision_fit"]["images"] == 12
    fitted_on = best["reference"]["val"]["fingerprints"]
    assert len(fitted_on) == 12  # the decision's record of its images: the colour photograph is not among them


def test_real_x_rays_are_not_left_out(tmp_path, caplog):
    """The shared training folder holds no image the checks flag (measured: 0 of 4,137 train, 0 of 559 val)."""
    from pneumonia_cnn.data.cache import build_or_load
    from pneumonia_cnn.data.dataset import load_split
    from pneumonia_cnn.training.config import TrainConfig
    from pneumonia_cnn.training.data import leave_out_not_xrays
    require_shared()
    root = link_subset(tmp_path / "data", {"train": 40})
    listed = load_split(root, "train")
    cached = build_or_load(listed, size=(64, 64), interpolation="area", intensity="equalize")
    config = TrainConfig(data=str(root), age_range_years=[1, 5])
    kept = leave_out_not_xrays(cached, listed, config, True, "training ")
    assert kept is cached and len(kept) == 80
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING]


def test_train_does_not_leave_out_patients_of_other_ages(tmp_path, caplog):
    """The presets carry the Kaggle set's ages (1-5) for the model card: used as a filter, they left out every
    image of a user's own adult DICOM set ("no readable training images")."""
    from pneumonia_cnn.cli import main
    from tests.interop.studies import xray_dicom
    require_shared()
    sources = {name: sorted((SHARED_DATA / "train" / name).iterdir())[:9] for name in ("NORMAL", "PNEUMONIA")}
    for name, paths in sources.items():
        for index, source in enumerate(paths):
            split = "val" if index >= 6 else "train"
            xray_dicom(source, (tmp_path / "data" / split / name).mkdir(parents=True, exist_ok=True) or
                       tmp_path / "data" / split / name / f"{index}.dcm", patient_id=f"{name}{index}", age="045Y")
    caplog.set_level(logging.INFO)
    assert main(["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run"), "--epochs", "1",
                 "--size", "32", "--batch-size", "4", "--min-val-images", "6", "--no-progress"]) == 0
    said = [record.getMessage() for record in caplog.records]
    assert not any("leaves out" in line for line in said)
    assert "train: 12 images (NORMAL 6, PNEUMONIA 6; 6 patients); val: 6 images (NORMAL 3, PNEUMONIA 3; " \
           "3 patients)" in said  # patients by file name: 0.dcm in both classes is one

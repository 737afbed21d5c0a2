"""``adapt --labelled`` leaves out the labelled images that the model-free input checks flag (a DICOM of another
modality or body part, a blank image), as it does those of ``--data``: said in one line, and counted nowhere
(patients, fine-tuning, the verdict, the detector's references). It had fine-tuned on a CT of the head."""
import shutil
from collections import defaultdict

import numpy as np
from PIL import Image

from pneumonia_cnn.adaptation import adapt
from pneumonia_cnn.cli import main
from pneumonia_cnn.data.dataset import patient_id
from tests.conftest import SHARED_DATA, require_shared
from tests.data.dicom_factory import write_dicom


def patients_of(split, name, count, images_each=2):
    """``count`` patients of a class with ``images_each`` X-rays each (the patient is in the file name)."""
    by_patient = defaultdict(list)
    for path in sorted((SHARED_DATA / split / name).iterdir()):
        by_patient[patient_id(path)].append(path)
    chosen = [paths[:images_each] for paths in by_patient.values() if len(paths) >= images_each][:count]
    assert len(chosen) == count
    return [path for paths in chosen for path in paths]


def labelled_site(folder, patients):
    """Real X-rays of ``patients`` patients per class, and in each class folder 3 DICOMs of a CT of the head and
    2 blank images: 10 files the input checks flag."""
    for name in ("NORMAL", "PNEUMONIA"):
        (folder / name).mkdir(parents=True)
        for path in patients_of("test", name, patients):
            shutil.copy(path, folder / name / path.name)
        for index, path in enumerate(sorted((SHARED_DATA / "val" / name).iterdir())[:3]):
            xray = np.asarray(Image.open(path).convert("L")).astype(np.uint16) * 16
            write_dicom(folder / name / f"ct{index}.dcm", xray, Modality="CT", BodyPartExamined="HEAD",
                        PatientAge="003Y")
        for value in (0, 255):
            Image.fromarray(np.full((224, 224), value, np.uint8)).save(folder / name / f"blank{value}.png")
    return folder


def unlabelled_site(folder):
    folder.mkdir()
    for name in ("NORMAL", "PNEUMONIA"):
        for path in sorted((SHARED_DATA / "val" / name).iterdir())[10:30]:
            shutil.copy(path, folder / f"{name[0]}_{path.name}")
    return folder


def test_flagged_labelled_images_are_left_out_before_the_patients_are_counted(trained_run, tmp_path, caplog,
                                                                               capsys):
    """3 patients per class are left once the 10 flagged files are out: refused (4 are needed), the flagged
    ones not counted as patients; it had fine-tuned on them."""
    require_shared()
    labelled = labelled_site(tmp_path / "lab_ct", patients=3)
    code = main(["adapt", str(trained_run), "--data", str(unlabelled_site(tmp_path / "site")), "--labelled",
                 str(labelled), "--out", str(tmp_path / "a.pt"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and not (tmp_path / "a.pt").exists()
    assert "need at least 4 patients per class (NORMAL 3, PNEUMONIA 3)" in err
    assert "adapt leaves out 10 of the 22 labelled image(s) in " in caplog.text
    assert "lab_ct" in caplog.text and "DICOM" in caplog.text and "blank" in caplog.text


def test_what_remains_is_what_adapt_fine_tunes_and_judges_on(trained_run, tmp_path, caplog):
    require_shared()
    labelled = labelled_site(tmp_path / "lab_ct", patients=4)
    result = adapt(str(trained_run), str(unlabelled_site(tmp_path / "site")), str(tmp_path / "a.pt"),
                   labelled=str(labelled), device="cpu", max_epochs=1, folds=2)
    assert result["labelled_images"] == 16 and result["labelled_left_out_by_input_checks"] == 10
    assert "adapt leaves out 10 of the 26 labelled image(s) in " in caplog.text
    assert result["ood_fitted_on"]["labelled_site_images"] <= 16

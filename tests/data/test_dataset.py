import numpy as np
import pytest

from pneumonia_cnn.data.dataset import load_split, patient_id, patient_split, read_csv_list, scan_folder
from pneumonia_cnn.errors import DatasetError
from tests.conftest import write_image

IMAGE = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))


@pytest.mark.parametrize("name,expected", [("person123_bacteria_456.jpeg", "person123"),
                                           ("person7_virus_1.jpeg", "person7"),
                                           ("IM-0115-0001.jpeg", "0115"),
                                           ("NORMAL2-IM-0381-0001.jpeg", "NORMAL2-0381"),
                                           ("scan.png", "scan")])
def test_patient_id(name, expected):
    assert patient_id(name) == expected


def test_classes_are_sorted_folders_and_junk_is_ignored(tmp_path, caplog):
    for cls in ("PNEUMONIA", "NORMAL"):
        write_image(tmp_path / "train" / cls / "a.jpeg", IMAGE, format="JPEG")
    (tmp_path / "train" / "NORMAL" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "train" / "NORMAL" / "notes.txt").write_text("x")
    images = load_split(tmp_path, "train")
    assert images.class_names == ("NORMAL", "PNEUMONIA")
    assert sorted(images.labels.tolist()) == [0, 1]
    assert images.paths[0].endswith("NORMAL/a.jpeg") and images.labels[0] == 0
    assert images.ignored == 2


def test_missing_folder_and_one_class(tmp_path):
    with pytest.raises(DatasetError, match="folder not found"):
        load_split(tmp_path / "nope", "train")
    write_image(tmp_path / "train" / "PNEUMONIA" / "a.jpeg", IMAGE, format="JPEG")
    (tmp_path / "train" / "NORMAL").mkdir()
    with pytest.raises(DatasetError, match="only one class"):
        scan_folder(tmp_path / "train", require_both_classes=True)


def test_patient_split_never_shares_a_patient():
    from pneumonia_cnn.data.dataset import ImageList
    paths = [f"/x/person{i // 3}_bacteria_{i}.jpeg" for i in range(90)]
    paths += [f"/x/IM-{i:04d}-0001.jpeg" for i in range(30)]
    labels = np.array([1] * 90 + [0] * 30)
    images = ImageList(paths, labels, [patient_id(p) for p in paths])
    train, val = patient_split(images, 0.2, seed=1)
    assert not set(train.patients) & set(val.patients)
    assert len(train) + len(val) == 120 and 15 <= len(val) <= 35
    assert set(val.labels.tolist()) == {0, 1}


def test_csv_list(tmp_path):
    write_image(tmp_path / "imgs" / "a.png", IMAGE)
    write_image(tmp_path / "imgs" / "b.png", IMAGE)
    (tmp_path / "set.csv").write_text("path,label\nimgs/a.png,PNEUMONIA\nimgs/b.png,0\n")
    images = read_csv_list(tmp_path / "set.csv")
    assert images.labels.tolist() == [1, 0] and images.paths[0] == str(tmp_path / "imgs" / "a.png")
    (tmp_path / "bad.csv").write_text("imgs/a.png,maybe\n")
    with pytest.raises(DatasetError, match="bad.csv:1"):
        read_csv_list(tmp_path / "bad.csv")


def test_csv_patient_id_comes_from_its_named_column(tmp_path):
    from pneumonia_cnn.data.dataset import read_csv_list
    (tmp_path / "a.csv").write_text("path,label,sex,patient_id\nx/person1_bacteria_1.jpeg,1,F,P7\n"
                                    "x/person2_virus_2.jpeg,0,M,\n")
    listing = read_csv_list(tmp_path / "a.csv")
    assert listing.patients == ["P7", "person2"]  # the named column; blank -> from the file name
    (tmp_path / "b.csv").write_text("path,label,sex\nx/person1_bacteria_1.jpeg,1,F\n")
    assert read_csv_list(tmp_path / "b.csv").patients == ["person1"]  # no patient_id column: not the sex
    (tmp_path / "c.csv").write_text("x/person1_bacteria_1.jpeg,1,P9\n")
    assert read_csv_list(tmp_path / "c.csv").patients == ["P9"]  # no header: the third column


def test_a_csv_saved_by_excel_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts with U+FEFF: the header was read as a row whose label is 'label'."""
    write_image(tmp_path / "imgs" / "a.png", IMAGE)
    (tmp_path / "excel.csv").write_bytes("path,label\nimgs/a.png,PNEUMONIA\n".encode("utf-8-sig"))
    assert read_csv_list(tmp_path / "excel.csv").labels.tolist() == [1]


# --- found by a probe of the evaluation commands (2026-11-28) -----------------------------------------------------

def _csv_images(tmp_path, names=("n1", "n2", "p1")):
    for name in names:
        write_image(tmp_path / f"{name}.png", IMAGE)


def test_a_csv_label_is_read_from_the_column_named_label_wherever_it_is(tmp_path):
    """Header path,old_ai_call,label: the label had been read from the second column (an earlier model's call,
    the opposite of the truth here), and evaluate scored accuracy 0.0 against it, exit 0."""
    _csv_images(tmp_path)
    (tmp_path / "calls.csv").write_text("path,old_ai_call,label\nn1.png,1,0\nn2.png,1,NORMAL\np1.png,0,1\n")
    assert read_csv_list(tmp_path / "calls.csv").labels.tolist() == [0, 0, 1]
    (tmp_path / "swapped.csv").write_text("label,patient_id,file\n1,pA,p1.png\n0,pB,n1.png\n")
    swapped = read_csv_list(tmp_path / "swapped.csv")
    assert swapped.labels.tolist() == [1, 0] and swapped.patients == ["pA", "pB"]
    assert [p.rsplit("/", 1)[1] for p in swapped.paths] == ["p1.png", "n1.png"]


def test_a_csv_header_without_a_label_column_is_refused_naming_its_columns(tmp_path):
    _csv_images(tmp_path)
    (tmp_path / "meta.csv").write_text("path,source,finding\nn1.png,hospital A,normal\n")
    with pytest.raises(DatasetError) as error:
        read_csv_list(tmp_path / "meta.csv")
    assert str(error.value) == (f"{tmp_path / 'meta.csv'}:1: the header names no label column (it has path, source, "
                                f"finding); name the column of 0/1 or class names 'label'")


def test_a_csv_row_with_an_empty_path_is_refused_not_dropped(tmp_path):
    _csv_images(tmp_path)
    (tmp_path / "gap.csv").write_text("path,label\nn1.png,0\n,1\np1.png,1\n,,\n")  # the last: a blank row
    with pytest.raises(DatasetError, match=r"gap\.csv:3: no path \(its path cell is empty\)$"):
        read_csv_list(tmp_path / "gap.csv")
    (tmp_path / "ok.csv").write_text("path,label\nn1.png,0\np1.png,1\n,,\n")
    assert read_csv_list(tmp_path / "ok.csv").labels.tolist() == [0, 1]


def test_class_folders_and_csv_labels_match_the_models_classes_without_regard_to_case(tmp_path):
    for name in ("normal", "Pneumonia"):
        write_image(tmp_path / "test" / name / "a.png", IMAGE)
    images = load_split(tmp_path, "test", class_names=("NORMAL", "PNEUMONIA"))
    assert images.class_names == ("NORMAL", "PNEUMONIA") and images.labels.tolist() == [0, 1]
    assert images.paths[0].endswith("normal/a.png")
    write_image(tmp_path / "test" / "NORMAL" / "b.png", IMAGE)
    with pytest.raises(DatasetError, match=r"class folders (NORMAL and normal|normal and NORMAL) both name the class "
                                           r"NORMAL; merge them into one$"):
        load_split(tmp_path, "test", class_names=("NORMAL", "PNEUMONIA"))
    for name in ("normal", "pneumonia"):
        (tmp_path / "empty" / name).mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"empty: no images found in its class folder\(s\) normal/, pneumonia/ "):
        load_split(tmp_path / "empty", None, class_names=("NORMAL", "PNEUMONIA"))
    _csv_images(tmp_path)
    (tmp_path / "lower.csv").write_text("n1.png,normal\np1.png,pneumonia\n")
    assert read_csv_list(tmp_path / "lower.csv").labels.tolist() == [0, 1]

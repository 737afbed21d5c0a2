"""README (Generalisation to a new site): adapt refuses a site that the source flags, 90% or more, as outside its
training population. It had adapted the built-in model to adult X-rays (or to photographs) and refitted its
detector on them: the adapted model then flagged 0 of 54 other adults (54 of 54 before) while its card still
said children 1-5 years."""
import torch

from pneumonia_cnn.cli import main
from tests.conftest import SHARED, require_shared

ADULTS = SHARED / "data" / "adult_xray_dev" / "covid_collection"


def test_a_site_the_source_flags_is_refused_unless_accepted_and_then_recorded(tmp_path, capsys, caplog):
    require_shared()
    out = tmp_path / "adults.pt"
    assert main(["adapt", "builtin", "--data", str(ADULTS), "--out", str(out), "--device", "cpu"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {ADULTS}: the source flags 115 of the site's 124 image(s) (93%) as outside its training population "
        f"(children 1–5 years, one hospital); adapting refits its detector on them, which then stops flagging such "
        f"images while the model card still states that population: if these are chest X-rays of that population "
        f"from another hospital (framing or exposure alone can be flagged as much), give --accept-outside-population; "
        f"not if they are adults, other views or not X-rays")
    assert not out.exists()
    assert main(["adapt", "builtin", "--data", str(ADULTS), "--out", str(out), "--device", "cpu",
                 "--accept-outside-population"]) == 0
    assert "(--accept-outside-population)" in caplog.text
    record = torch.load(out, weights_only=True)["adaptation"]
    assert abs(record["outside_source_population"] - 115 / 124) < 1e-12


def test_adapt_refuses_an_out_name_that_is_not_a_checkpoint_s(tmp_path, capsys):
    """adapt --out site.onnx wrote a PyTorch checkpoint under an ONNX name (import-keras refused it already)."""
    for name in ("site.onnx", "site"):
        assert main(["adapt", "builtin", "--data", str(tmp_path / "never-read"), "--out", str(tmp_path / name)]) == 2
        assert capsys.readouterr().err.strip() == (f"error: {tmp_path / name}: adapt writes a checkpoint, a file "
                                                   f"ending in .pt or .pth; give --out such a name")


def test_adapt_refuses_the_same_labelled_image_under_both_classes(tmp_path, capsys):
    """As train refuses it: three NORMAL images copied into PNEUMONIA were fine-tuned and judged on both labels."""
    import shutil

    from tests.conftest import link_subset
    require_shared()
    site = link_subset(tmp_path / "site", {"test": 20})
    labelled = link_subset(tmp_path / "lab", {"val": 16})
    normal = sorted((labelled / "val" / "NORMAL").iterdir())[0]
    shutil.copy(normal, labelled / "val" / "PNEUMONIA" / "copy.jpeg")
    out = tmp_path / "a.pt"
    assert main(["adapt", "builtin", "--data", str(site / "test"), "--labelled", str(labelled / "val"), "--out",
                 str(out), "--device", "cpu"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.endswith(" under the other class; an image has one label") and not out.exists()
    assert error.startswith("error: ") and {"copy.jpeg", normal.name} <= {w.strip(":").rsplit("/", 1)[-1]
                                                                        for w in error.split()}


def test_a_higher_roc_auc_that_decides_worse_at_its_threshold_is_not_better():
    """adapt's verdict said "better" from the ROC AUC alone while the deployed decision got worse (a probe:
    sensitivity 0.667 -> 0.500 on the kept-out images)."""
    import numpy as np

    from pneumonia_cnn.adaptation import _verdict
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    before = np.array([0.1, 0.2, 0.6, 0.3, 0.7, 0.8, 0.9, 0.5])  # AUC 15/16; at 0.55: sensitivity, specificity 3/4
    after = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8])  # AUC 1; at 0.75: sensitivity 1/4, specificity 1
    result = {}
    _verdict(labels, None, before, 0.55, after, 0.75, 0, result)
    assert result["improved"] is False
    assert result["verdict"] == ("adapted model is NOT better on the kept-out images (ROC AUC +0.062, balanced "
                                 "accuracy at the threshold -0.125) (it ranks better but decides worse at its "
                                 "threshold): keep using the original model for this site")
    _verdict(labels, None, before, 0.55, after, 0.45, 0, result)  # at 0.45 the adapted model decides perfectly
    assert result["improved"] is True and result["verdict"].startswith("adapted model is better")


def test_evaluate_save_as_refuses_a_name_that_is_not_a_checkpoint_s(tmp_path, capsys):
    """As adapt: evaluate --save-as m.onnx wrote a PyTorch checkpoint under an ONNX name (a review found it)."""
    require_shared()
    from tests.conftest import link_subset
    root = link_subset(tmp_path / "data", {"val": 4, "test": 4})
    out = tmp_path / "m.onnx"
    assert main(["evaluate", "--data", str(root), "--split", "test", "--threshold", "youden", "--save-as", str(out),
                 "--no-figures", "--out", str(tmp_path / "m.json")]) == 2
    assert capsys.readouterr().err.strip() == (f"error: {out}: --save-as writes a checkpoint, a file ending in .pt or "
                                               f".pth; give --save-as such a name")
    assert not out.exists() and not (tmp_path / "m.json").exists()


def test_adapt_refuses_weights_saved_before_their_runs_end_of_run_steps(trained_run, tmp_path, capsys):
    """adapt RUN/last.pt had made of its placeholder threshold 0.5 a model that labelled with no warning, and whose
    info said its decision was fitted on 'not recorded (a checkpoint of an earlier version)'."""
    require_shared()
    out = tmp_path / "site.pt"
    assert main(["adapt", str(trained_run / "last.pt"), "--data", str(ADULTS), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {trained_run / 'last.pt'}: weights saved while training, before its end-of-run steps (no decision "
        f"fitted: the threshold 0.5 is a placeholder); adapt needs a finished run's best.pt (finish the run with "
        f"pneumonia-cnn train --resume RUN)")
    assert not out.exists()

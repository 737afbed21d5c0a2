"""What decided each answer, stated where the answer is (review of the decision path's reporting): the calibration an
averaging ensemble applies and a site's rate for it, the engine, precision, batch adaptation and rate's source of each
predict row, a served single image under --prevalence estimate, and a refitted checkpoint's own model id."""
import asyncio
import csv
import io
import json
import math
import re

import numpy as np
import pytest
import torch

from pneumonia_cnn.calibration import Decision, estimate_prior, estimate_prior_of_members, sigmoid
from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import ConfigError
from pneumonia_cnn.inference import Predictor, load_bundle
from pneumonia_cnn.inference import predictor as predictor_module
from tests.conftest import SHARED_DATA

MEMBERS_METHOD = "mean of the members' calibrated probabilities (platt, temperature)"


def xrays(count=3):
    return sorted((SHARED_DATA / "test" / "PNEUMONIA").iterdir())[:count] + \
        sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:count]


def predict_json(capsys, *args):
    assert main(["predict", *map(str, args), "--format", "json"]) == 0
    return json.loads(capsys.readouterr().out)


def odds_to_probability(odds):
    return odds / (1 + odds)


def member(source, target, calibration, threshold, policy, scale, other_validation):
    """A copy of ``source`` with the decision given; ``other_validation``: validated on other images (one image of
    another content), so that the ensemble cannot fit its own decision and averages its members."""
    payload = torch.load(source, map_location="cpu", weights_only=True)
    name = next(iter(payload["state_dict"]))  # another model: one model's weights twice are refused
    payload["state_dict"][name] = payload["state_dict"][name] * scale
    payload.update(calibration=calibration, threshold=threshold, threshold_policy=policy)
    if other_validation:
        fingerprints = payload["reference"]["val"]["fingerprints"]
        fingerprints[0] = "0" * len(fingerprints[0])
    torch.save(payload, target)
    return target


@pytest.fixture
def averaging_members(trained_run, tmp_path):
    """Member a: Platt, calibrated at a rate of 0.7, its operating point at 0.6. Member b: a temperature, calibrated
    at 0.55, a fixed threshold of 0.5."""
    a = member(trained_run / "best.pt", tmp_path / "a.pt", {"method": "platt", "scale": 1.3, "bias": 0.4,
                                                          "prior": 0.7}, 0.6, "sensitivity:0.95", 1.0, False)
    b = member(trained_run / "best.pt", tmp_path / "b.pt", {"method": "temperature", "scale": 0.8, "bias": 0.0,
                                                          "prior": 0.55}, 0.5, "0.5", 1.05, True)
    return a, b


def member_raw_scores(members, images):
    return [[p.raw_score for p in Predictor(m, "cpu").predict_files(images)] for m in members]


def test_an_averaging_ensemble_states_the_calibrations_it_applies(averaging_members, small_root, tmp_path, capsys):
    """It said "none calibration" while each member's calibration was applied."""
    images = xrays()
    rows = predict_json(capsys, *averaging_members, "--", *images)
    for row, raw_a, raw_b in zip(rows, *member_raw_scores(averaging_members, images)):  # each calibration applied
        expected = (sigmoid(1.3 * raw_a + 0.4) + sigmoid(0.8 * raw_b)) / 2
        assert row["probability"] == pytest.approx(expected, abs=1e-6)
    assert rows[0]["threshold"] == pytest.approx(0.55)  # (0.6 + 0.5) / 2
    bundle = load_bundle(list(averaging_members))
    assert bundle.decision.calibration.method == MEMBERS_METHOD
    assert "each member's calibration applied (platt, temperature)" in bundle.notes[0]
    assert Predictor(bundle, "cpu").metadata()["decision"]["calibration"]["method"] == MEMBERS_METHOD  # /model
    assert main(["evaluate", "--checkpoint", *map(str, averaging_members), "--data", str(small_root), "--split",
                 "test", "--bootstrap", "5", "--no-figures", "--out", str(tmp_path / "e.json")]) == 0
    table = capsys.readouterr().out
    assert f"(mean of members, {MEMBERS_METHOD})" in table and "none calibration" not in table
    assert json.loads((tmp_path / "e.json").read_text())["calibration"]["method"] == MEMBERS_METHOD


def test_an_averaging_ensemble_moves_each_member_from_its_own_rate(averaging_members, capsys):
    """--prevalence 0.3 was refused ("this checkpoint does not record the pneumonia rate") though both members
    record theirs. By hand, in odds: a rate of 0.3 multiplies member a's odds by (3/7) / (7/3) = 9/49 and member b's
    by (3/7) / (11/9) = 27/77; a's operating point 0.6 (odds 3/2) moves to odds 27/98, a probability of 27/125 =
    0.216; b's fixed 0.5 stays: the threshold is (0.216 + 0.5) / 2 = 0.358."""
    images = xrays()
    rows = predict_json(capsys, *averaging_members, "--", *images, "--prevalence", "0.3")
    for row, raw_a, raw_b in zip(rows, *member_raw_scores(averaging_members, images)):
        moved_a = odds_to_probability(math.exp(1.3 * raw_a + 0.4) * 9 / 49)
        moved_b = odds_to_probability(math.exp(0.8 * raw_b) * 27 / 77)
        assert row["probability"] == pytest.approx((moved_a + moved_b) / 2, abs=1e-6)
        assert row["threshold"] == pytest.approx(0.358, abs=1e-12)
        assert row["label"] == ("PNEUMONIA" if row["probability"] >= 0.358 else "NORMAL")
        assert row["prevalence"] == 0.3 and row["prevalence_source"] == "given"


def test_an_averaging_ensemble_refuses_a_rate_it_cannot_state_in_one_true_line(averaging_members, tmp_path,
                                                                                capsys):
    payload = torch.load(averaging_members[1], map_location="cpu", weights_only=True)
    payload["calibration"]["prior"] = None  # a member of an earlier version
    torch.save(payload, tmp_path / "old.pt")
    assert main(["predict", str(averaging_members[0]), str(tmp_path / "old.pt"), "--", str(xrays(1)[0]),
                 "--prevalence", "0.3"]) == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.fullmatch(r"error: prevalence: member 2 \(.*old\.pt\) does not record the pneumonia rate its "
                        r"probabilities were calibrated at \(retrain or refit it with this version\)", error), error
    bundle = load_bundle(list(averaging_members))  # a threshold evaluate refitted on the mean, stated for no rate
    refitted = bundle.with_decision(Decision(bundle.decision.calibration, 0.4, "youden"))
    with pytest.raises(ConfigError, match="each stated for its own member's rate .* refit its calibration too"):
        refitted.with_prevalence(0.3, "given")


def test_the_members_em_is_saerens_for_one_member_and_a_fixed_point_for_several():
    probabilities = np.array([0.9, 0.8, 0.3, 0.95, 0.1, 0.6])
    assert estimate_prior_of_members([probabilities], [0.7]) == pytest.approx(estimate_prior(probabilities, 0.7),
                                                                              abs=1e-7)
    members, rates = [probabilities, probabilities[::-1]], [0.7, 0.4]
    rate = estimate_prior_of_members(members, rates)
    moved = [odds_to_probability(p / (1 - p) * (rate / (1 - rate)) / (own / (1 - own)))
             for p, own in zip(members, rates)]
    assert np.mean(moved) == pytest.approx(rate, abs=1e-6)  # the batch's mean probability at that rate is the rate
    assert rate != pytest.approx(np.mean(rates), abs=1e-3)


def test_an_averaging_ensemble_estimates_a_batch_rate_moving_each_member(trained_run, tmp_path, monkeypatch):
    """--prevalence estimate on such an ensemble: EM whose every step moves each member from its own rate (it would
    have failed as the given rate did). The tiny model's raw scores lie close together: the members' calibrations
    spread them around their centre, so that the batch's rate lies inside (0, 1)."""
    monkeypatch.setattr(predictor_module, "MIN_ESTIMATE_BATCH", 4)  # 6 images stand for a site's batch here
    images = xrays()
    centre = float(np.median(member_raw_scores([trained_run / "best.pt"], images)[0]))
    calibrations = [(150.0, -150.0 * centre + 0.5, 0.7), (100.0, -100.0 * centre, 0.4)]
    members = [member(trained_run / "best.pt", tmp_path / f"{index}.pt", {"method": "platt", "scale": scale,
                                                                        "bias": bias, "prior": own}, 0.5, "0.5",
                      1.0 + index / 100, index == 1) for index, (scale, bias, own) in enumerate(calibrations)]
    predictions = Predictor(members, "cpu", prevalence="estimate").predict_files(images)
    rate, inside = predictions[0].prevalence, [p.in_distribution is not False for p in predictions]
    assert 0.01 < rate < 0.99 and predictions[0].prevalence_source == f"estimated from {sum(inside)} images (EM)"
    moved = [[odds_to_probability(math.exp(scale * r + bias) * (rate / (1 - rate)) / (own / (1 - own))) for r in raw]
             for raw, (scale, bias, own) in zip(member_raw_scores(members, images), calibrations)]
    ensemble = np.mean(moved, axis=0)
    assert np.mean(ensemble[inside]) == pytest.approx(rate, abs=1e-5)  # EM's fixed point, each member moved
    assert [p.probability for p in predictions] == pytest.approx(list(ensemble), abs=1e-5)


@pytest.mark.parametrize("adapted", [True, False])
def test_each_predict_output_records_what_decided_it(best_like_run, tmp_path, capsys, monkeypatch, adapted):
    """Engine, precision and batch adaptation were on stderr only; FHIR with --adapt-batch --prevalence 0.3 stated
    the rate alone."""
    if adapted:
        monkeypatch.setattr(predictor_module, "MIN_ADAPT_BATCH", 4)  # 6 images stand for a site's batch here
        monkeypatch.setattr(predictor_module, "MIN_ADAPT_PER_CLASS", 1)  # with one of each class
    images = xrays()
    options = ["--adapt-batch", "--prevalence", "0.3", "--engine", "torch"]
    rows = predict_json(capsys, best_like_run, *images, *options)
    count = sum(row["in_distribution"] is not False for row in rows)
    note = (f"batch-norm statistics re-estimated on this batch ({count} in-distribution images, AdaBN at the "
            f"validation images' class mix)") if adapted else \
        f"not adapted: {count} in-distribution images, fewer than 32"
    for row in rows:
        assert (row["engine"], row["precision"], row["batch_adapted"]) == ("torch", "float32", adapted)
        assert row["batch_adaptation"] == note and (row["prevalence"], row["prevalence_source"]) == (0.3, "given")
    assert main(["predict", str(best_like_run), *map(str, images), *options, "--format", "csv"]) == 0
    table = list(csv.reader(io.StringIO(capsys.readouterr().out)))
    assert table[0] == ["path", "probability", "label", "threshold", "prevalence", "in_distribution", "ood_score",
                        "warnings", "error", "model", "engine", "precision", "batch_adapted", "batch_adaptation",
                        "prevalence_source", "ood_threshold"]  # the first ten as before, the new ones after them
    assert table[1][10:15] == ["torch", "float32", str(adapted), note, "given"]
    # the detector's cut-off beside each score: a score alone says nothing of the flag
    cut_off = torch.load(best_like_run / "best.pt", weights_only=False)["ood"]["threshold"]
    assert float(table[1][15]) == cut_off and {row["ood_threshold"] for row in rows} == {cut_off}
    assert all((row["ood_score"] > cut_off) is (row["in_distribution"] is False) for row in rows)
    assert main(["predict", str(best_like_run), *map(str, images), *options, "--format", "fhir"]) == 0
    components = json.loads(capsys.readouterr().out)["contained"][0]["component"]
    values = {c["code"]["coding"][0]["code"]: c.get("valueString", c.get("valueBoolean", c.get("valueQuantity")))
              for c in components}
    assert values["prevalence"]["value"] == 0.3 and values["prevalence-source"] == "given"
    assert (values["scoring-engine"], values["scoring-precision"]) == ("torch", "float32")
    assert values["batch-adapted"] is adapted and values["batch-adaptation"] == note
    assert values["ood-threshold"] == {"value": cut_off, "unit": "1", "system": "http://unitsofmeasure.org",
                                       "code": "1"}
    assert [c["code"]["coding"][0]["code"] for c in components][:3] == ["label", "threshold", "prevalence"]


def test_predict_rows_without_batch_steps_say_so(trained_run, capsys):
    rows = predict_json(capsys, trained_run, *xrays(1), "--engine", "torch", "--amp", "bf16")
    assert (rows[0]["engine"], rows[0]["precision"]) == ("torch", "bfloat16")
    assert (rows[0]["batch_adapted"], rows[0]["batch_adaptation"], rows[0]["prevalence_source"]) == \
        (False, "", "calibration images")


def test_a_served_single_image_says_its_rate_was_not_estimated(trained_run):
    """serve --prevalence estimate: /predict's notes were empty and /model showed "prior": null, while predict says
    "prevalence not estimated" for a batch too small."""
    from pneumonia_cnn.serving.service import ServeOptions, Service
    rate = float(torch.load(trained_run / "best.pt", weights_only=True)["calibration"]["prior"])

    async def ask(prevalence):
        service = Service(trained_run / "best.pt", ServeOptions(device="cpu", prevalence=prevalence))
        await service.start()
        try:
            answer = await service.predict_one(xrays(1)[0].read_bytes(), "x.jpeg", False, None)
        finally:
            await service.stop()
        return answer, service.served.predictor.metadata()  # what GET /model returns

    answer, model = asyncio.run(ask("estimate"))
    assert answer["notes"] == [f"prevalence not estimated: a single image cannot estimate a pneumonia rate (a batch "
                               f"scored together of at least 32 in-distribution images can); probabilities stated "
                               f"for the checkpoint's rate of {rate:.3f}"]
    assert answer["prevalence"] == pytest.approx(rate)
    assert answer["prevalence_source"] == answer["notes"][0]  # as /predict/batch says it ("calibration images")
    assert model["prevalence"]["mode"] == "estimate"
    assert "estimated from each batch" in model["prevalence"]["description"]
    answer, model = asyncio.run(ask(None))
    assert answer["notes"] == [] and model["prevalence"] == {
        "mode": "calibration", "rate": rate,
        "description": f"stated for the checkpoint's rate of {rate:.3f}, that of the images calibrated on"}


def test_a_refitted_checkpoint_has_its_own_traceable_model_id(trained_run, small_root, tmp_path, capsys, monkeypatch):
    """It kept the source's id: predict's model column and the SR's Algorithm Version showed two decisions as one."""
    from pneumonia_cnn.interop.dicom_sr import ModelIdentity
    monkeypatch.setenv("PNEUMONIA_CNN_CACHE", str(tmp_path / "cache"))
    source_id = torch.load(trained_run / "best.pt", weights_only=True)["run_id"]
    image = xrays(1)[0]
    assert predict_json(capsys, trained_run, image, "--engine", "onnx")[0]["model"] == source_id
    graphs = sorted((tmp_path / "cache" / "onnx").glob("*.onnx"))

    def refit(threshold, source, name):
        assert main(["evaluate", "--checkpoint", str(source), "--data", str(small_root), "--split", "test",
                     "--threshold", threshold, "--bootstrap", "5", "--no-figures", "--out", str(tmp_path / "e.json"),
                     "--save-as", str(tmp_path / name)]) == 0
        capsys.readouterr()
        return predict_json(capsys, tmp_path / name, image, "--engine", "onnx")[0]["model"]

    half, again, high = refit("0.5", trained_run, "half.pt"), refit("0.5", trained_run, "again.pt"), \
        refit("0.9", trained_run, "high.pt")
    assert re.fullmatch(re.escape(source_id) + r"-refit-[0-9a-f]{8}", half) and half == again and high != half
    assert refit("0.5", tmp_path / "high.pt", "back.pt") == half  # a refit of a refit names the model refitted
    assert ModelIdentity.of(Predictor(tmp_path / "high.pt", "cpu")).version == high  # the SR's Algorithm Version
    assert sorted((tmp_path / "cache" / "onnx").glob("*.onnx")) == graphs  # same weights: the same cached graph

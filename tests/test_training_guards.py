"""What `train` refuses before any work, and what it keeps when a run is stopped at an awkward moment (found by a
hostile probe of train/resume/data folders: each test here failed before its fix)."""
from __future__ import annotations

import json
import logging
import os
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.cli import main
from pneumonia_cnn.errors import CheckpointError, ConfigError, DatasetError, PneumoniaCNNError
from pneumonia_cnn.training import make_config, resume, train

from .conftest import link_subset

TINY = dict(epochs=1, size=32, batch_size=16, progress=False, min_val_images=10)


def copy_tree(root: Path, target: Path) -> Path:
    """Real files (not links) so that a test can add, move and duplicate them."""
    shutil.copytree(root, target, symlinks=False)
    return target


def test_config_values_are_checked_when_built():
    with pytest.raises(ConfigError, match=r"^out: empty"):
        make_config(out="")
    with pytest.raises(ConfigError, match=r"^freeze_stem: needs init"):
        make_config(freeze_stem=True)
    with pytest.raises(ConfigError, match=r"^lr: expected float, got True"):  # YAML's `lr: true` trained at 1.0
        make_config(lr=True)
    with pytest.raises(ConfigError, match=r"^age_range_years: need finite"):  # refused only by the checkpoint
        make_config(age_range_years=[1, float("inf")])
    assert make_config(threshold=0.3).threshold == "0.3"  # YAML/TOML numbers are thresholds too


def test_a_config_file_names_its_preset_and_its_unknown_fields(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("preset: best\nepochs: 3\n")
    made = make_config(None, str(config))
    assert (made.preset, made.model, made.epochs) == ("best", "resnet18_narrow", 3)  # was: the tutorial's seed
    with pytest.raises(ConfigError, match=r"c\.yaml: preset: 'best' differs from --preset fast"):
        make_config("fast", str(config))
    config.write_text("bogus: 1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml: unknown config field\(s\): bogus$"):
        make_config(None, str(config))


def test_a_config_file_that_contradicts_init_is_refused(tmp_path):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"init": "builtin", "model": "seed", "size": 64}))
    with pytest.raises(ConfigError, match=r"c\.json: model: 'seed' differs from the --init checkpoint's "
                                          r"'resnet18_narrow'"):
        make_config(None, str(config))
    config.write_text(json.dumps({"init": "builtin", "size": "192"}))  # a number in quotes is refused, as text
    with pytest.raises(ConfigError, match=r"c\.json: size: expected int \(not quoted text\)"):
        make_config(None, str(config))
    config.write_text(json.dumps({"init": "builtin", "size": 192}))  # the same size agrees
    assert make_config(None, str(config)).size == 192


def test_a_model_that_cannot_take_the_input_is_refused_before_the_data_are_read(small_root, cache_dir, tmp_path):
    out = tmp_path / "run"
    config = make_config(data=str(small_root), out=str(out), cache_dir=str(cache_dir), model="seed_bn",
                         model_kwargs={"width": 0}, **TINY)
    with pytest.raises(ConfigError, match=r'^size: model seed_bn with \{"width": 0\} cannot take 32x32 input'):
        train(config)
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"^size: model seed cannot be built"):
        train(make_config(data=str(small_root), out=str(out), model="seed", **dict(TINY, size=16)))


def test_weights_that_went_nan_with_a_finite_loss_stop_the_run(tmp_path):
    """bf16 at 16x16 left NaN weights behind a finite loss: best.pt was written, then refused at load."""
    from pneumonia_cnn.training.loop import refuse_diverged
    model = torch.nn.Linear(2, 1)
    run = SimpleNamespace(state=SimpleNamespace(eval_model=model), out=tmp_path)
    refuse_diverged(run, {"epoch": 1, "train_loss": 0.5}, None)  # finite: nothing to say
    with torch.no_grad():
        model.weight[0, 0] = float("nan")
    with pytest.raises(PneumoniaCNNError, match=r"^training diverged in epoch 1: its weights hold NaN"):
        refuse_diverged(run, {"epoch": 1, "train_loss": 0.5}, None)
    model.weight.data.zero_()
    with pytest.raises(PneumoniaCNNError, match=r"its validation scores hold NaN or infinite values"):
        refuse_diverged(run, {"epoch": 1, "train_loss": 0.5}, torch.tensor([1.0, float("inf")]).numpy())


def test_class_folders_put_pneumonia_last_whatever_their_case(tmp_path):
    from pneumonia_cnn.data.dataset import class_folders
    for names, expected in ((("normal", "PNEUMONIA"), ["normal", "PNEUMONIA"]),
                            (("Pneumonia", "Normal"), ["Normal", "Pneumonia"]),
                            (("sick", "Healthy"), ["Healthy", "sick"])):
        folder = tmp_path / "-".join(names)
        for name in names:
            (folder / name).mkdir(parents=True)
        assert class_folders(folder) == expected


def test_leaked_images_are_refused_before_training(small_root, cache_dir, tmp_path):
    root = copy_tree(small_root, tmp_path / "data")
    train_image = next((root / "train" / "NORMAL").iterdir())
    shutil.copy(train_image, root / "val" / "NORMAL" / "copy.jpeg")
    out = tmp_path / "run"
    with pytest.raises(DatasetError, match=r"val/NORMAL/copy\.jpeg: the same image as the train image .*a val image "
                                           r"must not be one the model trained on"):
        train(make_config(data=str(root), out=str(out), cache_dir=str(cache_dir), **TINY))
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()
    (root / "val" / "NORMAL" / "copy.jpeg").unlink()
    val_image = next((root / "val" / "PNEUMONIA").iterdir())
    shutil.copy(val_image, root / "test" / "NORMAL" / "v.jpeg")  # evaluate refused it, after the whole training
    with pytest.raises(DatasetError, match=r"test/NORMAL/v\.jpeg: the same image as the val image .*selected on"):
        train(make_config(data=str(root), out=str(out), cache_dir=str(cache_dir), **TINY))
    (root / "test" / "NORMAL" / "v.jpeg").unlink()
    shutil.copy(train_image, root / "train" / "PNEUMONIA" / "both.jpeg")
    with pytest.raises(DatasetError, match=r"train/PNEUMONIA/both\.jpeg: the same image as .* under the other class"):
        train(make_config(data=str(root), out=str(out), cache_dir=str(cache_dir), **TINY))


def test_an_empty_val_folder_is_carved_from_train_as_a_small_one_is(small_root, cache_dir, tmp_path, caplog):
    root = tmp_path / "data"
    link_subset(root, {"train": 24, "test": 10})
    for name in ("NORMAL", "PNEUMONIA"):
        (root / "val" / name).mkdir(parents=True)
    summary = train(make_config(data=str(root), out=str(tmp_path / "run"), cache_dir=str(cache_dir), **TINY))
    assert "carving 10% of train's patients" in caplog.text and "val_auc" in summary["history"][0]


def test_train_never_overwrites_its_inputs_or_files_no_run_wrote(small_root, tmp_path, capsys):
    exp = tmp_path / "exp"
    exp.mkdir()
    (exp / "config.json").write_text('{"epochs": 1}')
    before = (exp / "config.json").read_text()
    assert main(["train", "--data", str(small_root), "--config", str(exp / "config.json"), "--out", str(exp)]) == 2
    assert "--config names the config.json that the run writes" in capsys.readouterr().err
    assert (exp / "config.json").read_text() == before
    (exp / "config.json").unlink()
    (exp / "history.csv").write_text("path,label\n")  # a user's label CSV, given as the data
    assert main(["train", "--data", str(exp / "history.csv"), "--out", str(exp)]) == 2
    assert "--data names the history.csv that the run writes" in capsys.readouterr().err
    assert main(["train", "--data", str(small_root), "--out", str(exp)]) == 2
    assert "history.csv: --out holds a file a run writes, but no run" in capsys.readouterr().err
    assert (exp / "history.csv").read_text() == "path,label\n"


def test_a_folder_a_run_left_in_its_first_epoch_is_trained_again(small_root, cache_dir, tmp_path):
    from pneumonia_cnn.cli.training import refuse_overwriting
    out = tmp_path / "run"
    out.mkdir()
    config = make_config(data=str(small_root), out=str(out), cache_dir=str(cache_dir), **TINY)
    (out / "config.json").write_text(json.dumps(config.to_dict()))  # all a run killed in its first epoch leaves
    refuse_overwriting(out, {})


def test_resume_refuses_a_preset_or_config_it_would_ignore(trained_run, tmp_path, capsys):
    assert main(["train", "--resume", str(trained_run), "--preset", "best", "--epochs", "9"]) == 2
    assert "(got --preset)" in capsys.readouterr().err
    (tmp_path / "c.yaml").write_text("epochs: 9\n")
    assert main(["train", "--resume", str(trained_run), "--config", str(tmp_path / "c.yaml")]) == 2
    assert "(got --config)" in capsys.readouterr().err


def test_a_run_killed_between_last_pt_and_best_pt_resumes_and_writes_best_pt(small_root, cache_dir, tmp_path,
                                                                            monkeypatch):
    """best.pt was written first: a kill between the two left best.pt alone, which neither --resume (no last.pt)
    nor a new train (a run is there) would take. last.pt now comes first, and a resume writes best.pt, the
    history and the curves again."""
    from pneumonia_cnn.training import loop
    out = tmp_path / "run"
    config = make_config(data=str(small_root), out=str(out), cache_dir=str(cache_dir), **dict(TINY, epochs=2))
    original = loop.save_checkpoint

    def killed_at_the_second_best_pt(payload, path):
        if Path(path).name == "best.pt" and payload["epoch"] == 2:
            raise KeyboardInterrupt  # the process ends here
        return original(payload, path)

    monkeypatch.setattr(loop, "save_checkpoint", killed_at_the_second_best_pt)
    with pytest.raises(KeyboardInterrupt):
        train(config)
    monkeypatch.setattr(loop, "save_checkpoint", original)
    assert load_checkpoint(out / "last.pt")["training_state"]["epoch"] == 2  # the completed epoch is kept
    assert load_checkpoint(out / "best.pt")["epoch"] == 1 and len(json.loads((out / "history.json").read_text())) == 1
    resume(out)
    rewritten = load_checkpoint(out / "best.pt")
    assert rewritten["epoch"] == 2 and "decision_fit" in rewritten
    last = load_checkpoint(out / "last.pt")
    assert all(torch.equal(rewritten["state_dict"][k], last["state_dict"][k]) for k in last["state_dict"])  # no EMA
    assert [row["epoch"] for row in json.loads((out / "history.json").read_text())] == [1, 2]


def test_a_stop_asked_while_an_epoch_ends_is_obeyed(small_root, cache_dir, tmp_path, monkeypatch):
    """Ctrl-C during the last epoch's validation was acknowledged, then calibration, the OOD fit and the test
    scoring ran and the command exited 0."""
    from pneumonia_cnn.training import loop
    original = loop.end_of_epoch

    def end_of_epoch_then_sigint(run):
        row = original(run)
        os.kill(os.getpid(), signal.SIGINT)  # StopSignals' handler only notes it
        return row

    monkeypatch.setattr(loop, "end_of_epoch", end_of_epoch_then_sigint)
    out = tmp_path / "run"
    summary = train(make_config(data=str(small_root), out=str(out), cache_dir=str(cache_dir), **TINY))
    assert summary["interrupted"] and "decision_fit" not in load_checkpoint(out / "best.pt")
    with pytest.raises(CheckpointError, match=r"the run has not finished \(its end-of-run steps"):
        load_checkpoint(out)  # not a model yet


def test_an_unfinished_run_folder_is_not_used_as_a_model(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    assert load_checkpoint(run)["path"].endswith("best.pt")
    last = torch.load(run / "last.pt", weights_only=True)
    last["config"]["epochs"] = 5  # as if stopped after 2 of 5 epochs
    torch.save(last, run / "last.pt")
    with pytest.raises(CheckpointError, match=r"the run has not finished \(it stopped after epoch 2 of 5\); finish "
                                              r"it with pneumonia-cnn train --resume"):
        load_checkpoint(run)
    assert "decision_fit" in load_checkpoint(run / "best.pt")  # named, the file itself is used
    (run / "best.pt").unlink()
    with pytest.raises(CheckpointError, match=r"it has no best\.pt yet"):
        load_checkpoint(run)


def test_resume_refuses_other_training_images_and_works_from_another_directory(small_root, cache_dir, tmp_path,
                                                                             monkeypatch):
    root = copy_tree(small_root, tmp_path / "data")
    monkeypatch.chdir(tmp_path)
    train(make_config(data="data", out="run", cache_dir=str(cache_dir), **TINY))
    assert json.loads((tmp_path / "run" / "config.json").read_text())["data"] == str(root)  # absolute
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # resumed from another folder: "data: folder not found" before
    image = next((root / "train" / "NORMAL").iterdir())
    image.rename(root / "train" / "PNEUMONIA" / image.name)  # relabelled since the run started
    with pytest.raises(ConfigError, match=r"run: the training images or their labels changed since this run "
                                          r"started"):
        resume(tmp_path / "run", epochs=2)
    (root / "train" / "PNEUMONIA" / image.name).rename(image)
    assert len(resume(tmp_path / "run", epochs=2)["history"]) == 2


def test_validation_scores_that_are_not_finite_stop_the_run(small_root, cache_dir, tmp_path, monkeypatch):
    """--lr 1e6 gave infinite validation scores behind a finite loss; the calibration then failed in
    scikit-learn's "Input X contains infinity", naming no cause."""
    import numpy as np

    from pneumonia_cnn.training import loop
    monkeypatch.setattr(loop, "validation_logits", lambda run: np.full(len(run.val_set), np.inf))
    out = tmp_path / "run"
    with pytest.raises(PneumoniaCNNError, match=r"^training diverged in epoch 1: its validation scores hold NaN"):
        train(make_config(data=str(small_root), out=str(out), cache_dir=str(cache_dir), **TINY))
    assert not (out / "best.pt").exists()


def test_no_validation_images_is_said_before_training(small_root, cache_dir, tmp_path, caplog):
    rows = [f"{p},{p.parent.name}" for p in sorted((small_root / "train").glob("*/*"))]
    (tmp_path / "list.csv").write_text("path,label\n" + "\n".join(rows) + "\n")
    caplog.set_level(logging.INFO)
    train(make_config(data=str(tmp_path / "list.csv"), out=str(tmp_path / "run"), cache_dir=str(cache_dir), **TINY))
    messages = [record.getMessage() for record in caplog.records]
    said = next(i for i, m in enumerate(messages) if "no validation images: best.pt is chosen by the training loss"
                in m)
    assert said < next(i for i, m in enumerate(messages) if m.startswith("epoch 1/1"))
    assert "val/ folder" not in messages[said]  # a CSV has none


def test_identical_junk_files_are_not_taken_for_leaked_x_rays(small_root, cache_dir, tmp_path):
    root = copy_tree(small_root, tmp_path / "data")
    (root / "train" / "NORMAL" / "broken1.jpeg").write_bytes(b"<html>not found</html>")
    (root / "test" / "PNEUMONIA" / "broken2.jpeg").write_bytes(b"<html>not found</html>")
    (root / "val" / "NORMAL" / "empty.jpeg").write_bytes(b"")
    (root / "train" / "PNEUMONIA" / "empty.jpeg").write_bytes(b"")
    assert train(make_config(data=str(root), out=str(tmp_path / "run"), cache_dir=str(cache_dir), **TINY))["history"]


def test_a_damaged_last_pt_does_not_pass_an_unfinished_run_for_a_finished_one(trained_run, tmp_path):
    run = shutil.copytree(trained_run, tmp_path / "run")
    (run / "last.pt").write_bytes((run / "last.pt").read_bytes()[:1000])
    assert load_checkpoint(run)["path"].endswith("best.pt")  # best.pt has its fitted decision: finished
    best = torch.load(run / "best.pt", weights_only=True)
    del best["decision_fit"]
    torch.save(best, run / "best.pt")
    with pytest.raises(CheckpointError, match=r"its last\.pt is unreadable and its best\.pt has no fitted decision"):
        load_checkpoint(run)
    last = torch.load(trained_run / "last.pt", weights_only=True)
    last["training_state"]["epoch"] = None  # was: TypeError from int()
    torch.save(last, run / "last.pt")
    with pytest.raises(CheckpointError, match=r"its last\.pt is unreadable"):
        load_checkpoint(run)


def test_paths_recorded_for_a_resume(trained_run, tmp_path, monkeypatch):
    from pneumonia_cnn.training.setup import with_absolute_paths
    monkeypatch.chdir(tmp_path)
    (tmp_path / "builtin").mkdir()  # a folder of that name beside the run: --init builtin is still the model
    config = with_absolute_paths(make_config(data="d", out="o", init="builtin", cache_dir="new-cache"))
    assert config.init == "builtin" and config.cache_dir == str(tmp_path / "new-cache")  # absent yet, absolute
    config = with_absolute_paths(make_config(data="d", out="o", init=str(trained_run)))
    assert config.init == str(trained_run / "best.pt")  # the file, not a folder a later run may change


def test_a_model_that_builds_cpu_tensors_itself_is_not_refused(monkeypatch):
    """The meta-device check refused a model whose buffer comes from numpy: it is tried on the CPU too."""
    import numpy as np

    from pneumonia_cnn.models import registry
    from pneumonia_cnn.training.setup import _check_model_takes_input

    class NumpyBuffer(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("scale", torch.from_numpy(np.ones(1, dtype=np.float32)))
            self.linear = torch.nn.Linear(1, 1)

        def forward(self, x):
            return self.linear(x.mean(dim=(1, 2, 3))[:, None] * self.scale).squeeze(1)

    monkeypatch.setitem(registry._REGISTRY, "numpy_buffer", lambda in_channels=3, image_size=(224, 224): NumpyBuffer())
    monkeypatch.setitem(registry._DESCRIPTIONS, "numpy_buffer", "a model with a buffer from numpy")
    _check_model_takes_input(make_config(model="numpy_buffer", size=32))


def test_resume_checks_the_runs_best_pt_before_training_any_epoch(trained_run, tmp_path):
    """Another run's last.pt had replaced the folder's best.pt and history with its own; a missing or damaged
    best.pt was found only once the remaining epochs were trained, and then on every later resume."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    before = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt", "history.json")}
    last = torch.load(run / "last.pt", weights_only=True)
    own_id = last["run_id"]
    last["run_id"] = "seed-20260101-000000-abcdef"  # another run's last.pt copied in
    torch.save(last, run / "last.pt")
    with pytest.raises(PneumoniaCNNError, match=r"last\.pt: of run seed-20260101-000000-abcdef, not of this "
                                                rf"folder's {own_id} \(its best\.pt\): resuming would replace"):
        resume(run, epochs=3)
    last["run_id"] = own_id
    last["training_state"]["epochs_without_improvement"] = 1  # its last epoch did not improve: best.pt is older
    torch.save(last, run / "last.pt")
    (run / "best.pt").unlink()
    with pytest.raises(PneumoniaCNNError, match=r"best\.pt: missing, though 2 epochs are trained: the run's best "
                                                r"weights so far are lost"):
        resume(run, epochs=3)
    (run / "best.pt").write_bytes(before["best.pt"][:1000])
    with pytest.raises(PneumoniaCNNError, match=r"best\.pt: .*: the run resumes with its own best\.pt \(restore"):
        resume(run, epochs=3)
    assert (run / "history.json").read_bytes() == before["history.json"]  # no epoch was trained
    last["training_state"]["epochs_without_improvement"] = 0  # its last epoch improved: last.pt writes best.pt
    torch.save(last, run / "last.pt")
    (run / "best.pt").unlink()
    assert len(resume(run, epochs=3)["history"]) == 3 and (run / "best.pt").is_file()


def test_a_run_saved_with_amp_fp16_resumes_in_float32(trained_run, tmp_path, caplog):
    """Training dropped --amp fp16 (no loss scaling): a run saved with it could never be resumed ("amp: 'fp16' is
    not one of auto, off, bf16"), and --amp may not change on a resume."""
    run = shutil.copytree(trained_run, tmp_path / "run")
    last = torch.load(run / "last.pt", weights_only=True)
    last["config"]["amp"] = "fp16"
    torch.save(last, run / "last.pt")
    assert len(resume(run, epochs=3)["history"]) == 3
    assert load_checkpoint(run / "last.pt")["config"]["amp"] == "off"


def test_a_one_class_validation_split_says_val_auc_is_undefined_and_names_val_loss(small_root, cache_dir, tmp_path,
                                                                                    caplog):
    """With --monitor val_auc (the best and fast presets') and a val/ of one class, early stopping had cited
    "no improvement in val_auc", a score never computed (best.pt was chosen by val_loss)."""
    caplog.set_level(logging.INFO)
    root = copy_tree(small_root, tmp_path / "data")
    shutil.rmtree(root / "val" / "PNEUMONIA")
    config = make_config(data=str(root), out=str(tmp_path / "run"), cache_dir=str(cache_dir),
                         **dict(TINY, epochs=6, monitor="val_auc", early_stopping=1, lr=0.05))
    summary = train(config)
    assert "val_auc is undefined (the validation images are of one class): best.pt and early stopping use " \
           "val_loss" in caplog.messages
    assert all(row.get("val_auc") is None for row in summary["history"])
    card = ("model card: the training population is stated as the Kaggle set's (children 1-5 years, one hospital), "
            "the preset's: give --population and --age-range when these images are of another")
    assert card in caplog.messages  # the tutorial preset's population, whatever the data (a review: adults)
    from pneumonia_cnn.info import describe_checkpoint
    described = describe_checkpoint(load_checkpoint(tmp_path / "run" / "best.pt"))  # it said "of validation images"
    assert "quantile of the training images' out-of-fold scores (no validation images of both classes))" in described
    stopped = [m for m in caplog.messages if m.startswith("early stopping")]
    assert stopped == ["early stopping: no improvement in val_loss for 1 epochs"], summary["history"]


def test_weights_of_another_model_are_refused_before_the_data_are_read(small_root, tmp_path, caplog, capsys):
    """--model seed_bn --weights of a seed model was refused only after the data scan, naming neither --weights
    nor what to change."""
    from pneumonia_cnn.models import create_model
    caplog.set_level(logging.INFO)
    weights = tmp_path / "seed_weights.pt"
    torch.save(create_model("seed", in_channels=1, image_size=(48, 48)).state_dict(), weights)
    out = tmp_path / "run"
    assert main(["train", "--data", str(small_root), "--out", str(out), "--model", "seed_bn", "--size", "48",
                 "--channels", "1", "--weights", str(weights), "--no-progress"]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"error: weights: {weights}: weights do not fit model seed_bn (") and \
        error.endswith("); give the --model they were trained as") and error.count("\n") == 0, error
    assert not out.exists() and not any("images" in message for message in caplog.messages)
    caplog.clear()
    assert main(["train", "--data", str(small_root), "--out", str(out), "--model", "seed", "--size", "48",
                 "--channels", "1", "--weights", str(weights), "--no-progress", "--epochs", "1", "--no-ood",
                 "--max-steps-per-epoch", "1", "--population", "adults of two hospitals"]) == 0  # they fit: trained
    assert not any(message.startswith("model card:") for message in caplog.messages)  # a population was given


def test_the_run_folder_line_escapes_a_newline_in_out(small_root, cache_dir, tmp_path, capsys):
    out = tmp_path / "new\nline"
    assert main(["train", "--data", str(small_root), "--out", str(out), "--cache-dir", str(cache_dir), "--epochs",
                 "1", "--size", "32", "--no-progress", "--no-ood", "--max-steps-per-epoch", "1",
                 "--min-val-images", "10"]) == 0
    last = capsys.readouterr().out.splitlines()[-1]
    assert last == f"run folder: {tmp_path}/new\\nline"  # one line, the newline shown as \n

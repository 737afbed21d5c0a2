import json
import re

import numpy as np
import pytest
import torch

from pneumonia_cnn import load_model
from pneumonia_cnn.checkpoint import load_checkpoint
from pneumonia_cnn.training import make_config, resume, train


def test_training_writes_every_output(trained_run):
    for name in ("best.pt", "last.pt", "config.json", "history.csv", "history.json", "curves.png", "test_metrics.json"):
        assert (trained_run / name).is_file(), name
    history = json.loads((trained_run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    assert {"train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_auc"} <= set(history[0])
    header = (trained_run / "history.csv").read_text().splitlines()[0]
    assert header.startswith("epoch,train_loss,train_accuracy")
    checkpoint = load_checkpoint(trained_run / "best.pt")
    assert checkpoint["model"]["name"] == "seed" and checkpoint["class_names"] == ["NORMAL", "PNEUMONIA"]
    assert checkpoint["preprocessing"]["size"] == [64, 64] and checkpoint["config"]["epochs"] == 2
    model = load_model(trained_run)
    assert isinstance(model, torch.nn.Module) and not model.training


def test_same_seed_same_result(small_root, cache_dir, tmp_path):
    def run(out):
        config = make_config("tutorial", data=str(small_root), out=str(out), epochs=1, size=48, batch_size=16,
                             cache_dir=str(cache_dir), progress=False, min_val_images=10, ood=False,
                             evaluate_test=False, deterministic=True, seed=3)
        return train(config)["history"][0]
    first, second = run(tmp_path / "a"), run(tmp_path / "b")
    assert first["train_loss"] == second["train_loss"] and first["val_loss"] == second["val_loss"]
    a = load_checkpoint(tmp_path / "a" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "b" / "last.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit-identical weights


def test_val_from_train_is_patient_level(small_root, cache_dir, tmp_path):
    config = make_config("tutorial", data=str(small_root), out=str(tmp_path / "r"), epochs=1, size=48,
                         cache_dir=str(cache_dir), progress=False, val_from_train=0.25, ood=False,
                         evaluate_test=False, max_steps_per_epoch=1)
    from pneumonia_cnn.training import Distributed, prepare_data
    train_set, val_set = prepare_data(config, Distributed())
    assert len(val_set) > 0 and not set(train_set.patients) & set(val_set.patients)


def test_resume_gives_the_same_result_as_an_uninterrupted_run(small_root, cache_dir, tmp_path):
    common = dict(data=str(small_root), size=48, batch_size=16, cache_dir=str(cache_dir), progress=False,
                  min_val_images=10, ood=False, evaluate_test=False, seed=5)
    full = train(make_config("tutorial", out=str(tmp_path / "full"), epochs=2, **common))
    train(make_config("tutorial", out=str(tmp_path / "split"), epochs=1, **common))
    resumed = resume(tmp_path / "split", epochs=2)
    assert [r["epoch"] for r in resumed["history"]] == [1, 2]
    assert np.isclose(full["history"][1]["val_loss"], resumed["history"][1]["val_loss"], rtol=1e-6)
    a = load_checkpoint(tmp_path / "full" / "last.pt")["state_dict"]
    b = load_checkpoint(tmp_path / "split" / "last.pt")["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_presets_and_config_file(tmp_path):
    best = make_config("best")
    assert best.model != "seed" and best.monitor == "val_auc" and best.class_balance != "none"
    fast = make_config("fast")  # README: best in 10 epochs, lr 3e-3, EMA 0.995; everything else as best
    assert (fast.epochs, fast.lr, fast.ema_decay) == (10, 3e-3, 0.995)
    differ = {k for k, v in fast.to_dict().items() if best.to_dict()[k] != v}
    assert differ == {"epochs", "lr", "ema_decay", "preset"}, differ
    tutorial = make_config("tutorial")
    assert (tutorial.model, tutorial.epochs, tutorial.batch_size, tutorial.lr) == ("seed", 10, 32, 1e-3)
    assert tutorial.augment == {"shear": 0.2, "zoom": 0.2, "flip": True}
    (tmp_path / "c.yaml").write_text("epochs: 3\nlr: 0.01\n")
    (tmp_path / "c.toml").write_text("epochs = 4\n")
    assert make_config("best", str(tmp_path / "c.yaml"), epochs=5).epochs == 5
    assert make_config("best", str(tmp_path / "c.yaml")).lr == 0.01
    assert make_config("tutorial", str(tmp_path / "c.toml")).epochs == 4
    from pneumonia_cnn.errors import PneumoniaCNNError
    with pytest.raises(PneumoniaCNNError, match="unknown config field"):
        make_config("tutorial", epochz=3)


def test_ema_update_is_the_exponential_average_and_copies_counters():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    ema = torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4))
    model[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in ema.state_dict().items()}
    from pneumonia_cnn.training import update_ema
    update_ema(ema, model, 0.9)
    for key, value in model.state_dict().items():
        if value.dtype.is_floating_point:
            torch.testing.assert_close(ema.state_dict()[key], 0.9 * before[key] + 0.1 * value)
        else:
            assert torch.equal(ema.state_dict()[key], value)


def test_a_diverging_run_stops_at_once_and_saves_nothing_of_it(small_root, cache_dir, tmp_path):
    """--lr 1e6: the loss went NaN and training went on, saved NaN weights as best.pt, then failed in the
    calibration with "Input X contains infinity" (no file, no cause); predict then labelled everything NORMAL."""
    from pneumonia_cnn.errors import PneumoniaCNNError
    out = tmp_path / "run"
    config = make_config("tutorial", data=str(small_root), out=str(out), epochs=2, size=32, batch_size=16,
                         cache_dir=str(cache_dir), lr=1e6, progress=False)
    with pytest.raises(PneumoniaCNNError, match=r"^training diverged in epoch 1: the training loss is (nan|inf); "
                                                r"nothing of this epoch was saved in .*run "
                                                r"\(try a lower --lr, or --amp off\)$"):
        train(config)
    assert not (out / "best.pt").exists() and not (out / "last.pt").exists()


def test_resuming_from_a_last_pt_that_training_did_not_write_is_one_line(small_root, cache_dir, tmp_path):
    """A best.pt copied over last.pt raised KeyError: 'training_state'; a damaged state AttributeError or an int()
    error naming no file."""
    from pneumonia_cnn.errors import PneumoniaCNNError
    out = tmp_path / "run"
    config = make_config("tutorial", data=str(small_root), out=str(out), epochs=1, size=32, batch_size=16,
                         cache_dir=str(cache_dir), progress=False, ood=False)
    train(config)
    good = torch.load(out / "last.pt", weights_only=False)
    for edit, reason in ((lambda p: p.pop("training_state"), "it holds no training state: is it a best.pt?"),
                         (lambda p: p.__setitem__("training_state", "x"), "training_state is str, not a dict"),
                         (lambda p: p["training_state"].__setitem__("epoch", "abc"),
                          "training_state.epoch is 'abc', not a whole number")):
        damaged = {**good, "training_state": dict(good["training_state"])}
        edit(damaged)
        torch.save(damaged, out / "last.pt")
        with pytest.raises(PneumoniaCNNError, match=rf"^.*run/last.pt: cannot resume from it \({re.escape(reason)}\)$"):
            resume(out, epochs=2)

import json
import subprocess
import sys

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pneumonia_cnn.cli import main
from pneumonia_cnn.inference import Predictor
from tests.conftest import write_image


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "pneumonia_cnn", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, timeout=600)


def test_python_dash_m_summary_prints_the_tutorial_total():
    result = run_cli("summary", "--model", "seed")
    assert result.returncode == 0 and "11,169,089" in result.stdout


def test_evaluate_table_and_json(trained_run, small_root, cache_dir, capsys, tmp_path):
    assert main(["evaluate", "--checkpoint", str(trained_run / "best.pt"), "--data", str(small_root),
                 "--cache-dir", str(cache_dir), "--bootstrap", "50", "--out", str(tmp_path / "m.json")]) == 0
    table = capsys.readouterr().out
    for word in ("accuracy", "sensitivity", "specificity", "roc_auc", "confusion matrix", "95% CI"):
        assert word in table
    assert main(["evaluate", "--checkpoint", str(trained_run), "--data", str(small_root), "--format", "json",
                 "--cache-dir", str(cache_dir), "--bootstrap", "50", "--out", str(tmp_path / "n.json"),
                 "--no-figures"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert set(payload["metrics"]["roc_auc"]) >= {"value", "ci95"}
    assert payload["n_images"] == 20 and payload["counts"] == {"NORMAL": 10, "PNEUMONIA": 10}
    # the printed matrix counts the saved predictions at the printed threshold
    saved = json.loads((tmp_path / "n.json").read_text())
    calls = [(p["label"], p["probability"] >= payload["threshold"]) for p in saved["predictions"]]
    expected = {"tn": calls.count((0, False)), "fp": calls.count((0, True)), "fn": calls.count((1, False)),
                "tp": calls.count((1, True))}
    assert payload["metrics"]["confusion_matrix"] == expected
    assert payload["metrics"]["accuracy"]["value"] == pytest.approx((expected["tp"] + expected["tn"]) / 20)


def test_bad_input_is_one_line_without_traceback(tmp_path):
    result = run_cli("train", "--data", tmp_path / "missing", "--out", tmp_path / "r")
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "folder not found" in result.stderr
    assert "Traceback" not in result.stderr
    write_image(tmp_path / "one" / "train" / "PNEUMONIA" / "a.png", np.zeros((30, 30), np.uint8))
    (tmp_path / "one" / "train" / "NORMAL").mkdir()
    result = run_cli("train", "--data", tmp_path / "one", "--out", tmp_path / "r")
    assert result.returncode == 2 and "only one class" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("evaluate", "--checkpoint", tmp_path / "nothing.pt", "--data", tmp_path)
    assert result.returncode == 2 and "checkpoint not found" in result.stderr


@pytest.mark.parametrize("flag, value, reason", [
    ("--max-in-flight", "0", "must be a whole number from 1 to 1,000,000"),
    ("--max-batches-in-flight", "-2", "must be a whole number from 1 to 1,000,000"),
    ("--max-upload-mb", "nan", "must be a positive number of at most 4,096"),
    ("--max-upload-mb", "5000", "must be a positive number of at most 4,096"),
    ("--body-timeout", "-1", "must be a positive number of at most 86,400")])
def test_serve_refuses_limits_that_would_refuse_everything_or_nothing(flag, value, reason):
    result = run_cli("serve", flag, value)
    assert (result.returncode, result.stderr.strip()) == (2, f"error: {flag} {value}: {reason}")

def test_training_skips_bad_files_and_goes_on(small_root, tmp_path, cache_dir):
    import shutil
    root = tmp_path / "mixed"
    shutil.copytree(small_root, root, symlinks=True)
    bad = root / "train" / "NORMAL"
    (bad / "zero.jpeg").write_bytes(b"")
    (bad / "text.jpeg").write_text("I am not an image")
    good = next(p for p in (root / "train" / "PNEUMONIA").iterdir())
    (bad / "cut.jpeg").write_bytes(good.read_bytes()[:2000])
    result = run_cli("train", "--data", root, "--out", tmp_path / "r", "--epochs", "1", "--size", "48",
                     "--cache-dir", tmp_path / "c", "--no-progress", "--no-ood")
    assert result.returncode == 0, result.stderr
    for name in ("zero.jpeg", "text.jpeg", "cut.jpeg"):
        assert any(name in line and "skipped" in line for line in result.stderr.splitlines()), name
    assert "test accuracy" in result.stdout


def test_show_samples(small_root, tmp_path):
    assert main(["show-samples", "--data", str(small_root), "--out", str(tmp_path / "grid.png"),
                 "--per-class", "3"]) == 0
    assert (tmp_path / "grid.png").stat().st_size > 5000


def test_demo_learns_the_synthetic_set(tmp_path):
    from pneumonia_cnn.demo import run_demo
    summary = run_demo(tmp_path / "demo")
    assert summary["test_metrics"]["accuracy"] >= 0.8 and summary["test_metrics"]["roc_auc"] >= 0.9
    assert (tmp_path / "demo" / "run" / "curves.png").is_file()


def test_every_hyper_parameter_is_a_flag(small_root, tmp_path):
    from pneumonia_cnn.checkpoint import load_checkpoint
    result = run_cli("train", "--data", small_root, "--out", tmp_path / "r", "--model", "seed_bn", "--epochs", "1",
                     "--batch-size", "8", "--lr", "0.002", "--size", "40", "--channels", "1", "--seed", "4",
                     "--device", "cpu", "--cache-dir", tmp_path / "c", "--no-progress", "--no-ood",
                     "--max-steps-per-epoch", "2")
    assert result.returncode == 0, result.stderr
    config = load_checkpoint(tmp_path / "r" / "best.pt")["config"]
    assert (config["model"], config["epochs"], config["batch_size"], config["lr"], config["size"], config["channels"],
            config["seed"], config["device"]) == ("seed_bn", 1, 8, 0.002, 40, 1, 4, "cpu")


def test_demo_accepts_a_real_data_set(small_root, tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "d"), "--data", str(small_root), "--epochs", "1", "--size", "48"]) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert (tmp_path / "d" / "run" / "best.pt").is_file() and (tmp_path / "d" / "run" / "curves.png").is_file()


def test_demo_never_writes_among_files_it_did_not_make(tmp_path, capsys):
    """demo --out DIR wrote its synthetic images over a file of the same name in DIR and trained on both."""
    mine = tmp_path / "mine"
    foreign = mine / "data" / "train" / "NORMAL" / "IM-0001-0001.jpeg"
    foreign.parent.mkdir(parents=True)
    foreign.write_bytes(b"my x-ray")
    assert main(["demo", "--out", str(mine), "--epochs", "1"]) == 2
    assert capsys.readouterr().err.strip().endswith("mine: --out holds files demo did not write (it would write its "
                                                    "images, run and cache among them); give a new or empty folder")
    assert foreign.read_bytes() == b"my x-ray" and sorted(p.name for p in mine.iterdir()) == ["data"]


def test_a_run_stopped_while_scoring_its_test_split_resumes_to_that_scoring_alone(small_root, cache_dir, tmp_path,
                                                                                  capsys):
    """Ctrl-C during train's final test evaluation left best.pt and last.pt but no test_metrics.json, and
    --resume said "finished after 1 epochs; nothing to resume"."""
    run = tmp_path / "run"
    common = ["--size", "40", "--batch-size", "16", "--cache-dir", str(cache_dir), "--no-ood", "--no-progress"]
    assert main(["train", "--data", str(small_root), "--out", str(run), "--epochs", "1", *common]) == 0
    written = json.loads((run / "test_metrics.json").read_text())
    (run / "test_metrics.json").unlink()
    checkpoints = {name: (run / name).read_bytes() for name in ("best.pt", "last.pt")}
    capsys.readouterr()
    assert main(["train", "--resume", str(run)]) == 0
    assert "test accuracy" in capsys.readouterr().out
    again = json.loads((run / "test_metrics.json").read_text())
    assert again["metrics"]["roc_auc"] == written["metrics"]["roc_auc"] and again["n_images"] == written["n_images"]
    assert {name: (run / name).read_bytes() for name in checkpoints} == checkpoints  # nothing trained or refitted
    assert main(["train", "--resume", str(run)]) == 2  # now finished and scored: nothing to resume, as before
    assert "nothing to resume" in capsys.readouterr().err


def test_resume_from_the_cli_continues_and_scores_the_test_split(small_root, cache_dir, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--size", "40", "--batch-size", "16", "--cache-dir", str(cache_dir), "--no-ood", "--no-progress"]
    assert main(["train", "--data", str(small_root), "--out", str(run), "--epochs", "1", *common]) == 0
    (run / "test_metrics.json").unlink()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 0
    history = json.loads((run / "history.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2]
    report = json.loads((run / "test_metrics.json").read_text())
    # written again by the resumed run, from the checkpoint it left: same probabilities, AUC computed from them
    assert report["checkpoint"] == [str(run / "best.pt")] and report["n_images"] == 20
    paths = [p["path"] for p in report["predictions"]]
    probabilities = [p["probability"] for p in report["predictions"]]
    fresh = Predictor(run / "best.pt", "cpu").predict_files(paths)
    assert [r.probability for r in fresh] == pytest.approx(probabilities, abs=1e-5)
    labels = [p["label"] for p in report["predictions"]]
    assert report["metrics"]["roc_auc"]["value"] == pytest.approx(roc_auc_score(labels, probabilities))
    assert "test accuracy" in capsys.readouterr().out
    before = (run / "best.pt").read_bytes(), (run / "last.pt").read_bytes()
    assert main(["train", "--resume", str(run), "--epochs", "2", "--no-progress"]) == 2  # nothing left to train
    assert capsys.readouterr().err.strip() == (f"error: {run}: has trained 2 epochs already; --epochs 2 would "
                                               f"train none (and rewrite its checkpoints): give more than 2")
    assert ((run / "best.pt").read_bytes(), (run / "last.pt").read_bytes()) == before
    assert main(["train", "--resume", str(run), "--no-progress"]) == 2  # finished: its 2 epochs and its end steps
    assert capsys.readouterr().err.strip() == (f"error: {run}: finished after 2 epochs; nothing to resume (give "
                                               f"--epochs more than 2 to train further)")
    assert ((run / "best.pt").read_bytes(), (run / "last.pt").read_bytes()) == before


def test_output_cut_short_by_its_reader_is_not_an_error():
    """`pneumonia-cnn predict ... --format fhir | head`: the reader leaves after a few lines, the rest of the
    output has nowhere to go; that used to print 'error: [Errno 32] Broken pipe' and exit 2."""
    from tests.conftest import SHARED_DATA, require_shared
    require_shared()
    images = sorted((SHARED_DATA / "test" / "NORMAL").iterdir())[:150]  # about 2 KB of FHIR each: past a pipe
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "predict", "builtin", *map(str, images),
                                "--format", "fhir", "--engine", "torch"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    assert process.stdout.read(100).startswith(b"{")
    process.stdout.close()
    stderr = process.communicate(timeout=600)[1].decode()
    assert process.returncode == 141 and "error" not in stderr and "Traceback" not in stderr, stderr


def test_the_cli_logs_one_line_per_message(monkeypatch, capsys):
    """setup_logging (what every command runs first) writes each message on one line, whatever it quotes."""
    import logging

    from pneumonia_cnn.cli.common import setup_logging
    monkeypatch.setattr(logging.root, "handlers", [])  # as in a fresh process (pytest's own handlers set aside)
    monkeypatch.setattr(logging.root, "level", logging.root.level)
    setup_logging(False)
    logging.getLogger("pneumonia_cnn").warning("instance %s: unreadable", "1.2\nFORGED line\x85")
    assert capsys.readouterr().err == "instance 1.2\\nFORGED line\\x85: unreadable\n"
    import subprocess
    import sys
    script = ("from pneumonia_cnn.cli.common import setup_logging; import warnings; setup_logging(False); "
              "warnings.warn('overflow encountered in multiply\\nsecond line', RuntimeWarning)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    # one line of the log, not Python's two lines naming the file and quoting its source
    assert done.stderr == "warning: RuntimeWarning: overflow encountered in multiply\\nsecond line\n"


@pytest.mark.parametrize("stop, status, said", [("SIGINT", 130, "interrupted\n"),
                                                ("SIGTERM", -15, "terminated (SIGTERM)\n")])
def test_a_stop_while_the_command_is_still_importing_says_its_one_line(stop, status, said):
    """Ctrl-C in the first second (torch loading, before main's handler) printed a KeyboardInterrupt traceback
    through torch's import machinery; now exit 130 and no traceback, as later. SIGTERM there ended the process
    without a word; now its line, and still ended by the signal, as later."""
    import signal
    import subprocess
    import sys
    import time
    process = subprocess.Popen([sys.executable, "-m", "pneumonia_cnn", "info", "builtin"], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None:  # the handler is set just before torch is
        # imported: once torch's library is mapped, the import is under way (a fixed 0.6 s had left 0.2 s to
        # spare on a loaded machine, where Python's own start took 0.25 s)
        with open(f"/proc/{process.pid}/maps") as maps:
            if "libtorch" in maps.read():
                break
        time.sleep(0.01)
    assert process.poll() is None, "info ended before torch was imported"
    process.send_signal(getattr(signal, stop))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == status and stderr == said, stderr


def test_double_dash_separates_the_paths_even_those_that_start_with_a_dash(tmp_path, capsys, monkeypatch):
    """`predict -- scans.jpeg` said the arguments were missing; `predict builtin -- -dash.jpeg` took the file
    for an unknown option."""
    import shutil

    from pneumonia_cnn import builtin
    example = sorted(builtin.example_paths())[0]
    monkeypatch.chdir(tmp_path)
    shutil.copyfile(example, tmp_path / "-dash.jpeg")
    shutil.copyfile(example, tmp_path / "plain.jpeg")
    assert main(["predict", "--format", "json", "--", "plain.jpeg"]) == 0  # the built-in model
    first = json.loads(capsys.readouterr().out)
    assert main(["predict", "builtin", "--format", "json", "--", "-dash.jpeg"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in first + second] == ["plain.jpeg", "-dash.jpeg"]
    assert first[0]["probability"] == second[0]["probability"]
    shutil.copyfile(example, tmp_path / "--dd.jpeg")  # after a global option, and a name like an option's
    import torch
    other = torch.load(builtin.checkpoint_path(), weights_only=True)  # a second model: one model twice is refused
    first_weight = next(iter(other["state_dict"]))
    other["state_dict"][first_weight] = other["state_dict"][first_weight] * 1.01
    torch.save(other, tmp_path / "copy.pt")
    assert main(["-v", "predict", "builtin", "copy.pt", "--", "--dd.jpeg", "--format", "json"]) == 0
    third = json.loads(capsys.readouterr().out)
    assert [r["path"] for r in third] == ["--dd.jpeg"] and "+" in third[0]["model"]  # both checkpoints
    assert main(["predict"]) == 2
    assert capsys.readouterr().err.strip() == "error: predict needs a file, folder or glob (after an optional " \
                                              "checkpoint)"


def test_paths_may_follow_options(tmp_path, capsys):
    """`predict CKPT --format csv a.jpeg b.jpeg` said "unrecognized arguments: a.jpeg b.jpeg" (argparse takes
    one run of positionals); an unknown option is still argparse's one-line error."""
    from pneumonia_cnn import builtin
    images = [str(p) for p in sorted(builtin.example_paths())[:2]]
    assert main(["predict", "builtin", "--format", "json", *images]) == 0
    assert [r["path"] for r in json.loads(capsys.readouterr().out)] == images
    with pytest.raises(SystemExit) as stop:
        main(["predict", images[0], "--bogus"])
    assert stop.value.code == 2 and "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_an_unrecognized_argument_is_told_with_its_commands_usage(tmp_path, capsys):
    """`evaluate builtin --data D` (evaluate takes --checkpoint builtin) printed the top-level usage,
    "pneumonia-cnn [-h] [-v] COMMAND ...", which does not show the option it needed."""
    with pytest.raises(SystemExit) as stop:
        main(["evaluate", "builtin", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.startswith("usage: pneumonia-cnn evaluate ") and "--checkpoint" in err
    assert err.strip().splitlines()[-1] == "pneumonia-cnn evaluate: error: unrecognized arguments: builtin"


INTERRUPTED_CHILD = """
import os, signal, sys
sys.argv = [{program!r}, "info", "builtin"]
class SigintOnImport:  # Ctrl-C just as the command line imports one of its own modules
    def find_spec(self, name, path=None, target=None):
        if name == "pneumonia_cnn.cli.deployment":
            os.kill(os.getpid(), signal.SIGINT)
        return None
if {on_import}:
    sys.meta_path.insert(0, SigintOnImport())
import pneumonia_cnn.cli as cli
real_build = cli.build_parser
def build_interrupted():  # Ctrl-C while the parser is built (it imports the presets, and torch's modules)
    os.kill(os.getpid(), signal.SIGINT)
    return real_build()
cli.build_parser = build_interrupted
raise SystemExit(cli.entry())
"""


@pytest.mark.parametrize("program, on_import", [("pneumonia-cnn", True), ("pneumonia-cnn", False),
                                                ("/x/pneumonia_cnn/__main__.py", True)])
def test_a_ctrl_c_while_the_command_line_imports_or_builds_its_parser_says_interrupted(program, on_import):
    """After the package's own imports, the command line's modules and its parser (about 0.1-0.3 s) still came
    before main's handler: a Ctrl-C there printed a KeyboardInterrupt traceback."""
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", INTERRUPTED_CHILD.format(program=program, on_import=on_import)],
                          capture_output=True, text=True, timeout=120)
    assert (done.returncode, done.stderr) == (130, "interrupted\n"), done.stderr[-3000:]

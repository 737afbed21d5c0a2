"""Data and training: ``train``, ``demo``, ``models``, ``summary``, ``show-samples``. The train flags are
generated from ``TrainConfig``'s fields, so each is defined, validated and used under one name."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
from pathlib import Path

from ..errors import PneumoniaCNNError
from ..fileio import FolderLock, display_path, printable
from .common import NAME, PATH, Command, add_device, check_output, whole_number
from .outputs import check_replaceable

# the configuration's paths, refused empty when parsed ("" is the current folder: `--out ''` trained into it);
# cache_dir, weights, init and tracking_uri keep "" as their default ("the usual cache", "none"), which a flag
# may set to clear a preset's or a config file's value
PATH_FIELDS = ("data", "out")


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object such as '{\"flip\": true}'")
    return value


def add_config_flags(parser: argparse.ArgumentParser):
    """One flag per ``TrainConfig`` field: type, choices and help from its declaration; default None so that
    only flags given override the preset and the config file."""
    from ..training.config import TrainConfig
    group = parser.add_argument_group("configuration (each overrides the preset and --config; defaults are "
                                      "the tutorial's)")
    for spec in dataclasses.fields(TrainConfig):
        meta = spec.metadata
        if not meta.get("cli", True):
            continue
        default = spec.default if spec.default is not dataclasses.MISSING else spec.default_factory()
        said = "" if default in ("", None) or "(default:" in meta["help"] else f" (default: {default})"
        help_text = f"{meta['help']}{said}".replace("%", "%%")  # argparse expands %; "(default: )" said nothing
        options = {"dest": spec.name, "default": None, "help": help_text}
        kind = str(spec.type)
        if kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif kind in ("int", "float"):
            options["type"] = int if kind == "int" else float
        elif kind == "dict":
            options["type"] = _json_object
        elif spec.name in PATH_FIELDS:
            options["type"] = PATH
        elif kind.startswith("list"):
            options.update(type=float, nargs=len(meta["metavar"]))
        if meta.get("choices"):
            options["choices"] = meta["choices"]
        if meta.get("metavar"):
            options["metavar"] = meta["metavar"]
        group.add_argument(meta.get("flag") or "--" + spec.name.replace("_", "-"), **options)
    group.add_argument("--calibrate", dest="calibration", action="store_const", const="temperature",
                       help="same as --calibration temperature (the flag of earlier versions)")


def presets_epilog() -> str:
    from ..training.config import PRESETS
    lines = ["presets:", "  tutorial  the Keras tutorial exactly (the defaults above)"]
    for name, values in PRESETS.items():
        if name != "tutorial":
            shown = ", ".join(f"{k}={v}" for k, v in values.items() if k not in ("population", "augment"))
            lines.append(f"  {name:<9} {shown}, augment=<shift-robust set; see README>")
    return "\n".join(lines)


def train_arguments(p):
    p.add_argument("--preset", help="tutorial (the Keras tutorial exactly; the default unless --config names "
                   "another), best, fast (best in 10 epochs: about 3 minutes on 2 CPU cores) or finetune (best from "
                   "the built-in weights)")
    p.add_argument("--config", type=PATH, help="YAML/TOML/JSON file of config fields (overrides the preset)")
    p.add_argument("--resume", metavar="RUN_DIR", type=PATH, help="continue RUN_DIR from its last checkpoint")
    add_config_flags(p)


def refuse_finished_run(out) -> None:
    """A run folder that already holds a checkpoint is continued with --resume, never trained over."""
    held = [name for name in ("best.pt", "last.pt") if out and (Path(out) / name).is_file()]
    done = _finished_epochs(Path(out)) if held else None
    if done is not None:  # --resume alone refuses it: "finished after N epochs; nothing to resume"
        raise PneumoniaCNNError(f"{out}: already holds a run that finished after {done} epochs; train it further "
                                f"with --resume {out} --epochs N (N more than {done}), or give another --out")
    if held:
        raise PneumoniaCNNError(f"{out}: already holds a run ({held[0]}); continue it with --resume {out}, or "
                                f"give another --out")


def _finished_epochs(folder: Path) -> int | None:
    """The epochs of a run whose training and end-of-run steps are done (what --resume without --epochs
    refuses), or None: one to continue, or whose last.pt cannot be read (--resume says why)."""
    from ..checkpoint import _training_state, training_finished
    from ..fileio import load_torch_file
    state = _training_state(folder / "last.pt") if (folder / "last.pt").is_file() else None
    if not state or not training_finished(state, state["config"]) or not (folder / "best.pt").is_file():
        return None
    try:
        best = load_torch_file(folder / "best.pt")
    except PneumoniaCNNError:
        return None
    return int(state["epoch"]) if isinstance(best, dict) and "decision_fit" in best else None


@contextlib.contextmanager
def run_folder_lock(out):
    """RUN/.lock while a training writes its run folder: a second training (or --resume) into the same folder
    is refused instead of mixing its files with the first's. Under torchrun only the first process writes and
    locks. Folders made here for a run that then failed at once (nothing in them but the lock and the config it
    wrote) are removed;
    a refused training removes nothing: the folder and lock are the other training's."""
    if not out or Path(out).is_file() or int(os.environ.get("RANK", "0")) != 0:
        yield
        return
    folder = Path(out)
    made = [folder, *folder.parents]
    made = made[:next(i for i, f in enumerate(made) if f.exists())] if not folder.exists() else []
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise PneumoniaCNNError(f"{out}: --out cannot be made a run folder ({error.strerror})") from None
    lock = FolderLock(folder, f"{out}: another training is writing this run folder (it holds "
                              f"{display_path(folder / '.lock')}); wait for it, or give another --out")
    try:
        lock.acquire()
    except PneumoniaCNNError:
        for empty in made if not any(folder.iterdir()) else []:  # the other training made none of them yet
            empty.rmdir()
        raise
    try:
        yield
    finally:
        lock.release()
        if made and {p.name for p in folder.iterdir()} <= {".lock", "config.json"}:  # failed before its first
            # epoch (a tracker that could not start): nothing of a run to keep, and a rerun must not meet it
            for name in (".lock", "config.json"):
                with contextlib.suppress(FileNotFoundError):
                    (folder / name).unlink()
            for empty in made:
                with contextlib.suppress(OSError):  # a parent something else has written into stays
                    empty.rmdir()


class StoppedEarly(Exception):
    """An interruption the training did not catch itself, after which the run resumes from its last.pt."""


@contextlib.contextmanager
def resume_line_when_interrupted(out):
    """Ctrl-C or SIGTERM that reaches here (during the end-of-run steps after the last epoch, where no epoch's
    graceful stop is listening, or a second signal during an epoch) says how to resume, as a stop during an
    epoch does (it said only "interrupted"), when the run has a last.pt to resume from; ``run_train`` then
    exits 130 as after that stop."""
    try:
        yield
    except KeyboardInterrupt as interrupt:
        if int(os.environ.get("RANK", "0")) != 0 or not (Path(out) / "last.pt").is_file():
            raise
        from ..signals import Terminated
        logging.getLogger(__name__).warning(
            "interrupted by %s: stopped early; resume with: pneumonia-cnn train --resume %s",
            "SIGTERM" if isinstance(interrupt, Terminated) else "SIGINT", display_path(out))
        raise StoppedEarly from None


def run_train(args) -> int:
    try:
        return _run_train(args)
    except StoppedEarly:
        return 130


def _run_train(args) -> int:
    from ..experiment import resume_and_evaluate, train_and_evaluate
    from ..training.config import TrainConfig, make_config
    names = [spec.name for spec in dataclasses.fields(TrainConfig) if spec.metadata.get("cli", True)]
    overrides = {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}
    if args.resume and Path(args.resume).is_file():  # was "runs/x/best.pt: nothing to resume (no last.pt)"
        raise PneumoniaCNNError(f"--resume {args.resume}: a file; --resume takes the run folder "
                                f"(--resume {display_path(Path(args.resume).parent)})")
    if args.resume:
        allowed = {"epochs", "device", "progress"}
        ignored = sorted(set(overrides) - allowed) + [f"--{name}" for name in ("preset", "config")
                                                      if getattr(args, name)]
        if ignored:
            raise PneumoniaCNNError(f"--resume continues a run with its own configuration; only --epochs, --device "
                                    f"and --no-progress may change (got {', '.join(ignored)})")
        with resume_line_when_interrupted(args.resume), run_folder_lock(args.resume):
            summary = resume_and_evaluate(args.resume, **overrides)
    else:
        config = make_config(args.preset, args.config, **overrides)
        if not config.data:  # --data, or data: in --config
            raise PneumoniaCNNError("train needs --data ROOT (a folder in the Kaggle layout) or --resume RUN_DIR")
        refuse_finished_run(config.out)
        refuse_run_in_data(config.out, config.data)
        refuse_data_in_run(config.out, config.data)
        refuse_overwriting(config.out, {"--config": args.config, "--data": config.data})
        with resume_line_when_interrupted(config.out), run_folder_lock(config.out):
            refuse_finished_run(config.out)  # again, now that no other training can be writing it
            summary = train_and_evaluate(config)
    if summary.get("interrupted"):
        return 130
    if not summary.get("main_process", True):
        return 0  # in data-parallel runs only rank 0 reports
    test = summary.get("test_metrics")
    if test:
        print(f"test accuracy {test['accuracy']:.4f}  sensitivity {test['sensitivity']:.4f}  "
              f"specificity {test['specificity']:.4f}  ROC AUC {test['roc_auc']:.4f}")
    print(f"run folder: {printable(str(summary['run_dir']))}")  # a newline in --out had split the line
    return 0


def refuse_overwriting(out, inputs: dict) -> None:
    """Files in --out that a run writes (``RUN_FILES``) but that no run wrote there (refuse_finished_run has
    refused a folder holding one): an input given by ``inputs`` (flag: path), a user's own config.json or
    history.csv, an X-ray named curves.png a label CSV lists. The run would overwrite them."""
    from ..training.setup import RUN_FILES, is_run_config
    folder = Path(out)
    written = {(folder / name).resolve(): name for name in RUN_FILES}
    for flag, path in inputs.items():
        if path and Path(path).is_file() and Path(path).resolve() in written:
            raise PneumoniaCNNError(f"{path}: {flag} names the {written[Path(path).resolve()]} that the run writes in "
                                    f"--out {out}; give another --out")
    held = [name for name in RUN_FILES if (folder / name).exists()]
    if held == ["config.json"] and is_run_config(folder / "config.json"):
        return  # a run stopped in its first epoch: trained again from the start
    if held:
        raise PneumoniaCNNError(f"{display_path(folder / held[0])}: --out holds a file a run writes, but no run (no "
                                f"best.pt or last.pt); training would overwrite it: give another --out")


def refuse_run_in_data(out, data) -> None:
    """A run folder in (or as) the data folder puts its plots among the images: curves.png in train/NORMAL was
    read as an X-ray by the next evaluate."""
    if out and Path(out).exists() and not Path(out).is_dir():  # before the data is read, not after
        raise PneumoniaCNNError(f"{out}: --out is a file; give a folder for the run")
    if not (out and data and Path(data).is_dir()):
        return
    if _resolved(out) == _resolved(data):  # best.pt among the splits: `predict DATA` then took DATA for a model
        raise PneumoniaCNNError(f"{out}: --out is the data folder {data}, which training reads (its checkpoints and "
                                f"plots would sit among the images); choose a folder outside it")
    read = [Path(data) / split for split in ("train", "val", "test") if (Path(data) / split).is_dir()]
    if any(_resolved(out).is_relative_to(_resolved(folder)) for folder in read or [Path(data)]):
        raise PneumoniaCNNError(f"{out}: --out is inside the data folder {data}, which training reads (its plots "
                                f"would join the images); choose a folder outside it")


def refuse_data_in_run(out, data) -> None:
    """A data folder inside the run folder: the run's checkpoints and plots sit above the images, and a folder
    that is both a run and a data set is read as either (``predict``, ``evaluate``). Not for demo, whose folder
    holds its own synthetic data beside its run."""
    if out and data and Path(data).is_dir() and _resolved(data).is_relative_to(_resolved(out)):
        raise PneumoniaCNNError(f"{out}: --out holds the data folder {data}, which training reads (the run's files "
                                f"would sit above the images); choose a folder outside it")


def _resolved(path) -> Path:
    """``path`` with its links followed, to compare folders however they are spelt."""
    try:
        return Path(path).resolve()
    except (OSError, RuntimeError):  # a link loop (RuntimeError before Python 3.13): compared as written
        return Path(os.path.abspath(path))


def demo_arguments(p):
    p.add_argument("--out", default="runs/demo", type=PATH, help="folder for the synthetic data, cache and run")
    p.add_argument("--data", type=PATH, help="a Kaggle-layout ROOT to use instead of synthetic X-rays")
    p.add_argument("--epochs", type=whole_number(1), help="epochs (default 10)")
    p.add_argument("--size", type=whole_number(32, 1024),
                   help="input size (default 96 on synthetic data, 224 on --data)")
    add_device(p)


def run_demo(args) -> int:
    from ..demo import run_demo as demo
    refuse_run_in_data(args.out, args.data)  # before the demo marks its folder there
    summary = demo(args.out, data=args.data, epochs=args.epochs, size=args.size, device=args.device)
    test = summary.get("test_metrics", {})
    print(f"demo finished in {summary['seconds']:.0f}s: test accuracy {test.get('accuracy', float('nan')):.3f}, "
          f"ROC AUC {test.get('roc_auc', float('nan')):.3f}; run folder {summary['run_dir']}")
    if summary.get("examples"):
        from ..predict_io import format_predictions
        print("\nthe built-in model (trained on real pediatric X-rays) on the example X-rays that ship with the "
              "package (file names give the truth):")
        print(format_predictions(summary["examples"], "table"))
    return 0


def summary_arguments(p):
    p.add_argument("--model", default="seed", type=NAME, help="registered model name")
    p.add_argument("--size", type=whole_number(32, 2048), default=224, help="input height and width")
    p.add_argument("--channels", type=int, default=3, choices=(1, 3), help="input channels")


def run_summary(args) -> int:
    from ..models import create_model, format_summary, list_models
    if args.model not in list_models():
        raise PneumoniaCNNError(f"--model {args.model}: unknown model; choose from {', '.join(list_models())}")
    model = create_model(args.model, in_channels=args.channels, image_size=(args.size, args.size))
    print(format_summary(model, args.channels, (args.size, args.size), args.model))
    return 0


def run_models(_args) -> int:
    from ..models import count_parameters, create_model, list_models
    for name, description in list_models().items():
        print(f"{name:<18}{count_parameters(create_model(name))[0]:>12,}  {description}")
    return 0


def samples_arguments(p):
    p.add_argument("--data", required=True, type=PATH, help="Kaggle-layout ROOT or a split folder")
    p.add_argument("--split", default="train", help="which split to draw from")
    p.add_argument("--out", default="samples.png", type=PATH, help="picture to write; its suffix names the format "
                   "(.png, .pdf, .svg, .jpg...)")
    p.add_argument("--per-class", type=whole_number(1, 100), default=6, help="images per class")
    p.add_argument("--seed", type=whole_number(0), default=0, help="which images are drawn")


def run_show_samples(args) -> int:
    from ..samples import check_picture_path, show_samples
    check_output(args.out, args.data)
    check_replaceable(args.out, "samples")  # first: a run's best.pt is refused as that, not as an odd suffix
    check_picture_path(args.out)
    print(f"written: {display_path(show_samples(args.data, args.split, args.out, args.per_class, args.seed))}")
    return 0


COMMANDS = [
    Command("train", "train a model on a Kaggle-layout folder", train_arguments, run_train, (
        "pneumonia-cnn train --data chest_xray --out runs/tutorial",
        "pneumonia-cnn train --data chest_xray --out runs/best --preset best",
        "pneumonia-cnn train --resume runs/best")),
    Command("demo", "the whole pipeline on built-in synthetic X-rays (or --data ROOT)", demo_arguments, run_demo,
            ("pneumonia-cnn demo --out runs/demo",)),
    Command("models", "list the registered models", lambda p: None, run_models, ("pneumonia-cnn models",)),
    Command("summary", "Keras-style table of a model's layers and parameters", summary_arguments, run_summary,
            ("pneumonia-cnn summary --model seed",)),
    Command("show-samples", "grid of NORMAL vs PNEUMONIA images", samples_arguments, run_show_samples,
            ("pneumonia-cnn show-samples --data chest_xray --out samples.png",)),
]

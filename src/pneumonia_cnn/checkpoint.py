"""Self-describing checkpoints: everything inference needs, loaded without running any pickled code.

A checkpoint is a plain dict of tensors, numbers, strings, lists and dicts, saved with ``torch.save`` to a
temporary file and renamed, and read with ``torch.load(weights_only=True)``, which refuses any pickled
object (a crafted file cannot run code on load).
"""
from __future__ import annotations

import errno
import logging
import math
import numbers
import os
from pathlib import Path

import torch

from . import builtin
from .calibration import CALIBRATION_METHODS, parse_threshold_policy
from .data.intensity import INTENSITY_METHODS
from .data.readers import RESAMPLING
from .errors import OTHER_MODEL_FILES, CheckpointError, ConfigError
from .fileio import atomic_path, display_path, load_torch_file, not_a_file_reason, printable

CHECKPOINT_SUFFIXES = (".pt", ".pth")
FORMAT = "pneumonia-cnn/1"
log = logging.getLogger(__name__)


def save_checkpoint(payload: dict, path) -> Path:
    """Written through a Python file: torch's own writer says "unexpected pos" for a failed write (a full disk),
    Python's file raises the OSError, kept as the context of torch's RuntimeError: one line, the system's reason."""
    payload = dict(payload, format=FORMAT)
    try:
        with atomic_path(path) as temporary:
            try:
                with open(temporary, "wb") as handle:
                    torch.save(payload, handle)
            except (OSError, RuntimeError) as error:  # judged while the temporary file still takes its space
                _raise_write_failure(error, Path(path))
    except (OSError, RuntimeError) as error:  # the rename or the flush to disk
        _raise_write_failure(error, Path(path))
    return Path(path)


def _raise_write_failure(error: BaseException, path: Path):
    reason = _write_failure(error, path)
    if reason is None:  # not a write that failed: a bug to show in full
        raise error
    raise CheckpointError(f"{display_path(path)}: {reason}") from None


def _write_failure(error: BaseException, path: Path) -> str | None:
    """The system's reason a checkpoint could not be written (the first OSError among the error and its
    causes), or, for torch's writer error without one, a full disk when there is no space left."""
    seen, depth = error, 0
    while seen is not None and depth < 20:
        if isinstance(seen, OSError):
            return seen.strerror or str(seen) or type(seen).__name__
        seen, depth = seen.__cause__ or seen.__context__, depth + 1
    if not isinstance(error, RuntimeError) or "inline_container" not in str(error):
        return None
    try:
        full = os.statvfs(path.parent).f_bavail == 0
    except (OSError, AttributeError):  # no statvfs on Windows
        full = False
    return os.strerror(errno.ENOSPC) if full else "writing it failed (the file could not be written whole)"


def load_checkpoint(path, map_location="cpu", unfinished_run: bool = False) -> dict:
    """A checkpoint file, a run folder (its best.pt once finished; with ``unfinished_run``, as ``report``
    describes runs in progress, its best.pt, else last.pt, with a warning), or ``builtin`` (the packaged model)."""
    if builtin.is_builtin(path):
        if not builtin.available():
            raise CheckpointError("builtin: the packaged model is missing from this installation (reinstall "
                                  "pneumonia-cnn, or give a checkpoint)")
        path = builtin.checkpoint_path()
    path = Path(path)
    if path.is_dir():
        try:
            path = finished_run_checkpoint(path)
        except CheckpointError as unfinished:
            if not unfinished_run or not any((path / name).is_file() for name in ("best.pt", "last.pt")):
                raise
            log.warning("%s", str(unfinished).split("; finish it")[0])
            path = path / "best.pt" if (path / "best.pt").is_file() else path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{display_path(path)}: {not_a_file_reason(path)}")
    if path.suffix.lower() in OTHER_MODEL_FILES:  # evaluate, stress, drift, compare: torch's words on a zip's layout
        raise CheckpointError(f"{display_path(path)}: {OTHER_MODEL_FILES[path.suffix.lower()]}")
    payload = load_torch_file(path, map_location)
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{display_path(path)}: not a pneumonia-cnn checkpoint (no '{FORMAT}' format tag)")
    try:
        check_checkpoint(payload)
    except _Invalid as invalid:
        raise CheckpointError(f"{display_path(path)}: not a usable checkpoint: {invalid}") from None
    payload["path"] = str(path)
    return payload


def finished_run_checkpoint(folder: Path) -> Path:
    """A run folder's best.pt once its training has finished. One still training, stopped (SIGINT, a crash) or
    short of its end-of-run steps (calibration, threshold, OOD detector) is refused: its weights were served
    with a threshold of 0.5 and no out-of-distribution flag, as if finished. Naming the file itself uses it."""
    best, last = folder / "best.pt", folder / "last.pt"
    if not best.is_file() and not last.is_file():
        raise CheckpointError(f"{display_path(folder)}: run folder has no best.pt or last.pt")
    state = _training_state(last) if last.exists() else {}
    if not best.is_file():
        why = "it has no best.pt yet"
    elif state is None and "decision_fit" not in load_torch_file(best):
        why = "its last.pt is unreadable and its best.pt has no fitted decision"
    elif state and not training_finished(state, state["config"]):
        why = f"it stopped after epoch {state['epoch']} of {state['config']['epochs']}"
    elif state and state.get("train_digest") and "decision_fit" not in load_torch_file(best):
        why = "its end-of-run steps (calibration, threshold, out-of-distribution detector) were not done"
    else:
        return best
    raise CheckpointError(f"{display_path(folder)}: the run has not finished ({why}); finish it with pneumonia-cnn "
                          f"train --resume {display_path(folder)}, or name its best.pt or last.pt to use those "
                          f"weights as they are")


def _training_state(last: Path) -> dict | None:
    """last.pt's training state and config, read without its tensors (memory-mapped); None when it cannot be
    read or its epoch counts are not whole numbers (a damaged or foreign file)."""
    try:
        payload = torch.load(last, map_location="cpu", weights_only=True, mmap=True)
        state = {k: v for k, v in dict(payload["training_state"]).items() if k not in ("optimizer", "ema_state_dict")}
        state["config"] = dict(payload["config"])
    except Exception:  # any damage (truncated, empty, a folder, not a dict): the caller decides from best.pt
        return None
    counts = (state.get("epoch", 0), state.get("epochs_without_improvement", 0), state["config"].get("epochs", 0),
              state["config"].get("early_stopping") or 0)
    return state if all(isinstance(n, int) and not isinstance(n, bool) for n in counts) else None


def training_finished(state: dict, values: dict) -> bool:
    """Whether a last.pt's training state has no epoch left: all trained, or stopped early by --early-stopping."""
    patience = values.get("early_stopping") or 0
    return int(state.get("epoch", 0)) >= int(values.get("epochs", 0)) or bool(
        patience and state.get("epochs_without_improvement", 0) >= patience)


class _Invalid(Exception):
    """One field of a checkpoint that inference cannot use: its dotted name and why."""


def check_checkpoint(payload: dict) -> None:
    """Every field that inference and ``info`` read, checked once, where the file is loaded: required ones
    present, each of the type and in the range the code assumes (optional ones only when present)."""
    _check_model(_field(payload, "model", dict))
    state = _field(payload, "state_dict", dict)
    bad = next((key for key, value in state.items() if not isinstance(key, str) or not torch.is_tensor(value)
                or value.layout != torch.strided or value.is_meta), None)
    if bad is not None:
        raise _Invalid(f"state_dict: entry {_shown(bad)} is not a dense tensor")
    # NaN weights score every image NaN, which no threshold exceeds: all NORMAL, silently
    bad = next((key for key, value in state.items() if value.is_floating_point() and not torch.isfinite(value).all()),
               None)
    if bad is not None:
        raise _Invalid(f"state_dict: entry {_shown(bad)} holds NaN or infinite values (a diverged or damaged model)")
    _check_preprocessing(_field(payload, "preprocessing", dict))
    _check_input_agrees(payload["model"], payload["preprocessing"])
    _check_intended_use(_field(payload, "intended_use", dict, required=False) or {})
    names = _field(payload, "class_names", (list, tuple), required=False)
    if names is not None and (len(names) != 2 or not all(isinstance(n, str) and n for n in names)
                              or names[0] == names[1]):
        raise _Invalid(f"class_names must be a list of two different names, not {_shown(names)}")
    if names is not None and any(printable(n) != n for n in names):  # labels in every output, CSV included
        raise _Invalid(f"class_names must be printable text (no control characters), not {_shown(names)}")
    _field(payload, "tta", bool, required=False)  # the string "no" would have turned test-time flips on
    _check_decision(payload, "")
    if payload.get("decision_adapted"):
        _check_decision(_field(payload, "decision_adapted", dict), "decision_adapted.")
    for name in ("config", "decision_fit"):
        _field(payload, name, dict, required=False)
    _field(payload.get("decision_fit") or {}, "threshold_refit", dict, required=False, prefix="decision_fit.")
    _text(payload, "run_id")  # the model column of predict's outputs: an ESC in it redrew the terminal
    _field(payload, "parameters", numbers.Integral, required=False, nullable=True)
    _field(payload, "epoch", numbers.Integral, required=False, nullable=True)  # info, the report, the SR
    history = _field(payload, "history", list, required=False) or []  # a resumed run extends it and draws its curves
    if not all(isinstance(row, dict) and isinstance(row.get("epoch"), numbers.Integral) for row in history):
        raise _Invalid(f"history must be a list of per-epoch records (each with its epoch), not {_shown(history)}")
    if payload.get("reference"):
        _check_reference(_field(payload, "reference", dict))
    if payload.get("ood"):  # rebuilt, and so checked (its numbers too), by inference.bundle.ood_detector_of
        _field(payload, "ood", dict)


def _field(container: dict, name: str, types, required: bool = True, prefix: str = "", nullable: bool = False):
    """``container[name]`` if it is of ``types``; None for an optional one that is absent, or for a
    ``nullable`` one (a field that the code reads as "not recorded" when None) that is None."""
    if name not in container:
        if required:
            raise _Invalid(f"{prefix}{name} is missing")
        return None
    value = container[name]
    if value is None and nullable:
        return None
    if not isinstance(value, types) or isinstance(value, bool) and bool not in _as_tuple(types):
        wanted = " or ".join(dict.fromkeys(_TYPE_NAMES.get(t, t.__name__) for t in _as_tuple(types)))
        found = "None" if value is None else f"{type(value).__name__} {_shown(value)}"
        raise _Invalid(f"{prefix}{name} must be {wanted}, not {found}")
    return value


def _text(container: dict, name: str, prefix: str = "") -> str | None:
    """An optional string field that outputs print as it is: no control characters, line breaks or
    bidirectional overrides (what ``fileio.printable`` would escape)."""
    value = _field(container, name, str, required=False, prefix=prefix)
    if value is not None and printable(value) != value:
        raise _Invalid(f"{prefix}{name} must be printable text (no control characters), not {_shown(value)}")
    return value


def _finite_values(value, name: str, none_allowed: bool = False) -> torch.Tensor:
    """A number, a list of numbers (None entries skipped where ``none_allowed``) or a tensor, as a tensor whose
    every value is finite: NaN reference scores made drift print "KS nan (p=nan)", NaN OOD values flag all."""
    if isinstance(value, (list, tuple)) and none_allowed:
        value = [v for v in value if v is not None]
    try:
        tensor = value if torch.is_tensor(value) else torch.as_tensor(value, dtype=torch.float64)
        finite = not isinstance(value, bool) and (not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()))
    except (TypeError, ValueError, RuntimeError, OverflowError):  # text, None, ragged lists, meta tensors
        finite = False
    if not finite:
        raise _Invalid(f"{name} must hold finite numbers only, not NaN, infinite or other values")
    return tensor


def _check_model(model: dict) -> None:
    from .models.registry import check_model_kwargs
    name = _field(model, "name", str, prefix="model.")
    kwargs = _field(model, "kwargs", dict, required=False, prefix="model.") or {}
    try:
        check_model_kwargs(name, kwargs)
    except ConfigError as error:
        field = "model.kwargs" if "keyword" in str(error) else "model.name"
        raise _Invalid(f"{field}: {error}") from None


def _check_preprocessing(pre: dict) -> None:
    size = _field(pre, "size", (list, tuple), prefix="preprocessing.")
    if len(size) != 2 or not all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and 16 <= v <= 4096
                                 for v in size):  # the sizes train accepts
        raise _Invalid(f"preprocessing.size must be two whole numbers from 16 to 4096 (height, width), "
                       f"not {_shown(size)}")
    channels = _field(pre, "channels", numbers.Integral, required=False, prefix="preprocessing.")
    if channels is not None and channels not in (1, 3):
        raise _Invalid(f"preprocessing.channels must be 1 or 3, not {_shown(channels)}")
    for name, allowed in (("interpolation", RESAMPLING), ("intensity", INTENSITY_METHODS)):
        value = _field(pre, name, str, required=False, prefix="preprocessing.")
        if value is not None and value not in allowed:
            raise _Invalid(f"preprocessing.{name} {_shown(value)} is not one of {', '.join(allowed)}")
    rescale = _field(pre, "rescale", numbers.Real, required=False, prefix="preprocessing.")
    if rescale is not None and not math.isclose(rescale, 1 / 255, rel_tol=1e-6):  # every path divides by 255:
        # a model that expects another scale would be fed wrong pixels without a word
        raise _Invalid(f"preprocessing.rescale {_shown(rescale)} is not supported (pixels are scaled by 1/255)")


def _check_input_agrees(model: dict, pre: dict) -> None:
    """The input the preprocessing promises is the one the model was built for: ``channels: 3`` on a gray model
    made ``info`` and the report describe an input the model never takes."""
    built = (model.get("kwargs") or {}).get("in_channels")
    channels = pre.get("channels")
    if built is not None and channels is not None and built != channels:
        raise _Invalid(f"preprocessing.channels {_shown(channels)} differs from the model's in_channels "
                       f"{_shown(built)}")


def _check_intended_use(use: dict) -> None:
    ages = _field(use, "age_range_years", (list, tuple), required=False, prefix="intended_use.", nullable=True)
    numeric = all(isinstance(a, numbers.Real) and not isinstance(a, bool) and math.isfinite(a) for a in ages or ())
    if ages is not None and not (len(ages) == 2 and numeric and 0 <= ages[0] <= ages[1]):
        raise _Invalid(f"intended_use.age_range_years must be [min, max] with 0 <= min <= max, not {_shown(ages)}")


def _check_decision(decision: dict, prefix: str) -> None:
    """Threshold, policy, calibration (or the temperature of earlier versions) as ``decision_of`` reads them."""
    threshold = _field(decision, "threshold", numbers.Real, required=False, prefix=prefix)
    # an operating point is an observed probability (0 or 1 included), or the float just above 1
    if threshold is not None and not 0.0 <= threshold <= math.nextafter(1.0, math.inf):
        raise _Invalid(f"{prefix}threshold must be a probability between 0 and 1, not {_shown(threshold)}")
    policy = _field(decision, "threshold_policy", str, required=False, prefix=prefix)
    if policy is not None:
        try:  # as decision_of reads it: an annotation after " (" is a note
            parse_threshold_policy(policy.split(" (")[0].strip() or "0.5")
        except ConfigError:
            raise _Invalid(f"{prefix}threshold_policy {_shown(policy)} is not a threshold policy (a probability, "
                           f"youden, sensitivity:X or specificity:X)") from None
    temperature = _field(decision, "temperature", numbers.Real, required=False, prefix=prefix)
    if temperature is not None and not (math.isfinite(temperature) and temperature > 0):
        raise _Invalid(f"{prefix}temperature must be a positive number, not {_shown(temperature)}")
    if decision.get("calibration"):
        _check_calibration(_field(decision, "calibration", dict, prefix=prefix), f"{prefix}calibration.")


def _check_calibration(calibration: dict, prefix: str) -> None:
    unknown = sorted(str(key) for key in set(calibration) - {"method", "scale", "bias", "prior"})
    if unknown:
        raise _Invalid(f"{prefix[:-1]} has unknown field(s) {', '.join(unknown)}")
    method = _field(calibration, "method", str, required=False, prefix=prefix)
    if method is not None and method not in CALIBRATION_METHODS:
        raise _Invalid(f"{prefix}method {_shown(method)} is not one of {', '.join(CALIBRATION_METHODS)}")
    for name in ("scale", "bias"):
        value = _field(calibration, name, numbers.Real, required=False, prefix=prefix)
        if value is not None and not math.isfinite(value):
            raise _Invalid(f"{prefix}{name} must be a finite number, not {_shown(value)}")
    if calibration.get("scale", 1.0) <= 0:  # the fit never writes one: it would reverse the ranking
        raise _Invalid(f"{prefix}scale must be positive, not {_shown(calibration['scale'])}")
    # the pneumonia rate of the images it was fitted on, which had both classes: 0 or 1 made --prevalence's
    # shift infinite, and outputs stated a prevalence of 0.0 beside a probability of 0.355
    prior = _field(calibration, "prior", numbers.Real, required=False, prefix=prefix, nullable=True)
    if prior is not None and not 0.0 < prior < 1.0:
        raise _Invalid(f"{prefix}prior must be a rate strictly between 0 and 1, not {_shown(prior)}")


def _check_reference(reference: dict) -> None:
    """The validation scores an ensemble refits its decision on, and drift compares against."""
    val = _field(reference, "val", dict, required=False, prefix="reference.", nullable=True) or {}
    scores = _field(val, "raw_scores", (list, tuple), required=False, prefix="reference.val.", nullable=True)
    if scores and not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in scores):
        raise _Invalid("reference.val.raw_scores must be a list of numbers")
    for name in ("raw_scores", "adapted_raw_scores", "ood_scores"):  # an OOD score may be None (not scored)
        if isinstance(val.get(name), (list, tuple)):
            _finite_values(val[name], f"reference.val.{name}", none_allowed=name == "ood_scores")
    labels = _field(val, "labels", (list, tuple), required=False, prefix="reference.val.", nullable=True)
    if labels and not all(v in (0, 1) and not isinstance(v, bool) for v in labels):
        raise _Invalid("reference.val.labels must be a list of 0 (first class) and 1 (second class)")
    for name in ("labels", "fingerprints", "adapted_raw_scores"):
        values = _field(val, name, (list, tuple), required=False, prefix="reference.val.", nullable=True)
        if values and scores is not None and len(values) != len(scores):
            raise _Invalid(f"reference.val.{name} holds {len(values)} values for {len(scores)} raw_scores")
    _field(val, "ood_scores", (list, tuple), required=False, prefix="reference.val.", nullable=True)
    threshold_fit = _field(reference, "threshold_fit", dict, required=False, prefix="reference.") or {}
    _field(threshold_fit, "split", str, required=False, prefix="reference.threshold_fit.")
    prints = _field(threshold_fit, "fingerprints", (list, tuple), required=False, prefix="reference.threshold_fit.")
    if prints and not all(isinstance(v, str) for v in prints):
        raise _Invalid("reference.threshold_fit.fingerprints must be a list of SHA-256 strings")


_TYPE_NAMES = {dict: "a dict", list: "a list", tuple: "a list", str: "a string", bool: "true or false",
               numbers.Real: "a number", numbers.Integral: "a whole number"}


def _as_tuple(types) -> tuple:
    return types if isinstance(types, tuple) else (types,)


def _shown(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:59] + "…"


def build_model(checkpoint: dict) -> torch.nn.Module:
    from .models import create_model
    from .models.registry import state_dict_misfit
    where = display_path(checkpoint.get("path", "?"))
    spec = checkpoint["model"]
    try:
        model = create_model(spec["name"], **dict(spec.get("kwargs") or {}))
    except ConfigError as error:
        raise CheckpointError(f"{where}: {error}") from None
    problem = weights_problem(checkpoint["state_dict"], model.state_dict())
    if problem:
        raise CheckpointError(f"{where}: weights do not fit model {spec['name']} ({problem})")
    try:
        model.load_state_dict(checkpoint["state_dict"])
    except RuntimeError as error:
        raise CheckpointError(f"{where}: weights do not fit model {spec['name']} ({state_dict_misfit(error)})"
                              ) from None
    model.eval()
    return model


def weights_problem(state: dict, expected: dict) -> str | None:
    """What load_state_dict would let through: integer values where the model holds floats (it cast them
    silently, and a probability moved from 0.03 to 0.85). Non-finite weights are refused when the checkpoint is
    validated."""
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or name not in expected:
            continue  # load_state_dict names what is missing or unexpected
        if tensor.is_floating_point() != expected[name].is_floating_point():
            return f"{name} holds {str(tensor.dtype).removeprefix('torch.')} values, the model " \
                   f"{str(expected[name].dtype).removeprefix('torch.')}"
    return None


def load_model(path) -> torch.nn.Module:
    """The trained ``torch.nn.Module`` from a checkpoint (or run folder), in eval mode, on the CPU."""
    return build_model(load_checkpoint(path))


def check_out_name(out, command: str, flag: str = "--out") -> None:
    """``flag`` named as a checkpoint: it was written under any name (a PyTorch checkpoint as ``x.onnx``)."""
    if Path(out).suffix not in CHECKPOINT_SUFFIXES:
        raise ConfigError(f"{display_path(out)}: {command} writes a checkpoint, a file ending in "
                          f"{' or '.join(CHECKPOINT_SUFFIXES)}; give {flag} such a name")

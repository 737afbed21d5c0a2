"""The training configuration, declared once: every field's type, default, allowed values and help text.

``TrainConfig`` is validated when it is built (a one-line error naming the field), the presets are partial
configs on top of its defaults, and the ``train`` command's flags are generated from these fields
(``cli/training.py``), so a flag is defined, validated and used under one name.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
from dataclasses import dataclass, field

from ..calibration import CALIBRATION_METHODS, parse_threshold_policy
from ..data.augment import AugmentConfig
from ..errors import CheckpointError, ConfigError
from ..fileio import display_path
from .config_file import PATH_FIELDS, check_relative_paths, read_config_file

TUTORIAL_AUGMENT = {"shear": 0.2, "zoom": 0.2, "flip": True}
INTERPOLATIONS = ("bilinear", "nearest", "bicubic", "area")
INTENSITIES = ("none", "equalize", "clahe", "window")


def option(default, help: str, choices=None, minimum=None, maximum=None, flag: str | None = None,
           metavar: str | None = None, cli: bool = True, number_as_text: bool = False):
    """A config field: default, help text, allowed values; ``flag``/``metavar`` name its CLI option;
    ``number_as_text``: a text field that a config file may give as a number (YAML's ``threshold: 0.5``)."""
    meta = {"help": help, "choices": choices, "minimum": minimum, "maximum": maximum, "flag": flag,
            "metavar": metavar, "cli": cli, "number_as_text": number_as_text}
    if isinstance(default, (dict, list)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class TrainConfig:
    # data
    data: str = option("", "ROOT with train/ (and val/, test/) of NORMAL/ and PNEUMONIA/, or a CSV of path,label")
    out: str = option("runs/run", "run folder: checkpoints, history, curves")
    val_from_train: float = option(0.0, "carve this fraction of train's patients as the validation split",
                                   minimum=0.0, maximum=0.9)
    min_val_images: int = option(100, "below this many val/ images (Kaggle's has 16) val is carved from train",
                                 minimum=0)
    limit_images: int = option(0, "use only N images per split, drawn at random with --seed (quick runs; 0 = all)",
                               minimum=0)
    cache_dir: str = option("", "where decoded arrays are cached (default: ~/.cache/pneumonia-cnn)")
    workers: int = option(0, "decoding processes for the cache (0 = one per core)", minimum=0)
    # model and input
    model: str = option("seed", "registered model name (pneumonia-cnn models)")
    model_kwargs: dict = option({}, "extra keyword arguments of the model, as JSON", metavar="JSON")
    weights: str = option("", "local weights file to start from (nothing is downloaded)")
    init: str = option("", "start from a trained checkpoint's weights: 'builtin', a .pt file or a run folder; "
                           "the model, input size, channels, interpolation and intensity come from it")
    freeze_stem: bool = option(False, "keep the first convolution block's weights fixed (fine-tuning)")
    size: int = option(224, "input height and width in pixels", minimum=16, maximum=4096)
    channels: int = option(3, "input channels: 3 (gray repeated, as the tutorial) or 1", choices=(1, 3))
    interpolation: str = option("bilinear", "resize filter (Keras' default is nearest)", choices=INTERPOLATIONS)
    intensity: str = option("none", "per-image intensity standardisation", choices=INTENSITIES)
    size_schedule: dict = option({}, "progressive resizing as JSON {size: epochs}: the first epochs train on "
                                     "smaller views of the cache, smallest first, e.g. '{\"128\": 6}'; the other "
                                     "epochs, validation and the checkpoint use --size", metavar="JSON")
    # optimisation
    epochs: int = option(10, "passes over the training images", minimum=1)
    batch_size: int = option(32, "images per step", minimum=1)
    lr: float = option(1e-3, "peak learning rate", minimum=1e-12)
    optimizer: str = option("adam", "adam (Keras' defaults), adamw or sgd (Nesterov momentum 0.9)",
                            choices=("adam", "adamw", "sgd"))
    weight_decay: float = option(0.0, "weight decay (AdamW: decoupled, not on biases or norms)", minimum=0.0)
    schedule: str = option("constant", "learning-rate schedule after warm-up",
                           choices=("constant", "cosine", "onecycle"))
    warmup_epochs: float = option(0.0, "linear warm-up length in epochs", minimum=0.0)
    label_smoothing: float = option(0.0, "targets pulled toward 0.5 by this amount", minimum=0.0, maximum=0.5)
    class_balance: str = option("none", "weights: positive class weighted by the imbalance; sampler: "
                                        "class-balanced sampling", choices=("none", "weights", "sampler"))
    augment: dict = option(dict(TUTORIAL_AUGMENT), "augmentation as JSON, e.g. "
                                                   "'{\"shear\": 0.2, \"zoom\": 0.2, \"flip\": true}'",
                           metavar="JSON")
    ema_decay: float = option(0.0, "exponential moving average of the weights (0 = off)", minimum=0.0,
                              maximum=0.99999)
    # selection and decision
    monitor: str = option("val_loss", "what picks best.pt and drives early stopping",
                          choices=("val_loss", "val_auc"))
    early_stopping: int = option(0, "epochs without improvement before stopping (0 = off)", minimum=0)
    tta: bool = option(False, "average the prediction of the image and its mirror image")
    threshold: str = option("0.5", "operating threshold: a probability, youden, sensitivity:X or "
                                    "specificity:X (chosen on val, never on test)", number_as_text=True)
    calibration: str = option("none", "probability calibration fitted on val: platt (scale and bias), "
                                      "temperature, or none", choices=CALIBRATION_METHODS)
    ood: bool = option(True, "fit the out-of-distribution detector at the end of training")
    ood_quantile: float = option(0.95, "in-distribution quantile of val OOD scores used as the flag threshold",
                                 minimum=0.5, maximum=0.9999)
    # run
    seed: int = option(0, "random seed", minimum=0, maximum=2**32 - 1)  # numpy's: else refused after training
    deterministic: bool = option(False, "bit-reproducible kernels (slower)")
    device: str = option("auto", "auto, cpu, cuda or cuda:N")
    amp: str = option("auto", "reduced precision: auto (bf16 where native, else float32), off or bf16 (no fp16: "
                              "its gradients need loss scaling)", choices=("auto", "off", "bf16"))
    channels_last: bool = option(True, "channels-last memory layout (faster convolutions)")
    compile: bool = option(False, "torch.compile the model")
    cuda_graph: bool = option(False, "replay the training step (forward, backward, optimiser) as one CUDA graph: "
                                     "CUDA, one process, batches of --batch-size (others step eagerly)")
    max_steps_per_epoch: int = option(0, "stop each epoch after N steps (smoke tests, benchmarks; 0 = all)",
                                      minimum=0)
    population: str = option("", "who the training X-rays come from (for the model card)")
    age_range_years: list | None = option(None, "training population's age range in years; DICOM ages outside "
                                                "it are flagged", flag="--age-range", metavar=("MIN", "MAX"))
    tracker: str = option("none", "experiment tracking", choices=("none", "mlflow", "tensorboard"))
    tracking_uri: str = option("", "tracking store (default: inside the run folder)")
    evaluate_test: bool = option(True, "score the test split (when present) at the end")
    progress: bool = option(True, "progress bars")
    preset: str = option("tutorial", "the preset this config started from", cli=False)

    def __post_init__(self):
        for spec in dataclasses.fields(self):
            setattr(self, spec.name, _coerce(spec, getattr(self, spec.name)))
            _check_field(spec, getattr(self, spec.name))
        if not self.out.strip():  # "" would train into the working directory, past the guards of an --out
            raise ConfigError("out: empty; give the run folder")
        if self.freeze_stem and not self.init:
            raise ConfigError("freeze_stem: needs init (the trained weights whose stem stays fixed); without it the "
                              "stem's random weights would be frozen")
        parse_threshold_policy(self.threshold, name="threshold")
        _augment(self.augment)
        self.size_schedule = _size_schedule(self.size_schedule, self.size, self.epochs)
        if self.age_range_years is not None:
            low, high = _age_range(self.age_range_years)
            self.age_range_years = [low, high]
        from ..models import list_models
        if self.model not in list_models():
            raise ConfigError(f"model: unknown model {self.model!r}; choose from {', '.join(list_models())}")
        self._check_model_kwargs()

    def _check_model_kwargs(self):
        """Before any data are read: keywords the model does not take, or that other fields already set."""
        from ..models.registry import check_model_kwargs
        taken = {"in_channels": "channels", "image_size": "size", "weights": "weights"}
        clash = sorted(set(self.model_kwargs) & set(taken))
        if clash:
            raise ConfigError(f"model_kwargs: {', '.join(clash)} come(s) from the field(s) "
                              f"{', '.join(taken[k] for k in clash)}; set those instead")
        try:
            check_model_kwargs(self.model, self.model_kwargs, reserved=tuple(taken))
        except ConfigError as error:
            raise ConfigError(f"model_kwargs: {error}") from None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def size_at(self, epoch: int) -> tuple[int, int]:
        """The training input size of ``epoch`` (0-based) under ``size_schedule`` and the epoch its phase began."""
        start = 0
        for size, epochs in sorted((int(k), v) for k, v in self.size_schedule.items()):
            if epoch < start + epochs:
                return size, start
            start += epochs
        return self.size, start


def _coerce(spec: dataclasses.Field, value):
    """Numbers written as text (YAML reads 1e-3 as a string) or floats with integer values (JSON's 10.0)."""
    kind = str(spec.type)
    if spec.metadata.get("number_as_text") and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    try:
        if kind == "float" and isinstance(value, str):
            return float(value)
        if kind == "int" and isinstance(value, float) and value.is_integer():
            return int(value)
        if kind == "int" and isinstance(value, str) and value.strip().lstrip("-").isdigit():
            return int(value)
    except ValueError:
        pass
    return value


def _check_field(spec: dataclasses.Field, value):
    """Type, allowed values and bounds of one field, from its declaration."""
    name, meta = spec.name, spec.metadata
    expected = {"str": str, "int": int, "float": (int, float), "bool": bool, "dict": dict}.get(str(spec.type))
    if expected is not None and (not isinstance(value, expected) or (expected is not bool and isinstance(value, bool))):
        raise ConfigError(f"{name}: expected {spec.type}, got {value!r}")
    if expected == (int, float) and not math.isfinite(value):  # nan passes every comparison below
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if meta.get("choices") and value not in meta["choices"]:
        raise ConfigError(f"{name}: {value!r} is not one of {', '.join(map(str, meta['choices']))}")
    if meta.get("minimum") is not None and value < meta["minimum"]:
        raise ConfigError(f"{name}: {value!r} is below the minimum {meta['minimum']}")
    if meta.get("maximum") is not None and value > meta["maximum"]:
        raise ConfigError(f"{name}: {value!r} is above the maximum {meta['maximum']}")


def _size_schedule(value: dict, size: int, epochs: int) -> dict:
    try:  # epochs as numbers (a quoted "4" was read, 2.5 cut to 2 and true taken for 1), sizes as JSON's keys
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and v == int(v) for v in value.values()):
            raise TypeError("epochs are not whole numbers")
        schedule = {str(int(k)): int(v) for k, v in value.items()}
    except (TypeError, ValueError, AttributeError, OverflowError):
        raise ConfigError(f"size_schedule: expected {{size: epochs}} with whole numbers, got {value!r}") from None
    if any(not 16 <= int(k) < size or v < 1 for k, v in schedule.items()):
        raise ConfigError(f"size_schedule: sizes must lie in [16, size={size}) and epochs be >= 1, got {value!r}")
    if sum(schedule.values()) >= epochs:
        raise ConfigError(f"size_schedule: {sum(schedule.values())} epochs at smaller sizes leave none of the "
                          f"{epochs} at size {size}")
    return schedule


def _age_range(value) -> tuple[float, float]:
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"age_range_years: expected two numbers [min, max], got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and 0 <= low <= high):  # a checkpoint refuses inf at load
        raise ConfigError(f"age_range_years: need finite 0 <= min <= max, got {value!r}")
    return low, high


KAGGLE_POPULATION = {  # Kermany et al., Cell 2018: the Kaggle set's source
    "population": "children aged 1 to 5 years, anterior-posterior chest X-rays from routine care at Guangzhou "
                  "Women and Children's Medical Center (Kermany et al., 2018)",
    "age_range_years": [1, 5],
}

PRESETS = {
    "tutorial": dict(KAGGLE_POPULATION),  # otherwise the dataclass defaults are the tutorial
    "best": {
        "model": "resnet18_narrow", "size": 192, "channels": 1, "intensity": "equalize",
        "epochs": 24, "batch_size": 32, "lr": 2e-3, "optimizer": "adamw", "weight_decay": 0.05,
        "schedule": "cosine", "warmup_epochs": 1, "label_smoothing": 0.05, "class_balance": "weights",
        # an isotropic scale of +-25% (a random resized crop) covers a 10% tighter collimation on every side
        # (1.25x): with independent x/y zoom alone such a crop cost specificity on the stress panel (README)
        "augment": {"zoom": 0.1, "scale": 0.25, "flip": True, "rotation": 7, "translate": 0.06, "brightness": 0.1,
                    "contrast": 0.25, "gamma": 0.3, "blur_sigma": 2.0, "blur_p": 0.3, "noise": 0.03,
                    "jpeg_quality": 30, "jpeg_p": 0.2},
        "ema_decay": 0.998, "monitor": "val_auc", "early_stopping": 8, "tta": True,
        # the fewest false positives at 95% sensitivity on val: Youden's J is flat on this nearly separable val
        # set and lands on the side that acquisition shifts punish (README, "Models and recipes")
        "threshold": "sensitivity:0.95", "calibration": "platt", **KAGGLE_POPULATION,
    },
}

# ``best`` in about three minutes on 2 CPU cores: 10 epochs instead of 24, with a higher peak learning rate and a
# shorter weight average to suit them (benchmarks/tta_fast.json)
PRESETS["fast"] = dict(PRESETS["best"], epochs=10, lr=3e-3, ema_decay=0.995)

# fine-tuning a trained model (``--init``) on a new site's labelled images: the best recipe with a tenth of
# its learning rate, a warm-up, and early stopping on validation AUC
PRESETS["finetune"] = dict(PRESETS["best"], lr=2e-4, warmup_epochs=1, epochs=30, early_stopping=8,
                           init="builtin")
INIT_FIELDS = ("model", "size", "channels", "interpolation", "intensity")

# fields of configs saved by earlier versions, mapped to today's (old run folders still resume)
LEGACY_FIELDS = {"calibrate": lambda value: {"calibration": "temperature" if value else "none"}}


def upgrade_legacy_fields(values: dict) -> dict:
    values = dict(values)
    for name, convert in LEGACY_FIELDS.items():
        if name in values:
            values.update(convert(values.pop(name)))
    return values


def make_config(preset: str | None = None, config_file: str | None = None, **overrides) -> TrainConfig:
    """Preset (``--preset``, else the config file's ``preset:``, else tutorial), then a YAML/TOML/JSON config
    file, then explicit overrides (the CLI's flags); validated."""
    explicit = upgrade_legacy_fields({k: v for k, v in overrides.items() if v is not None})
    from_file = _config_file_fields(config_file) if config_file else {}
    named = from_file.pop("preset", None)
    if preset is not None and named is not None and named != preset:
        raise ConfigError(f"{display_path(config_file)}: preset: {named!r} differs from --preset {preset}; give one")
    given_by_file = set(from_file) - set(explicit) | ({"preset"} if named is not None and preset is None else set())
    preset = preset or named or "tutorial"
    with _naming_the_file(config_file, given_by_file):
        if preset not in PRESETS:
            raise ConfigError(f"preset: unknown preset {preset!r}; choose from {', '.join(PRESETS)}")
        values = TrainConfig().to_dict()
        values.update(copy.deepcopy(PRESETS[preset]))
        values["preset"] = preset
        values.update(from_file)
        values.update(explicit)
        unknown = set(values) - {spec.name for spec in dataclasses.fields(TrainConfig)}
        if unknown:
            raise ConfigError(f"unknown config field(s): {', '.join(sorted(unknown))}")
        if values.get("init"):  # what the file or the flags say of the model must agree with the checkpoint
            values.update(_fields_of_init(values["init"], {**from_file, **explicit}))
        config = TrainConfig(**values)
        if config.weights:  # else a missing file is found once the data are read, as a checkpoint, not --weights
            _check_weights(config.weights)
        if "device" in given_by_file:  # else found only once the data are read, and said as a flag's ("--device")
            _check_device(config.device)
        check_relative_paths(config_file, {name: values[name] for name in given_by_file & PATH_FIELDS})
    return config


def _check_device(name: str) -> None:
    from ..device import resolve_device
    from ..errors import PneumoniaCNNError
    try:
        resolve_device(name)
    except PneumoniaCNNError as error:
        reason = str(error).split(": ", 1)[-1].replace("--device ", "")  # the file's field, not a flag, is wrong
        raise ConfigError(f"device: {name!r}: {reason}") from None


def _check_weights(path: str) -> None:
    from ..models.registry import read_weights_file
    try:
        read_weights_file(path)
    except CheckpointError as error:
        raise ConfigError(f"weights: {error}") from None


_FIELD_PREFIX = re.compile(r"^(\w+): ")


@contextlib.contextmanager
def _naming_the_file(config_file, from_file: set[str]):
    """A field's error ("epochs: expected int, got 'ten'") names the config file when the file gave the value
    (a flag overrides it): the user must know where to look, the flags or the file."""
    try:
        yield
    except ConfigError as error:
        field_name = _FIELD_PREFIX.match(str(error))
        if config_file and field_name and field_name.group(1) in from_file:
            raise ConfigError(f"{display_path(config_file)}: {error}") from None
        raise


def _config_file_fields(config_file) -> dict:
    """A config file's fields; one it names that no config has is an error naming the file."""
    values = upgrade_legacy_fields(read_config_file(config_file))
    unknown = set(values) - {spec.name for spec in dataclasses.fields(TrainConfig)}
    if unknown:
        raise ConfigError(f"{display_path(config_file)}: unknown config field(s): {', '.join(sorted(unknown))}")
    with _naming_the_file(config_file, set(values)):
        _check_file_values(values)
    return values


def _check_file_values(values: dict) -> None:
    """Each value of a config file on its own, before a flag may override it (``limit_images: -5`` hidden by
    ``--limit-images 40`` went unreported): type, bounds and allowed values; a number given as quoted text
    (TOML's ``lr = "0.01"``, YAML's ``epochs: "1"``) is refused, as ``lr: true`` is."""
    specs = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
    single = {"threshold": lambda v: parse_threshold_policy(v, name="threshold"), "age_range_years": _age_range,
              "augment": _augment}
    for name, value in values.items():
        kind = str(specs[name].type)
        texts = [value] if kind in ("int", "float") else value if kind.startswith("list") and \
            isinstance(value, list) else []
        if any(isinstance(item, str) and _number_text(item) for item in texts):  # 'ten': "expected int" below
            expected = "numbers" if texts is value else kind
            raise ConfigError(f"{name}: expected {expected} (not quoted text), got {value!r}")
        value = _coerce(specs[name], value)
        _check_field(specs[name], value)
        if name in single and value is not None:
            single[name](value)


def _number_text(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def _augment(value) -> None:
    try:
        AugmentConfig.from_dict(value)
    except (TypeError, ValueError) as error:
        raise ConfigError(f"augment: {error}") from None


def _fields_of_init(init: str, explicit: dict) -> dict:
    """Model and input of the checkpoint ``--init`` starts from; a flag that contradicts them is an error."""
    from ..checkpoint import load_checkpoint
    checkpoint = load_checkpoint(init)
    pre = checkpoint["preprocessing"]
    kwargs = {k: v for k, v in checkpoint["model"].get("kwargs", {}).items() if k not in ("in_channels", "image_size")}
    fields = {"model": checkpoint["model"]["name"], "model_kwargs": kwargs, "size": int(pre["size"][0]),
              "channels": int(pre.get("channels", 3)), "interpolation": pre.get("interpolation", "bilinear"),
              "intensity": pre.get("intensity", "none")}
    specs = {spec.name: spec for spec in dataclasses.fields(TrainConfig)}
    for name in INIT_FIELDS:
        if name in explicit and _coerce(specs[name], explicit[name]) != fields[name]:
            raise ConfigError(f"{name}: {explicit[name]!r} differs from the --init checkpoint's {fields[name]!r}")
    return fields


def config_from_dict(values: dict) -> TrainConfig:
    """A saved config (a run's config.json or a checkpoint's ``config``), upgraded from earlier versions."""
    values = upgrade_legacy_fields(values)
    if values.get("amp") == "fp16":  # saved before training dropped float16 (no loss scaling): resumed in float32
        values["amp"] = "off"
    known = {spec.name for spec in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{k: v for k, v in values.items() if k in known})

"""Which out-of-distribution detector catches adults' X-rays: a measured comparison, one command.

    python benchmarks/ood_study.py runs/best/best.pt [--data ../shared/data/chest_xray_224]
        [--adults ../shared/data/adult_xray_dev] [--features-dir /tmp/ood_study] [--out benchmarks/ood_study.json]

Protocol. Every detector is fitted on the ``train`` folder only (80% of it; the other 20%, "calib", sets the
scale of each score when scores are summed). Its threshold is set on the ``val`` folder only, as in training:
``conservative_quantile(val scores, QUANTILE, 0.9)``, so that a new in-distribution X-ray is flagged with
probability at most 1 - QUANTILE, with 90% confidence. Anything chosen with adults' X-rays (a
hyperparameter, which components to sum, a logistic model fitted with adult outliers) is chosen on ONE
source of ``adult_xray_dev`` and reported on the OTHER: the "covid_collection" column of such a row comes
from the variant developed on actualmed, and the reverse. The ``test`` folder is never used to choose.

Columns: % flagged on each adult source, % of ``test`` flagged, ROC AUC of the score for adults vs ``test``
(per source), and the cost in ms per image on top of the forward pass (the taps' extra work in the forward
plus the scoring; CPU, batch 32, this machine's threads).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT / "src"))

from pneumonia_cnn import ood  # noqa: E402
from pneumonia_cnn.checkpoint import build_model, load_checkpoint  # noqa: E402
from pneumonia_cnn.data.cache import build_or_load  # noqa: E402
from pneumonia_cnn.data.dataset import load_split, scan_unlabelled  # noqa: E402
from pneumonia_cnn.data.loader import to_model_input  # noqa: E402

QUANTILE = 0.95
ADULT_SOURCES = ("covid_collection", "actualmed")
REPORTED = ("val", "test", *ADULT_SOURCES)


# ------------------------------------------------------------------ images and features, cached on disk
def load_pixels(checkpoint: dict, data: Path, adults: Path, cache_dir: Path) -> dict:
    """Preprocessed uint8 images (as the model sees them) and labels of every set."""
    pre = checkpoint["preprocessing"]
    size, options = tuple(pre["size"]), dict(interpolation=pre.get("interpolation", "bilinear"),
                                             intensity=pre.get("intensity", "none"), cache_dir=cache_dir)
    sets = {}
    for split in ("train", "val", "test"):
        cached = build_or_load(load_split(data, split), size, **options)
        sets[split] = {"pixels": np.asarray(cached.images), "labels": cached.labels.astype(int)}
    for source in ADULT_SOURCES:
        cached = build_or_load(scan_unlabelled(adults / source), size, **options)
        sets[source] = {"pixels": np.asarray(cached.images), "labels": None}
    return sets


def study_modules(model: torch.nn.Module) -> tuple[list[str], list[str]]:
    """(modules whose pooled features are studied, the subset also given Gram features)."""
    names = dict(model.named_modules())
    if "layer4" in names:  # ResNet: the stem, each stage, and each stage's first block
        main = ["stem", "layer1", "layer2", "layer3", "layer4"]
        return main + [f"layer{i}.0" for i in range(1, 5)], main
    convs = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)][:-1]
    return convs + linears, convs


def study_taps(model) -> list[tuple[str, str]]:
    pooled, gram = study_modules(model)
    taps = [(name, "mean_std") for name in pooled]
    taps += [(name, f"gram{p}") for name in gram for p in (1, 2, 3)]
    taps += [(ood.INPUT_TAP, r) for r in ("thumbnail8", "edge_map24", "thumbnail4", "orientations4")]
    return taps


def load_features(checkpoint_path: Path, sets: dict, features_dir: Path) -> tuple[dict, list]:
    """Features of every tap and the logits, for every set; computed once and kept in ``features_dir``."""
    checkpoint = load_checkpoint(checkpoint_path)
    model = build_model(checkpoint)
    taps = study_taps(model)
    import hashlib
    stamp = hashlib.sha256(repr((checkpoint_path.stat().st_size, checkpoint_path.stat().st_mtime_ns, taps))
                           .encode()).hexdigest()[:16]
    features_dir.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, entry in sets.items():
        path = features_dir / f"{name}-{stamp}.npz"
        if not path.exists():
            started = time.perf_counter()
            features, logits = ood.extract(model, entry["pixels"], taps, "cpu", batch_size=64)
            np.savez(path, logits=logits, **{f"f{i}": f.astype(np.float32) for i, f in enumerate(features)})
            print(f"features of {name}: {len(logits)} images in {time.perf_counter() - started:.0f} s", flush=True)
        stored = np.load(path)
        out[name] = dict(entry, logits=stored["logits"].astype(np.float64),
                         features={tap: stored[f"f{i}"].astype(np.float64) for i, tap in enumerate(taps)})
    return out, taps


def split_train(sets: dict, seed: int = 0) -> dict:
    """train -> fit (80%) and calib (20%): detectors are fitted on fit; calib sets each score's scale."""
    train = sets.pop("train")
    order = np.random.default_rng(seed).permutation(len(train["logits"]))
    cut = len(order) // 5

    def part(index):
        index = np.sort(index)
        return {"pixels": train["pixels"][index], "labels": train["labels"][index], "logits": train["logits"][index],
                "features": {tap: f[index] for tap, f in train["features"].items()}}
    return {"fit": part(order[cut:]), "calib": part(order[:cut]), **sets}


# ------------------------------------------------------------------ the detectors: scores for every set but fit
class Timed:
    """Scores of every set but ``fit``; the scoring time per image is measured on the ``test`` set."""

    def __init__(self, sets):
        self.sets, self.seconds_per_image = sets, {}

    def __call__(self, name, score_fn) -> dict:
        out = {}
        for set_name, entry in self.sets.items():
            if set_name == "fit":
                continue
            times = []
            for _ in range(3 if set_name == "test" and not name.startswith("perturbed") else 1):
                started = time.perf_counter()
                out[set_name] = np.asarray(score_fn(entry), dtype=np.float64)
                times.append(time.perf_counter() - started)
            if set_name == "test":  # the fastest of three: the least disturbed by other work on the machine
                self.seconds_per_image[name] = min(times) / len(entry["logits"])
        return out


def standardise(scores: dict) -> dict:
    """(score - median) / interquartile range, both on calib (train images kept out of the fit)."""
    low, centre, high = np.percentile(scores["calib"], (25, 50, 75))
    return {name: (value - centre) / max(high - low, 1e-12) for name, value in scores.items()}


def mean_of(score_dicts: list[dict]) -> dict:
    return {name: np.mean([s[name] for s in score_dicts], axis=0) for name in score_dicts[0]}


def fisher_of(score_dicts: list[dict]) -> dict:
    """Fisher's method, as the shipped detector combines: -2 log of each score's upper-tail p-value among
    calib (ood.OODDetector._evidence), summed."""
    total = {name: 0.0 for name in score_dicts[0]}
    for scores in score_dicts:
        component = {"calibration": np.sort(scores["calib"])}
        for name, values in scores.items():
            total[name] = total[name] + ood.OODDetector._evidence(component, np.asarray(values, dtype=np.float64))
    return total


def gaussian(timed, tap, by_class=True, name=None) -> dict:
    fit = timed.sets["fit"]
    model = ood.GaussianScore.fit(fit["features"][tap], fit["labels"] if by_class else None)
    return timed(name or f"gaussian {tap}", lambda e: model.score(e["features"][tap]))


def penultimate(entry, tap) -> np.ndarray:
    """The head's input: the channel means of the last feature layer (after ReLU for a dense layer)."""
    values = entry["features"][tap]
    return np.maximum(values, 0) if tap[0].startswith("fc") else values[:, : values.shape[1] // 2]


def knn(timed, tap, k) -> dict:
    model = ood.NeighbourScore.fit(penultimate(timed.sets["fit"], tap), k)
    return timed(f"knn k={k}", lambda e: model.score(penultimate(e, tap)))


def energy(timed) -> dict:
    # binary head: the two-class logits are (0, z); energy = -logsumexp(0, z) = -softplus(z)
    return timed("energy", lambda e: -np.logaddexp(0, e["logits"]))


def vim(timed, tap, head: torch.nn.Linear, dimension: int) -> dict:
    """ViM (Wang et al., 2022): the norm of the features outside their principal subspace, as a virtual
    logit scaled to the real ones, minus the energy."""
    weight = head.weight.detach().double().numpy()
    origin = -np.linalg.pinv(weight) @ head.bias.detach().double().numpy()
    fit = penultimate(timed.sets["fit"], tap) - origin
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(fit, rowvar=False))
    residual_space = eigenvectors[:, np.argsort(eigenvalues)[::-1][dimension:]]
    alpha = np.maximum(timed.sets["fit"]["logits"], 0).mean() / np.linalg.norm(fit @ residual_space, axis=1).mean()

    def score(entry):
        virtual = alpha * np.linalg.norm((penultimate(entry, tap) - origin) @ residual_space, axis=1)
        return virtual - np.logaddexp(0, entry["logits"])
    return timed(f"vim D={dimension}", score)


def gram(timed, modules, orders=(1, 2, 3)) -> dict:
    """Gram-matrix deviations (Sastry and Oore, 2020): per predicted class, how far each Gram feature falls
    outside its range on the fit images, per layer normalised by the mean deviation on calib."""
    fit = timed.sets["fit"]
    predicted = fit["logits"] > 0
    bounds = {(m, p): [(fit["features"][(m, f"gram{p}")][predicted == c].min(0),
                        fit["features"][(m, f"gram{p}")][predicted == c].max(0)) for c in (False, True)]
              for m in modules for p in orders}

    def layer_deviation(entry, module):
        total = np.zeros(len(entry["logits"]))
        for p in orders:
            values, positive = entry["features"][(module, f"gram{p}")], (entry["logits"] > 0)[:, None]
            (low_0, high_0), (low_1, high_1) = bounds[(module, p)]
            low, high = np.where(positive, low_1, low_0), np.where(positive, high_1, high_0)
            below = np.maximum(low - values, 0) / (np.abs(low) + 1e-6)
            above = np.maximum(values - high, 0) / (np.abs(high) + 1e-6)
            total += (below + above).sum(1)
        return total
    scale = {m: max(layer_deviation(timed.sets["calib"], m).mean(), 1e-12) for m in modules}
    return timed("gram", lambda e: sum(layer_deviation(e, m) / scale[m] for m in modules))


def legacy(timed, layers, quantile) -> tuple[dict, float]:
    """Today's detector, refitted by today's recipe: Gaussians on the pooled features with a fixed 10%
    shrinkage, each layer standardised on val and averaged; its threshold from val at ``quantile``."""
    fit = timed.sets["fit"]
    labels = fit["labels"]
    per_layer = []
    for layer in layers:
        tap = (layer, "mean_std")
        features = fit["features"][tap]
        means = np.stack([features[labels == c].mean(0) for c in (0, 1)])
        centred = np.concatenate([features[labels == c] - means[c] for c in (0, 1)])
        covariance = centred.T @ centred / (len(centred) - 1)
        covariance = 0.9 * covariance + 0.1 * np.eye(len(covariance)) * np.trace(covariance) / len(covariance)
        model = ood.GaussianScore(means, np.linalg.pinv(covariance))
        raw = timed(f"legacy {layer}", lambda e, m=model, t=tap: m.score(e["features"][t]))
        low, centre, high = np.percentile(raw["val"], (25, 50, 75))
        per_layer.append({n: (v - centre) / (high - low) for n, v in raw.items()})
    scores = mean_of(per_layer)
    return scores, ood.conservative_quantile(scores["val"], quantile)


def perturbed_gaussian(timed, model, layers, epsilons, batch_size=64) -> dict:
    """Lee et al. (2018)'s input perturbation: move the image by epsilon * sign of the gradient that brings
    it closer to the training Gaussians, then score it; per epsilon, the layers' standardised mean."""
    fit = timed.sets["fit"]
    taps = [(layer, "mean_std") for layer in layers]
    models = [ood.GaussianScore.fit(fit["features"][t], fit["labels"]) for t in taps]
    scales = [np.subtract(*np.percentile(m.score(timed.sets["calib"]["features"][t]), (75, 25)))
              for m, t in zip(models, taps)]
    means = [torch.tensor(m.means, dtype=torch.float32) for m in models]
    precisions = [torch.tensor(m.precision, dtype=torch.float32) for m in models]
    tapped = ood.TappedModel(model.eval(), taps)

    def perturbed_features(pixels, epsilon):
        outputs = [[] for _ in taps]
        for start in range(0, len(pixels), batch_size):
            x = to_model_input(torch.from_numpy(np.array(pixels[start:start + batch_size])), "cpu").requires_grad_(True)
            _, features = tapped(x)
            objective = 0
            for f, mu, precision, scale in zip(features, means, precisions, scales):
                delta = f.unsqueeze(1) - mu.unsqueeze(0)
                distance = torch.einsum("bkd,de,bke->bk", delta, precision, delta).min(1).values
                objective = objective + distance.clamp_min(0).sqrt().sum() / scale
            (gradient,) = torch.autograd.grad(objective, x)
            with torch.no_grad():
                _, features = tapped((x - epsilon * gradient.sign()).clamp(0, 1))
            for store, f in zip(outputs, features):
                store.append(f.double().numpy())
        return [np.concatenate(o) for o in outputs]

    out = {}
    for epsilon in epsilons:
        def score(entry, epsilon=epsilon):
            features = perturbed_features(entry["pixels"], epsilon)
            return np.mean([m.score(f) / s for m, f, s in zip(models, features, scales)], axis=0)
        out[epsilon] = standardise(timed(f"perturbed eps={epsilon}", score))
    tapped.remove_hooks()
    return out


# ------------------------------------------------------------------ measuring, choosing on one source
def measure(scores: dict, threshold: float | None = None) -> dict:
    """Flag rates at the val threshold and ROC AUCs (each adult source vs test)."""
    threshold = ood.conservative_quantile(scores["val"], QUANTILE) if threshold is None else threshold
    out = {"threshold": float(threshold)}
    for name in REPORTED:
        out[f"flagged_{name}"] = float(np.mean(scores[name] > threshold))
    for source in ADULT_SOURCES:
        labels = np.r_[np.zeros(len(scores["test"])), np.ones(len(scores[source]))]
        out[f"auc_{source}"] = float(roc_auc_score(labels, np.r_[scores["test"], scores[source]]))
    return out


def dev_merit(scores: dict, dev: str) -> tuple[float, float]:
    """What a choice on the development source looks at: its flag rate at the val threshold, then the ROC
    AUC of the dev source against calib (train images kept out of the fit; never test)."""
    threshold = ood.conservative_quantile(scores["val"], QUANTILE)
    labels = np.r_[np.zeros(len(scores["calib"])), np.ones(len(scores[dev]))]
    return float(np.mean(scores[dev] > threshold)), float(roc_auc_score(labels, np.r_[scores["calib"], scores[dev]]))


def other(source: str) -> str:
    return ADULT_SOURCES[1 - ADULT_SOURCES.index(source)]


def cross_source(variants_by_dev: dict) -> dict:
    """A row whose adult columns come from the variant developed on the other source."""
    by_reported = {other(dev): (label, measure(scores)) for dev, (label, scores) in variants_by_dev.items()}
    row = {"chosen": {f"developed on {other(s)}": label for s, (label, _) in by_reported.items()}}
    for source, (_, metrics) in by_reported.items():
        row[f"flagged_{source}"], row[f"auc_{source}"] = metrics[f"flagged_{source}"], metrics[f"auc_{source}"]
    row["flagged_test"] = [by_reported[s][1]["flagged_test"] for s in ADULT_SOURCES]
    row["flagged_val"] = [by_reported[s][1]["flagged_val"] for s in ADULT_SOURCES]
    return row


def tune(candidates: dict) -> dict:
    """Each source picks the candidate that flags most of it (cross_source then reports it on the other)."""
    return {dev: max(candidates.items(), key=lambda item: dev_merit(item[1], dev)) for dev in ADULT_SOURCES}


def greedy_sum(pool: dict, dev: str, most: int = 4, combine=fisher_of) -> tuple[str, dict]:
    """Forward selection on ``dev`` of scores to combine (stops when nothing adds)."""
    chosen, best = [], (-1.0, -1.0)
    while len(chosen) < most:
        trials = {name: combine([pool[c] for c in chosen + [name]]) for name in pool if name not in chosen}
        if not trials:
            break
        name, scores = max(trials.items(), key=lambda item: dev_merit(item[1], dev))
        merit = dev_merit(scores, dev)
        if merit <= best:
            break
        chosen, best = chosen + [name], merit
    return " + ".join(chosen), combine([pool[c] for c in chosen])


def outlier_exposure(pool: dict, dev: str) -> tuple[str, dict]:
    """A logistic model on the standardised scores, fitted on calib (in distribution) against the dev source."""
    names = sorted(pool)
    stack = {set_name: np.stack([pool[n][set_name] for n in names], axis=1) for set_name in pool[names[0]]}
    model = LogisticRegression(C=1.0, class_weight="balanced", max_iter=2000)
    model.fit(np.r_[stack["calib"], stack[dev]], np.r_[np.zeros(len(stack["calib"])), np.ones(len(stack[dev]))])
    return "logistic on all scores", {name: model.decision_function(x) for name, x in stack.items()}


# ------------------------------------------------------------------ cost on top of the forward pass
def forward_ms(model, taps, size, batch=32, repeats=15) -> tuple[float, float]:
    """(ms per image of the bare forward, extra ms per image with ``taps``): bare and tapped forwards
    alternate and the fastest of each counts, so that other work on the machine does not land on one side."""
    tapped = ood.TappedModel(model.eval(), taps)
    x = torch.rand(batch, 1, *size)
    bare, with_taps = [], []
    with torch.inference_mode():
        model(x), tapped(x)
        for _ in range(repeats):
            started = time.perf_counter()
            model(x)
            middle = time.perf_counter()
            tapped(x)
            bare.append(middle - started), with_taps.append(time.perf_counter() - middle)
    tapped.remove_hooks()
    return 1000 * min(bare) / batch, max(1000 * (min(with_taps) - min(bare)) / batch, 0.0)


def cost_ms(model, size, taps, scoring_names, timed) -> float:
    extra_forward = forward_ms(model, taps, size)[1] if taps else 0.0
    return extra_forward + 1000 * sum(timed.seconds_per_image.get(n, 0.0) for n in scoring_names)


# ------------------------------------------------------------------ the study
def neighbours(timed, tap, k=10, name=None) -> dict:
    fit = timed.sets["fit"]
    model = ood.NeighbourScore.fit(fit["features"][tap], k)
    return timed(name or f"knn {tap}", lambda e: model.score(e["features"][tap]))


def base_detectors(timed, model) -> tuple[dict, dict, dict]:
    """Standardised scores of each single detector (the pool that combinations draw from), their taps, and
    the names their scoring times are kept under."""
    pooled, gram_modules = study_modules(model)
    last = (ood.penultimate_layer(model), "mean_std")
    pool, used, timers = {}, {}, {}

    def put(name, scores, taps, timer):
        pool[name], used[name], timers[name] = standardise(scores), taps, timer
    for module in pooled:
        tap = (module, "mean_std")
        put(f"Mahalanobis {module}", gaussian(timed, tap), [tap], f"gaussian {tap}")
        put(f"k-NN {module}", neighbours(timed, tap), [tap], f"knn {tap}")
    thumbnail, edges = (ood.INPUT_TAP, "thumbnail8"), (ood.INPUT_TAP, "edge_map24")
    put("Gaussian thumbnail", gaussian(timed, thumbnail, by_class=False), [thumbnail], f"gaussian {thumbnail}")
    put("k-NN thumbnail", neighbours(timed, thumbnail), [thumbnail], f"knn {thumbnail}")
    put("k-NN edge map", neighbours(timed, edges), [edges], f"knn {edges}")
    coarse, orientations = (ood.INPUT_TAP, "thumbnail4"), (ood.INPUT_TAP, "orientations4")
    put("k-NN 4x4 thumbnail", neighbours(timed, coarse), [coarse], f"knn {coarse}")
    put("k-NN orientations", neighbours(timed, orientations), [orientations], f"knn {orientations}")
    put("k-NN penultimate", knn(timed, last, 10), [last], "knn k=10")
    put("energy", energy(timed), [], "energy")
    put("Gram", gram(timed, gram_modules), [(m, f"gram{p}") for m in gram_modules for p in (1, 2, 3)], "gram")
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    put("ViM", vim(timed, last, head, head.in_features // 2), [last], f"vim D={head.in_features // 2}")
    return pool, used, timers


def shipped(checkpoint_path, sets, model) -> tuple[dict, object, float]:
    """The detector that ``ood.py`` ships, fitted by its own code on all of train, threshold on val."""
    train = {key: np.concatenate([sets["fit"][key], sets["calib"][key]]) for key in ("pixels", "labels", "logits")}
    taps = ood.default_taps(model)

    def features_of(entry):
        return [entry["features"][tap] if tap in entry["features"] else derive(entry, tap) for tap in taps]
    train["features"] = [np.concatenate([a, b]) for a, b in zip(features_of(sets["fit"]), features_of(sets["calib"]))]
    val = dict(sets["val"], features=features_of(sets["val"]))
    detector = ood.OODDetector.fit(model, train, val, quantile=QUANTILE, seed=0)
    started = time.perf_counter()
    scores = {name: detector.score(features_of(e), e["logits"], e["pixels"]) for name, e in sets.items()
              if name != "fit"}
    seconds = (time.perf_counter() - started) / sum(len(e["logits"]) for n, e in sets.items() if n != "fit")
    return scores, detector, seconds


def derive(entry, tap):
    """A tap's features from the study's ones (the channel means are the first half of mean_std)."""
    module, reduction = tap
    if reduction == "mean":
        values = entry["features"][(module, "mean_std")]
        return values if module.startswith("fc") else values[:, : values.shape[1] // 2]
    raise KeyError(tap)


def study_rows(checkpoint_path, checkpoint, sets, model, perturbation: bool = True) -> list[dict]:
    timed = Timed(sets)
    size = tuple(checkpoint["preprocessing"]["size"])
    base_ms = forward_ms(model, [], size)[0]
    rows = []

    def add(name, measured, row_taps, scoring, note=""):
        row = measured if {"chosen", "threshold"} & set(measured) else measure(measured)
        rows.append(dict(row, method=name, note=note, cost_ms=cost_ms(model, size, row_taps, scoring, timed),
                         forward_ms=base_ms))
        print(format_row(rows[-1]), flush=True)

    layers = list(getattr(model, "feature_layers", None) or [])
    legacy_taps = [(layer, "mean_std") for layer in layers]
    if checkpoint.get("ood") and "version" not in checkpoint["ood"]:
        stored = ood.OODDetector.from_state(checkpoint["ood"])
        scores = timed("stored", lambda e: stored.score([e["features"][t] for t in stored.taps]))
        add("current multi-layer Mahalanobis, as stored in the checkpoint (its own 97.5% quantile)",
            measure(scores, stored.threshold), stored.taps, ["stored"])
    scores, threshold = legacy(timed, layers, QUANTILE)
    add("current multi-layer Mahalanobis, today's recipe refitted", measure(scores, threshold), legacy_taps,
        [f"legacy {layer}" for layer in layers])
    pool, used, timers = base_detectors(timed, model)

    def add_pool(title, names, note="", combine=mean_of):
        add(title, combine([pool[n] for n in names]), sorted({t for n in names for t in used[n]}),
            [timers[n] for n in names], note)
    add_pool("multi-layer Mahalanobis, Ledoit-Wolf shrinkage, scaled on train",
             [f"Mahalanobis {layer}" for layer in layers])
    if perturbation:
        perturbed = perturbed_gaussian(timed, model, layers, (0.0005, 0.001, 0.002, 0.004))
        add("Mahalanobis with input perturbation (Lee et al. 2018; epsilon chosen on the other source)",
            cross_source(tune({f"eps={e}": s for e, s in perturbed.items()})), legacy_taps,
            [f"perturbed eps={e}" for e in perturbed], note="cost: one eps; a backward pass and a 2nd forward")
        rows[-1]["cost_ms"] = rows[-1]["cost_ms"] / len(perturbed) - base_ms  # one epsilon, less the shared forward
    add_pool("energy score (Liu et al. 2020)", ["energy"])
    last = (ood.penultimate_layer(model), "mean_std")
    by_k = {f"k={k}": standardise(knn(timed, last, k)) for k in (1, 5, 10, 50)}
    add("deep k-NN, normalised penultimate features (Sun et al. 2022; k chosen on the other source)",
        cross_source(tune(by_k)), [last], ["knn k=10"])
    add_pool("Gram-matrix deviations (Sastry & Oore 2020)", ["Gram"])
    add_pool("ViM (Wang et al. 2022), principal subspace = half the features", ["ViM"])
    pooled_modules, _ = study_modules(model)
    for family in ("Mahalanobis", "k-NN"):
        add_pool(f"feature ensemble: {family} over {len(pooled_modules)} layers ({', '.join(pooled_modules)})",
                 [f"{family} {m}" for m in pooled_modules])
    add_pool("model-free: Gaussian on the 8 x 8 thumbnail", ["Gaussian thumbnail"])
    add_pool("model-free: k-NN on the 8 x 8 thumbnail", ["k-NN thumbnail"])
    add_pool("model-free: k-NN on the 24 x 24 edge map", ["k-NN edge map"])
    add_pool("model-free: k-NN on thumbnail + edge map (mean of standardised scores)",
             ["k-NN thumbnail", "k-NN edge map"])
    add_pool("model-free: k-NN on thumbnail + edge map (Fisher's method)", ["k-NN thumbnail", "k-NN edge map"],
             combine=fisher_of)
    add_pool("model-free: k-NN on the 4 x 4 thumbnail", ["k-NN 4x4 thumbnail"])
    add_pool("model-free: k-NN on the edges' orientations in 4 x 4 blocks (coarse HOG)", ["k-NN orientations"])
    add_pool("model-free: k-NN on 4 x 4 thumbnail + orientations (Fisher's method)",
             ["k-NN 4x4 thumbnail", "k-NN orientations"], combine=fisher_of)
    last_layer = f"k-NN {ood.penultimate_layer(model)}"
    add_pool("k-NN on last layer + thumbnail + edge map, mean of standardised scores",
             [last_layer, "k-NN thumbnail", "k-NN edge map"])
    add_pool("shipped until 2026-11-26: k-NN on last layer + 8 x 8 thumbnail + edge map, Fisher's method",
             [last_layer, "k-NN thumbnail", "k-NN edge map"], combine=fisher_of)
    add_pool("k-NN on last layer + 4 x 4 thumbnail + orientations, mean of standardised scores",
             [last_layer, "k-NN 4x4 thumbnail", "k-NN orientations"])
    # the energy of a one-logit head is a monotone function of the logit: it flags by predicted class and
    # confidence, not by population, so combinations leave it out
    candidates = {name: scores for name, scores in pool.items() if name != "energy"}
    greedy = {dev: greedy_sum(candidates, dev) for dev in ADULT_SOURCES}
    chosen_taps = sorted({t for label, _ in greedy.values() for part in label.split(" + ") for t in used[part]})
    chosen = sorted({part for label, _ in greedy.values() for part in label.split(" + ")})
    add("Fisher's method on components chosen greedily on the other source", cross_source(greedy),
        chosen_taps, [timers[c] for c in chosen], note="cost: the union of both directions' components")
    scores, detector, seconds = shipped(checkpoint_path, sets, model)
    timed.seconds_per_image["shipped"] = seconds
    add("shipped: k-NN on last layer + 4 x 4 thumbnail + orientations, Fisher's method",
        measure(scores, detector.threshold),
        detector.taps, ["shipped"], note=f"OODDetector.fit on all of train, threshold on val: {ood.METHOD}")
    rows[-1]["by_quantile"] = {str(q): measure(scores, ood.conservative_quantile(scores["val"], q))
                               for q in (0.95, 0.96, 0.97, 0.975)}
    add("outlier exposure: logistic model on all detectors' scores, fitted with the other source",
        cross_source({dev: outlier_exposure(candidates, dev) for dev in ADULT_SOURCES}),
        sorted({t for n in candidates for t in used[n]}), [timers[n] for n in candidates])
    return rows


def percent(value) -> str:
    if isinstance(value, list):
        return " / ".join(f"{v:.1%}" for v in value) if len(set(value)) > 1 else f"{value[0]:.1%}"
    return f"{value:.1%}"


def format_row(row: dict) -> str:
    return (f"| {row['method']} | {percent(row['flagged_covid_collection'])} | {percent(row['flagged_actualmed'])} | "
            f"{percent(row['flagged_test'])} | {row['auc_covid_collection']:.3f} / {row['auc_actualmed']:.3f} | "
            f"{row['cost_ms']:.2f} |")


HEADER = ("| detector | covid_collection flagged | actualmed flagged | shared test flagged | "
          "AUROC vs test (covid / actualmed) | ms/image on top of the forward |\n|---|---:|---:|---:|---:|---:|")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path)
    parser.add_argument("--data", type=Path, default=PROJECT.parent / "shared" / "data" / "chest_xray_224")
    parser.add_argument("--adults", type=Path, default=PROJECT.parent / "shared" / "data" / "adult_xray_dev")
    parser.add_argument("--cache-dir", type=Path, default=None, help="the image cache (default: the usual one)")
    parser.add_argument("--features-dir", type=Path, default=Path("/tmp/pneumonia-cnn-ood-study"))
    parser.add_argument("--out", type=Path, default=PROJECT / "benchmarks" / "ood_study.json")
    parser.add_argument("--no-perturbation", action="store_true",
                        help="skip the slowest row (a backward pass per image)")
    args = parser.parse_args()
    torch.manual_seed(0)
    checkpoint = load_checkpoint(args.checkpoint)
    model = build_model(checkpoint).eval()
    sets = load_pixels(checkpoint, args.data, args.adults, args.cache_dir)
    features, _ = load_features(args.checkpoint, sets, args.features_dir / checkpoint.get("run_id", "run"))
    sets = split_train(features)
    print(f"{checkpoint['model']['name']} {tuple(checkpoint['preprocessing']['size'])}, threshold: "
          f"conservative_quantile(val, {QUANTILE}, confidence 0.9); torch threads {torch.get_num_threads()}")
    print(HEADER)
    rows = study_rows(args.checkpoint, checkpoint, sets, model, not args.no_perturbation)
    args.out.write_text(json.dumps({"checkpoint": str(args.checkpoint), "model": checkpoint["model"]["name"],
                                    "size": checkpoint["preprocessing"]["size"], "quantile": QUANTILE,
                                    "confidence": 0.9, "rows": rows}, indent=2) + "\n")
    print(f"written: {args.out}")


if __name__ == "__main__":
    main()

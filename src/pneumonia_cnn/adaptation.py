"""``adapt``: prepare a trained model for a new site before use.

1. AdaBN (Li et al., 2016): batch-norm statistics re-estimated on the site's unlabelled images.
2. With ``labelled`` (LABELLED_DIR/NORMAL, LABELLED_DIR/PNEUMONIA, a few dozen each): a patient-level part
   is kept out for the verdict; the rest fine-tunes the model with L2-SP regularisation (weights pulled
   toward the trained ones), a small learning rate and batch norm frozen at the adapted statistics. The
   number of epochs is chosen by k-fold cross-validation on the fine-tuning part (0 epochs is allowed:
   then nothing is fine-tuned); temperature and threshold are refitted on the out-of-fold predictions.
3. The out-of-distribution model and its threshold are refitted on the site's images.
4. Before/after ROC AUC with 95% intervals on the kept-out part, and a plain verdict: the adapted model is
   never silently worse.
"""
from __future__ import annotations

import copy
import logging

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedGroupKFold

from .calibration import choose_threshold, fit_temperature
from .checkpoint import build_model, load_checkpoint, save_checkpoint
from .data.augment import AugmentConfig, augment_batch
from .data.cache import build_or_load
from .data.dataset import load_split, scan_unlabelled
from .data.loader import to_model_input
from .device import resolve_device
from .errors import PneumoniaCNNError
from .evaluation.metrics import bootstrap_metrics
from .fileio import display_path
from .ood import OODDetector

log = logging.getLogger(__name__)
FINE_TUNE_AUGMENT = AugmentConfig(zoom=0.1, flip=True, rotation=5, contrast=0.15, brightness=0.05)


def has_batch_norm(model) -> bool:
    return any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())


def adabn(model, images: np.ndarray, device, batch_size: int = 32) -> int:
    """Re-estimate every batch-norm layer's running mean and variance on ``images``; returns layers reset."""
    layers = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not layers:
        return 0
    momenta = [m.momentum for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # cumulative average over all batches
    model.eval()
    for layer in layers:
        layer.train()
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            model(to_model_input(torch.from_numpy(np.array(images[start:start + batch_size])), device))
    for layer, momentum in zip(layers, momenta):
        layer.momentum = momentum
    model.eval()
    return len(layers)


def logits_of(model, images, device, batch_size=64) -> np.ndarray:
    model.eval()
    out = []
    with torch.no_grad():
        for start in range(0, len(images), batch_size):
            out.append(model(to_model_input(torch.from_numpy(np.array(images[start:start + batch_size])), device)).cpu())
    return torch.cat(out).numpy().astype(np.float64) if out else np.zeros(0)


def fine_tune(model, images, labels, device, epochs: int, lr: float = 3e-4, l2sp: float = 0.01, seed: int = 0,
              batch_size: int = 16, evaluate=None):
    """Fine-tune in place; ``evaluate(model, epoch)`` is called after each epoch (for cross-validation)."""
    anchor = [p.detach().clone() for p in model.parameters()]
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(seed)
    rng = np.random.default_rng(seed)
    positives = max(float(np.mean(labels)), 1e-3)
    pos_weight = torch.tensor((1 - positives) / positives, device=device)
    for epoch in range(1, epochs + 1):
        model.train()
        for module in model.modules():  # keep the adapted batch-norm statistics
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        order = rng.permutation(len(labels))
        for start in range(0, len(order), batch_size):
            chosen = np.sort(order[start:start + batch_size])
            x = augment_batch(to_model_input(torch.from_numpy(np.array(images[chosen])), device), FINE_TUNE_AUGMENT,
                              generator)
            y = torch.as_tensor(labels[chosen], dtype=torch.float32, device=device)
            loss = F.binary_cross_entropy_with_logits(model(x), y, pos_weight=pos_weight)
            penalty = sum(((p - a) ** 2).sum() for p, a in zip(model.parameters(), anchor))
            optimiser.zero_grad(set_to_none=True)
            (loss + l2sp * penalty).backward()
            optimiser.step()
        if evaluate:
            evaluate(model, epoch)
    model.eval()
    return model


def choose_epochs(base_model, images, labels, groups, device, max_epochs: int, folds: int, seed: int):
    """Cross-validated AUC after each epoch (0 = no fine-tuning); returns the best epoch and out-of-fold logits."""
    folds = max(2, min(folds, int(min(np.bincount(labels)))))
    splitter = StratifiedGroupKFold(n_splits=folds, shuffle=True, random_state=seed)
    oof = np.zeros((max_epochs + 1, len(labels)))
    for train_idx, test_idx in splitter.split(np.zeros(len(labels)), labels, groups):
        model = copy.deepcopy(base_model)
        oof[0, test_idx] = logits_of(model, images[test_idx], device)

        def record(m, epoch, test_idx=test_idx):
            oof[epoch, test_idx] = logits_of(m, images[test_idx], device)
        fine_tune(model, images[train_idx], labels[train_idx], device, max_epochs, seed=seed, evaluate=record)
    aucs = [float(roc_auc_score(labels, oof[e])) for e in range(max_epochs + 1)]
    best = int(np.argmax(aucs))
    if aucs[best] - aucs[0] < 0.005:  # a gain within noise does not justify changing the weights
        best = 0
    return best, aucs, oof[best]


def _held_out_split(labels, groups, fraction, seed):
    rng = np.random.default_rng(seed)
    held = np.zeros(len(labels), dtype=bool)
    for label in (0, 1):
        patients = sorted({g for g, l in zip(groups, labels) if l == label})
        rng.shuffle(patients)
        count = max(2, int(round(len(patients) * fraction)))
        chosen = set(patients[:count])
        held |= np.array([g in chosen and l == label for g, l in zip(groups, labels)])
    return held


def adapt(checkpoint, data, out, labelled=None, device: str = "auto", recalibrate: bool = False, seed: int = 0,
          max_epochs: int = 12, folds: int = 4, held_out: float = 0.35, cache_dir=None) -> dict:
    source = load_checkpoint(checkpoint)
    device = resolve_device(device)
    pre = source["preprocessing"]
    size, interpolation, intensity = tuple(pre["size"]), pre.get("interpolation", "bilinear"), pre.get("intensity", "none")
    unlabelled = build_or_load(scan_unlabelled(data), size, interpolation, intensity, cache_dir=cache_dir)
    if len(unlabelled) == 0:
        raise PneumoniaCNNError(f"{display_path(data)}: no readable images to adapt on")
    original = build_model(source).to(device)
    model = copy.deepcopy(original)
    reset = adabn(model, np.asarray(unlabelled.images), device)
    result = {"checkpoint": str(source["path"]), "out": str(out), "unlabelled_images": len(unlabelled),
              "adabn_layers": reset, "fine_tune_epochs": 0}
    if not reset:
        log.warning("%s has no batch-norm layers: AdaBN does not apply (use a model such as seed_bn or resnet18)",
                    source["model"]["name"])
    temperature, threshold = float(source.get("temperature", 1.0)), float(source.get("threshold", 0.5))
    policy = str(source.get("config", {}).get("threshold", "0.5"))
    ood_images, ood_labels = np.asarray(unlabelled.images), None
    if labelled:
        site = build_or_load(load_split(labelled, None, class_names=tuple(source["class_names"])), size, interpolation,
                             intensity, cache_dir=cache_dir)
        labels = site.labels.astype(int)
        if len(site) < 8 or min(np.bincount(labels, minlength=2)) < 4:
            raise PneumoniaCNNError(f"{display_path(labelled)}: need at least 4 labelled images per class")
        images = np.asarray(site.images)
        groups = np.array(site.patients)
        held = _held_out_split(labels, groups, held_out, seed)
        tune_x, tune_y, tune_g = images[~held], labels[~held], groups[~held]
        epochs, cv_aucs, oof_logits = choose_epochs(model, tune_x, tune_y, tune_g, device, max_epochs, folds, seed)
        if epochs:
            fine_tune(model, tune_x, tune_y, device, epochs, seed=seed)
        result.update(fine_tune_epochs=epochs, cv_auc_by_epoch=cv_aucs, labelled_images=int(len(site)),
                      kept_out_images=int(held.sum()))
        temperature = fit_temperature(tune_y, oof_logits) if recalibrate else temperature
        threshold = choose_threshold(tune_y, 1 / (1 + np.exp(-oof_logits / temperature)), policy) \
            if not _is_number(policy) else threshold
        before = 1 / (1 + np.exp(-logits_of(original, images[held], device) / float(source.get("temperature", 1.0))))
        after = 1 / (1 + np.exp(-logits_of(model, images[held], device) / temperature))
        metrics_before = bootstrap_metrics(labels[held], before, float(source.get("threshold", 0.5)), groups=groups[held],
                                           resamples=1000, seed=seed)
        metrics_after = bootstrap_metrics(labels[held], after, threshold, groups=groups[held], resamples=1000, seed=seed)
        keys = ("roc_auc", "balanced_accuracy", "sensitivity", "specificity", "accuracy")
        result["kept_out"] = {"before": {k: metrics_before[k] for k in keys},
                              "after": {k: metrics_after[k] for k in keys}}
        gain = metrics_after["roc_auc"]["value"] - metrics_before["roc_auc"]["value"]
        operating_gain = metrics_after["balanced_accuracy"]["value"] - metrics_before["balanced_accuracy"]["value"]
        # better: a higher ROC AUC, or (AUC equal within 0.005) a better operating point at the saved thresholds
        improved = gain > 0.005 or (abs(gain) <= 0.005 and operating_gain > 0)
        result["improved"] = bool(improved)
        change = f"ROC AUC {gain:+.3f}, balanced accuracy at the threshold {operating_gain:+.3f}"
        result["verdict"] = (f"adapted model is better on the kept-out images ({change})" if improved else
                             f"adapted model is NOT better on the kept-out images ({change}): keep using the "
                             f"original model for this site")
        ood_images = np.concatenate([ood_images, images])
        pseudo = (logits_of(model, np.asarray(unlabelled.images), device) > 0).astype(int)
        ood_labels = np.concatenate([pseudo, labels])
    if ood_labels is None:
        ood_labels = (logits_of(model, ood_images, device) > 0).astype(int)
    if len(set(ood_labels.tolist())) < 2:
        ood_labels = ood_labels.copy()
        ood_labels[: max(1, len(ood_labels) // 2)] = 1 - ood_labels[0]
    detector = OODDetector.fit(model, ood_images, ood_labels, device,
                               quantile=float(source.get("config", {}).get("ood_quantile", 0.975)), seed=seed)
    adapted = dict(source)
    adapted.pop("path", None)
    adapted.pop("training_state", None)
    adapted["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    adapted["temperature"], adapted["threshold"] = temperature, threshold
    adapted["threshold_policy"] = f"{policy} (refitted on the new site)" if labelled else source.get("threshold_policy", "0.5")
    adapted["ood"] = detector.state()
    adapted["run_id"] = f"{source.get('run_id', 'model')}-adapted"
    adapted["adaptation"] = {"site_data": str(data), "labelled": str(labelled) if labelled else None,
                             "adabn_layers": reset, "fine_tune_epochs": result["fine_tune_epochs"],
                             "improved": result.get("improved"), "verdict": result.get("verdict")}
    save_checkpoint(adapted, out)
    return result


def _is_number(text) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def format_adaptation(result: dict) -> str:
    lines = [f"adapted {result['checkpoint']} -> {result['out']}",
             f"AdaBN: {result['adabn_layers']} batch-norm layer(s) re-estimated on {result['unlabelled_images']} "
             f"unlabelled image(s)" if result["adabn_layers"] else "AdaBN: the model has no batch-norm layers"]
    if "kept_out" in result:
        lines.append(f"fine-tuning: {result['fine_tune_epochs']} epoch(s) chosen by cross-validation on "
                     f"{result['labelled_images'] - result['kept_out_images']} labelled images "
                     f"(CV ROC AUC by epoch: {', '.join(f'{a:.3f}' for a in result['cv_auc_by_epoch'])})")
        for when in ("before", "after"):
            m = result["kept_out"][when]
            lines.append(f"{when:>6} on {result['kept_out_images']} kept-out images: ROC AUC {m['roc_auc']['value']:.3f} "
                         f"[{m['roc_auc']['ci95'][0]:.3f}, {m['roc_auc']['ci95'][1]:.3f}]  sensitivity "
                         f"{m['sensitivity']['value']:.3f}  specificity {m['specificity']['value']:.3f}")
        lines.append(result["verdict"])
    lines.append("out-of-distribution model and threshold refitted on the new site's images")
    return "\n".join(lines)

"""Knowing when not to answer: an out-of-distribution (OOD) score fitted on the training images, and input checks
that need no model (not an X-ray; a DICOM of another modality, body part or view; age outside the range).

Features come from *taps*: ``(module_name, reduction_name)`` pairs. A tap reduces the output of one named
module of the network (or, for the module name ``"input"``, the network's input image) with a pure torch
function of ``REDUCTIONS`` that exports to ONNX, so that the served engine computes the logit and every tap in
one forward pass (``TappedModel``). The detector then scores those features with numpy.

The detector of new checkpoints (``METHOD``, ``default_recipe``) combines k-NN distances to the training
images in five views (Fisher's method on their p-values): what the network makes of the image (its last
feature layer) and four that need no network, the image's coarse layout (where lungs, heart, diaphragm and
shoulders lie: a child's thorax is proportioned and framed differently from an adult's) and how its edges run
(ribs, clavicles, the outline), each of the whole frame and of the content inside its dark margins (so that
black side bands do not make an adult look like a child). ``adapt`` refits on a site's images with the three
whole-frame views (``site_recipe``). The README's section "Intended use and out-of-distribution warnings" has
the measured comparison with the alternatives. The threshold is a distribution-free bound on a quantile of the
validation images' scores (``conservative_quantile``). Checkpoints written before taps hold a multi-layer
Mahalanobis detector (Lee et al., 2018); ``OODDetector.from_state`` still loads and scores it.
"""
from .checks import (
                     AGE_OUTSIDE,
                     DEFAULT_POPULATION,
                     FLAG_MEANING,
                     NOT_FRONTAL_CHEST,
                     NOT_XRAY,
                     flag_message,
                     flag_reasons,
                     image_statistics,
                     input_warnings,
                     patient_age_years,
                     training_population,
)
from .detector import InvalidState, OODDetector
from .scorers import (
                     FOLDS,
                     METHOD,
                     SCORERS,
                     TRAINING_METHODS,
                     GaussianScore,
                     NeighbourScore,
                     conservative_quantile,
                     default_recipe,
                     default_taps,
                     site_method,
                     site_recipe,
                     site_taps,
)
from .taps import INPUT_TAP, REDUCTIONS, TappedModel, extract, penultimate_layer

__all__ = ["AGE_OUTSIDE", "DEFAULT_POPULATION", "FLAG_MEANING", "NOT_FRONTAL_CHEST", "NOT_XRAY", "flag_message",
           "flag_reasons",
           "image_statistics", "input_warnings", "patient_age_years", "training_population", "InvalidState",
           "OODDetector", "FOLDS",
           "METHOD", "TRAINING_METHODS", "SCORERS", "GaussianScore", "NeighbourScore", "conservative_quantile",
           "default_recipe",
           "site_method", "site_recipe", "site_taps",
           "INPUT_TAP", "REDUCTIONS", "TappedModel", "default_taps", "extract", "penultimate_layer"]

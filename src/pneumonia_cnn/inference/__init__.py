"""Inference in parts: the checkpoint bundle, the engines, the one scorer, file reading, and the Predictor
that puts them together for every command that turns images into decisions."""
from .bundle import Bundle, Preprocessing, load_bundle, refuse_unfitted
from .predictor import Prediction, Predictor, predict
from .scorer import Scorer, Scores

__all__ = ["Bundle", "Preprocessing", "load_bundle", "refuse_unfitted", "Prediction", "Predictor", "predict", "Scorer",
           "Scores"]

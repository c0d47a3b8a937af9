"""Evaluation metrics and the networks they use."""

from difflab.metrics.classifier import DigitClassifier, load_digit_classifier, predict, train_classifier
from difflab.metrics.frechet import FeatureStatistics, frechet_distance, frechet_distance_of

__all__ = ["DigitClassifier", "FeatureStatistics", "frechet_distance", "frechet_distance_of", "load_digit_classifier",
           "predict", "train_classifier"]

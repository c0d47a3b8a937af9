"""Evaluation metrics and the networks they use."""

from difflab.metrics.classifier import DigitClassifier, load_digit_classifier, predict, train_classifier

__all__ = ["DigitClassifier", "load_digit_classifier", "predict", "train_classifier"]

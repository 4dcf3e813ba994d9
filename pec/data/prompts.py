"""Prompts of the digits world: "a handwritten 7" and its paraphrases, and the digit a prompt names."""
from __future__ import annotations

import random

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Paraphrases seen during pretraining, so that the prompt encoder learns that "7" and "seven" agree.
TEMPLATES = ("a handwritten {}", "a handwritten digit {}", "the digit {}", "number {}")
FILLER_WORDS = ("a", "handwritten", "digit", "the", "number")
VOCABULARY = FILLER_WORDS + tuple(str(d) for d in range(10)) + DIGIT_WORDS


def digit_prompt(digit: int) -> str:
    """The canonical prompt for `digit`: "a handwritten 7"."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return TEMPLATES[0].format(int(digit))


def random_prompt(digit: int, rng: random.Random) -> str:
    """A random paraphrase naming `digit` as a numeral or a word."""
    name = str(digit) if rng.random() < 0.5 else DIGIT_WORDS[digit]
    return rng.choice(TEMPLATES).format(name)


def prompt_digit(prompt: str) -> int:
    """The digit a prompt names ("a handwritten seven" -> 7); ValueError if it names none or several."""
    found = {int(w) if w.isdigit() else DIGIT_WORDS.index(w)
             for w in prompt.lower().split() if w in VOCABULARY and w not in FILLER_WORDS}
    if len(found) != 1:
        raise ValueError(f"prompt must name exactly one digit (0-9 or zero-nine), got {prompt!r}")
    return found.pop()

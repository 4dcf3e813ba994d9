"""The embedded world's data: scikit-learn digits and their prompts."""
from pec.data.digits import IMAGE_SHAPE, NUM_CLASSES, Digits, augment, load_digits, to_unit
from pec.data.prompts import DIGIT_WORDS, VOCABULARY, digit_prompt, prompt_digit, random_prompt

__all__ = ["IMAGE_SHAPE", "NUM_CLASSES", "Digits", "augment", "load_digits", "to_unit",
           "DIGIT_WORDS", "VOCABULARY", "digit_prompt", "prompt_digit", "random_prompt"]

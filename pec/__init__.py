"""PEC: perceptual-entropy RLHF (GRPO, PEC, PCGS) for flow-matching text-to-image models."""
__version__ = "0.2.0"

"""Rewards registered the way the README tells users to (`@REWARDS.register`), for the run-safety tests.
The trainer scores in chunks of train.micro_batch images: with the whole batch in one chunk, call n is
step n. Not a test module (pytest collects only test_*.py); the SIGTERM test's subprocess imports it too.

- "nan_at_call3": the digit reward, but its third call (training step 3) returns NaN for sample 0 and
  for two samples of the second group (which then keeps too few valid samples).
- "slow_at_call3": the digit reward; when PEC_TEST_MARKER names a file, its third call creates that
  file and sleeps, so a test can signal the process in the middle of step 3.
"""
import os
import time
from pathlib import Path

import torch

from pec.rewards import REWARDS

NAN_ROWS = (0, 3, 4)


class _CountingDigitReward(torch.nn.Module):
    def __init__(self, device, directory, on_third_call):
        super().__init__()
        self.inner = REWARDS.build("digit", device=device, directory=directory)
        self.calls = 0
        self.on_third_call = on_third_call

    def forward(self, images, prompts):
        self.calls += 1
        rewards = self.inner(images, prompts)
        if self.calls == 3:
            rewards = self.on_third_call(rewards)
        return rewards


def _nan_rows(rewards):
    rewards = rewards.clone()
    rewards[list(NAN_ROWS)] = float("nan")
    return rewards


def _pause(rewards):
    marker = os.environ.get("PEC_TEST_MARKER")
    if marker:
        Path(marker).touch()
        time.sleep(60)
    return rewards


@REWARDS.register("nan_at_call3")
def build_nan_reward(device="cpu", directory=None):
    """Digit reward with NaN rewards at its third call."""
    return _CountingDigitReward(device, directory, _nan_rows)


@REWARDS.register("slow_at_call3")
def build_slow_reward(device="cpu", directory=None):
    """Digit reward that pauses at its third call when PEC_TEST_MARKER is set."""
    return _CountingDigitReward(device, directory, _pause)

"""Rewards: reward(images (B, C, H, W) in [0, 1], prompts) -> (B,) float32, no grad.

Registered names (`REWARDS`):
- the embedded world's: "digit" (learned, preference-like; 8x8 digits), "contrast", "smoothness" (rules);
- real images: "pickscore", "clipscore", "hpsv2", "aesthetic" (LAION v2), "aesthetic_v25" (Aesthetic Predictor
  v2.5, the paper's) (weights from local paths or hub ids, `--paths.*`: `pec.hub`),
  "jpeg" / "jpeg_incompressibility" (rules, any size), "http" (a reward server, `--paths.reward_url`);
- videos only: "temporal_smoothness" (a rule: 1 − the mean change between consecutive frames).

`build_reward("pickscore:1.0,jpeg:0.1", ...)` builds a weighted sum; `check_reward_spec` validates names,
weights and paths from config files only, before any model loads (a hub id is resolved there: from the hub
cache, fetched into it unless HF_HUB_OFFLINE is set).

Videos (a video model's frames (B, F, C, H, W)): `build_reward(..., video_frames=N)` wraps each term in
`VideoReward` (`pec.rewards.video`): an image reward is averaged over N frames spread over the clip, a reward
that takes videos gets them as the clip. "temporal_smoothness" scores videos only (`needs_video`), and so
may the reward of an `http` server (its health check says `"video": true`); `check_reward_spec` refuses
such a reward for an image model.
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from pec.config import Config
from pec.models import is_video_model
from pec.perceptual.backbones import check_hf_clip, check_open_clip
from pec.registry import Registry
from pec.rewards.aesthetic import build_aesthetic_reward, check_aesthetic
from pec.rewards.aesthetic_v25 import build_aesthetic_v25_reward, check_aesthetic_v25
from pec.rewards.clip import build_clipscore_reward, build_hpsv2_reward
from pec.rewards.digit import DigitReward, build_digit_reward
from pec.rewards.http import build_http_reward, check_server, resolve_token, server_needs_video
from pec.rewards.jpeg import JpegReward
from pec.rewards.pickscore import build_pickscore_reward
from pec.rewards.rules import ContrastReward, SmoothnessReward, TemporalSmoothnessReward
from pec.rewards.video import VideoReward, needs_video

REWARDS: Registry[nn.Module] = Registry("reward")
REWARDS.register("digit")(build_digit_reward)
REWARDS.register("pickscore")(build_pickscore_reward)
REWARDS.register("clipscore")(build_clipscore_reward)
REWARDS.register("hpsv2")(build_hpsv2_reward)
REWARDS.register("aesthetic")(build_aesthetic_reward)
REWARDS.register("aesthetic_v25")(build_aesthetic_v25_reward)
REWARDS.register("http")(build_http_reward)
REWARDS.register("temporal_smoothness")(TemporalSmoothnessReward)


@REWARDS.register("contrast")
def build_contrast_reward(device: str | torch.device = "cpu", directory: str | Path | None = None,
                          paths: object = None) -> ContrastReward:
    """The contrast reward (no weights; `directory`, `paths` are accepted for a uniform factory signature)."""
    return ContrastReward().to(device)


@REWARDS.register("smoothness")
def build_smoothness_reward(device: str | torch.device = "cpu", directory: str | Path | None = None,
                            paths: object = None) -> SmoothnessReward:
    """The smoothness reward (no weights; `directory`, `paths` are accepted for a uniform factory signature)."""
    return SmoothnessReward().to(device)


@REWARDS.register("jpeg")
def build_jpeg_reward(device: str | torch.device = "cpu", directory: str | Path | None = None,
                      paths: object = None) -> JpegReward:
    """JPEG compressibility: -size/500 (kB)."""
    return JpegReward(-1.0)


@REWARDS.register("jpeg_incompressibility")
def build_jpeg_incompressibility_reward(device: str | torch.device = "cpu", directory: str | Path | None = None,
                                        paths: object = None) -> JpegReward:
    """JPEG incompressibility: +size/500 (kB)."""
    return JpegReward(1.0)


def _get(paths: object, name: str) -> object:
    return getattr(paths, name, None)


# What each reward needs on disk, checked from config files only (no weights load).
CHECKS: dict[str, Callable[[object], object]] = {
    "pickscore": lambda p: check_hf_clip(_get(p, "pickscore"), "--paths.pickscore",
                                         processor=_get(p, "pickscore_processor")),
    "clipscore": lambda p: check_open_clip(_get(p, "clip"), "--paths.clip", _get(p, "clip_arch")),
    "hpsv2": lambda p: check_open_clip(_get(p, "hpsv2"), "--paths.hpsv2", _get(p, "hpsv2_arch")),
    "aesthetic": check_aesthetic,
    "aesthetic_v25": check_aesthetic_v25,
    "http": lambda p: check_server(_get(p, "reward_url")),
}


def parse_reward_spec(spec: str) -> list[tuple[str, float]]:
    """'pickscore:1.0,jpeg:0.1' -> [('pickscore', 1.0), ('jpeg', 0.1)]; a bare name has weight 1.

    Unknown names, bad or non-finite weights, duplicates and an empty spec raise ValueError naming --reward.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"--reward must be a reward name or name:weight,... ; got {spec!r}")
    terms: list[tuple[str, float]] = []
    for part in spec.split(","):
        name, _, weight = part.strip().partition(":")
        name = name.strip()
        if name not in REWARDS.names():
            raise ValueError(f"--reward: unknown reward {name!r}; choose one of {REWARDS.names()}")
        try:
            value = float(weight) if weight.strip() else 1.0
        except ValueError:
            raise ValueError(f"--reward: the weight of {name!r} must be a number, got {weight!r}") from None
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"--reward: the weight of {name!r} must be finite, got {weight!r}")
        if name in dict(terms):
            raise ValueError(f"--reward names {name!r} twice")
        terms.append((name, value))
    return terms


def check_reward_spec(spec: str, paths: object = None, *, video: bool = False,
                      http: object = None) -> list[tuple[str, float]]:
    """Validate a reward spec and the paths its rewards need (config files only); return its terms.
    Unless `video` (the model makes videos), a reward that scores videos only is refused (`http`: the client
    settings, whose token the health check of an `http` reward's server may need)."""
    terms = parse_reward_spec(spec)
    for name, _ in terms:
        if name in CHECKS:
            CHECKS[name](paths)
        if not video and reward_needs_video(name, paths, http):
            where = "the reward server at --paths.reward_url serves" if name == "http" else f"{name!r} is"
            raise ValueError(f"--reward: {where} a video reward, and --model.name makes images: train a video "
                             f"model (--model.name wan) with it, or choose an image reward")
    return terms


def reward_needs_video(name: str, paths: object = None, http: object = None) -> bool:
    """Whether the registered reward `name` scores videos only: its `needs_video`, or for `http` its server's
    health check (`"video": true`, asked with the token of `http`, a `pec.config.RewardHttpConfig`)."""
    if name == "http":
        return server_needs_video(_get(paths, "reward_url"), resolve_token(getattr(http, "token", None)))
    return needs_video(REWARDS.get(name))


class WeightedReward(nn.Module):
    """sum_i weight_i * reward_i(images, prompts): several rewards as one."""

    def __init__(self, rewards: dict[str, nn.Module], weights: dict[str, float]) -> None:
        super().__init__()
        if set(rewards) != set(weights) or not rewards:
            raise ValueError(f"rewards and weights must name the same non-empty set, got {sorted(rewards)} and "
                             f"{sorted(weights)}")
        self.rewards = nn.ModuleDict(rewards)
        self.weights = dict(weights)

    @property
    def needs_video(self) -> bool:
        """Whether some term scores videos only."""
        return any(needs_video(r) for r in self.rewards.values())

    @torch.no_grad()
    def components(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Each reward's (B,) float32 scores, unweighted."""
        return {name: reward(images, prompts).float() for name, reward in self.rewards.items()}

    @torch.no_grad()
    def forward(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        parts = self.components(images, prompts)
        return sum(self.weights[name] * value for name, value in parts.items())


def build_reward(spec: str, device: str | torch.device = "cpu", directory: str | Path | None = None,
                 paths: object = None, http: object = None, video_frames: int | None = None) -> nn.Module:
    """The reward of a spec: a single registered reward (weight 1) as is, otherwise a `WeightedReward`.

    Args:
        spec: 'name' or 'name:weight,name:weight,...' (see `parse_reward_spec`).
        device: where scoring runs.
        directory: the embedded world's assets folder (--assets).
        paths: weights of the real rewards, local or hub ids (a `pec.config.PathsConfig`).
        http: the `http` reward's client settings (a `pec.config.RewardHttpConfig`; None = defaults), passed
            only to the factories whose signature takes `http`.
        video_frames: None for an image model; for a video model the frames of each clip the rewards see
            (`--reward_video.frames`, 0 = every frame): the reward then takes videos (`on_videos`).
    """
    # Every reward builds here (a server may serve a video reward): whether the model may use it is a question
    # of the run's configuration, which `pec.checks.check_run` asks (check_reward_spec with `video`).
    terms = check_reward_spec(spec, paths, video=True)
    options = {"paths": paths, "http": http}
    rewards = {name: REWARDS.build_with_options(name, options, device=device, directory=directory)
               for name, _ in terms}
    reward = (rewards[terms[0][0]] if len(terms) == 1 and terms[0][1] == 1.0 else
              WeightedReward(rewards, dict(terms)))
    return reward if video_frames is None else on_videos(reward, video_frames)


def reward_for_run(spec: str, cfg: Config, device: str | torch.device) -> nn.Module:
    """The reward `spec` as a run of `cfg` uses it (the trainer's and the evaluator's): its weights from
    `cfg.assets` / `cfg.paths`, the `http` client of `cfg.reward_http`, and for a video model scoring clips on
    `reward_video.frames` frames of each."""
    frames = cfg.reward_video.frames if is_video_model(cfg.model.name) else None
    return build_reward(spec, device=device, directory=cfg.assets, paths=cfg.paths, http=cfg.reward_http,
                        video_frames=frames)


def on_videos(reward: nn.Module, frames: int) -> nn.Module:
    """`reward` scoring videos (B, F, C, H, W): each term of a `WeightedReward` (or the reward itself) wrapped in
    `VideoReward` over `frames` frames of each clip (0 = every frame); the modules are shared, not copied."""
    if isinstance(reward, WeightedReward):
        return WeightedReward({name: VideoReward(r, frames) for name, r in reward.rewards.items()}, reward.weights)
    return VideoReward(reward, frames)


__all__ = ["REWARDS", "DigitReward", "ContrastReward", "SmoothnessReward", "TemporalSmoothnessReward", "JpegReward",
           "WeightedReward", "VideoReward", "build_reward", "check_reward_spec", "on_videos", "parse_reward_spec",
           "reward_for_run", "reward_needs_video"]

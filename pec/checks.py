"""Refusing a run before any model loads: every check that reads only the configuration and local files.

`check_run` is what `pec.train` and the evaluator call on a configuration: the options on their own, the
algorithm and regulariser pair, the options together (`Config.validate`), then the names and paths of the
model, the rewards, the perceptual spaces and the prompt file, each checked by the package that implements
it. A path is a local one or a Hugging Face hub id, resolved there through huggingface_hub's cache
(`pec.hub`: fetched into it unless HF_HUB_OFFLINE is set), so that a wrong id fails here too. A wrong path,
id or name is one ValueError naming the option, before any weight loads.
"""
from __future__ import annotations

import dataclasses

from pec.algorithms import check_algorithm
from pec.config import Config, check_options
from pec.data.prompt_files import load_prompt_splits
from pec.hub import pin_revision
from pec.models import check_model_config, is_video_model
from pec.perceptual import EVAL_ONLY_SPACES, check_spaces
from pec.rewards import check_reward_spec


def check_run(cfg: Config) -> Config:
    """Each option on its own, the algorithm and regulariser (each exists, accepts its options, and the pair
    composes: `pec.algorithms.check_algorithm`), the options together (`cfg.validate()`), then the model
    folder, reward spec, perceptual spaces and prompt file; returns cfg, with each hub id pinned to the commit
    it resolved to (`--model.revision`: `pec.models.check_model_config`; `--paths.*`: `pec.hub.pin_revision`),
    which the run's config.yaml records. The algorithm speaks before the cross-option rules, which assume an
    algorithm that has the options they relate (e.g. Clip-Higher's minibatches): an option it refuses is named
    as such, not as half of a combination to fix."""
    check_options(cfg)
    check_algorithm(cfg)
    cfg.validate()
    check_model_config(cfg.model, cfg.sampling.guidance_scale)
    check_reward_spec(cfg.reward, cfg.paths, video=is_video_model(cfg.model.name), http=cfg.reward_http)
    if cfg.method == "gardo" and cfg.gardo.aux_rewards:  # scored by GARDO's gate beside the trained reward
        try:
            check_reward_spec(",".join(cfg.gardo.aux_rewards), cfg.paths, video=is_video_model(cfg.model.name),
                              http=cfg.reward_http)
        except ValueError as err:
            raise ValueError(str(err).replace("--reward", "--gardo.aux_rewards", 1)) from None
    check_spaces(cfg.perceptual.spaces, cfg.paths)
    for field in dataclasses.fields(cfg.paths):
        setattr(cfg.paths, field.name, pin_revision(getattr(cfg.paths, field.name)))
    if cfg.perceptual.space in EVAL_ONLY_SPACES:
        raise ValueError(f"perceptual.space {cfg.perceptual.space!r} is an evaluation-only space (the paper table "
                         f"judges claims there because no regulariser uses it): choose another of "
                         f"perceptual.spaces")
    if cfg.data.prompts:
        load_prompt_splits(cfg.data.prompts)
    return cfg

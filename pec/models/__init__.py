"""Flow models: `embedded` (the tiny digits model), `sd3` (SD3 / SD3.5) and `flux` (FLUX.1-dev).

`check_model_config` validates a model's options and local folder from config files only, before
any weights load.
"""
from __future__ import annotations

MODEL_NAMES = ("embedded", "sd3", "flux")


def check_model_config(cfg: object, guidance_scale: float = 1.0) -> None:
    """ValueError, naming the option, for an unknown model, a missing / wrong folder or bad options.

    Args:
        cfg: a `pec.config.ModelConfig`.
        guidance_scale: the sampler's CFG scale (FLUX.1-dev is guidance-distilled: it must be 1).
    """
    if cfg.name == "embedded":
        return
    if cfg.name not in MODEL_NAMES:
        from pec.policy import MODELS  # at call time: pec.policy imports pec.config, which imports this

        if cfg.name in MODELS.names():
            return  # a model plugged in by registering a loader in pec.policy.MODELS checks its own options
        raise ValueError(f"--model.name must be one of {MODELS.names()}, got {cfg.name!r}")
    from pec.models.diffusers_model import TEXT_ENCODER_PLACEMENTS, resolve_dtype

    resolve_dtype(cfg.dtype)
    if cfg.resolution < 16 or cfg.resolution % 16:
        raise ValueError(f"--model.resolution must be a positive multiple of 16, got {cfg.resolution}")
    if cfg.max_sequence_length < 1:
        raise ValueError(f"--model.max_sequence_length must be >= 1, got {cfg.max_sequence_length}")
    for name in ("vae_batch", "prompt_cache"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--model.{name} must be >= 0 (0 = no limit), got {getattr(cfg, name)}")
    if cfg.text_encoders not in TEXT_ENCODER_PLACEMENTS:
        raise ValueError(f"--model.text_encoders must be one of {TEXT_ENCODER_PLACEMENTS}, got {cfg.text_encoders!r}")
    if cfg.name == "sd3":
        from pec.models.sd3 import SD3FlowModel

        SD3FlowModel.check_path(cfg.path, cfg.t5)
    else:
        from pec.models.flux import FluxFlowModel

        if guidance_scale != 1:
            raise ValueError(f"--sampling.guidance_scale must be 1 for flux (FLUX.1-dev is guidance-distilled: it "
                             f"has no CFG forward); set the distilled guidance with --model.guidance, got "
                             f"{guidance_scale}")
        FluxFlowModel.check_path(cfg.path)

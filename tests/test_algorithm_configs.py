"""The shipped configs of MixGRPO (FLUX.1-dev), Flow-GRPO-Fast and GRPO-Guard (SD3.5-M) and their PEC variants:
they validate on tiny folders in the real layouts (in place of the real weights) with the authors' published
settings. (The algorithms' runs: tests/test_mixgrpo_algorithm.py, test_flow_grpo_fast_algorithm.py,
test_grpo_guard_algorithm.py.)"""
from pathlib import Path

import pytest

pytest.importorskip("diffusers")
pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from _tiny_diffusers import (tiny_clip_folder, tiny_dino_folder, tiny_flux_folder, tiny_open_clip_folder,  # noqa: E402
                             tiny_sd3_folder)

import pec  # noqa: E402
from pec.checks import check_run  # noqa: E402
from pec.config import parse_config  # noqa: E402

CONFIGS = Path(pec.__file__).parent / "configs"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("real")
    return {"flux": tiny_flux_folder(tmp), "sd3": tiny_sd3_folder(tmp), "clip": tiny_open_clip_folder(tmp),
            "dino": tiny_dino_folder(tmp), "pickscore": tiny_clip_folder(tmp)}


def _paths(world):
    return [f"--paths.{k}={world[k]}" for k in ("pickscore", "dino", "clip")]


def _published(cfg):
    """The authors' settings each config must keep (notes: algorithms.md §2-§4)."""
    s, t = cfg.sampling, cfg.train
    if cfg.algorithm == "mixgrpo":
        m = cfg.mixgrpo
        assert cfg.model.name == "flux" and s.num_steps == 25 and s.eta == 0.7 and s.kind == "flow"
        assert (m.window_size, m.shift_interval, m.stride, m.strategy, m.roll_back) == (4, 25, 1, "progressive", True)
        assert (t.clip_range, t.adv_clip, t.kl_beta, s.group_size, t.lr, t.lora) == (1e-4, 5.0, 0.0, 12, 1e-5, False)
        assert t.timestep_fraction == 1.0 and s.guidance_scale == 1.0
    elif cfg.algorithm == "flow_grpo_fast":
        f = cfg.flow_grpo_fast
        assert cfg.model.name == "sd3" and s.num_steps == 10 and (f.window_size, f.window_range) == (3, [0, 5])
        assert (s.kind, s.eta, t.clip_range, t.kl_beta, s.group_size, s.guidance_scale) == ("cps", 0.8, 1e-5, 0.0, 24,
                                                                                             1.0)
    else:
        assert cfg.algorithm == "grpo_guard" and cfg.model.name == "sd3"
        assert (t.clip_range, t.kl_beta, t.timestep_fraction, cfg.grpo_guard.dt_scaling) == (2e-6, 0.0, 0.99, True)


@pytest.mark.parametrize("name", ["mixgrpo_flux", "flow_grpo_fast_sd35", "grpo_guard_sd35"])
@pytest.mark.parametrize("pec_variant", [False, True])
def test_shipped_configs_validate_with_the_published_settings(world, name, pec_variant):
    config = CONFIGS / f"{name}{'_pec' if pec_variant else ''}.yaml"
    model = world["flux" if "flux" in name else "sd3"]
    cfg = check_run(parse_config(["--config", str(config), "--model.path", str(model), *_paths(world)]))
    _published(cfg)
    assert cfg.method == ("pec" if pec_variant else "none") and cfg.reward == "pickscore"
    assert cfg.perceptual.space == "pickscore"
    if pec_variant:
        assert cfg.pec.lambda_ == 0.05  # the other FLUX / SD3.5 configs' lambda


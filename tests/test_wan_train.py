"""Wan runs end to end through `python -m pec.train` and `python -m pec.evaluate` (their main(argv), in-process),
on tiny WanPipeline folders in the real on-disk layout (tests/_tiny_wan.py: 5 frames of 32x32 px):
- each shipped Wan config, shrunk with ordinary options, trains 2 steps (the first run stops after one and
  resumes from its checkpoint), writing frame-strip grids and GIFs;
- the headline: with a rule-based reward (contrast, which GRPO turns into one saturated clip), judged by
  `pec.evaluate` in a space the regulariser did not use (clip; PEC's is dino) on the same held-out seeds,
  GRPO alone lowers within-prompt video diversity, and PEC with concat pooling keeps more;
- the guided PCGS form's gradient reaches the latents through the frames' pooling and the VAE;
- `pec.evaluate` writes a table for a Qwen-Image run too.
"""
import json
from pathlib import Path

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")
pytest.importorskip("open_clip")

from _tiny_diffusers import tiny_clip_folder, tiny_dino_folder, tiny_open_clip_folder  # noqa: E402
from _tiny_qwen import tiny_qwen_image_folder  # noqa: E402
from _tiny_wan import tiny_wan_folder  # noqa: E402

import pec  # noqa: E402
from pec.config import Config, apply_dict, load_yaml  # noqa: E402
from pec.entropy import group_entropy  # noqa: E402
from pec.evaluate import main as evaluate_main  # noqa: E402
from pec.perceptual import VideoSpace, space_for_run  # noqa: E402
from pec.models import MODELS  # noqa: E402
from pec.regularizers import entropy_guidance  # noqa: E402
from pec.train import main as train_main  # noqa: E402

CONFIGS = Path(pec.__file__).parent / "configs"
QUIET = ["--device", "cpu", "--logging.progress", "false", "--logging.tensorboard", "false",
         "--logging.grid_samples", "1"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("wan_runs")
    out = {kind: tiny_wan_folder(tmp, kind) for kind in ("wan21", "wan22", "ti2v")}
    out.update(pickscore=tiny_clip_folder(tmp), dino=tiny_dino_folder(tmp), clip=tiny_open_clip_folder(tmp))
    return out


def _paths(folders) -> list[str]:
    return [arg for name in ("pickscore", "dino", "clip") for arg in (f"--paths.{name}", str(folders[name]))]


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("name", ["wan21_t2v_1.3b", "wan21_t2v_1.3b_pec", "wan22_t2v_a14b", "wan22_t2v_a14b_pec"])
def test_each_shipped_wan_config_trains_two_steps(folders, tmp_path, name):
    config = CONFIGS / f"{name}.yaml"
    shipped = Config()
    apply_dict(shipped, load_yaml(config))
    assert shipped.perceptual.video_pool == "concat" and shipped.perceptual.video_frames == 4
    assert shipped.reward_video.frames == 4
    run_dir = tmp_path / "run"
    argv = ["--config", str(config), "--model.path", str(folders["wan22" if "wan22" in name else "wan21"]),
            "--model.resolution", "32", "--model.dtype", "float32", "--model.max_sequence_length", "8",
            *_paths(folders), "--sampling.prompts_per_step", "2", "--sampling.group_size", "2",
            "--perceptual.k", "1", "--sampling.num_steps", "2", "--sampling.sde_window", "0", "2",
            "--train.steps", "2", "--train.micro_batch", "2", *QUIET, "--run-dir", str(run_dir)]
    first = name == "wan21_t2v_1.3b"
    train_main(argv + (["--train.stop_after", "1"] if first else []))
    if first:  # the checkpoint of step 1 holds the video run's state: it resumes to step 2
        assert [r["step"] for r in _rows(run_dir)] == [1]
        train_main(argv + ["--resume"])
    rows = _rows(run_dir)
    assert [r["step"] for r in rows] == [1, 2]
    for row in rows:
        for key in ("reward_mean", "loss", "grad_norm", "perc_knn/dino", "diversity/clip", "perc_knn_batch/dino"):
            assert torch.isfinite(torch.tensor(float(row[key]))), key
        assert row["mask/masked_samples"] == 0
    assert rows[0]["first_update_ratio_dev"] == 0 and rows[0]["grad_norm"] > 0
    if name.endswith("_pec"):
        assert all(r["shaped_reward_mean"] != r["reward_mean"] for r in rows)
    for grid in ("samples_start", "samples_end"):
        assert (run_dir / f"{grid}.png").is_file() and (run_dir / f"{grid}.gif").is_file()


def test_pcgs_guidance_backpropagates_through_the_frames_pooling(folders):
    """The guided PCGS form on a video model: the gradient of the groups' perceptual entropy (dino, concat of 4
    frames) through the Wan VAE's decode into the latents, and a small step along it raises the entropy."""
    cfg = Config()
    apply_dict(cfg, {"model": {"name": "wan", "path": str(folders["ti2v"]), "resolution": 32, "frames": 5,
                               "dtype": "float32", "max_sequence_length": 8},
                     "paths": {"dino": str(folders["dino"])}, "perceptual": {"k": 1}})
    model = MODELS.build("wan", cfg=cfg.model, device=torch.device("cpu"))
    space = space_for_run("dino", cfg, "cpu")
    assert isinstance(space, VideoSpace) and space.pool == "concat"
    guide = entropy_guidance(model.decode, space, group_size=4, k=1)
    latents, sigma = torch.randn(8, *model.sample_shape, generator=torch.Generator().manual_seed(0)), torch.full((8,), 0.5)
    velocity = torch.zeros_like(latents)
    direction = guide(latents, sigma, velocity)
    assert direction.shape == latents.shape and torch.isfinite(direction).all() and direction.abs().sum() > 0

    def entropy(x):
        with torch.no_grad():
            feats = space(model.decode(x - 0.5 * velocity)).reshape(2, 4, -1)
            return group_entropy(feats, k=1).entropy.sum()

    step = 1e-2 * direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1, 1)
    assert entropy(latents + step) > entropy(latents)


def _judged(folders, out: Path, runs: list[str]) -> dict[str, dict[str, float]]:
    """`pec.evaluate` of `runs` on the same held-out seeds: 2 prompts, 8 clips each, in the clip space only."""
    evaluate_main([*runs, "--out", str(out), "--eval.spaces", "clip", "--eval.images_per_prompt", "8",
                   "--eval.max_prompts", "2", "--eval.batch", "16"])
    assert (out / "table.md").is_file() and (out / "samples_pretrained.gif").is_file()
    return json.loads((out / "metrics.json").read_text())


def test_grpo_collapses_video_diversity_and_pec_with_concat_keeps_more(folders, tmp_path):
    """Contrast rewards saturated pixels, so GRPO drives every clip of a prompt toward one saturated clip. The
    tiny TI2V-5B folder is the model: its Wan2.2 VAE decodes distinct latents to distinct clips (the tiny Wan2.1
    VAE's random decoder all but ignores them: its clips differ by ~1e-3 per pixel, with no diversity to lose),
    and full fine-tuning at a high rate moves the random transformer in a few dozen steps. Both runs share every
    seed; PEC regularises in dino (concat of 4 frames), the judge is clip. (These settings, on seeds 0-7:
    GRPO's distance fell to 0.06-0.14 from 0.355 in 7 of them, and PEC's stayed 1.3-4x GRPO's in all 8.)"""
    common = ["--model.name", "wan", "--model.path", str(folders["ti2v"]), "--model.resolution", "32",
              "--model.frames", "5", "--model.dtype", "float32", "--model.max_sequence_length", "8",
              "--reward", "contrast", *_paths(folders), "--perceptual.spaces", "dino", "clip",
              "--perceptual.space", "dino", "--perceptual.k", "2", "--perceptual.video_pool", "concat",
              "--perceptual.video_frames", "4", "--sampling.prompts_per_step", "4", "--sampling.group_size", "4",
              "--sampling.num_steps", "4", "--train.steps", "40", "--train.micro_batch", "16", "--train.lr", "0.015",
              "--train.lora", "false", "--logging.checkpoint_every", "1000", *QUIET]
    runs = {"grpo": tmp_path / "grpo", "pec": tmp_path / "pec"}
    train_main([*common, "--method", "grpo", "--run-dir", str(runs["grpo"])])
    train_main([*common, "--method", "pec", "--pec.lambda", "0.3", "--run-dir", str(runs["pec"])])
    judged = _judged(folders, tmp_path / "eval", [str(runs["grpo"]), str(runs["pec"]), "pretrained"])
    dist = {row: metrics["dist/clip"] for row, metrics in judged.items()}
    reward = {row: metrics["contrast"] for row, metrics in judged.items()}
    assert reward["grpo"] > reward["pretrained"] + 0.05, reward  # GRPO did optimise the reward
    assert dist["grpo"] < 0.5 * dist["pretrained"], dist  # and collapsed the clips of a prompt
    assert dist["pec"] > 1.5 * dist["grpo"], dist  # PEC kept more of their diversity


def test_evaluate_writes_a_table_for_a_qwen_image_run(folders, tmp_path):
    qwen = tiny_qwen_image_folder(tmp_path)
    run_dir = tmp_path / "qwen-run"
    train_main(["--model.name", "qwen_image", "--model.path", str(qwen), "--model.resolution", "32",
                "--model.dtype", "float32", "--method", "pec", "--reward", "pickscore", *_paths(folders),
                "--perceptual.spaces", "dino", "--perceptual.space", "dino", "--sampling.prompts_per_step", "2",
                "--sampling.group_size", "2", "--perceptual.k", "1", "--sampling.num_steps", "2",
                "--train.steps", "1", "--train.micro_batch", "2", *QUIET, "--run-dir", str(run_dir)])
    out = tmp_path / "eval"
    evaluate_main([str(run_dir), "--out", str(out), "--eval.spaces", "dino", "--eval.images_per_prompt", "2",
                   "--eval.max_prompts", "2", "--eval.num_steps", "2"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics) == {"qwen-run"} and {"pickscore", "dist/dino", "vendi/dino"} <= set(metrics["qwen-run"])
    assert "| qwen-run |" in (out / "table.md").read_text() and not (out / "samples_qwen-run.gif").exists()

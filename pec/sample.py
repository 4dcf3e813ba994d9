"""`python -m pec.sample SOURCE --prompt "..." | --prompts FILE [--n 8] [--seed 0] [--out DIR]`: pictures of one's
own prompts from a trained model.

SOURCE is a run folder of `python -m pec.train` (its newest valid checkpoint), RUN@STEP (its checkpoint or
milestone of step STEP) or a folder written by `python -m pec.export` (a LoRA on its base model, a whole
model, or an embedded model's export: export.json says which; a LoRA export loads the base model recorded there,
a folder or a hub id, or the copy `--model.path` names). The model samples as `pec.evaluate` samples it:
the run's schedule, CFG scale and SDE kind, the ODE sampler by default (`--eval.eta`, `--eval.num_steps`), and
with `--eval.guidance true` a PCGS guided run's guidance on (its "policy plus guidance" reading). Every other
option of `pec.train` may override the run's config (e.g. `--device cuda:1`, `--model.text_encoders gpu`, the
`--paths.*` weights of a reward).

OUT receives, for prompt p and sample k: `pPPP-kKKK.png` (a video model: `.gif`, every frame), grid.png (one row
per prompt, at most 16 prompts and 16 samples; a video model's frame strips and grid.gif), and samples.json: each
image's file, prompt, seed and index (image k of a prompt comes from sampling call `seed + k // eval.batch`, row
`k % eval.batch`: the same command gives the same images), and with `--reward` its score (a weighted sum's terms
too) and the mean.
"""
from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from pec.atomic import atomic_write_text
from pec.cli import command_parser, expected_errors
from pec.config import Config, add_config_arguments, load_yaml, merge_dicts, overrides_from_args
from pec.data.prompt_files import read_prompts
from pec.evaluate import (eval_steps, load_policy, run_config, sample_chunks, sampling_calls, sampling_guidance,
                          save_samples, split_run)
from pec.export import MANIFEST, check_base, export_config, load_export, read_manifest, run_argument
from pec.logging_utils import save_sample
from pec.models import check_model_config, is_video_model
from pec.policy import Policy, resolve_device
from pec.rewards import WeightedReward, check_reward_spec, reward_for_run

PROG = "pec.sample"
RECORD = "samples.json"
GRID = "grid.png"
GRID_MAX = 16  # prompts (rows) and samples (columns) in grid.png


def source_config(source: str, overrides: dict[str, Any]) -> tuple[Config, dict[str, Any] | None]:
    """(config, export manifest or None) of SOURCE: a run folder, RUN@STEP or an export folder, with `overrides`;
    ValueError (one line) for anything else."""
    folder, step = split_run(source)
    if (Path(folder) / MANIFEST).is_file():
        if step is not None:
            raise ValueError(f"SOURCE {source}: an export holds one model; @STEP names a run's checkpoint")
        manifest = read_manifest(folder)
        cfg = export_config(folder, manifest, overrides)
    else:
        run_argument(source, "SOURCE", f"neither a run folder of pec.train (config.yaml) nor an export of "
                                       f"pec.export ({MANIFEST})")
        cfg, manifest = run_config(source, overrides), None
    check_base(cfg, f"SOURCE {source}")
    return cfg, manifest


def prompt_list(prompts: Sequence[str] | None, prompts_file: str | None) -> list[str]:
    """The prompts to sample: the `--prompt` values, or the lines / records of `--prompts FILE` (.txt, .jsonl,
    .csv as --data.prompts reads them); ValueError unless exactly one of the two is given."""
    if bool(prompts) == bool(prompts_file):
        raise ValueError("give the prompts with --prompt TEXT (repeatable) or --prompts FILE, not both or neither")
    if prompts_file:
        try:
            return read_prompts(prompts_file)
        except ValueError as err:
            raise ValueError(str(err).replace("--data.prompts", "--prompts")) from None
    if not all(p.strip() for p in prompts):
        raise ValueError("--prompt must not be empty")
    return list(prompts)


def check_out(out: Path, force: bool) -> Path:
    """The output folder: refused (ValueError naming --out) when it is a file, or a folder that is not empty
    without `force` (which then replaces files of the same names and keeps the others)."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"--out {out} exists and is not empty: choose another folder or pass --force")
    return out


def prepare(source: str, prompts: list[str], n: int, seed: int, reward: str | None,
            overrides: dict[str, Any]) -> tuple[Config, Policy, Any, torch.nn.Module | None]:
    """Everything checked and loaded before any image is made: the config (`--n` images a prompt, `--seed` the
    evaluation seed), the policy, its guidance (`--eval.guidance`) and the reward; the prompts are encoded once,
    so a prompt the model cannot take is refused here."""
    if n < 1:
        raise ValueError(f"--n must be >= 1 (images per prompt), got {n}")
    if seed < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    cfg, manifest = source_config(source, merge_dicts(overrides, {"eval": {"images_per_prompt": n, "seed": seed}}))
    check_model_config(cfg.model, cfg.sampling.guidance_scale)
    if reward is not None:
        check_reward_spec(reward, cfg.paths, video=is_video_model(cfg.model.name), http=cfg.reward_http)
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    policy = load_policy(source, cfg, device) if manifest is None else load_export(split_run(source)[0], cfg, device)
    with torch.no_grad():
        for prompt in prompts:
            policy.model.encode_prompts([prompt])
    guidance = sampling_guidance(policy, cfg)
    scorer = None if reward is None else reward_for_run(reward, cfg, device)
    return cfg, policy, guidance, scorer


def sample_prompts(cfg: Config, policy: Policy, guidance: Any, scorer: torch.nn.Module | None, prompts: list[str],
                   out: Path, progress: bool = True) -> dict[str, Any]:
    """Sample `cfg.eval.images_per_prompt` images of each prompt into `out` (the module docstring), score them
    with `scorer` when given; return what samples.json holds."""
    from tqdm import tqdm

    out.mkdir(parents=True, exist_ok=True)
    n = cfg.eval.images_per_prompt
    calls = sampling_calls(1, n, cfg.eval.batch)
    records: list[dict[str, Any]] = []
    grid: list[torch.Tensor] = []
    with tqdm(total=n * len(prompts), unit="image", desc=PROG, disable=not progress) as bar:
        for p, prompt in enumerate(prompts):
            k = 0
            for (_, _, _, offset), (chunk, images) in zip(calls, sample_chunks(policy, cfg, [prompt], guidance)):
                scores = _scores(scorer, images, chunk)
                for row, image in enumerate(images):
                    path = save_sample(image, out / f"p{p:03d}-k{k:03d}")
                    records.append({"file": path.name, "prompt": prompt, "prompt_index": p, "sample": k,
                                    "seed": cfg.eval.seed + offset, "index": row,
                                    **{key: value[row] for key, value in scores.items()}})
                    k += 1
                if p < GRID_MAX:
                    grid.append(images[:max(0, GRID_MAX - (k - len(images)))].cpu())
                bar.update(len(images))
    save_samples(torch.cat(grid), min(n, GRID_MAX), out / GRID)
    record: dict[str, Any] = {"eta": cfg.eval.eta, "num_steps": eval_steps(cfg),
                              "guidance": cfg.eval.guidance, "images_per_prompt": n, "seed": cfg.eval.seed,
                              "batch": cfg.eval.batch, "prompts": prompts, "images": records}
    if scorer is not None:
        record["reward_mean"] = sum(r["reward"] for r in records) / len(records)
    atomic_write_text(out / RECORD, json.dumps(record, indent=2) + "\n")
    return record


def _scores(scorer: torch.nn.Module | None, images: torch.Tensor, prompts: list[str]) -> dict[str, list[float]]:
    """Each image's reward ("reward") and, for a weighted sum, each term's ("reward/<name>")."""
    if scorer is None:
        return {}
    with torch.no_grad():
        out = {"reward": scorer(images, prompts).float().cpu().tolist()}
        if isinstance(scorer, WeightedReward):
            for name, values in scorer.components(images, prompts).items():
                out[f"reward/{name}"] = values.cpu().tolist()
    return out


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pec.sample`: SOURCE, the prompts, --n, --seed, --reward, --out, and every
    config option (`--seed` and `--reward` are this command's own: the sampling seed and the score)."""
    parser = command_parser("python -m pec.sample", __doc__, conflict_handler="resolve")
    parser.add_argument("source", metavar="SOURCE",
                        help="a run folder, RUN@STEP (its checkpoint or milestone of step STEP), or an export folder "
                             "(python -m pec.export)")
    add_config_arguments(parser)
    own = parser.add_argument_group("sampling")
    own.add_argument("--prompt", action="append", default=None, metavar="TEXT",
                     help="a prompt (repeat for several)")
    own.add_argument("--prompts", metavar="FILE", default=None,
                     help="a prompt file: .txt (one a line), .jsonl ('prompt' field) or .csv ('prompt' column)")
    own.add_argument("--n", type=int, default=8, help="images per prompt (default: 8)")
    own.add_argument("--seed", type=int, default=0, dest="sample_seed",
                     help="sampling seed (--eval.seed; default: 0): the same seed gives the same images")
    own.add_argument("--reward", default=None, dest="sample_reward", metavar="SPEC",
                     help="score every image with this reward, a name or a weighted sum as pec.train's --reward "
                          "(e.g. pickscore, with its --paths.* weights); default: no scores")
    own.add_argument("--out", default=None, metavar="DIR", help="output folder (default: samples-<timestamp>)")
    own.add_argument("--force", action="store_true", help="write into a folder that is not empty")
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.sample`, with the exit codes of `pec.cli`: 2 with one line for input refused
    (no prompt, a SOURCE that is neither a run nor an export, a prompt the model cannot take, a bad option), 1 with
    one line for a failure while sampling (a full disk, a reward server gone)."""
    args = build_parser().parse_args(argv)
    out = Path(args.out or f"samples-{time.strftime('%Y%m%d-%H%M%S')}")
    with expected_errors(PROG, before_work=True):
        overrides = overrides_from_args(args)
        if getattr(args, "config", None):
            overrides = merge_dicts(load_yaml(args.config), overrides)
        prompts = prompt_list(args.prompt, args.prompts)
        check_out(out, args.force)
        cfg, policy, guidance, scorer = prepare(args.source, prompts, args.n, args.sample_seed, args.sample_reward,
                                                overrides)
    # The bar unless this command says otherwise: the run's own --logging.progress was about training.
    progress = "progress" not in overrides.get("logging", {}) or cfg.logging.progress
    with expected_errors(PROG):
        record = sample_prompts(cfg, policy, guidance, scorer, prompts, out, progress=progress)
    mean = f"; mean reward {record['reward_mean']:.4f}" if "reward_mean" in record else ""
    print(f"wrote {len(record['images'])} samples of {len(prompts)} prompt(s) to {out}/ ({GRID}, {RECORD}){mean}")


if __name__ == "__main__":
    main()

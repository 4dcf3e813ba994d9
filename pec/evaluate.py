"""`python -m pec.evaluate RUN [RUN ...]`: quality and diversity of trained runs, and the paper's table.

Each RUN is a run folder of `python -m pec.train`, or the word `pretrained` (the base model, before
any RL). For every run: `eval.images_per_prompt` images per prompt, on fixed held-out seeds
(`eval.seed`, never used in training), with the ODE sampler by default (`eval.eta`), in sampling calls
of at most `eval.batch` images.

Embedded model (the ten digit prompts). Quality columns: the "digit" reward (the trained,
preference-like one), the "gold" reward (the evaluation-only gold classifier's probability of the
prompted digit: another architecture, trained on digits the reward classifier never saw, so reward
hacking shows as digit rising while gold does not), the rule-based "contrast" reward, and precision
(fidelity) against the held-out digits of the prompted class (`pec.data.splits`: digits no model
trained on) in the evaluation-only space `simclr_eval`. Diversity columns: within-prompt mean
pairwise distance and Vendi score in each perceptual space (the runs' `perceptual.spaces` and
`simclr_eval`), and recall / coverage against the held-out digits in `simclr_eval`. metrics.json
also has precision/recall/coverage in every space (`precision/<space>` ...). The table min-max
normalises every column across the evaluated rows (notes/paper.md 6.2) and is written as table.md
and table.csv, with the raw numbers in metrics.json and a plot in table.png. `--eval.guidance true`
samples a PCGS-guided run with its guidance on (its "policy plus guidance" reading).

Real models (`--model.name flux` / `sd3`): the held-out prompts are the test split of `--data.prompts`
(the first `eval.max_prompts` of them), each batch of images is scored as it is sampled, and the table
has the same min-max Overall. Quality columns: every configured reward (the runs' `--reward` terms and
`--eval.rewards`), scored separately. Diversity columns: within-prompt mean pairwise distance in the
dino and clip spaces and the Vendi score in the dino, clip and pickscore spaces, for each configured
space (`--eval.spaces`, or every one whose `--paths.*` weights are given). table.md and columns.json
say which of the paper's columns (`PAPER_QUALITY`, `PAPER_DIVERSITY`) the table has, and why each
other one is missing.
"""
from __future__ import annotations

import argparse
import copy
import csv
import itertools
import json
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from pec.assets import ASSETS_DIR
from pec.atomic import atomic_write, atomic_write_text
from pec.checkpoint import checkpoint_at, load_checkpoint
from pec.cli import command_parser, expected_errors
from pec.config import (
    Config,
    add_config_arguments,
    apply_dict,
    check_options,
    load_yaml,
    merge_dicts,
    overrides_from_args,
    to_dict,
)
from pec.data import Digits, load_digits, prompt_digit, to_unit
from pec.data.prompt_files import load_prompt_splits
from pec.data.splits import GOLD_FRACTION, HELDOUT_FRACTION, heldout_splits
from pec.logging_utils import save_figure, save_image_grid
from pec.metrics import (
    NormalisedTable,
    mean_pairwise_distance,
    minmax_table,
    precision_recall_coverage,
    table_markdown,
    table_rows,
    vendi_score,
)
from pec.models import check_model_config, is_video_model
from pec.perceptual import ENCODERS, EVAL_ONLY_SPACES, check_spaces, space_for_run
from pec.perceptual.networks import load_network
from pec.perceptual.real import SPACES as REAL_SPACES
from pec.policy import Policy, resolve_device
from pec.regularizers import pcgs_guidance
from pec.rewards import REWARDS, check_reward_spec, parse_reward_spec, reward_for_run
from pec.rewards.digit import DigitReward
from pec.sampling import GuidanceFn, sample
from pec.data.prompt_files import default_prompts

PROG = "pec.evaluate"
PRETRAINED = "pretrained"
EMBEDDED = "embedded"
QUALITY_REWARDS = ("digit", "contrast")
GOLD = "gold"  # the evaluation-only gold classifier's reward column
FIDELITY_SPACE = EVAL_ONLY_SPACES[0]  # the unqualified precision / recall / coverage columns are measured here
FIDELITY = ("precision", "recall", "coverage")
MANIFOLD_K = 5
EMBEDDED_REWARDS = ("digit",)  # it scores the embedded world's 8x8 digits only (the rule rewards take any size)
# The paper's table columns (notes/paper.md 6.1) and the column of ours that measures each: a reward name
# (quality), `dist/<space>` (within-prompt mean pairwise distance) or `vendi/<space>`; None: no local one.
# STAND_INS: a column of ours that fills a paper column when its own is not in the table (its note says so).
PAPER_QUALITY = {"PickScore": "pickscore", "Aesthetic": "aesthetic_v25", "ImageReward": "imagereward",
                 "CLIP": "clipscore", "HPS": "hpsv2", "UnifiedReward": None}
PAPER_DIVERSITY = {"DINO": "dist/dino", "CLIP": "dist/clip", "VS_CLIP": "vendi/clip", "VS_DINO": "vendi/dino",
                   "VS_IR": "vendi/imagereward", "VS_PS": "vendi/pickscore"}
STAND_INS = {"Aesthetic": "aesthetic"}
NO_LOCAL = {"UnifiedReward": "a VLM judge with no local reward here: serve it and score it through the 'http' "
                             "reward (its column is then 'http', not identified with UnifiedReward)"}
COLUMN_NOTES = {"aesthetic": "LAION aesthetic v2 (CLIP-L/14 MLP), not the paper's Aesthetic Predictor v2.5",
                "aesthetic_v25": "Aesthetic Predictor v2.5 (SigLIP so400m MLP), the paper's",
                "http": "the reward server at --paths.reward_url (not identified with a paper column)"}
DISTANCE_SPACES = ("dino", "clip")  # the paper's within-prompt distance columns; Vendi is in every space


def split_run(run: str) -> tuple[str, int | None]:
    """A RUN argument as (folder, step): `runs/pec@40` is runs/pec at its step-40 checkpoint (a milestone
    or a kept checkpoint, for evaluation along training); a plain folder means its newest checkpoint."""
    folder, at, step = run.rpartition("@")
    if at and step.isdigit():
        return folder, int(step)
    return run, None


def run_config(run: str, overrides: dict, base: Config | None = None) -> Config:
    """The configuration a run was trained with (its config.yaml), with command-line `overrides`.

    `pretrained` takes `base`'s model (and, for a real model, all of `base`: resolution, sampler, paths,
    prompts), so that it is sampled as the trained runs are.
    """
    cfg = Config()
    if run == PRETRAINED:
        if base is not None:
            apply_dict(cfg, to_dict(base) if base.model.name != EMBEDDED else
                       {"model": {"path": base.model.path, "name": base.model.name}, "assets": base.assets})
    else:
        saved = Path(split_run(run)[0]) / "config.yaml"
        if not saved.exists():
            raise ValueError(f"{run} is not a run folder (no config.yaml) and not the word {PRETRAINED!r}")
        apply_dict(cfg, load_yaml(saved))
    apply_dict(cfg, overrides)
    check_options(cfg)  # ranges too (e.g. --eval.num_steps 0), as pec.train's validation does
    return cfg


def load_policy(run: str, cfg: Config, device: torch.device) -> Policy:
    """The run's model with its trained weights (the base model for `pretrained`), without a KL reference."""
    cfg = copy.deepcopy(cfg)
    cfg.train.kl_beta = 0.0  # evaluation never needs the full fine-tuning's reference copy
    policy = Policy(cfg, device)
    if run != PRETRAINED:
        folder, step = split_run(run)

        def check(payload: dict) -> None:  # as --resume checks it: the run's model and LoRA config
            policy.check_checkpoint(payload, cfg)

        def skipped(path: Path, reason: str) -> None:
            print(f"pec.evaluate: skipping checkpoint {path}: {reason}", file=sys.stderr)

        ckpt = (load_checkpoint(folder, map_location=device, check=check, on_skip=skipped) if step is None
                else checkpoint_at(folder, step, device, check=check))
        policy.load_trainable_state(ckpt["model"])
        policy.checkpoint = (int(ckpt["step"]), Path(ckpt["path"]))
    policy.model.eval()
    return policy


def heldout_digits(assets: str | Path | None = None) -> Digits:
    """The held-out digits no model of the assets in `assets` trained on: the `heldout` split with the seed
    and fractions of their pretrain_config.json (the defaults, seed 0, where it has none, e.g. a tiny world)."""
    config_path = Path(assets or ASSETS_DIR) / "pretrain_config.json"
    saved = json.loads(config_path.read_text()) if config_path.exists() else {}
    return heldout_splits(load_digits(), saved.get("seed", 0), saved.get("heldout_fraction", HELDOUT_FRACTION),
                          saved.get("gold_fraction", GOLD_FRACTION)).heldout


class Evaluator:
    """Scores images with the rewards (the gold one included) and the perceptual spaces, against the
    held-out digits."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device = device
        self.rewards = {name: REWARDS.build(name, device=device, directory=cfg.assets) for name in QUALITY_REWARDS}
        self.rewards[GOLD] = DigitReward(load_network(GOLD, device, cfg.assets))
        spaces = list(dict.fromkeys([*cfg.perceptual.spaces, *EVAL_ONLY_SPACES]))
        self.encoders = {name: ENCODERS.build(name, device=device, directory=cfg.assets) for name in spaces}
        digits = heldout_digits(cfg.assets)
        real_images = to_unit(digits.images).to(device)
        self.real_labels = digits.labels.to(device)
        with torch.no_grad():
            self.real_features = {name: encoder(real_images) for name, encoder in self.encoders.items()}

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], per_prompt: int) -> dict[str, float]:
        """All metrics of `images` (B, C, H, W), grouped in consecutive runs of `per_prompt` per prompt."""
        out: dict[str, float] = {}
        for name, reward in self.rewards.items():
            out[name] = reward(images, list(prompts)).float().mean().item()
        groups = list(range(0, images.shape[0], per_prompt))
        for name, encoder in self.encoders.items():
            feats = encoder(images)
            out[f"dist/{name}"], out[f"vendi/{name}"] = within_prompt_diversity(feats, per_prompt)
            real = self.real_features[name]
            scores = [precision_recall_coverage(real[self.real_labels == prompt_digit(prompts[i])],
                                                feats[i:i + per_prompt], k=MANIFOLD_K) for i in groups]
            for field in FIDELITY:
                out[f"{field}/{name}"] = sum(getattr(s, field) for s in scores) / len(scores)
                if name == FIDELITY_SPACE:
                    out[field] = out[f"{field}/{name}"]
        return out


def columns(spaces: Sequence[str]) -> tuple[list[str], list[str]]:
    """(quality columns, diversity columns) of the table."""
    quality = [QUALITY_REWARDS[0], GOLD, *QUALITY_REWARDS[1:], "precision"]
    diversity = [f"dist/{s}" for s in spaces] + [f"vendi/{s}" for s in spaces] + ["recall", "coverage"]
    return quality, diversity


def within_prompt_diversity(features: torch.Tensor, per_prompt: int) -> tuple[float, float]:
    """(mean pairwise distance, Vendi score) of `features` (N, D) within each consecutive run of `per_prompt`
    rows (one prompt's images), averaged over the prompts."""
    groups = list(range(0, features.shape[0], per_prompt))
    dist = sum(mean_pairwise_distance(features[i:i + per_prompt]) for i in groups) / len(groups)
    vendi = sum(vendi_score(features[i:i + per_prompt]) for i in groups) / len(groups)
    return dist, vendi


def sampling_calls(num_prompts: int, per_prompt: int, batch: int) -> list[tuple[int, int, int, int]]:
    """(first prompt, end prompt, images per prompt, seed offset) of each sampling call.

    Whole groups of `per_prompt` images, as many prompts per call as `batch` images hold (at least one,
    seed offset = the first prompt's index); a group larger than `batch` is split over calls of at most
    `batch` images, piece j of prompt p drawing its noise from offset p + j * num_prompts. The calls, and
    so every image's noise, depend only on these three numbers: every evaluated run gets the same noise.
    """
    if per_prompt <= batch:
        step = batch // per_prompt
        return [(start, min(start + step, num_prompts), per_prompt, start) for start in range(0, num_prompts, step)]
    return [(p, p + 1, min(batch, per_prompt - first), p + piece * num_prompts)
            for p in range(num_prompts) for piece, first in enumerate(range(0, per_prompt, batch))]


def sampling_guidance(policy: Policy, cfg: Config) -> Callable[[int], tuple[GuidanceFn | None, torch.Tensor | float]]:
    """group -> (guidance_fn, per-step weights) of a sampling call of `group` images per prompt: with
    `eval.guidance` (a PCGS guided run), the trainer's guidance (`pcgs.guidance_weight` in `perceptual.space`,
    `pcgs.guidance_window`) over groups of the run's `sampling.group_size` consecutive images of a prompt (the
    whole `group` when that does not divide it); otherwise (None, 0)."""
    if not cfg.eval.guidance:
        return lambda group: (None, 0.0)
    if cfg.method != "pcgs" or cfg.pcgs.form != "guided":
        raise ValueError(f"eval.guidance needs a PCGS guided run (method pcgs, pcgs.form guided), got method "
                         f"{cfg.method!r}" + (f" form {cfg.pcgs.form!r}" if cfg.method == "pcgs" else ""))
    train_group = cfg.sampling.group_size

    def size(group: int) -> int:
        return train_group if group % train_group == 0 else group

    # The guidance compares a call's images of a prompt with each other: refuse, before any sampling, calls
    # that hold too few of them (a prompt's last piece when eval.batch splits its images).
    sizes = sorted({size(g) for _, _, g, _ in sampling_calls(1, cfg.eval.images_per_prompt, cfg.eval.batch)})
    if sizes[0] <= cfg.perceptual.k:
        raise ValueError(f"eval.guidance compares each sampling call's images of a prompt, so every call needs more "
                         f"than perceptual.k = {cfg.perceptual.k} of them: {cfg.eval.images_per_prompt} images a "
                         f"prompt in calls of eval.batch {cfg.eval.batch} leave a call with {sizes[0]}; sample more "
                         f"images a prompt or raise eval.batch")
    encoder = space_for_run(cfg.perceptual.space, cfg, next(policy.model.parameters()).device)

    def for_group(group: int) -> tuple[GuidanceFn, torch.Tensor]:
        return pcgs_guidance(cfg, policy.model.decode, encoder, size(group), eval_steps(cfg))

    return for_group


def eval_steps(cfg: Config) -> int:
    """Denoising steps at evaluation: `eval.num_steps`, or the run's `sampling.num_steps`."""
    return cfg.eval.num_steps or cfg.sampling.num_steps


def sample_chunks(policy: Policy, cfg: Config, prompts: Sequence[str],
                  guidance: Callable[[int], tuple[GuidanceFn | None, torch.Tensor | float]] | None = None
                  ) -> Iterator[tuple[list[str], torch.Tensor]]:
    """(prompt of each image, images) of each sampling call (`sampling_calls`): `eval.images_per_prompt`
    images per prompt, prompt by prompt, on the held-out seed `eval.seed`, with the model's own schedule
    (and the run's guidance with `eval.guidance`: `guidance`, or else `sampling_guidance` built here)."""
    e, s = cfg.eval, cfg.sampling
    guidance = guidance or sampling_guidance(policy, cfg)
    for start, stop, group, offset in sampling_calls(len(prompts), e.images_per_prompt, e.batch):
        chunk = list(prompts[start:stop])
        guide, weight = guidance(group)
        with torch.no_grad():
            out = sample(policy.model, chunk, group_size=group, num_steps=eval_steps(cfg),
                         guidance_scale=s.guidance_scale, eta=e.eta, kind=s.kind, seed=e.seed + offset,
                         guidance_fn=guide, guidance_weight=weight)
        yield [p for p in chunk for _ in range(group)], out.images


def generate(policy: Policy, cfg: Config, prompts: Sequence[str]) -> torch.Tensor:
    """`eval.images_per_prompt` images per prompt on the held-out seed, in chunks of `eval.batch` images."""
    return torch.cat([images for _, images in sample_chunks(policy, cfg, prompts)])


def plot_table(table, path: Path) -> None:
    """Bars of Q-norm, D-norm and Overall per row, and quality vs diversity averages as a scatter."""
    from pec.logging_utils import plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
    x = torch.arange(len(table.rows)).float()
    for offset, (label, values) in zip((-0.25, 0.0, 0.25), (("Q-norm", table.quality_avg),
                                                           ("D-norm", table.diversity_avg),
                                                           ("Overall", table.overall))):
        ax1.bar((x + offset).tolist(), [values[r] for r in table.rows], width=0.25, label=label)
    ax1.set_xticks(x.tolist(), table.rows, rotation=30, ha="right", fontsize=8)
    ax1.legend(fontsize=8)
    ax2.scatter([table.quality_avg[r] for r in table.rows], [table.diversity_avg[r] for r in table.rows])
    for r in table.rows:
        ax2.annotate(r, (table.quality_avg[r], table.diversity_avg[r]), fontsize=7)
    ax2.set_xlabel("quality (normalised average)")
    ax2.set_ylabel("diversity (normalised average)")
    save_figure(fig, path)


def save_samples(images: torch.Tensor, per_prompt: int, path: Path, max_rows: int | None = None,
                 max_cols: int = 16) -> None:
    """A PNG grid of `images` (B, C, H, W): one row per prompt (consecutive runs of `per_prompt` images); of
    videos (B, F, C, H, W): frame strips, one row per video, and a GIF of the grid (`save_image_grid`)."""
    grid = images.reshape(-1, per_prompt, *images.shape[1:])[:max_rows, :min(per_prompt, max_cols)]
    save_image_grid(grid.flatten(0, 1), path, nrow=grid.shape[1])


def write_table(results: dict[str, dict[str, float]], quality: Sequence[str], diversity: Sequence[str],
                out_dir: Path, notes: str = "") -> NormalisedTable:
    """The min-max table of `results` over the `quality` and `diversity` columns, written as table.md (with
    `notes` below it), table.csv, metrics.json and table.png in `out_dir`."""
    table = minmax_table(results, quality, diversity)
    atomic_write_text(out_dir / "table.md", table_markdown(table) + notes)
    rows = table_rows(table)

    def write_csv(fh) -> None:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)

    atomic_write(out_dir / "table.csv", write_csv)
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2))
    plot_table(table, out_dir / "table.png")
    return table


def evaluate_embedded(runs: Sequence[str], names: Sequence[str], base: Config, overrides: dict,
                      device: torch.device, out_dir: Path) -> NormalisedTable:
    """The embedded world's table (the module docstring) of `runs`, rows `names`, written into `out_dir`."""
    evaluator = Evaluator(base, device)
    prompts = default_prompts()
    results: dict[str, dict[str, float]] = {}
    for run, name in zip(runs, names):
        cfg = run_config(run, overrides, base)
        if cfg.eval.images_per_prompt <= MANIFOLD_K:
            raise ValueError(f"eval.images_per_prompt must be > {MANIFOLD_K} (the k of recall / coverage), "
                             f"got {cfg.eval.images_per_prompt}")
        start = time.perf_counter()
        policy = load_policy(run, cfg, device)
        with torch.no_grad():
            images = generate(policy, cfg, prompts)
        per_prompt = cfg.eval.images_per_prompt
        results[name] = evaluator.score(images, [p for p in prompts for _ in range(per_prompt)], per_prompt)
        save_samples(images, per_prompt, out_dir / f"samples_{name.replace('/', '_')}.png")
        print(f"evaluated {name} in {time.perf_counter() - start:.1f} s")
    quality, diversity = columns(list(evaluator.encoders))
    return write_table(results, quality, diversity, out_dir)


class RealEvaluator:
    """Scores a real model's images as they are sampled: each reward's per-image scores (quality) and each
    perceptual space's within-prompt distance and Vendi score (diversity). A video model's clips are scored
    as in training: the rewards on `reward_video.frames` frames of each, the spaces pooling their frames'
    features (`perceptual.video_pool`, `perceptual.video_frames`)."""

    def __init__(self, cfg: Config, rewards: Sequence[str], spaces: Sequence[str], device: torch.device) -> None:
        self.rewards = {name: reward_for_run(name, cfg, device) for name in rewards}
        self.spaces = {name: space_for_run(name, cfg, device) for name in spaces}

    @torch.no_grad()
    def score(self, chunks: Iterable[tuple[list[str], torch.Tensor]], per_prompt: int) -> dict[str, float]:
        """Metrics of the (prompts, images) `chunks` (`sample_chunks`), `per_prompt` consecutive images a prompt:
        the mean of each reward, and `dist/<space>` and `vendi/<space>` (`within_prompt_diversity`)."""
        scores: dict[str, list[torch.Tensor]] = {name: [] for name in self.rewards}
        features: dict[str, list[torch.Tensor]] = {name: [] for name in self.spaces}
        for prompts, images in chunks:
            for name, reward in self.rewards.items():
                scores[name].append(reward(images, prompts).float().cpu())
            for name, space in self.spaces.items():
                features[name].append(space(images).float().cpu())
        out = {name: torch.cat(values).mean().item() for name, values in scores.items()}
        for name, values in features.items():
            out[f"dist/{name}"], out[f"vendi/{name}"] = within_prompt_diversity(torch.cat(values), per_prompt)
        return out


def real_rewards(runs: Sequence[str], configs: Sequence[Config], base: Config, overrides: dict) -> list[str]:
    """The rewards a real-model table scores: the trained runs' `--reward` terms (and a `--reward` given to
    the evaluation), then `--eval.rewards`; their names and `base`'s local weights are checked (no weights
    load)."""
    extra = base.eval.rewards or []
    unknown = [name for name in extra if name not in REWARDS.names()]
    if unknown:
        raise ValueError(f"--eval.rewards: unknown reward {unknown[0]!r}; choose from {REWARDS.names()}")
    specs = [cfg.reward for run, cfg in zip(runs, configs) if run != PRETRAINED or "reward" in overrides]
    names = list(dict.fromkeys([name for spec in specs for name, _ in parse_reward_spec(spec)] + list(extra)))
    embedded = [name for name in names if name in EMBEDDED_REWARDS]
    if embedded:
        raise ValueError(f"--reward / --eval.rewards: {embedded[0]!r} scores the embedded world's 8x8 digits, not a "
                         f"real model's images: give real rewards (e.g. --eval.rewards pickscore clipscore)")
    if not names:
        raise ValueError("no reward to score: give --eval.rewards NAME ... (e.g. pickscore clipscore hpsv2 "
                         "aesthetic) or the --reward the runs were trained with")
    check_reward_spec(",".join(names), base.paths, video=is_video_model(base.model.name), http=base.reward_http)
    return names


def real_spaces(configs: Sequence[Config], base: Config) -> list[str]:
    """The perceptual spaces of a real-model table: `--eval.spaces`, or the runs' real `perceptual.spaces`
    plus every real space whose `--paths.*` weights (`base`'s) are given; their local weights are checked."""
    paths = base.paths
    if base.eval.spaces:
        spaces = list(dict.fromkeys(base.eval.spaces))
        wrong = [name for name in spaces if name not in REAL_SPACES]
        if wrong:
            raise ValueError(f"--eval.spaces: {wrong[0]!r} is not a perceptual space of real images; choose from "
                             f"{list(REAL_SPACES)}")
    else:
        used = [name for cfg in configs for name in cfg.perceptual.spaces if name in REAL_SPACES]
        spaces = list(dict.fromkeys(used + [name for name in REAL_SPACES if getattr(paths, name, None)]))
    if not spaces:
        raise ValueError(f"no perceptual space for the diversity columns: give the weights of one of "
                         f"{list(REAL_SPACES)} (--paths.dino, --paths.clip, --paths.pickscore) or --eval.spaces")
    check_spaces(spaces, paths)
    return spaces


def eval_prompts(cfg: Config) -> tuple[list[str], str]:
    """(held-out prompts, where they come from) of a real-model evaluation: the test split of `--data.prompts`
    (its train split if it has none; the digit prompts without it), the first `eval.max_prompts` of them."""
    if cfg.eval.max_prompts < 0:
        raise ValueError(f"eval.max_prompts must be >= 0 (0 = all), got {cfg.eval.max_prompts}")
    if cfg.data.prompts:
        splits = load_prompt_splits(cfg.data.prompts)
        prompts, source = ((splits.test, f"the test split of {cfg.data.prompts}") if splits.test else
                           (splits.train, f"the train split of {cfg.data.prompts} (it has no test split)"))
    else:
        prompts, source = default_prompts(), "the embedded world's digit prompts (no --data.prompts)"
    return prompts[:cfg.eval.max_prompts or None], source


def paper_coverage(quality: Sequence[str], diversity: Sequence[str]) -> dict[str, dict[str, dict[str, str]]]:
    """Which of the paper's columns (`PAPER_QUALITY`, `PAPER_DIVERSITY`) a table with these columns has:
    {"quality" / "diversity": {"present": {paper column: ours}, "missing": {paper column: why}}, "extra":
    {our column that is no paper column: what it is}}."""
    def missing_reason(paper: str, ours: str | None, kind: str) -> str:
        if ours is None:
            return NO_LOCAL[paper]
        name = ours.split("/")[-1]
        if kind == "quality":
            if name not in REWARDS.names():
                return f"no {name!r} reward is registered here: score it through the 'http' reward"
            stand_in = (f" (or {STAND_INS[paper]}, {COLUMN_NOTES[STAND_INS[paper]]})" if paper in STAND_INS
                        else "")
            return f"reward {name!r} not configured: add --eval.rewards {name} with its --paths.* weights{stand_in}"
        if name not in ENCODERS.names():
            return f"no {name!r} perceptual space is registered here"
        return f"space {name!r} not configured: give --paths.{name} (or list it in --eval.spaces)"

    out: dict[str, dict[str, dict[str, str]]] = {}
    for kind, paper_columns, ours in (("quality", PAPER_QUALITY, quality), ("diversity", PAPER_DIVERSITY, diversity)):
        filled = {p: c if c in ours else STAND_INS.get(p) for p, c in paper_columns.items()}
        out[kind] = {"present": {p: c for p, c in filled.items() if c in ours},
                     "missing": {p: missing_reason(p, c, kind) for p, c in paper_columns.items()
                                 if filled[p] not in ours}}
    mapped = set(PAPER_QUALITY.values()) | set(PAPER_DIVERSITY.values()) | set(out["quality"]["present"].values())
    out["extra"] = {c: COLUMN_NOTES.get(c, "not a paper column") for c in [*quality, *diversity] if c not in mapped}
    return out


def coverage_markdown(coverage: dict[str, dict[str, dict[str, str]]], prompts: str) -> str:
    """The notes under a real-model table: the paper's columns it has and lacks (and why), and its prompts."""
    lines = ["", "Paper columns (notes/paper.md 6.1) in this table:"]
    for kind in ("quality", "diversity"):
        present = coverage[kind]["present"]
        text = ", ".join(f"{p} = {c}" + (f" ({COLUMN_NOTES[c]})" if c in COLUMN_NOTES else "")
                         for p, c in present.items())
        lines.append(f"- {kind}: {text or 'none'}")
    lines += ["", "Paper columns missing from this table (not in Q-norm / D-norm):"]
    for kind in ("quality", "diversity"):
        lines += [f"- {kind} {p}: {why}" for p, why in coverage[kind]["missing"].items()]
    if coverage["extra"]:
        lines += ["", "Other columns: " + "; ".join(f"{c} ({note})" for c, note in coverage["extra"].items())]
    lines += ["", (f"dist/<space>: mean pairwise L2 distance of the space's features within a prompt's images; "
                   f"vendi/<space>: their cosine-kernel Vendi score; both averaged over the prompts. {prompts}"), ""]
    return "\n".join(lines)


def evaluate_real(runs: Sequence[str], names: Sequence[str], base: Config, overrides: dict,
                  device: torch.device, out_dir: Path) -> NormalisedTable:
    """A real model's table (the module docstring) of `runs`, rows `names`, written into `out_dir` with
    columns.json (`paper_coverage`). Every option is checked before any model loads."""
    configs = [run_config(run, overrides, base) for run in runs]
    if base.eval.images_per_prompt < 2:
        raise ValueError(f"eval.images_per_prompt must be >= 2 (within-prompt diversity needs pairs), got "
                         f"{base.eval.images_per_prompt}")
    for cfg in configs:
        check_model_config(cfg.model, cfg.sampling.guidance_scale)
        cfg.eval = copy.deepcopy(base.eval)  # every row: the same prompts, images per prompt and noise
    rewards, spaces = real_rewards(runs, configs, base, overrides), real_spaces(configs, base)
    prompts, source = eval_prompts(base)
    per_prompt = base.eval.images_per_prompt
    evaluator = RealEvaluator(base, rewards, spaces, device)
    results: dict[str, dict[str, float]] = {}
    for run, name, cfg in zip(runs, names, configs):
        start = time.perf_counter()
        policy = load_policy(run, cfg, device)
        with torch.no_grad():
            chunks = sample_chunks(policy, cfg, prompts)
            first = next(chunks)
            save_samples(first[1], min(per_prompt, first[1].shape[0]),
                         out_dir / f"samples_{name.replace('/', '_')}.png", max_rows=4, max_cols=8)
            results[name] = evaluator.score(itertools.chain([first], chunks), per_prompt)
        del policy, chunks, first
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"evaluated {name} in {time.perf_counter() - start:.1f} s")
    quality = list(rewards)
    diversity = [f"dist/{s}" for s in spaces if s in DISTANCE_SPACES] + [f"vendi/{s}" for s in spaces]
    coverage = paper_coverage(quality, diversity)
    atomic_write_text(out_dir / "columns.json", json.dumps({"quality": quality, "diversity": diversity,
                                                            "paper": coverage}, indent=2))
    mode = "ODE" if base.eval.eta == 0 else f"SDE eta {base.eval.eta}"
    text = (f"Prompts: {len(prompts)} from {source}, {per_prompt} images each ({mode}, eval.seed "
            f"{base.eval.seed}).")
    return write_table(results, quality, diversity, out_dir, coverage_markdown(coverage, text))


def evaluate(runs: Sequence[str], out_dir: str | Path, overrides: dict | None = None,
             names: Sequence[str] | None = None) -> tuple[dict[str, dict[str, float]], NormalisedTable]:
    """Evaluate `runs` (folders or "pretrained") of the embedded model or a real one (by `--model.name`),
    write the table into `out_dir`; return (raw metrics by row name, the normalised table)."""
    overrides = overrides or {}
    if not runs:
        raise ValueError("runs must name at least one run folder or 'pretrained'")
    if names is None:
        names = [Path(r).name for r in runs]
        if len(set(names)) != len(names):  # e.g. runs/a/grpo and runs/b/grpo: add the parent folder
            names = [r if r == PRETRAINED else "/".join(Path(r).parts[-2:]) for r in runs]
    names = list(names)
    if len(set(names)) != len(names):
        raise ValueError(f"row names must be unique, got {names}")
    first_real = next((r for r in runs if r != PRETRAINED), None)
    base = run_config(first_real, overrides) if first_real else run_config(PRETRAINED, overrides)
    device = resolve_device(base.device)
    if base.threads:
        torch.set_num_threads(base.threads)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    build = evaluate_embedded if base.model.name == EMBEDDED else evaluate_real
    table = build(runs, names, base, overrides, device, out_dir)
    return table.raw, table


def build_parser() -> argparse.ArgumentParser:
    """The command line of `python -m pec.evaluate`: RUN ..., --out, and every config option."""
    parser = command_parser("python -m pec.evaluate", __doc__)
    parser.add_argument("runs", nargs="+", metavar="RUN",
                        help=f"run folders (RUN@STEP: the run at its step-STEP checkpoint or milestone), or "
                             f"{PRETRAINED!r} for the base model")
    parser.add_argument("--out", default=None, help="output folder (default: eval-<timestamp>)")
    add_config_arguments(parser)
    return parser


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.evaluate`, with the exit codes of `pec.cli`: 2 with one line for input
    refused (an option, a --config file, a RUN that is not a run folder or has no usable checkpoint), 1 with
    one line for a failure of the machine (a full disk, a reward server gone)."""
    args = build_parser().parse_args(argv)
    out = args.out or f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    # `evaluate` checks each RUN as it reaches it and writes the table only at the end, so a ValueError or a
    # missing file anywhere in it is input refused, never a partial table.
    with expected_errors(PROG, before_work=True):
        overrides = overrides_from_args(args)
        if getattr(args, "config", None):
            overrides = merge_dicts(load_yaml(args.config), overrides)
        evaluate(args.runs, out, overrides)
    print((Path(out) / "table.md").read_text())
    print(f"written to {out}/ (table.md, table.csv, metrics.json, table.png; columns.json for a real model)")


if __name__ == "__main__":
    main()

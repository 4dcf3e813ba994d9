"""`python -m pec.evaluate RUN [RUN ...]`: quality and diversity of trained runs, and the paper's table.

Each RUN is a run folder of `python -m pec.train`, or the word `pretrained` (the base model, before
any RL). For every run: `eval.images_per_prompt` images for each of the ten digit prompts, on fixed
held-out seeds (`eval.seed`, never used in training), with the ODE sampler by default (`eval.eta`).

Quality columns: the "digit" reward (the trained, preference-like one), the rule-based "contrast"
reward, and precision (fidelity) against the real digits of the prompted class in the self-supervised
space. Diversity columns: within-prompt mean pairwise distance and Vendi score in each perceptual
space, and recall / coverage against the real digits. The table min-max normalises every column
across the evaluated rows (notes/paper.md 6.2) and is written as table.md and table.csv, with the
raw numbers in metrics.json and a plot in table.png.
"""
from __future__ import annotations

import argparse
import csv
import json
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from pec.checkpoint import load_checkpoint
from pec.config import Config, add_config_arguments, apply_dict, load_yaml, overrides_from_args
from pec.data import load_digits, prompt_digit, to_unit
from pec.logging_utils import save_image_grid
from pec.metrics import (NormalisedTable, mean_pairwise_distance, minmax_table, precision_recall_coverage, table_markdown,
                         table_rows, vendi_score)
from pec.perceptual import ENCODERS
from pec.policy import Policy, resolve_device
from pec.rewards import REWARDS
from pec.sampling import sample
from pec.train import default_prompts

PRETRAINED = "pretrained"
QUALITY_REWARDS = ("digit", "contrast")
FIDELITY_SPACE = "simclr"
MANIFOLD_K = 5


def run_config(run: str, overrides: dict, base: Config | None = None) -> Config:
    """The configuration a run was trained with (its config.yaml), with command-line `overrides`."""
    cfg = Config()
    if run == PRETRAINED:
        if base is not None:
            apply_dict(cfg, {"model": {"path": base.model.path, "name": base.model.name}, "assets": base.assets})
    else:
        saved = Path(run) / "config.yaml"
        if not saved.exists():
            raise ValueError(f"{run} is not a run folder (no config.yaml) and not the word {PRETRAINED!r}")
        apply_dict(cfg, load_yaml(saved))
    apply_dict(cfg, overrides)
    return cfg


def load_policy(run: str, cfg: Config, device: torch.device) -> Policy:
    """The run's model with its trained weights (the base model for `pretrained`)."""
    policy = Policy(cfg, device)
    if run != PRETRAINED:
        policy.load_trainable_state(load_checkpoint(run, map_location=device)["model"])
    policy.model.eval()
    return policy


class Evaluator:
    """Scores images with the rewards and the perceptual spaces, against the real digits."""

    def __init__(self, cfg: Config, device: torch.device) -> None:
        self.device = device
        self.rewards = {name: REWARDS.build(name, device=device, directory=cfg.assets) for name in QUALITY_REWARDS}
        self.encoders = {name: ENCODERS.build(name, device=device, directory=cfg.assets)
                         for name in cfg.perceptual.spaces}
        if FIDELITY_SPACE not in self.encoders:
            self.encoders[FIDELITY_SPACE] = ENCODERS.build(FIDELITY_SPACE, device=device, directory=cfg.assets)
        digits = load_digits()
        self.real_images = to_unit(digits.images).to(device)
        self.real_labels = digits.labels.to(device)
        with torch.no_grad():
            self.real_features = self.encoders[FIDELITY_SPACE](self.real_images)

    @torch.no_grad()
    def score(self, images: torch.Tensor, prompts: Sequence[str], per_prompt: int) -> dict[str, float]:
        """All metrics of `images` (B, C, H, W), grouped in consecutive runs of `per_prompt` per prompt."""
        out: dict[str, float] = {}
        for name, reward in self.rewards.items():
            out[name] = reward(images, list(prompts)).float().mean().item()
        groups = list(range(0, images.shape[0], per_prompt))
        for name, encoder in self.encoders.items():
            feats = encoder(images)
            out[f"dist/{name}"] = sum(mean_pairwise_distance(feats[i:i + per_prompt]) for i in groups) / len(groups)
            out[f"vendi/{name}"] = sum(vendi_score(feats[i:i + per_prompt]) for i in groups) / len(groups)
            if name == FIDELITY_SPACE:
                scores = [precision_recall_coverage(self.real_features[self.real_labels == prompt_digit(prompts[i])],
                                                    feats[i:i + per_prompt], k=MANIFOLD_K) for i in groups]
                for field in ("precision", "recall", "coverage"):
                    out[field] = sum(getattr(s, field) for s in scores) / len(scores)
        return out


def columns(spaces: Sequence[str]) -> tuple[list[str], list[str]]:
    """(quality columns, diversity columns) of the table."""
    quality = [*QUALITY_REWARDS, "precision"]
    diversity = [f"dist/{s}" for s in spaces] + [f"vendi/{s}" for s in spaces] + ["recall", "coverage"]
    return quality, diversity


def generate(policy: Policy, cfg: Config, prompts: Sequence[str]) -> torch.Tensor:
    """`eval.images_per_prompt` images per prompt on the held-out seed, in chunks of `eval.batch` images."""
    e, s = cfg.eval, cfg.sampling
    per_prompt = e.images_per_prompt
    prompts_per_call = max(1, e.batch // per_prompt)
    images = []
    for start in range(0, len(prompts), prompts_per_call):
        chunk = list(prompts[start:start + prompts_per_call])
        out = sample(policy.model, chunk, group_size=per_prompt, num_steps=e.num_steps or s.num_steps,
                     guidance_scale=s.guidance_scale, eta=e.eta, kind=s.kind, seed=e.seed + start)
        images.append(out.images)
    return torch.cat(images)


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
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(runs: Sequence[str], out_dir: str | Path, overrides: dict | None = None,
             names: Sequence[str] | None = None) -> tuple[dict[str, dict[str, float]], NormalisedTable]:
    """Evaluate `runs` (folders or "pretrained"), write the table into `out_dir`; return (raw metrics by
    row name, the normalised table)."""
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
        grid = images.reshape(len(prompts), per_prompt, *images.shape[1:])[:, :min(per_prompt, 16)]
        save_image_grid(grid.flatten(0, 1), out_dir / f"samples_{name.replace('/', '_')}.png", nrow=grid.shape[1])
        print(f"evaluated {name} in {time.perf_counter() - start:.1f} s")
    quality, diversity = columns(list(evaluator.encoders))
    table = minmax_table(results, quality, diversity)
    (out_dir / "table.md").write_text(table_markdown(table))
    rows = table_rows(table)
    with open(out_dir / "table.csv", "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    (out_dir / "metrics.json").write_text(json.dumps(results, indent=2))
    plot_table(table, out_dir / "table.png")
    return results, table


def _merge(base: dict, top: dict) -> dict:
    """Nested dict merge, `top` winning."""
    out = dict(base)
    for key, value in top.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.evaluate`."""
    parser = argparse.ArgumentParser(prog="python -m pec.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", metavar="RUN", help=f"run folders, or {PRETRAINED!r} for the base model")
    parser.add_argument("--out", default=None, help="output folder (default: eval-<timestamp>)")
    add_config_arguments(parser)
    args = parser.parse_args(argv)
    overrides = overrides_from_args(args)
    if getattr(args, "config", None):
        overrides = _merge(load_yaml(args.config), overrides)
    out = args.out or f"eval-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        evaluate(args.runs, out, overrides)
    except ValueError as err:
        raise SystemExit(f"pec.evaluate: {err}") from None
    print((Path(out) / "table.md").read_text())
    print(f"written to {out}/ (table.md, table.csv, metrics.json, table.png)")


if __name__ == "__main__":
    main()

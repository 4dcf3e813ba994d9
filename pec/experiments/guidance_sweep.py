"""`python -m pec.experiments.guidance_sweep`: what the PCGS guided form does to diversity and reward.

Samples the pretrained embedded model (no training) with the trainer's rollout settings (the config
defaults; training options after `--` change them, e.g. `-- --sampling.kind cps --config FILE.yaml`),
unguided and guided at each --weights gamma, with the same seeds, so every sample of a guided batch
starts from the same noise as its unguided twin. For each gamma it prints the within-group diversity
(mean pairwise distance of the group's features) in every perceptual space, as a change from
gamma = 0, and the training reward's mean and change: the diversity the guidance buys and its reward
cost.

Guidance (DESIGN.md 2.5, `pec.sampling.guidance_shift`): per sample, the velocity is shifted by
-gamma*||v||*g/||g||, g the gradient of the group's perceptual entropy in `perceptual.space`
(`pec.regularizers.entropy_guidance`). `--window START END` guides only those steps.
"""
from __future__ import annotations

import time
from collections.abc import Mapping, Sequence

import torch

from pec.cli import command_parser, expected_errors
from pec.checks import check_run
from pec.config import Config, parse_config
from pec.data import digit_prompt
from pec.experiments import split_passthrough
from pec.metrics import mean_pairwise_distance
from pec.models.base import FlowModel
from pec.perceptual import ENCODERS
from pec.models import MODELS
from pec.policy import resolve_device
from pec.regularizers import entropy_guidance
from pec.rewards import REWARDS
from pec.sampling import sample, sde_step_mask

DEFAULT_WEIGHTS = (0.0, 0.01, 0.02, 0.05, 0.1, 0.2)
DEFAULT_SEEDS = (0, 1, 2)
PROG = "pec.experiments.guidance_sweep"


def group_diversity(features: torch.Tensor, group_size: int) -> float:
    """Mean over groups of the within-group mean pairwise distance of `features` (B, D), groups contiguous."""
    groups = features.reshape(-1, group_size, features.shape[-1])
    return sum(mean_pairwise_distance(g) for g in groups) / groups.shape[0]


def measure(model: FlowModel, encoders: Mapping[str, torch.nn.Module], reward_fn: torch.nn.Module, cfg: Config,
            prompts: Sequence[str], weights: Sequence[float], seeds: Sequence[int],
            window: tuple[int, int] | None = None) -> dict[float, dict[str, float]]:
    """Within-group diversity per space ("dist/<space>") and mean reward ("reward") for each guidance
    weight, averaged over `seeds` (each seed one batch of len(prompts) groups of
    `cfg.sampling.group_size`; the same seeds for every weight). Guidance uses `cfg.perceptual`
    (space, estimator, k, per_dim); sampling uses `cfg.sampling`."""
    s, p = cfg.sampling, cfg.perceptual
    guide = entropy_guidance(model.decode, encoders[p.space], s.group_size, estimator=p.estimator, k=p.k,
                             per_dim=p.per_dim)
    mask = sde_step_mask(s.num_steps, window).float()
    results: dict[float, dict[str, float]] = {}
    for weight in weights:
        totals: dict[str, float] = {}
        for seed in seeds:
            out = sample(model, prompts, group_size=s.group_size, num_steps=s.num_steps,
                         guidance_scale=s.guidance_scale, eta=s.eta, kind=s.kind,
                         sde_window=tuple(s.sde_window) if s.sde_window else None, seed=seed,
                         guidance_fn=guide if weight else None, guidance_weight=weight * mask)
            with torch.no_grad():
                row = {f"dist/{name}": group_diversity(enc(out.images), s.group_size) for name, enc in encoders.items()}
                row["reward"] = reward_fn(out.images, out.prompts).float().mean().item()
            for key, value in row.items():
                totals[key] = totals.get(key, 0.0) + value / len(seeds)
        results[float(weight)] = totals
    return results


def report(results: Mapping[float, Mapping[str, float]]) -> str:
    """A markdown table: each weight's diversity per space and reward, with changes from gamma 0 (from
    the smallest weight when 0 was not measured)."""
    weights = sorted(results)
    base = results[0.0] if 0.0 in results else results[weights[0]]
    keys = [k for k in base if k.startswith("dist/")] + ["reward"]
    lines = ["| gamma | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
    for w in weights:
        cells = [f"{results[w][k]:.4g} ({100 * (results[w][k] / base[k] - 1):+.1f}%)" for k in keys]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.experiments.guidance_sweep`, with the exit codes of `pec.cli` (2: an option,
    the config or a model refused before sampling; 1: a failure while sampling)."""
    argv, extra = split_passthrough(argv)
    parser = command_parser("python -m pec.experiments.guidance_sweep", __doc__)
    parser.add_argument("--weights", type=float, nargs="+", default=list(DEFAULT_WEIGHTS),
                        help=f"guidance weights gamma (0 is added as the baseline) (default: {DEFAULT_WEIGHTS})")
    parser.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS),
                        help=f"sampling seeds, one batch each (default: {DEFAULT_SEEDS})")
    parser.add_argument("--window", type=int, nargs=2, metavar=("START", "END"), default=None,
                        help="guide only steps [START, END) (default: every step)")
    args = parser.parse_args(argv)
    with expected_errors(PROG, before_work=True):
        cfg = check_run(parse_config(extra))
        if any(w < 0 for w in args.weights):
            raise ValueError("--weights must be >= 0 (a negative gamma pulls groups together)")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = resolve_device(cfg.device)
        model = MODELS.build(cfg.model.name, cfg=cfg.model, device=device)
        encoders = {name: ENCODERS.build(name, device=device, directory=cfg.assets) for name in cfg.perceptual.spaces}
        reward_fn = REWARDS.build(cfg.reward, device=device, directory=cfg.assets)
    prompts = [digit_prompt(d) for d in range(10)]
    weights = sorted({0.0, *args.weights})
    start = time.perf_counter()
    with expected_errors(PROG):
        results = measure(model, encoders, reward_fn, cfg, prompts, weights, args.seeds,
                          tuple(args.window) if args.window else None)
    s = cfg.sampling
    print(f"PCGS guided form on the {cfg.model.name} model: {len(prompts)} prompts x {s.group_size} samples x "
          f"{len(args.seeds)} seeds, {s.num_steps} steps ({s.kind}, eta {s.eta}, CFG {s.guidance_scale}), guidance "
          f"in {cfg.perceptual.space} ({cfg.perceptual.estimator}, k {cfg.perceptual.k}), "
          f"{'steps %d-%d' % (args.window[0], args.window[1] - 1) if args.window else 'every step'}; reward "
          f"{cfg.reward}. Changes are from gamma 0 with the same seeds.\n")
    print(report(results))
    print(f"\n{time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()

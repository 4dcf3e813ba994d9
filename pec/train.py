"""`python -m pec.train`: GRPO, the policy-entropy bonus, PEC and PCGS on a flow-matching model.

One training step:
1. rollouts: `prompts_per_step` prompts, `group_size` samples each with distinct noise, through
   `pec.sampling.sample` (CFG, the chosen SDE kind and window; the PCGS guided form adds the
   perceptual-entropy gradient to the velocity and stores it with the rollout);
2. the reward of every final image, and the perceptual features of every image in each space;
3. a (B, T) shaped-reward array (one column per trained step: R for GRPO, + lambda*omega_t*surprisal
   for PEC, - lambda*omega_t*(log p_perc - log p_theta_t) for PCGS's reward form), normalised per group
   and column into advantages;
4. `train.minibatches` policy updates: per trained step and micro-batch, the log-prob re-evaluated by
   `pec.sampling.step_log_prob` (exactly the rollout's code path and, with the rollout's forwards
   chunked by `train.micro_batch` too, the same batch shapes, so the first ratio is exactly 1),
   the clipped surrogate, the optional KL to the reference, gradients accumulated over the logical batch.
Every step appends a row to metrics.jsonl (and TensorBoard) and, by default, writes a checkpoint;
`--resume` continues from it. Rollout noise and minibatch order are seeded by (seed, step), so a
resumed run reproduces the uninterrupted one.
"""
from __future__ import annotations

import argparse
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pec.checkpoint import CHECKPOINT_NAME, load_checkpoint, save_checkpoint, set_rng_state
from pec.config import Config, add_config_arguments, apply_dict, config_from_args, load_yaml, save_yaml, to_dict
from pec.data import digit_prompt
from pec.entropy import group_entropy
from pec.grpo import clipped_surrogate, group_advantages
from pec.logging_utils import MetricsLog, TensorBoardLog, plot_metrics, save_image_grid
from pec.metrics import mean_pairwise_distance
from pec.perceptual import ENCODERS
from pec.policy import Policy, latent_dim, resolve_device
from pec.regularizers import entropy_guidance, omega_weights, pcgs_reward, pec_reward, policy_entropy
from pec.rewards import REWARDS
from pec.sampling import guided_velocity, sample, step_log_prob

METRICS_FILE = "metrics.jsonl"
PLOT_KEYS = ("reward_mean", "policy_entropy", "perc_knn", "diversity")


def default_prompts() -> list[str]:
    """The embedded world's training prompts: "a handwritten 0" ... "a handwritten 9"."""
    return [digit_prompt(d) for d in range(10)]


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step, stream) (rollouts and shuffles of a step)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


class Trainer:
    """Runs one configuration to completion in its run folder (see the module docstring)."""

    def __init__(self, cfg: Config, prompts: Sequence[str] | None = None) -> None:
        self.cfg = cfg.validate()
        self.device = resolve_device(cfg.device)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run_dir = Path(cfg.run_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        has_checkpoint = (self.run_dir / CHECKPOINT_NAME).exists()
        if cfg.resume and not has_checkpoint:
            raise ValueError(f"--resume: no checkpoint in {self.run_dir}; drop --resume to start a new run there")
        if not cfg.resume and has_checkpoint:
            raise ValueError(f"{self.run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.prompts = list(prompts) if prompts is not None else default_prompts()
        self.policy = Policy(cfg, self.device)
        self.model = self.policy.model
        self.reward_fn = REWARDS.build(cfg.reward, device=self.device, directory=cfg.assets)
        self.encoders = {name: ENCODERS.build(name, device=self.device, directory=cfg.assets)
                         for name in cfg.perceptual.spaces}
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        self.start_step = 0
        if cfg.resume:
            ckpt = load_checkpoint(self.run_dir, map_location=self.device)
            self.policy.load_trainable_state(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            set_rng_state(ckpt["rng"])
            self.start_step = ckpt["step"]
        save_yaml(cfg, self.run_dir / "config.yaml")
        self.metrics = MetricsLog.open(self.run_dir / METRICS_FILE, keep_through=self.start_step)
        self.tb = TensorBoardLog(self.run_dir / "tensorboard", cfg.logging.tensorboard,
                                 purge_step=self.start_step + 1 if cfg.resume else None)

    # ------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Train from `start_step` to `train.steps` (or `train.stop_after` steps); return all metric rows."""
        cfg = self.cfg
        if self.start_step == 0:
            self.save_grid("samples_start.png")
        last = min(cfg.train.steps, self.start_step + (cfg.train.stop_after or cfg.train.steps))
        bar = tqdm(range(self.start_step + 1, last + 1), initial=self.start_step, total=cfg.train.steps,
                   desc=f"{cfg.method}", disable=not cfg.logging.progress, dynamic_ncols=True)
        for step in bar:
            row = self.train_step(step)
            self.metrics.append(row)
            self.tb.log(row, step)
            if step % cfg.logging.checkpoint_every == 0 or step == last:
                save_checkpoint(self.run_dir, step=step, model_state=self.policy.trainable_state(),
                                optimizer_state=self.optimizer.state_dict(), config=to_dict(cfg))
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}",
                            H_perc=f"{row[f'perc_knn/{cfg.perceptual.space}']:.3f}")
        bar.close()
        if last == cfg.train.steps:
            self.save_grid("samples_end.png")
        if self.metrics.rows:
            plot_metrics(self.metrics.rows, PLOT_KEYS, self.run_dir / "curves.png", title=self.run_dir.name)
        self.tb.close()
        return self.metrics.rows

    # ------------------------------------------------------------------------------------------
    def rollout(self, step: int):
        """Sample one batch of groups for `step` (seeded by the step, so resuming reproduces it)."""
        cfg, s = self.cfg, self.cfg.sampling
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        if s.prompts_per_step <= len(self.prompts):
            chosen = torch.randperm(len(self.prompts), generator=gen)[:s.prompts_per_step]
        else:
            chosen = torch.randint(len(self.prompts), (s.prompts_per_step,), generator=gen)
        prompts = [self.prompts[i] for i in chosen.tolist()]
        guidance_fn, guidance_weight = None, 0.0
        if cfg.method == "pcgs" and cfg.pcgs.form == "guided":
            p = cfg.perceptual
            guidance_fn = entropy_guidance(self.model.decode, self.encoders[p.space], s.group_size,
                                           estimator=p.estimator, k=p.k, per_dim=p.per_dim)
            guidance_weight = cfg.pcgs.guidance_weight
        with torch.no_grad():
            return sample(self.model, prompts, group_size=s.group_size, num_steps=s.num_steps,
                          guidance_scale=s.guidance_scale, eta=s.eta, kind=s.kind,
                          sde_window=tuple(s.sde_window) if s.sde_window else None,
                          seed=step_seed(cfg.seed, step, stream=1), guidance_fn=guidance_fn,
                          guidance_weight=guidance_weight, batch_size=cfg.train.micro_batch)

    def perceptual_stats(self, images: torch.Tensor) -> tuple[dict[str, float], torch.Tensor]:
        """Per-space perceptual entropies (kNN and Gaussian) and within-group diversity, and the
        regulariser's per-sample surprisal (B,) in `perceptual.space`."""
        p, k = self.cfg.perceptual, self.cfg.sampling.group_size
        row: dict[str, float] = {}
        surprisal = None
        with torch.no_grad():
            for name, encoder in self.encoders.items():
                feats = encoder(images).reshape(-1, k, encoder.dim)
                knn = group_entropy(feats, estimator="knn", k=p.k, per_dim=p.per_dim)
                gauss = group_entropy(feats, estimator="gaussian", per_dim=p.per_dim)
                row[f"perc_knn/{name}"] = knn.entropy.mean().item()
                row[f"perc_gauss/{name}"] = gauss.entropy.mean().item()
                row[f"diversity/{name}"] = sum(mean_pairwise_distance(g) for g in feats) / feats.shape[0]
                if name == p.space:
                    surprisal = (knn if p.estimator == "knn" else gauss).surprisal.reshape(-1)
        return row, surprisal

    def shaped_rewards(self, rewards: torch.Tensor, surprisal: torch.Tensor, old_log_probs: torch.Tensor
                       ) -> torch.Tensor:
        """The (B, T) reward array of the method; `old_log_probs` (B, T) are the trained steps' log-probs."""
        cfg = self.cfg
        num_trained = old_log_probs.shape[1]
        if cfg.method == "pec":
            omega = omega_weights(cfg.pec.omega, num_trained, device=rewards.device)
            return pec_reward(rewards, surprisal, cfg.pec.lambda_, omega)
        if cfg.method == "pcgs" and cfg.pcgs.form == "reward":
            omega = omega_weights(cfg.pcgs.omega, num_trained, device=rewards.device)
            return pcgs_reward(rewards, -surprisal, old_log_probs, cfg.pcgs.lambda_, omega)
        return rewards.float()[:, None].expand(-1, num_trained)

    # ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        """One rollout batch and its policy updates; returns the step's metrics row."""
        cfg = self.cfg
        times: dict[str, float] = {}
        t0 = time.perf_counter()
        self.model.eval()
        rollout = self.rollout(step)
        times["rollout"] = time.perf_counter() - t0

        t = time.perf_counter()
        with torch.no_grad():
            rewards = self.reward_fn(rollout.images, rollout.prompts).float()
        times["reward"] = time.perf_counter() - t

        t = time.perf_counter()
        perc_row, surprisal = self.perceptual_stats(rollout.images)
        times["perceptual"] = time.perf_counter() - t

        t = time.perf_counter()
        trained = rollout.train_steps()
        old_log_probs = rollout.log_probs[trained].T.float()  # (B, T_trained)
        shaped = self.shaped_rewards(rewards, surprisal, old_log_probs)
        advantages = group_advantages(shaped, rollout.group_ids, global_std=cfg.train.global_std,
                                      clip=cfg.train.adv_clip)
        train_row = self.update(step, rollout, trained, advantages)
        times["train"] = time.perf_counter() - t
        times["step"] = time.perf_counter() - t0

        group_std = rewards.reshape(-1, cfg.sampling.group_size).std(dim=1, unbiased=False).mean()
        row: dict[str, Any] = {"step": step, "reward_mean": rewards.mean().item(),
                               "reward_group_std": group_std.item(), "shaped_reward_mean": shaped.mean().item()}
        row.update(perc_row)
        row.update(train_row)
        row.update({f"time/{k}": v for k, v in times.items()})
        return row

    def update(self, step: int, rollout, trained: list[int], advantages: torch.Tensor) -> dict[str, float]:
        """`train.minibatches` optimizer updates on the rollout; returns averaged diagnostics."""
        cfg = self.cfg
        batch = advantages.shape[0]
        dim = latent_dim(self.model)
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step, stream=2))
        order = torch.randperm(batch, generator=gen)
        minibatches = order.tensor_split(cfg.train.minibatches)
        sums: dict[str, float] = defaultdict(float)
        counts: dict[str, int] = defaultdict(int)
        first_ratio_dev, ratio_max, ratio_min, grad_norm_sum = 0.0, -math.inf, math.inf, 0.0
        self.model.train()
        for mb_index, mb in enumerate(minibatches):
            self.optimizer.zero_grad(set_to_none=True)
            pieces = len(trained) * len(mb)
            for col, t_index in enumerate(trained):
                for idx in mb.split(cfg.train.micro_batch):
                    idx_dev = idx.to(self.device)
                    v_ref = None
                    if cfg.train.kl_beta > 0:
                        with torch.no_grad(), self.policy.reference() as ref_model:
                            v_ref = guided_velocity(ref_model, rollout, t_index, idx_dev)
                    out = step_log_prob(self.model, rollout, t_index, idx_dev, v_ref=v_ref)
                    old = rollout.log_probs[t_index, idx_dev].float()
                    adv = advantages[idx_dev, col]
                    loss, stats = clipped_surrogate(out.log_prob.float(), old, adv, cfg.train.clip_range)
                    entropy = policy_entropy(out.std.detach(), dim)
                    surrogate = loss.item()
                    if out.kl is not None:
                        loss = loss + cfg.train.kl_beta * out.kl.mean()
                    if cfg.method == "entropy_bonus":
                        # The analytic policy entropy depends on the schedule only: this term adds a
                        # constant to the loss and nothing to the gradient (the paper's diagnosis).
                        loss = loss - cfg.entropy_bonus.coef * entropy.mean().to(loss.dtype)
                    (loss * len(idx) / pieces).backward()
                    if mb_index == 0:
                        first_ratio_dev = max(first_ratio_dev, (stats.ratio_max - 1).abs().item(),
                                              (stats.ratio_min - 1).abs().item())
                    n = len(idx)
                    for key, value in (("loss", loss.item()), ("surrogate", surrogate),
                                       ("ratio_mean", stats.ratio_mean.item()),
                                       ("clip_fraction", stats.clip_fraction.item()),
                                       ("approx_kl", stats.approx_kl.item()),
                                       ("policy_entropy", entropy.mean().item()),
                                       ("policy_entropy_per_dim", entropy.mean().item() / dim),
                                       ("advantage_abs", adv.abs().mean().item())):
                        sums[key] += value * n
                        counts[key] += n
                    if out.kl is not None:
                        sums["kl"] += out.kl.mean().item() * n
                        counts["kl"] += n
                    ratio_max = max(ratio_max, stats.ratio_max.item())
                    ratio_min = min(ratio_min, stats.ratio_min.item())
            grad_norm = torch.nn.utils.clip_grad_norm_(self.policy.trainable_parameters(), cfg.train.max_grad_norm)
            grad_norm_sum += grad_norm.item()
            self.optimizer.step()
        row = {k: sums[k] / counts[k] for k in counts}
        row.update(ratio_max=ratio_max, ratio_min=ratio_min, grad_norm=grad_norm_sum / len(minibatches),
                   first_update_ratio_dev=first_ratio_dev)
        return row

    # ------------------------------------------------------------------------------------------
    def save_grid(self, name: str) -> None:
        """A PNG grid: `logging.grid_samples` samples (fixed seed) for each prompt, one row per prompt."""
        n = self.cfg.logging.grid_samples
        s = self.cfg.sampling
        self.model.eval()
        with torch.no_grad():
            out = sample(self.model, self.prompts, group_size=n, num_steps=s.num_steps,
                         guidance_scale=s.guidance_scale, eta=s.eta, kind=s.kind, seed=step_seed(self.cfg.seed, 0, 3))
        save_image_grid(out.images, self.run_dir / name, nrow=n)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m pec.train` argument parser (one option per config field)."""
    parser = argparse.ArgumentParser(prog="python -m pec.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    return parser


def config_from_argv(argv: Sequence[str] | None = None) -> Config:
    """Config from the command line; with --resume, the run folder's config.yaml is the base."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    if cfg.resume and cfg.run_dir:
        saved = Path(cfg.run_dir) / "config.yaml"
        if not saved.exists():
            raise ValueError(f"--resume: {saved} does not exist; is --run-dir the folder of an earlier run?")
        base = Config()
        apply_dict(base, load_yaml(saved))
        cfg = config_from_args(args, base)
    return cfg.validate()


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.train`."""
    try:
        cfg = config_from_argv(argv)
        trainer = Trainer(cfg)
    except ValueError as err:
        raise SystemExit(f"pec.train: {err}") from None
    trainer.run()
    print(f"run folder: {trainer.run_dir}")


if __name__ == "__main__":
    main()

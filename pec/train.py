"""`python -m pec.train`: GRPO, PEC, PCGS and the paper's baselines on a flow-matching model.

Methods (`--method`): grpo (with --train.kl_beta: GRPO + KL; with --train.clip_range_high: Clip-Higher),
entropy_bonus and entropy_sample (the policy-entropy bonus, analytic and per sample),
perc_entropy_bonus, pec, pcgs (reward or guided form), clip_cov and kl_cov (native or perceptual).

One training step:
1. rollouts: `prompts_per_step` prompts, `group_size` samples each with distinct noise, through
   `pec.sampling.sample` (CFG, the chosen SDE kind and window; the PCGS guided form shifts the
   velocity to push each group apart along its perceptual-entropy gradient, `pec.sampling.guidance_shift`,
   and stores the shift with the rollout);
2. the reward of every final image, and the perceptual features of every image in each space (scored
   in the rollout's micro-batches);
3. a (B, T) shaped-reward array (one column per trained step: R for GRPO, + lambda*omega_t*surprisal
   for PEC, - lambda*omega_t*(log p_perc - log p_theta_t) for PCGS's reward form), normalised per group
   and column into advantages;
4. `train.minibatches` policy updates: per trained step and micro-batch, the log-prob re-evaluated by
   `pec.sampling.step_log_prob` (exactly the rollout's code path and, with the rollout's forwards
   chunked by `train.micro_batch` too, the same batch shapes, so the first ratio is exactly 1),
   the clipped surrogate, the optional KL to the reference, gradients accumulated over the logical batch.

Under `torchrun` each process runs this loop on its share of the batch (`pec.distributed`): masks,
rewards and shaped rewards are gathered so that advantages and metrics cover the global batch, and
gradients are averaged over ranks (DDP for adapters, FSDP2 for full fine-tuning).
Every step appends a row to metrics.jsonl (and TensorBoard) and, by default, writes a checkpoint;
`--resume` continues from the newest valid one. Rollout noise is seeded by (seed, step, global sample
index) and minibatch order by (seed, step), so a resumed run reproduces the uninterrupted one, with
any number of processes.

Run safety (`pec.run_safety`, `pec.checkpoint`): samples with a non-finite reward, image, feature or
log-prob are masked out of their group (advantage 0); a non-finite loss or gradient skips the optimizer
update; `train.max_bad_steps` consecutive skipped steps stop the run; a non-finite state is never
written; SIGTERM/SIGINT checkpoint the last complete step and exit with 128 + the signal number.
"""
from __future__ import annotations

import argparse
import gc
import sys
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pec.checks import check_run
from pec.checkpoint import (
    NonFiniteStateError,
    checkpoint_files,
    checkpoint_name,
    has_checkpoint,
    load_checkpoint,
    nonfinite_entries,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from pec.cli import (
    EXIT_CODES_HELP,
    EXPECTED,
    CommandError,
    best_effort,
    expected_errors,
    fail,
    one_line,
    signal_exit_code,
)
from pec.config import (
    Config,
    add_config_arguments,
    apply_dict,
    config_from_args,
    load_yaml,
    save_yaml,
    to_dict,
)
from pec.covariance import COV_METHODS, CovSelection, select_entries
from pec.data import digit_prompt
from pec.data.prompt_files import load_prompt_splits
from pec.distributed import (
    DistContext,
    gather_order,
    minibatch_plan,
    plain_tensor,
    sample_noise,
)
from pec.entropy import group_entropy
from pec.grpo import clipped_surrogate, group_advantages
from pec.logging_utils import MetricsLog, TensorBoardLog, plot_metrics, save_image_grid
from pec.metrics import group_pairwise_distance
from pec.perceptual import build_space
from pec.policy import Policy, latent_dim, resolve_device
from pec.regularizers import (
    latent_group_log_density,
    omega_weights,
    pcgs_guidance,
    pcgs_reward,
    pec_reward,
    policy_entropy,
)
from pec.rewards import build_reward
from pec.run_safety import (
    BadStepGuard,
    Preempted,
    PreemptionHandler,
    TrainingStopped,
    finite_samples,
    group_validity,
    zero_invalid,
)
from pec.sampling import guided_velocity, sample, step_log_prob
from pec.syncs import documented_sync
from pec_kernels import knn_entropy

METRICS_FILE = "metrics.jsonl"
PLOT_KEYS = ("reward_mean", "policy_entropy", "perc_knn", "diversity")
PROG = "pec.train"


def default_prompts(source: str | None = None) -> list[str]:
    """The train split of `source` (--data.prompts), or the embedded world's "a handwritten 0" ... "9"."""
    return load_prompt_splits(source).train if source else [digit_prompt(d) for d in range(10)]


def step_seed(seed: int, step: int, stream: int = 0) -> int:
    """A distinct, reproducible seed per (run seed, step, stream) (rollouts and shuffles of a step)."""
    return (seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2**63 - 1)


def read_scalars(scalars: dict[str, Any]) -> dict[str, float]:
    """Logged values as Python floats, reading every device tensor among them in one host sync."""
    keys = [k for k, v in scalars.items() if isinstance(v, torch.Tensor)]
    with documented_sync():
        values = torch.stack([scalars[k].detach().double().reshape(()) for k in keys]).tolist() if keys else []
    out = {k: float(v) for k, v in scalars.items() if not isinstance(v, torch.Tensor)}
    out.update(zip(keys, values))
    return {k: out[k] for k in scalars}


class Trainer:
    """Runs one configuration to completion in its run folder (see the module docstring)."""

    def __init__(self, cfg: Config, prompts: Sequence[str] | None = None) -> None:
        self.cfg = check_run(cfg)
        s = cfg.sampling
        self.dist = DistContext.from_env(cfg.device, cfg.dist.timeout)
        self.dist.check_layout(s.prompts_per_step, s.group_size, cfg.dist.placement, cfg.method, cfg.pcgs.form,
                               cfg.pcgs.generation_density)
        cfg.dist.processes = self.dist.world_size
        self.placements = [self.dist.placement(s.prompts_per_step, s.group_size, cfg.dist.placement, rank=r)
                           for r in range(self.dist.world_size)]
        self.place = self.placements[self.dist.rank]
        self.device = resolve_device(self.dist.device(cfg.device))
        self.index = self.place.global_index.to(self.device)  # this rank's global sample indices
        self.order = gather_order(self.placements, self.device)  # gathered rows -> global order
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.run_dir = Path(cfg.run_dir or f"runs/{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
        found = has_checkpoint(self.run_dir)
        if cfg.resume and not found:
            raise ValueError(f"--resume: no checkpoint in {self.run_dir}; drop --resume to start a new run there")
        if not cfg.resume and found:
            raise ValueError(f"{self.run_dir} already holds a run: pass --resume to continue it, or another --run-dir")
        self.run_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.prompts = list(prompts) if prompts is not None else default_prompts(cfg.data.prompts)
        self.policy = Policy(cfg, self.device, shard=self.dist.active)
        self.model = self.policy.model
        self.reward_fn = build_reward(cfg.reward, device=self.device, directory=cfg.assets, paths=cfg.paths,
                                      http=cfg.reward_http)
        self.encoders = {name: build_space(name, device=self.device, directory=cfg.assets, paths=cfg.paths)
                         for name in cfg.perceptual.spaces}
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        self.start_step = 0
        self.guard = BadStepGuard(cfg.train.max_bad_steps)
        self.preemption = PreemptionHandler()  # installed for the duration of `run`
        # The regulariser space's features of the last bank_steps steps (whole batches, masked rows zeroed)
        # and their validity masks.
        self.bank: list[torch.Tensor] = []
        self.bank_valid: list[torch.Tensor] = []
        if cfg.resume:
            self.resume()
        self.last_complete, self.last_saved, self.last_rng = self.start_step, self.start_step, rng_state()
        main = self.dist.is_main  # rank 0 writes the run folder; the others only train
        if main:
            save_yaml(cfg, self.run_dir / "config.yaml")
        self.metrics = (MetricsLog.open(self.run_dir / METRICS_FILE, keep_through=self.start_step) if main
                        else MetricsLog(self.run_dir / METRICS_FILE, []))
        self.tb = TensorBoardLog(self.run_dir / "tensorboard", cfg.logging.tensorboard and main,
                                 purge_step=self.start_step + 1 if cfg.resume else None)
        self.dist.barrier()  # nobody starts step 1 before every rank has checked the run folder
        # What start-up built (models, encoders, optimizer) lives for the whole run: keep it out of the
        # cyclic garbage collector's full passes, which would otherwise walk it every few steps.
        gc.collect()
        gc.freeze()

    # ------------------------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        """Train from `start_step` to `train.steps` (or `train.stop_after` steps); return all metric rows.

        Raises `Preempted` after a SIGTERM/SIGINT and `TrainingStopped` when the run cannot go on; in
        both cases the last complete step has been checkpointed (if its state is finite).
        """
        cfg = self.cfg
        main = self.dist.is_main
        if self.start_step == 0:
            self.save_grid("samples_start.png")
        last = min(cfg.train.steps, self.start_step + (cfg.train.stop_after or cfg.train.steps))
        bar = tqdm(range(self.start_step + 1, last + 1), initial=self.start_step, total=cfg.train.steps,
                   desc=f"{cfg.method}", disable=not (cfg.logging.progress and main), dynamic_ncols=True)
        try:
            with self.preemption:
                try:
                    for step in bar:
                        row = self.train_step(step)
                        self.finish_step(step, row, last)
                        bar.set_postfix(reward=f"{row['reward_mean']:.3f}",
                                        H_perc=f"{row[f'perc_knn/{cfg.perceptual.space}']:.3f}")
                        self.preemption.check()
                except (Preempted, TrainingStopped):
                    self.checkpoint_last_complete()
                    raise
                except RuntimeError as err:
                    if self.preemption.signum is None:
                        raise
                    # Another rank took the signal first and left a collective this rank was in.
                    self.checkpoint_last_complete()
                    raise Preempted(self.preemption.signum) from err
        finally:
            # Cleanup never replaces the error that ends the run (a full disk fails this plot too).
            bar.close()
            if self.metrics.rows and main:
                with best_effort(f"writing {self.run_dir / 'curves.png'}"):
                    plot_metrics(self.metrics.rows, PLOT_KEYS, self.run_dir / "curves.png", title=self.run_dir.name)
            with best_effort("closing the TensorBoard log"):
                self.tb.close()
        if last == cfg.train.steps:
            self.save_grid("samples_end.png")
        return self.metrics.rows

    def finish_step(self, step: int, row: dict[str, Any], last: int) -> None:
        """Log a finished step, checkpoint it when due, and stop after too many skipped updates (every
        rank takes the same decisions: they rest on all-reduced numbers)."""
        causes = row.pop("_skip_causes")
        if self.dist.is_main:
            self.metrics.append(row)
        else:
            self.metrics.rows.append(row)
        self.tb.log(row, step)
        self.last_complete, self.last_rng = step, rng_state()
        self.preemption.committed = False
        self.guard.record(step, causes)
        milestone = bool(self.cfg.logging.milestone_every) and step % self.cfg.logging.milestone_every == 0
        if step % self.cfg.logging.checkpoint_every == 0 or step == last or milestone or self.guard.exhausted:
            self.save(step, milestone=milestone)
        if self.guard.exhausted:
            raise TrainingStopped(self.guard.message(step))

    def save(self, step: int, *, milestone: bool = False) -> None:
        """Checkpoint the current state as that of finished `step` (never a non-finite one). Every rank
        gathers the whole state (a collective under FSDP2); rank 0 writes it, by parameter name, so any
        process count can resume it."""
        model_state = self.policy.trainable_state()
        optimizer_state = self.policy.optimizer_state(self.optimizer)
        try:
            if not self.dist.is_main:
                bad = nonfinite_entries({"model": model_state, "optimizer": optimizer_state})
                if bad:
                    raise NonFiniteStateError(f"the state of step {step} holds NaN/Inf in {bad[0]}")
            else:
                save_checkpoint(self.run_dir, step=step, model_state=model_state, optimizer_state=optimizer_state,
                                config=to_dict(self.cfg), rng=self.last_rng,
                                extra={"guard": self.guard.state(), "bank": [b.cpu() for b in self.bank],
                                       "bank_valid": [v.cpu() for v in self.bank_valid]},
                                keep=self.cfg.logging.keep_checkpoints, milestone=milestone)
        except NonFiniteStateError as err:
            raise TrainingStopped(str(err)) from None
        except OSError as err:
            # Says nothing of older checkpoints: `recovery` does (a caller such as `main` adds it).
            raise OSError(f"could not write the checkpoint of step {step} into {self.run_dir} "
                          f"({err.strerror or err})") from err
        self.last_saved = step

    def recovery(self) -> str:
        """How to go on after a failure, for messages: the checkpoint of the last step this run saved or
        resumed from and the command that resumes it, or that the run has none (a message never names a
        checkpoint that is not on disk)."""
        launcher = "torchrun ... -m pec.train" if self.dist.active else "python -m pec.train"
        held = [p for p in checkpoint_files(self.run_dir) if p.name == checkpoint_name(self.last_saved)]
        if self.last_saved > 0 and held:
            return (f"the last checkpoint is step {self.last_saved} ({held[0]}); resume with: "
                    f"{launcher} --run-dir {self.run_dir} --resume")
        return f"{self.run_dir} holds no checkpoint of this run, so there is nothing to resume: run it again"

    def checkpoint_last_complete(self) -> None:
        """After a stop, make sure the last complete step is on disk (the in-memory state is its state:
        an abandoned step never reached its first optimizer update)."""
        if self.last_complete > self.last_saved and not self.preemption.committed:
            self.save(self.last_complete)

    def resume(self) -> None:
        """Load the newest valid checkpoint of the run folder and say which one it took (and which newer
        ones it skipped: torn, a full pickle, not a regular file, or not this run's model config)."""

        def skipped(path: Path, reason: str) -> None:
            if self.dist.is_main:
                print(f"pec.train: skipping checkpoint {path}: {reason}", file=sys.stderr)

        ckpt = load_checkpoint(self.run_dir, map_location=self.device, on_skip=skipped,
                               check=lambda payload: self.policy.check_checkpoint(payload, self.cfg))
        self.policy.load_trainable_state(ckpt["model"])
        self.policy.load_optimizer_state(self.optimizer, ckpt["optimizer"])
        set_rng_state(ckpt["rng"])
        self.guard.load_state(ckpt.get("extra", {}).get("guard", {}))
        extra = ckpt.get("extra", {})
        self.bank = [b.to(self.device) for b in extra.get("bank", [])]
        # Checkpoints from before the masks held only valid rows.
        self.bank_valid = [v.to(self.device) for v in extra.get(
            "bank_valid", [torch.ones(b.shape[0], dtype=torch.bool) for b in self.bank])]
        self.start_step = ckpt["step"]
        if self.dist.is_main:
            print(f"pec.train: resuming from {ckpt['path']} (step {self.start_step})", file=sys.stderr)

    # ------------------------------------------------------------------------------------------
    def rollout(self, step: int):
        """Sample one batch of groups for `step` (seeded by the step, so resuming reproduces it)."""
        cfg, s = self.cfg, self.cfg.sampling
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        if s.prompts_per_step <= len(self.prompts):
            chosen = torch.randperm(len(self.prompts), generator=gen)[:s.prompts_per_step]
        else:
            chosen = torch.randint(len(self.prompts), (s.prompts_per_step,), generator=gen)
        chosen = chosen.tolist()  # the step's G prompts, the same on every rank
        prompts = [self.prompts[chosen[i]] for i in self.place.prompt_slots]
        guidance_fn, guidance_weight = None, 0.0
        if cfg.method == "pcgs" and cfg.pcgs.form == "guided":
            spread = cfg.dist.placement == "spread" and self.dist.active
            guidance_fn, guidance_weight = pcgs_guidance(
                cfg, self.model.decode, self.encoders[cfg.perceptual.space], self.place.group_size, s.num_steps,
                gather=self.dist.gather_group_samples if spread else None)
        with torch.no_grad():
            noise = sample_noise(self.place.global_index, tuple(self.model.sample_shape), s.num_steps,
                                 step_seed(cfg.seed, step, stream=1), self.device)
            return sample(self.model, prompts, group_size=self.place.group_size, num_steps=s.num_steps,
                          guidance_scale=s.guidance_scale, eta=s.eta, kind=s.kind,
                          sde_window=tuple(s.sde_window) if s.sde_window else None, noise=noise,
                          guidance_fn=guidance_fn, guidance_weight=guidance_weight,
                          batch_size=cfg.train.micro_batch)

    def scores(self, images: torch.Tensor, prompts: Sequence[str]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Rewards (B,) and (B, D) features in each perceptual space, float32, no grad.

        Scored in the rollout's chunks of `train.micro_batch` images: bounded memory with real reward
        models, and the same batches whatever the number of processes (BLAS rounds a row by its batch).
        """
        step = self.cfg.train.micro_batch
        chunks = [slice(start, start + step) for start in range(0, images.shape[0], step)]
        with torch.no_grad():
            rewards = torch.cat([self.reward_fn(images[c], list(prompts[c])).float() for c in chunks])
            feats = {name: torch.cat([encoder(images[c]).float() for c in chunks])
                     for name, encoder in self.encoders.items()}
        return rewards, feats

    def perceptual_stats(self, feats: dict[str, torch.Tensor], valid: torch.Tensor
                         ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """Per-group perceptual entropies (kNN and Gaussian) and within-group diversity in each space over
        the valid samples, and the regulariser's per-sample surprisal in `perceptual.space` (0 for
        invalid samples). `feats` hold whole groups of `sampling.group_size` consecutive samples;
        `valid` is their (B,) mask on the device, which the estimators take as it is (no host read).
        Returns ({key: (G,) tensor}, surprisal (B,))."""
        p, n = self.cfg.perceptual, self.cfg.sampling.group_size
        group_mask = valid.reshape(-1, n)
        per_group: dict[str, torch.Tensor] = {}
        surprisal = None
        for name, f in feats.items():
            groups = f.reshape(-1, n, f.shape[-1])
            knn = group_entropy(groups, estimator="knn", k=p.k, per_dim=p.per_dim, valid=group_mask,
                                check_finite=False)
            gauss = group_entropy(groups, estimator="gaussian", per_dim=p.per_dim, valid=group_mask,
                                  check_finite=False)
            per_group[f"perc_knn/{name}"] = knn.entropy.double()
            per_group[f"perc_gauss/{name}"] = gauss.entropy.double()
            per_group[f"diversity/{name}"] = group_pairwise_distance(groups, group_mask)
            if name == p.space:
                surprisal = (knn if p.estimator == "knn" else gauss).surprisal.reshape(-1)
        return per_group, surprisal

    def step_perceptual(self, feats: dict[str, torch.Tensor], valid: torch.Tensor
                        ) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """`perceptual_stats` over the step's global batch, laid out by `dist.placement`: the logged means
        over valid groups (0-dim tensors, identical on every rank) and this rank's surprisal; with
        `perceptual.batch_metric`/`bank_steps`/`scope batch`, the kNN entropy of the whole batch too."""
        p = self.cfg.perceptual
        index = self.index
        spread = self.cfg.dist.placement == "spread" and self.dist.active
        gathered: dict[str, torch.Tensor] = {}
        if spread:
            # A group lives on every rank: gather each space's features, and every rank computes all groups.
            gathered = {name: self.dist.all_gather(f, self.order) for name, f in feats.items()}
            per_group, surprisal = self.perceptual_stats(gathered, valid)
        else:
            per_group, surprisal = self.perceptual_stats(feats, valid[index])
            keys = list(per_group)
            stacked = self.dist.all_gather(torch.stack([per_group[k] for k in keys], dim=1))
            per_group = {k: stacked[:, i] for i, k in enumerate(keys)}
        group_ok = valid.reshape(-1, self.cfg.sampling.group_size).any(dim=1).double()
        n_ok = group_ok.sum().clamp_min(1)
        row = {k: (v * group_ok).sum() / n_ok for k, v in per_group.items()}
        if p.batch_metric or p.bank_steps or p.scope == "batch":
            whole = gathered.get(p.space)
            if whole is None:
                whole = self.dist.all_gather(feats[p.space], self.order)
            batch_row, batch_surprisal = self.batch_entropy(whole, valid)
            row.update(batch_row)
            if p.scope == "batch":
                return row, batch_surprisal[index]
        return row, surprisal[index] if spread else surprisal

    def batch_entropy(self, feats: torch.Tensor, valid: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """The kNN entropy of the regulariser's space over the step's valid samples (B, D) (`valid` (B,) on
        the device), as one masked group, and against the bank of earlier steps' features; returns the
        logged values and the per-sample batch surprisal (B,) (0 for invalid samples). This is the
        large-N case the fused kNN kernel exists for. No host read: with fewer than k + 1 valid samples
        (every group masked) the batch entropy is 0, and so is the bank entropy with fewer than k valid
        bank rows."""
        p = self.cfg.perceptual
        out: dict[str, torch.Tensor] = {}
        normalize = "per_dim" if p.per_dim else "none"
        surprisal = torch.zeros(feats.shape[0], dtype=torch.float32, device=feats.device)
        if feats.shape[0] > p.k:
            batch = knn_entropy(feats, k=p.k, valid=valid, normalize=normalize, check_finite=False)
            surprisal = batch.surprisal
            out[f"perc_knn_batch/{p.space}"] = batch.entropy
        if p.bank_steps:
            if self.bank:
                bank = torch.cat(self.bank)
                if bank.shape[0] >= p.k:
                    against = knn_entropy(feats, k=p.k, reference=bank, valid=valid,
                                          reference_valid=torch.cat(self.bank_valid), normalize=normalize,
                                          check_finite=False)
                    out[f"perc_knn_bank/{p.space}"] = against.entropy
            # Masked rows are zeroed: the bank is checkpointed, and NaN must not reach a later step.
            self.bank = (self.bank + [zero_invalid(feats.detach(), valid)])[-p.bank_steps:]
            self.bank_valid = (self.bank_valid + [valid])[-p.bank_steps:]
        return out, surprisal

    def shaped_rewards(self, rewards: torch.Tensor, surprisal: torch.Tensor, old_log_probs: torch.Tensor,
                       latents: torch.Tensor | None = None, valid: torch.Tensor | None = None) -> torch.Tensor:
        """The (B, T) reward array of the method; `old_log_probs` (B, T) are the trained steps' log-probs,
        `latents` (B, ...) the final latents (needed by PCGS's `latent_group` generation density, zeroed where
        not finite) and `valid` their mask (the groups' latent fits leave masked samples out)."""
        cfg = self.cfg
        num_trained = old_log_probs.shape[1]
        if cfg.method == "pec":
            omega = omega_weights(cfg.pec.omega, num_trained, device=rewards.device)
            return pec_reward(rewards, surprisal, cfg.pec.lambda_, omega)
        if cfg.method == "pcgs" and cfg.pcgs.form == "reward":
            omega = omega_weights(cfg.pcgs.omega, num_trained, device=rewards.device)
            log_p_gen = old_log_probs
            if cfg.pcgs.generation_density == "latent_group":
                if latents is None:
                    raise ValueError("pcgs.generation_density latent_group needs the rollout's final latents")
                density = latent_group_log_density(latents, cfg.sampling.group_size, per_dim=cfg.perceptual.per_dim,
                                                   valid=valid, check_finite=False)
                log_p_gen = density[:, None].expand_as(old_log_probs)
            return pcgs_reward(rewards, -surprisal, log_p_gen, cfg.pcgs.lambda_, omega)
        if cfg.method == "entropy_sample":
            # The native entropy, per-sample reading: the bonus -log pi(x'|x) of each sampled transition,
            # 1/2 mean(eps^2) + a per-step constant. Its policy gradient is zero in expectation (an odd
            # moment of eps): GRPO plus noise, as the paper's Table 3 "PEC with H" suggests.
            return rewards.float()[:, None] - cfg.entropy_bonus.sample_coef * old_log_probs.detach().float()
        if cfg.method == "perc_entropy_bonus":
            # The perceptual entropy, analytic reading: the batch's entropy estimate (mean surprisal), the
            # same number for every sample (of every process), which group normalisation removes. Per
            # sample, it is PEC.
            bonus = cfg.entropy_bonus.coef * self.dist.all_gather(surprisal.detach().float()).mean()
            return rewards.float()[:, None].expand(-1, num_trained) + bonus
        return rewards.float()[:, None].expand(-1, num_trained)

    # ------------------------------------------------------------------------------------------
    def train_step(self, step: int) -> dict[str, Any]:
        """One rollout batch and its policy updates; returns the step's metrics row (its "_skip_causes"
        entry lists the updates that were skipped and why).

        Until its first optimizer update the step may be abandoned by a SIGTERM/SIGINT (`Preempted`).
        Host syncs (`pec.syncs`): one decision per optimizer update (finiteness, and whether it has a valid
        sample) and one read of the logged scalars at the end; the validity mask stays on the device.
        """
        cfg = self.cfg
        times: dict[str, float] = {}
        with self.preemption.abandonable():
            t0 = time.perf_counter()
            self.model.eval()
            rollout = self.rollout(step)
            times["rollout"] = time.perf_counter() - t0

            t = time.perf_counter()
            rewards, feats = self.scores(rollout.images, rollout.prompts)
            times["reward"] = time.perf_counter() - t

            t = time.perf_counter()
            # Flow-GRPO's rule (pec.sampling): the SDE steps among the first int(T * timestep_fraction).
            trained = rollout.train_steps(cfg.train.timestep_fraction)
            if not trained or trained[-1] - trained[0] + 1 != len(trained):
                raise ValueError(f"the trained steps must be a non-empty run of consecutive steps, got {trained} "
                                 f"(check sampling.sde_window, sampling.kind and train.timestep_fraction)")
            # Contiguous: a slice, not a host-built index (a blocking copy on a GPU).
            trained_rows = slice(trained[0], trained[-1] + 1)
            old_log_probs = rollout.log_probs[trained_rows].T.float()  # (B_local, T_trained)
            index = self.index
            # Masks over the step's global batch (identical on every rank), kept on the device: every use
            # below is a masked computation of fixed shape, so no host read of them.
            finite = self.dist.all_gather(finite_samples(rewards, rollout.images, old_log_probs, *feats.values()),
                                          self.order)
            valid = group_validity(finite, cfg.sampling.group_size, cfg.perceptual.k + 1)
            local_valid = valid[index]
            # No NaN of a masked sample may reach a forward or backward pass of the update (a copy where
            # every sample is valid, with the same values).
            rollout.latents = zero_invalid(rollout.latents, local_valid, dim=1)
            rollout.log_probs = zero_invalid(rollout.log_probs, local_valid, dim=1)
            if rollout.guidance is not None:
                rollout.guidance = zero_invalid(rollout.guidance, local_valid, dim=1)
            old_log_probs = rollout.log_probs[trained_rows].T.float()
            perc_row, surprisal = self.step_perceptual(feats, valid)
            times["perceptual"] = time.perf_counter() - t

            t = time.perf_counter()
            shaped = self.shaped_rewards(rewards, surprisal, old_log_probs, rollout.latents[-1], valid=local_valid)
            # Group statistics need every reward of a group: gather [R, R~] (B x (1 + T) floats).
            both = self.dist.all_gather(torch.cat([rewards[:, None], shaped], dim=1), self.order)
            rewards, shaped = both[:, 0], both[:, 1:]
            group_ids = torch.arange(shaped.shape[0], device=self.device) // cfg.sampling.group_size
            advantages = group_advantages(shaped, group_ids, global_std=cfg.train.global_std,
                                          clip=cfg.train.adv_clip, valid=valid,
                                          num_groups=shaped.shape[0] // cfg.sampling.group_size)
            cov = self.covariance_selection(step, old_log_probs, surprisal, advantages, valid)
            train_row, causes = self.update(step, rollout, trained, advantages[index], local_valid, valid, cov=cov)
            times["train"] = time.perf_counter() - t
            times["step"] = time.perf_counter() - t0

        n = cfg.sampling.group_size
        w = valid.float()
        n_valid = w.sum().clamp_min(1)
        clean = zero_invalid(rewards, valid)
        group_w = w.reshape(-1, n)
        group_n = group_w.sum(dim=1)
        group_mean = clean.reshape(-1, n).sum(dim=1) / group_n.clamp_min(1)
        group_var = ((clean.reshape(-1, n) - group_mean[:, None]) * group_w).square().sum(dim=1) / group_n.clamp_min(1)
        group_ok = (group_n > 0).float()
        scalars: dict[str, Any] = {
            "reward_mean": clean.sum() / n_valid,
            "reward_group_std": (group_var.sqrt() * group_ok).sum() / group_ok.sum().clamp_min(1),
            "shaped_reward_mean": zero_invalid(shaped, valid).sum() / (n_valid * shaped.shape[1]),
            "mask/invalid_samples": (~finite).sum(), "mask/masked_samples": (~valid).sum(),
            "mask/masked_groups": (group_ok == 0).sum()}
        scalars.update(perc_row)
        scalars.update(train_row)
        row: dict[str, Any] = {"step": step}
        row.update(read_scalars(scalars))
        row["skipped_updates"] = len(causes)
        row.update({f"time/{k}": v for k, v in times.items()})
        row["_skip_causes"] = causes
        return row

    def covariance_selection(self, step: int, old_log_probs: torch.Tensor, surprisal: torch.Tensor,
                             advantages: torch.Tensor, valid: torch.Tensor) -> CovSelection | None:
        """Clip-Cov / KL-Cov: the step's selected (sample, trained step) entries, this process's rows
        (`pec.covariance`); None for the other methods.

        Chosen once per step over the global batch from the rollout's stored log-probs (native) or
        -surprisal (perceptual) and the global (B, T) `advantages` and `valid` mask; Cui et al.'s Cov is
        of the current log pi, which at the first, on-policy update equals the stored one exactly.
        Clip-Cov's random draw is seeded by (seed, step).
        """
        cfg = self.cfg
        if cfg.method not in COV_METHODS:
            return None
        density = old_log_probs if cfg.cov.variant == "native" else -surprisal
        fraction = cfg.cov.detach_fraction if cfg.method == "clip_cov" else cfg.cov.kl_fraction
        selection = select_entries(cfg.method, self.dist.all_gather(density, self.order), advantages, valid,
                                   band=cfg.cov.band, fraction=fraction, kl_coef=cfg.cov.kl_coef,
                                   generator=torch.Generator().manual_seed(step_seed(cfg.seed, step, stream=4)))
        return selection.rows(self.index)

    def minibatches(self, step: int) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """This rank's micro-batches of each minibatch, and the minibatch's global sample indices (the
        union of every rank's share: `pec.distributed.minibatch_plan`, one draw for all ranks)."""
        cfg = self.cfg
        per_rank = [minibatch_plan(p.global_index, cfg.train.micro_batch, cfg.train.minibatches,
                                   torch.Generator().manual_seed(step_seed(cfg.seed, step, stream=2)))
                    for p in self.placements]
        return [(per_rank[self.dist.rank][m][0], torch.cat([plan[m][1] for plan in per_rank]))
                for m in range(cfg.train.minibatches)]

    def update(self, step: int, rollout, trained: list[int], advantages: torch.Tensor, valid: torch.Tensor,
               global_valid: torch.Tensor, cov: CovSelection | None = None
               ) -> tuple[dict[str, torch.Tensor], list[str]]:
        """`train.minibatches` optimizer updates on the rollout.

        Masked samples (`valid` False: this rank's rows; `global_valid`: the step's whole batch, both on
        the device) add nothing to the loss. An update whose loss or gradient is not finite is skipped
        (weights and optimizer moments untouched), and so is an update whose minibatch has no valid
        sample (with a cause when the whole step has none). Each update decides with one host read.
        `cov` (Clip-Cov / KL-Cov) detaches or penalises its selected entries.
        Returns the averaged diagnostics (0-dim device tensors) and the causes of the skipped updates.
        """
        cfg = self.cfg
        dim = latent_dim(self.model)
        minibatches = self.minibatches(step)
        # DDP and FSDP2 average gradients over ranks; every rank's loss is already a share of the global mean.
        loss_scale = self.dist.world_size
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        sums: dict[str, torch.Tensor] = defaultdict(lambda: zero)
        counts: dict[str, int] = defaultdict(int)
        first_ratio_dev, ratio_max, ratio_min = zero, zero - torch.inf, zero + torch.inf
        grad_norm_sum, updates, causes = zero, 0, []
        # The analytic policy entropy of each trained step, from the schedule's noise std on the host (no
        # device read): s is fixed by the schedule, and every trained step has s > 0.
        step_entropy = policy_entropy(rollout.step_std[trained], dim)
        entropies = step_entropy.tolist()
        # The optimizer's own parameter objects: FSDP2 swaps a module's parameters for unsharded views
        # between forwards, and only its sharded ones receive the gradients.
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.model.train()
        for mb_index, (chunks, mb) in enumerate(minibatches):
            self.optimizer.zero_grad(set_to_none=True)
            pieces = len(trained) * len(mb)  # the loss is a mean over the whole (global) minibatch
            mb_loss = zero
            passes = len(trained) * len(chunks)
            chunks_dev = [idx.to(self.device, non_blocking=True) for idx in chunks]  # once, not per trained step
            for col, t_index in enumerate(trained):
                for chunk_index, (idx, idx_dev) in enumerate(zip(chunks, chunks_dev)):
                    self.policy.gradient_sync(col * len(chunks) + chunk_index == passes - 1)
                    v_ref = None
                    if cfg.train.kl_beta > 0:
                        with torch.no_grad(), self.policy.reference() as ref_model:
                            v_ref = guided_velocity(ref_model, rollout, t_index, idx_dev)
                    out = step_log_prob(self.model, rollout, t_index, idx_dev, v_ref=v_ref,
                                        kl_units=cfg.train.kl_units)
                    old = rollout.log_probs[t_index, idx_dev].float()
                    adv = advantages[idx_dev, col]
                    keep = valid[idx_dev]
                    log_prob, penalty = out.log_prob.float(), None
                    if cov is not None:
                        log_prob, penalty = cov.apply(idx_dev, col, log_prob, old)
                    loss, stats = clipped_surrogate(log_prob, old, adv, cfg.train.clip_range, valid=keep,
                                                    clip_range_high=cfg.train.clip_range_high)
                    if penalty is not None:
                        loss = loss + penalty
                    surrogate = loss.detach()
                    if out.kl is not None:
                        loss = loss + cfg.train.kl_beta * (out.kl * keep).mean()
                    if cfg.method == "entropy_bonus":
                        # The analytic policy entropy depends on the schedule only: this term adds a
                        # constant to the loss and nothing to the gradient (the paper's diagnosis).
                        loss = loss - cfg.entropy_bonus.coef * loss.new_full((), entropies[col])
                    scaled = loss * len(idx) / pieces
                    (scaled * loss_scale).backward()
                    mb_loss = mb_loss + scaled.detach()
                    if mb_index == 0:
                        first_ratio_dev = torch.maximum(first_ratio_dev, torch.maximum(
                            (stats.ratio_max - 1).abs(), (stats.ratio_min - 1).abs()).double())
                    n = len(idx)
                    for key, value in (("loss", loss.detach()), ("surrogate", surrogate),
                                       ("ratio_mean", stats.ratio_mean), ("clip_fraction", stats.clip_fraction),
                                       ("approx_kl", stats.approx_kl), ("advantage_abs", adv.abs().mean())):
                        sums[key] = sums[key] + value.double() * n
                        counts[key] += n
                    if out.kl is not None:
                        sums["kl"] = sums["kl"] + out.kl.mean().double() * n
                        counts["kl"] += n
                    ratio_max = torch.maximum(ratio_max, stats.ratio_max.double())
                    ratio_min = torch.minimum(ratio_min, stats.ratio_min.double())
            mb_loss = self.dist.all_reduce_(mb_loss.clone())
            grad_norm = plain_tensor(torch.nn.utils.clip_grad_norm_(params, cfg.train.max_grad_norm))
            # The update's one host read: finiteness of loss and gradient, and whether the minibatch and
            # the step hold a valid sample.
            mb_valid = global_valid[mb.to(self.device, non_blocking=True)].any()
            decision = torch.stack([mb_loss.isfinite(), grad_norm.isfinite(), mb_valid, global_valid.any()])
            with documented_sync():
                loss_ok, grad_ok, mb_has_valid, step_has_valid = decision.tolist()
            if not mb_has_valid:
                if not step_has_valid:
                    causes.append(f"minibatch {mb_index}: no valid sample group (every group kept fewer than "
                                  f"perceptual.k + 1 = {cfg.perceptual.k + 1} samples with a finite reward, "
                                  f"image, features and log-probs)")
                continue
            if not (loss_ok and grad_ok):
                causes.append(f"minibatch {mb_index}: non-finite {'loss' if not loss_ok else 'gradient'}")
                continue
            self.preemption.commit()
            self.optimizer.step()
            grad_norm_sum = grad_norm_sum + grad_norm.double()
            updates += 1
        self.optimizer.zero_grad(set_to_none=True)
        keys = sorted(counts)
        weights = torch.tensor([float(counts[k]) for k in keys], dtype=torch.float64).to(self.device, non_blocking=True)
        totals = self.dist.all_reduce_(torch.cat([torch.stack([sums[k] for k in keys]), weights]))
        row = {k: totals[i] / totals[len(keys) + i] for i, k in enumerate(keys)}
        first_ratio_dev, ratio_max = self.dist.all_reduce_(torch.stack([first_ratio_dev, ratio_max]), "max")
        ratio_min = self.dist.all_reduce_(ratio_min.clone(), "min")
        entropy_mean = step_entropy.mean().tolist()
        row.update(policy_entropy=entropy_mean, policy_entropy_per_dim=entropy_mean / dim)
        row.update(ratio_max=ratio_max, ratio_min=ratio_min, first_update_ratio_dev=first_ratio_dev,
                   grad_norm=grad_norm_sum / updates if updates else zero + torch.nan)
        if cov is not None:
            row.update(cov.counts())
        return row, causes

    # ------------------------------------------------------------------------------------------
    def save_grid(self, name: str) -> None:
        """A PNG grid: `logging.grid_samples` samples (fixed seed) for each prompt, one row per prompt."""
        n = self.cfg.logging.grid_samples
        s = self.cfg.sampling
        self.model.eval()
        with torch.no_grad():
            out = sample(self.model, self.prompts, group_size=n, num_steps=s.num_steps,
                         guidance_scale=s.guidance_scale, eta=s.eta, kind=s.kind, seed=step_seed(self.cfg.seed, 0, 3))
        if self.dist.is_main:  # every rank samples: under FSDP2 each forward is a collective
            save_image_grid(out.images, self.run_dir / name, nrow=n)


def build_parser() -> argparse.ArgumentParser:
    """The `python -m pec.train` argument parser (one option per config field)."""
    parser = argparse.ArgumentParser(prog="python -m pec.train", description=__doc__, epilog=EXIT_CODES_HELP,
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
    return check_run(cfg)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of `python -m pec.train`, with the exit codes of `pec.cli`.

    Exits 2 with one line for a configuration or run folder refused at start-up; 1 with one line for a
    run that cannot go on (a full disk, a peer gone, too many skipped updates), naming the checkpoint to
    resume from, if any; 128 + the signal number after SIGTERM/SIGINT, once the last complete step is
    checkpointed.
    """
    with expected_errors(PROG, before_work=True):
        cfg = config_from_argv(argv)
        try:
            trainer = Trainer(cfg)
        except torch.distributed.DistError as err:
            raise CommandError(f"could not set up the process group ({one_line(err)}): a process died or did "
                               f"not join within --dist.timeout {cfg.dist.timeout:g} s") from err
    try:
        with expected_errors(PROG):
            try:
                trainer.run()
            except Preempted as sig:
                code = signal_exit_code(sig.signum)
                if trainer.dist.is_main:
                    fail(PROG, f"{sig.signame}: stopped after step {trainer.last_complete}; {trainer.recovery()}",
                         code)
                raise SystemExit(code) from None
            except (TrainingStopped, *EXPECTED) as err:
                raise CommandError(f"{one_line(err)}; {trainer.recovery()}") from err
            except RuntimeError as err:
                if not trainer.dist.active:
                    raise
                first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
                raise CommandError(f"rank {trainer.dist.rank}: a collective failed ({first}): another process "
                                   f"died or did not answer within --dist.timeout {trainer.cfg.dist.timeout:g} s; "
                                   f"{trainer.recovery()}") from err
    finally:
        with best_effort("leaving the process group"):
            trainer.dist.close()
    if trainer.dist.is_main:
        print(f"run folder: {trainer.run_dir}")


if __name__ == "__main__":
    main()

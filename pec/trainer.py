"""The training loop: one configuration run to completion in its run folder, a step at a time.

A step reads as its four phases (`Trainer.train_step`):
1. rollout: the algorithm's plan for the step (`pec.algorithms`: which steps are SDE steps with a
   log-prob, which are ODE steps, whether a group shares its initial noise), then `prompts_per_step`
   prompts x `group_size` samples through `pec.sampling.sample`, with the regulariser's guidance if it has
   one (PCGS's guided form, `pec.methods`);
2. scoring: the reward of every image and its features in each perceptual space (`pec.scoring`), the
   validity masks of run safety, and the step's perceptual statistics (per-group entropies, the
   regulariser's surprisal); a video model's samples are clips (B, F, C, H, W), which the rewards and
   spaces take on a few frames of each (`pec.video`);
3. reward shaping: the regulariser's shaped rewards, one column per advantage column of the algorithm,
   gathered over processes and turned into advantages (group-normalised, or the regulariser's own);
4. update: the algorithm's optimizer updates on the step's `UpdateBatch`, with the regulariser's loss
   terms.
Then the step's metrics row is logged and, when due, the state is checkpointed.

Under `torchrun` each process runs this loop on its share of the batch (`pec.distributed`): masks,
rewards and shaped rewards are gathered so that advantages and metrics cover the global batch, and
gradients are averaged over ranks (DDP for adapters, FSDP2 for full fine-tuning). Rollout noise is
seeded by (seed, step, global sample index) and minibatch order by (seed, step) (`pec.seeding`), so a
resumed run reproduces the uninterrupted one, with any number of processes.

Run safety (`pec.run_safety`, `pec.checkpoint`): samples with a non-finite reward, image, feature or
log-prob are masked out of their group (advantage 0); a non-finite loss or gradient skips the optimizer
update; `train.max_bad_steps` consecutive skipped steps stop the run; a non-finite state is never
written; SIGTERM/SIGINT checkpoint the last complete step and the run exits with 128 + the signal number.
"""
from __future__ import annotations

import gc
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pec.algorithms import algorithm_class, build_algorithm
from pec.algorithms.base import Learner, RolloutPlan, UpdateBatch
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
from pec.cli import best_effort
from pec.config import Config, save_yaml, secret_values, to_dict
from pec.data.prompt_files import default_prompts
from pec.distributed import DistContext, gather_order, minibatch_plan, sample_noise
from pec.grpo import group_advantages
from pec.logging_utils import MetricsLog, TensorBoardLog, WandbLog, check_wandb, plot_metrics, save_image_grid
from pec.methods import build_method
from pec.methods.base import GuidanceContext, ShapingInputs, StepContext, TermsInputs
from pec.perceptual import space_for_run
from pec.policy import Policy, latent_dim, resolve_device
from pec.regularizers import policy_entropy
from pec.rewards import reward_for_run
from pec.run_safety import (
    BadStepGuard,
    Preempted,
    PreemptionHandler,
    TrainingStopped,
    finite_samples,
    group_validity,
    zero_invalid,
)
from pec.sampling import Rollout, sample
from pec.scoring import PerceptualStats, Scorer
from pec.seeding import step_seed
from pec.syncs import documented_sync

METRICS_FILE = "metrics.jsonl"
PLOT_KEYS = ("reward_mean", "policy_entropy", "perc_knn", "diversity")


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
        check_wandb(cfg.logging)  # before any model loads
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
        self.spread = cfg.dist.placement == "spread" and self.dist.active
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
        self.method = build_method(cfg)
        self.policy = Policy(cfg, self.device, shard=self.dist.active,
                             reference=algorithm_class(cfg).needs_reference(cfg) or self.method.needs_reference())
        self.model = self.policy.model
        # A video model's clips: the rewards see --reward_video.frames of their frames, the spaces pool theirs.
        self.reward_fn = reward_for_run(cfg.reward, cfg, self.device)
        self.encoders = {name: space_for_run(name, cfg, self.device) for name in cfg.perceptual.spaces}
        self.scorer = Scorer(self.reward_fn, self.encoders, cfg.train.micro_batch, overlap=cfg.train.overlap_scoring)
        self.perceptual = PerceptualStats(cfg, self.gather, self.dist.all_gather, self.spread, self.index)
        self.optimizer = torch.optim.AdamW(self.policy.trainable_parameters(), lr=cfg.train.lr,
                                           weight_decay=cfg.train.weight_decay)
        self.start_step = 0
        self.guard = BadStepGuard(cfg.train.max_bad_steps)
        self.preemption = PreemptionHandler()  # installed for the duration of `run`
        self.algorithm = build_algorithm(cfg, Learner(cfg, self.policy, self.optimizer, self.dist, self.device,
                                                      self.preemption))
        self.method.bind(self.policy)
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
        self.wandb = WandbLog(self.run_dir, cfg.logging, to_dict(cfg), enabled=main, resume=cfg.resume,
                              secrets=secret_values(cfg))
        self.dist.barrier()  # nobody starts step 1 before every rank has checked the run folder
        # What start-up built (models, encoders, optimizer) lives for the whole run: keep it out of the
        # cyclic garbage collector's full passes, which would otherwise walk it every few steps.
        gc.collect()
        gc.freeze()

    def gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Every rank's per-sample `rows`, in the step's global sample order (the identity with one process)."""
        return self.dist.all_gather(rows, self.order)

    # ------------------------------------------------------------------------------------------ the run
    def run(self) -> list[dict[str, Any]]:
        """Train from `start_step` to `train.steps` (or `train.stop_after` steps); return all metric rows.

        Raises `Preempted` after a SIGTERM/SIGINT and `TrainingStopped` when the run cannot go on; in
        both cases the last complete step has been checkpointed (if its state is finite).
        """
        cfg = self.cfg
        main = self.dist.is_main
        if self.start_step == 0:
            self.save_grid("samples_start.png", 0)
        last = min(cfg.train.steps, self.start_step + (cfg.train.stop_after or cfg.train.steps))
        bar = tqdm(range(self.start_step + 1, last + 1), initial=self.start_step, total=cfg.train.steps,
                   desc=f"{cfg.method}", disable=not (cfg.logging.progress and main), dynamic_ncols=True)
        finished = False
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
            finished = True
        finally:
            # Cleanup never replaces the error that ends the run (a full disk fails this plot too).
            bar.close()
            if self.metrics.rows and main:
                with best_effort(f"writing {self.run_dir / 'curves.png'}"):
                    plot_metrics(self.metrics.rows, PLOT_KEYS, self.run_dir / "curves.png", title=self.run_dir.name)
            with best_effort("closing the TensorBoard log"):
                self.tb.close()
            self.scorer.close()
            if not finished:  # the run ends with an error: W&B marks its run failed
                with best_effort("finishing the W&B run"):
                    self.wandb.close(failed=True)
        if last == cfg.train.steps:
            self.save_grid("samples_end.png", last)
        self.wandb.close()
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
        self.wandb.log(row, step)
        self.last_complete, self.last_rng = step, rng_state()
        self.preemption.committed = False
        self.guard.record(step, causes)
        milestone = bool(self.cfg.logging.milestone_every) and step % self.cfg.logging.milestone_every == 0
        if step % self.cfg.logging.checkpoint_every == 0 or step == last or milestone or self.guard.exhausted:
            self.save(step, milestone=milestone)
        if self.guard.exhausted:
            raise TrainingStopped(self.guard.message(step))

    # ------------------------------------------------------------------------------------------ checkpoints
    def save(self, step: int, *, milestone: bool = False) -> None:
        """Checkpoint the current state as that of finished `step` (never a non-finite one). Every rank
        gathers the whole state (a collective under FSDP2); rank 0 writes it, by parameter name, so any
        process count can resume it. Besides weights, optimizer and RNG states, it holds the bad-step
        counters, the feature bank and the algorithm's own state."""
        model_state = self.policy.trainable_state()
        optimizer_state = self.policy.optimizer_state(self.optimizer)
        algorithm_state = self.algorithm.state_dict()  # on every rank too: it may gather a sharded state
        method_state = self.method.state_dict()  # likewise
        try:
            if not self.dist.is_main:
                bad = nonfinite_entries({"model": model_state, "optimizer": optimizer_state})
                if bad:
                    raise NonFiniteStateError(f"the state of step {step} holds NaN/Inf in {bad[0]}")
            else:
                extra = {"guard": self.guard.state(), **self.perceptual.state_dict(),
                         "algorithm": algorithm_state, "method": method_state}
                save_checkpoint(self.run_dir, step=step, model_state=model_state, optimizer_state=optimizer_state,
                                config=to_dict(self.cfg), rng=self.last_rng, extra=extra,
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
        extra = ckpt.get("extra", {})
        self.guard.load_state(extra.get("guard", {}))
        self.perceptual.load_state_dict(extra, self.device)
        self.algorithm.load_state_dict(extra.get("algorithm", {}))
        self.method.load_state_dict(extra.get("method", {}))
        self.start_step = ckpt["step"]
        if self.dist.is_main:
            print(f"pec.train: resuming from {ckpt['path']} (step {self.start_step})", file=sys.stderr)

    # ------------------------------------------------------------------------------------------ one step
    def train_step(self, step: int) -> dict[str, Any]:
        """One rollout batch and its policy updates, in the four phases of the module docstring; returns
        the step's metrics row (its "_skip_causes" entry lists the updates that were skipped and why).

        Until its first optimizer update the step may be abandoned by a SIGTERM/SIGINT (`Preempted`).
        Host syncs (`pec.syncs`): one decision per optimizer update (finiteness, and whether it has a valid
        sample) and one read of the logged scalars at the end; the validity mask stays on the device.
        With `train.overlap_scoring` the micro-batches are scored while the rollout goes on (`pec.scoring`):
        time/rollout then includes handing them to the scorer, and time/reward is what is left to wait for.
        """
        times: dict[str, float] = {}
        overlap = self.cfg.train.overlap_scoring
        with self.preemption.abandonable():
            t0 = time.perf_counter()
            self.model.eval()
            try:
                rollout = self.rollout(step, self.algorithm.plan(step),
                                       on_decoded=self.scorer.submit if overlap else None)
                times["rollout"] = time.perf_counter() - t0

                t = time.perf_counter()
                rewards, feats = (self.scorer.collect() if overlap
                                  else self.scorer.score(rollout.images, rollout.prompts))
                times["reward"] = time.perf_counter() - t
            except BaseException:  # an abandoned step leaves nothing for the next one to collect
                self.scorer.discard()
                raise

            t = time.perf_counter()
            masks = self.mask_invalid(rollout, rewards, feats)
            perc_row, surprisal = self.perceptual.step(feats, masks.valid)
            times["perceptual"] = time.perf_counter() - t

            t = time.perf_counter()
            batch, rewards, shaped = self.shape(step, rollout, masks, rewards, surprisal,
                                                feats[self.cfg.perceptual.space])
            train_row, causes = self.algorithm.update(batch)
            times["train"] = time.perf_counter() - t
            times["step"] = time.perf_counter() - t0
        return self.step_row(step, rewards, shaped, masks, perc_row, train_row, causes, times)

    def rollout(self, step: int, plan: RolloutPlan | None = None,
                on_decoded: Callable[[torch.Tensor, list[str]], None] | None = None) -> Rollout:
        """Phase 1: sample one batch of groups for `step` as `plan` (default: the algorithm's) says, seeded by
        the step, so resuming reproduces it; `on_decoded(images, prompts)` gets each micro-batch as soon as it
        is decoded (`pec.sampling.sample`)."""
        cfg, s = self.cfg, self.cfg.sampling
        plan = self.algorithm.plan(step) if plan is None else plan
        gen = torch.Generator().manual_seed(step_seed(cfg.seed, step))
        if s.prompts_per_step <= len(self.prompts):
            chosen = torch.randperm(len(self.prompts), generator=gen)[:s.prompts_per_step]
        else:
            chosen = torch.randint(len(self.prompts), (s.prompts_per_step,), generator=gen)
        chosen = chosen.tolist()  # the step's G prompts, the same on every rank
        prompts = [self.prompts[chosen[i]] for i in self.place.prompt_slots]
        guidance_fn, guidance_weight = self.method.guidance(GuidanceContext(
            self.model.decode, self.encoders[cfg.perceptual.space], self.place.group_size, s.num_steps,
            self.dist.gather_group_samples if self.spread else None))
        with torch.no_grad(), self.algorithm.sampling_policy():
            noise = sample_noise(self.place.global_index, tuple(self.model.sample_shape), s.num_steps,
                                 step_seed(cfg.seed, step, stream=1), self.device,
                                 shared_group=s.group_size if plan.shared_noise else None)
            return sample(self.model, prompts, group_size=self.place.group_size, num_steps=s.num_steps,
                          guidance_scale=s.guidance_scale, eta=s.eta if plan.eta is None else plan.eta, kind=s.kind,
                          sde_window=plan.sde_window, noise=noise, guidance_fn=guidance_fn,
                          guidance_weight=guidance_weight, batch_size=cfg.train.micro_batch, solver=plan.solver,
                          record_means=plan.record_means, on_decoded=on_decoded)

    def mask_invalid(self, rollout: Rollout, rewards: torch.Tensor, feats: dict[str, torch.Tensor]) -> _Masks:
        """Phase 2's run safety: which samples the step may learn from, over the global batch (identical
        on every rank, kept on the device: every use is a masked computation of fixed shape, so no host
        read). The rollout's rows of masked samples are zeroed in place, so that no NaN reaches a forward
        or backward pass of the update (a copy where every sample is valid, with the same values)."""
        cfg = self.cfg
        trained = rollout.train_steps(cfg.train.timestep_fraction)  # the one rule: pec.sampling.trained_steps
        if "log_probs" in self.algorithm.provides and (not trained or trained[-1] - trained[0] + 1 != len(trained)):
            raise ValueError(f"the trained steps must be a non-empty run of consecutive steps, got {trained} "
                             f"(check sampling.sde_window, sampling.kind and train.timestep_fraction)")
        # Contiguous: a slice, not a host-built index (a blocking copy on a GPU).
        rows = slice(trained[0], trained[-1] + 1) if trained else slice(0, 0)
        finite = self.gather(finite_samples(rewards, rollout.images, rollout.log_probs[rows].T.float(),
                                            *feats.values()))
        valid = group_validity(finite, cfg.sampling.group_size, cfg.perceptual.k + 1)
        local_valid = valid[self.index]
        rollout.latents = zero_invalid(rollout.latents, local_valid, dim=1)
        rollout.log_probs = zero_invalid(rollout.log_probs, local_valid, dim=1)
        if rollout.guidance is not None:
            rollout.guidance = zero_invalid(rollout.guidance, local_valid, dim=1)
        if rollout.means is not None:
            rollout.means = zero_invalid(rollout.means, local_valid, dim=1)
        return _Masks(trained, rows, finite, valid, local_valid)

    def shape(self, step: int, rollout: Rollout, masks: _Masks, rewards: torch.Tensor, surprisal: torch.Tensor,
              features: torch.Tensor) -> tuple[UpdateBatch, torch.Tensor, torch.Tensor]:
        """Phase 3: the regulariser's shaped rewards (B_local, C), gathered with the rewards over the global
        batch, and the advantages (group-normalised, or the regulariser's own); returns the update's batch
        and the global rewards (B,) and shaped rewards (B, C) for the metrics. `features` are this rank's
        (B_local, D) in the regulariser's space."""
        cfg = self.cfg
        ctx = StepContext(step, cfg, self.gather, self.index)
        columns = self.algorithm.columns(masks.trained)
        log_probs = rollout.log_probs[masks.rows].T.float() if "log_probs" in self.algorithm.provides else None
        shaped = self.method.shape(ShapingInputs(rewards, surprisal, log_probs, rollout.latents[-1], masks.local_valid,
                                                 columns, features, rollout.images, rollout.prompts), ctx)
        # Group statistics need every reward of a group: gather [R, R~] (B x (1 + C) floats).
        both = self.gather(torch.cat([rewards[:, None], shaped], dim=1))
        rewards, shaped = both[:, 0], both[:, 1:]
        advantages = self.method.advantages(shaped, masks.valid, ctx)
        if advantages is None:
            group_ids = torch.arange(shaped.shape[0], device=self.device) // cfg.sampling.group_size
            advantages = group_advantages(shaped, group_ids, global_std=cfg.train.global_std,
                                          clip=cfg.train.adv_clip, valid=masks.valid,
                                          num_groups=shaped.shape[0] // cfg.sampling.group_size)
        terms = None
        if log_probs is not None:
            step_entropy = (policy_entropy(rollout.step_std[masks.trained], latent_dim(self.model)).tolist()
                            if "policy_entropy" in self.algorithm.provides else [])
            terms = self.method.loss_terms(TermsInputs(log_probs, surprisal, advantages, masks.valid, step_entropy,
                                                       latent_dim(self.model), masks.trained), ctx)
        batch = UpdateBatch(step, rollout, masks.trained, advantages[self.index], masks.local_valid, masks.valid,
                            self.minibatches(step), terms)
        return batch, rewards, shaped

    def minibatches(self, step: int) -> list[tuple[list[torch.Tensor], torch.Tensor]]:
        """This rank's micro-batches of each minibatch, and the minibatch's global sample indices (the
        union of every rank's share: `pec.distributed.minibatch_plan`, one draw for all ranks)."""
        cfg = self.cfg
        per_rank = [minibatch_plan(p.global_index, cfg.train.micro_batch, cfg.train.minibatches,
                                   torch.Generator().manual_seed(step_seed(cfg.seed, step, stream=2)))
                    for p in self.placements]
        return [(per_rank[self.dist.rank][m][0], torch.cat([plan[m][1] for plan in per_rank]))
                for m in range(cfg.train.minibatches)]

    def step_row(self, step: int, rewards: torch.Tensor, shaped: torch.Tensor, masks: _Masks,
                 perc_row: dict[str, torch.Tensor], train_row: dict[str, Any], causes: list[str],
                 times: dict[str, float]) -> dict[str, Any]:
        """The step's metrics row: reward and shaped-reward statistics over the valid samples, the mask
        counts, the perceptual statistics, the update's diagnostics and the phases' times (one host read)."""
        n = self.cfg.sampling.group_size
        valid = masks.valid
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
            "mask/invalid_samples": (~masks.finite).sum(), "mask/masked_samples": (~valid).sum(),
            "mask/masked_groups": (group_ok == 0).sum()}
        scalars.update(perc_row)
        scalars.update(self.method.metrics())
        scalars.update(train_row)
        row: dict[str, Any] = {"step": step}
        row.update(read_scalars(scalars))
        row["skipped_updates"] = len(causes)
        row.update({f"time/{k}": v for k, v in times.items()})
        row["_skip_causes"] = causes
        return row

    # ------------------------------------------------------------------------------------------ grids
    def save_grid(self, name: str, step: int) -> None:
        """A PNG grid: `logging.grid_samples` samples (fixed seed) for each prompt, one row per prompt (a video
        model: frame strips, one row per sample, and an animated GIF grid: `save_image_grid`); to W&B as an image
        at `step`."""
        n = self.cfg.logging.grid_samples
        s = self.cfg.sampling
        self.model.eval()
        with torch.no_grad():
            out = sample(self.model, self.prompts, group_size=n, num_steps=s.num_steps,
                         guidance_scale=s.guidance_scale, eta=s.eta, kind=s.kind, seed=step_seed(self.cfg.seed, 0, 3))
        if self.dist.is_main:  # every rank samples: under FSDP2 each forward is a collective
            save_image_grid(out.images, self.run_dir / name, nrow=n)
            self.wandb.log_image(Path(name).stem, self.run_dir / name, step)


@dataclass
class _Masks:
    """A step's validity masks (phase 2): the trained steps and their rows of the rollout's log-probs, the
    global (B,) `finite` and `valid` masks and this rank's `local_valid` rows."""

    trained: list[int]
    rows: slice
    finite: torch.Tensor
    valid: torch.Tensor
    local_valid: torch.Tensor

"""End-to-end iteration benchmark (issue 11, item 7, CPU part): our trainer against a Flow-GRPO-style loop.

One iteration = sample a batch with CFG, score it, compute group advantages, and train on every
sampled (SDE) step, ending with one optimizer update. Both sides use the same embedded model (the
shipped weights, LoRA), batch (prompts_per_step x group_size), CFG scale 2, η, schedule, number of
trained steps, micro-batch and optimizer, in the same process:
  ours:   pec.train.Trainer(...).train_step(step) for method "grpo" (the target) and "pec" (reported);
  anchor: the loop as Flow-GRPO writes it (after notes/peers.md and notes/kernels.md §3): eager, a
          per-sample timestep lookup (nonzero() + .item() per sample, diffusers' index_for_timestep),
          CFG as one concatenated [uncond; cond] forward at twice the batch, the SDE step and its
          log-prob by Flow-GRPO's fp32 formula, and one training pass (forward + backward) per timestep
          and micro-batch, with the clipped PPO surrogate.
Target: ours (grpo) runs at >= 0.95x the anchor's iterations per second (median of 5). The GPU part
of item 7 (an SD3.5-M-size transformer) needs a GPU and is not in this file.
Run: `pytest benchmarks/bench_iteration.py --benchmark-only -s` (a minute or two on 2 cores).
"""
from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path

import torch

from _timing import Measurement, run_benchmark
from bench_sde import flow_grpo_formula
from pec.config import Config, apply_dict
from pec.models.base import PromptBatch
from pec.train import Trainer

CFG_SCALE = 2.0
REPS = 5
TARGET = ">= 0.95x"


def _trainer(run_dir: Path, method: str) -> Trainer:
    cfg = Config()
    apply_dict(cfg, {"device": "cpu", "method": method, "run_dir": str(run_dir), "seed": 0,
                     "sampling": {"guidance_scale": CFG_SCALE},
                     "logging": {"tensorboard": False, "progress": False}})
    return Trainer(cfg)


def _index_for_timestep(timesteps: torch.Tensor, t: torch.Tensor) -> int:
    """diffusers' FlowMatchEulerDiscreteScheduler.index_for_timestep: nonzero() and .item() (host syncs)."""
    indices = (timesteps == t).nonzero()
    return indices[1 if len(indices) > 1 else 0].item()


class FlowGrpoLoop:
    """One Flow-GRPO-style iteration on a Trainer's model, reward, optimizer and settings."""

    def __init__(self, trainer: Trainer):
        self.trainer, self.model, self.cfg = trainer, trainer.model, trainer.cfg
        s = self.cfg.sampling
        self.sigmas = self.model.schedule(s.num_steps, trainer.device).float()
        self.timesteps = self.sigmas[:-1] * 1000  # diffusers keeps timesteps = 1000 σ on the device
        self.sigmas_cpu = self.sigmas.cpu()      # ... and the sigmas on the CPU

    def _velocity(self, x: torch.Tensor, t: torch.Tensor, cond: PromptBatch, uncond: PromptBatch) -> torch.Tensor:
        """CFG as Flow-GRPO runs it: one forward of [uncond; cond] at twice the batch, then the combine."""
        v = self.model.velocity(torch.cat([x, x]), torch.cat([t, t]) / 1000, PromptBatch.cat([uncond, cond]))
        v_uncond, v_cond = v.chunk(2)
        return v_uncond + CFG_SCALE * (v_cond - v_uncond)

    def _step(self, x, v, t, prev_sample=None, noise=None):
        """Flow-GRPO's sde_step_with_logprob: the per-sample timestep lookup loop, then the fp32 formula."""
        step_index = [_index_for_timestep(self.timesteps, ti) for ti in t]
        shape = (-1,) + (1,) * (x.dim() - 1)
        sigma = self.sigmas_cpu[step_index].view(shape).to(x.device)
        sigma_prev = self.sigmas_cpu[[i + 1 for i in step_index]].view(shape).to(x.device)
        return flow_grpo_formula(x, v, sigma, sigma_prev, self.sigmas_cpu[1].item(), prev_sample, noise)

    def iteration(self, seed: int) -> None:
        s, tr = self.cfg.sampling, self.cfg.train
        gen = torch.Generator().manual_seed(seed)
        prompts = [self.trainer.prompts[i] for i in torch.randperm(len(self.trainer.prompts), generator=gen)[
            :s.prompts_per_step].tolist()]
        expanded = [p for p in prompts for _ in range(s.group_size)]
        b = len(expanded)
        cond = PromptBatch.cat([self.model.encode_prompts([p]) for p in prompts]).repeat_interleave(s.group_size)
        uncond = self.model.encode_prompts([""]).repeat_interleave(b)
        # Sampling: eager, B samples at once, every step an SDE step with its log-prob.
        self.model.eval()
        x = torch.randn((b, *self.model.sample_shape), generator=gen)
        latents, log_probs = [x], []
        with torch.no_grad():
            for i in range(s.num_steps):
                t = self.timesteps[i].expand(b)
                v = self._velocity(x, t, cond, uncond)
                x, log_prob, _, _ = self._step(x, v, t, noise=torch.randn(x.shape, generator=gen))
                latents.append(x)
                log_probs.append(log_prob)
            images = self.model.decode(x).float().clamp(0, 1)
            rewards = torch.cat([self.trainer.reward_fn(images[c], [expanded[j] for j in c.tolist()]).float()
                                 for c in torch.arange(b).split(tr.micro_batch)])
        grouped = rewards.view(-1, s.group_size)
        advantages = ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).view(-1)
        advantages = advantages.clamp(-tr.adv_clip, tr.adv_clip)
        # Training: one pass per timestep and micro-batch, gradients accumulated, one optimizer update.
        self.model.train()
        optimizer = self.trainer.optimizer
        optimizer.zero_grad(set_to_none=True)
        passes = s.num_steps * len(range(0, b, tr.micro_batch))
        for i in range(s.num_steps):
            for start in range(0, b, tr.micro_batch):
                rows = slice(start, min(start + tr.micro_batch, b))
                t = self.timesteps[i].expand(rows.stop - rows.start)
                v = self._velocity(latents[i][rows], t, cond.index(rows), uncond.index(rows))
                _, log_prob, _, _ = self._step(latents[i][rows], v, t, prev_sample=latents[i + 1][rows])
                ratio = torch.exp(log_prob - log_probs[i][rows])
                adv = advantages[rows]
                unclipped = -adv * ratio
                clipped = -adv * torch.clamp(ratio, 1 - tr.clip_range, 1 + tr.clip_range)
                (torch.maximum(unclipped, clipped).mean() / passes).backward()
        torch.nn.utils.clip_grad_norm_(self.trainer.policy.trainable_parameters(), tr.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def _median_s(fn, reps: int) -> float:
    fn(0)  # warm-up (first-call allocations, lazy initialisation)
    times = []
    for rep in range(1, reps + 1):
        start = time.perf_counter()
        fn(rep)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def test_iteration_cpu_ours_vs_flow_grpo(benchmark, result_table):
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        trainers = {m: _trainer(Path(tmp) / m, m) for m in ("grpo", "pec")}
        s = trainers["grpo"].cfg.sampling
        case = (f"cpu iteration, embedded model, B={s.prompts_per_step}x{s.group_size}, {s.num_steps} SDE steps, "
                f"CFG {CFG_SCALE:g} ({torch.get_num_threads()} threads)")
        anchor = FlowGrpoLoop(trainers["grpo"])
        ours = {m: _median_s(lambda rep, t=t: t.train_step(rep), REPS) for m, t in trainers.items()}
        anchor_s = _median_s(anchor.iteration, REPS)
        rows = []
        run_benchmark(benchmark, lambda: rows.append(trainers["grpo"].train_step(REPS + 1)), rounds=1,
                      warmup_rounds=0)
    for method, seconds in ours.items():
        result_table.add(case, f"ours (Trainer.train_step, {method})", Measurement(seconds * 1e3),
                         f"{s.prompts_per_step * s.group_size / seconds:.1f} images/s")
    result_table.add(case, "anchor (Flow-GRPO-style loop)", Measurement(anchor_s * 1e3),
                     f"{s.prompts_per_step * s.group_size / anchor_s:.1f} images/s")
    result_table.add_ratio(case, "speed ours (grpo) / anchor", anchor_s / ours["grpo"], TARGET)
    result_table.add_ratio(case, "speed ours (pec) / anchor", anchor_s / ours["pec"])
    result_table.note("ms are medians of 5 iterations after one warm-up; speed ratios > 1: ours is faster")
    parts = ", ".join(f"{key[5:]} {value * 1e3:.0f} ms" for key, value in rows[-1].items()
                      if key.startswith("time/") and key != "time/step")
    result_table.note(f"ours (grpo), one more iteration by phase: {parts} (the anchor scores rewards only; "
                      "ours also encodes the images in every perceptual space for the diversity metrics)")

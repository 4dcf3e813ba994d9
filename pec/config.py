"""Typed configuration for training and evaluation: dataclasses, YAML files and command-line overrides.

One source of truth: every option is a dataclass field with a `help` string in its metadata. The
command-line parser, `--help`, YAML loading and the saved `config.yaml` of a run are all generated
from these fields, so an option cannot be documented in one place and missing in another.

Precedence: dataclass defaults < YAML file (`--config file.yaml`) < command-line options
(`--method pec --pec.lambda 0.1`). Nested sections use dotted names on the command line and nested
mappings in YAML. A field whose Python name ends in "_" (e.g. `lambda_`) is spelled without it in
YAML and on the command line (`lambda`).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import os
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from pec.atomic import atomic_write_text
from pec_kernels import SDE_KINDS

# The choices of the options, here because configuration sits below what it configures: the modules
# that implement them import these names from here.
PCGS_FORMS = ("reward", "guided")
SCOPES = ("group", "batch")
COV_METHODS = ("clip_cov", "kl_cov")
COV_VARIANTS = ("native", "perceptual")  # pec.covariance
PLACEMENTS = ("contiguous", "spread")  # pec.distributed
ESTIMATORS = ("knn", "gaussian")  # pec.entropy
OMEGAS = ("uniform", "late", "early")  # pec.regularizers.omega_weights
# Readings of log p_gen in the PCGS reward form (`pec.regularizers.pcgs_reward`, `latent_group_log_density`).
GENERATION_DENSITIES = ("policy", "latent_group")
KL_UNITS = ("exact", "flow_grpo")  # units of the fused KL to the reference (`pec.sampling.kl_in_units`)
VIDEO_POOLS = ("mean", "concat")  # a video's feature from its frames' (`pec.perceptual.VideoSpace`)
WAN_EXPERTS = ("both", "high", "low")  # which Wan2.2 A14B experts train (`pec.models.wan`)
NFT_SOLVERS = ("dpm2", "euler")  # DiffusionNFT's rollout solver (`pec.sampling.sample`'s solver)
MIXGRPO_STRATEGIES = ("progressive", "decay", "exp_decay", "random", "frozen")  # pec.algorithms.mixgrpo
WANDB_MODES = ("online", "offline", "disabled")  # Weights & Biases' modes (`pec.logging_utils.WandbLog`)
GARDO_SCALES = ("none", "global")  # GARDO's advantage: unscaled (the paper's) or over the batch std (pec.methods.gardo)


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with a help string (shown by `--help` and used as documentation).

    Further keyword arguments go into the field's metadata. A number option states its range there, and
    `Config.validate` checks every field against it (`check_options`): `min=` (value >= min), `max=`
    (value <= max), `positive=True` (value > 0); `note=` is added to the error message (e.g. what an
    empty value means). Every float option must be finite (`_coerce`).
    """
    if isinstance(default, (list, dict)):
        value = default
        return dataclasses.field(default_factory=lambda: type(value)(value), metadata={"help": help, **kwargs})
    if dataclasses.is_dataclass(default):
        return dataclasses.field(default_factory=type(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def public_name(field_name: str) -> str:
    """The YAML / command-line spelling of a field (`lambda_` -> `lambda`)."""
    return field_name.rstrip("_")


@dataclasses.dataclass
class ModelConfig:
    """Which flow model to fine-tune."""

    name: str = option("embedded", "flow model: 'embedded' (the tiny digits model shipped with the package), "
                                   "'sd3' (SD3 / SD3.5-M / SD3.5-L), 'flux' (FLUX.1-dev), 'flux2' (FLUX.2 dev or "
                                   "klein: the folder's pipeline class decides), 'qwen_image' (Qwen-Image) or 'wan' "
                                   "(Wan2.1 / Wan2.2 text-to-video), from a diffusers folder (--model.path)")
    path: str | None = option(None, "model weights: a folder (embedded) or a diffusers folder (the others), either "
                                    "local or a Hugging Face hub id ORG/NAME, taken from the hub cache (HF_HOME; "
                                    "fetched there unless HF_HUB_OFFLINE is set; configs, tokenizers and "
                                    "safetensors weights only, never code); empty = the embedded weights shipped "
                                    "with the package")
    revision: str | None = option(None, "revision of a hub id --model.path: a branch, tag or commit; empty = main. "
                                        "The run's config.yaml records the commit it resolved to, so that a resume "
                                        "or pec.evaluate loads the same snapshot")
    resolution: int = option(512, "image (or video frame) side in pixels (sd3, flux, wan; a multiple of 16)", min=16)
    compile: bool = option(False, "compile the transformer with torch.compile (on GPUs; the first steps pay the "
                                  "compile time, and new batch shapes recompile)")
    dtype: str = option("bfloat16", "weights dtype of the sd3 / flux pipeline: bfloat16, float16 or float32")
    guidance: float = option(3.5, "flux / flux2 dev: the distilled guidance scale fed to the transformer's guidance "
                                  "embedding (FLUX.1-dev and FLUX.2-dev have no CFG forward: keep "
                                  "sampling.guidance_scale 1; FLUX.2-dev's pipeline default is 4.0; klein takes "
                                  "none)", min=0)
    t5: bool = option(True, "sd3: use the T5-XXL text encoder (false = CLIP-L and CLIP-G only, as SD3 allows)")
    max_sequence_length: int = option(256, "sd3 / flux: T5 tokens per prompt; flux2: text-encoder tokens per "
                                           "prompt, system prompt and chat template included (its pipelines' 512); "
                                           "qwen_image: text tokens kept per prompt after its chat template (at "
                                           "most 1024)", min=1)
    negative_prompt: str = option(" ", "qwen_image: the negative prompt of its true CFG, what the null prompt "
                                       "(the unconditional row of --sampling.guidance_scale) is encoded as; "
                                       "\" \" as in Qwen-Image's examples and Flow-GRPO's Qwen-Image trainer")
    gradient_checkpointing: bool = option(True, "sd3 / flux: recompute the transformer's blocks in the backward "
                                                "pass (less memory, ~30% more time)")
    vae_batch: int = option(8, "sd3 / flux: images per VAE decode call (0 = the whole batch at once)",
                            min=0)
    text_encoders: str = option("offload", "sd3 / flux: 'offload' keeps the text encoders on the CPU and moves "
                                           "them to the GPU only to encode prompts not yet cached; 'gpu' keeps them "
                                           "there")
    prompt_cache: int = option(0, "sd3 / flux: most prompts kept encoded in host memory (each prompt is encoded "
                                  "once; 0 = no limit)", min=0)
    frames: int = option(81, "wan: frames per video, 1 + a multiple of 4 (the VAE keeps the first frame and "
                             "compresses each next 4 into one latent frame): 81 is WanPipeline's default, 5 "
                             "Flow-Factory's training clips", min=1)
    flow_shift: float | None = option(None, "wan: the flow shift of the sigma schedule (empty = the folder's "
                                            "scheduler config: 3.0 in Wan-AI's T2V folders; diffusers' examples "
                                            "use 5.0 at 720p)", positive=True)
    guidance_scale_2: float | None = option(None, "wan (Wan2.2 A14B): CFG scale of the low-noise expert "
                                                  "(transformer_2); empty = sampling.guidance_scale, as WanPipeline",
                                            min=0)
    train_experts: str = option("both", f"wan (Wan2.2 A14B): which experts train, one of {WAN_EXPERTS}: 'high' is "
                                        f"`transformer` (the high-noise steps), 'low' is `transformer_2`; the other "
                                        f"stays frozen. 'both' because a step's gradient reaches only the expert "
                                        f"that ran it, so a frozen expert leaves its steps untrained")


@dataclasses.dataclass
class SamplingConfig:
    """Rollouts: groups of samples per prompt, CFG and the SDE sampler."""

    prompts_per_step: int = option(4, "prompts (groups) per training step", min=1)
    group_size: int = option(8, "samples per prompt (K); each gets its own initial noise", min=2,
                             note="group-normalised advantages and per-group perceptual entropy need several "
                                  "samples per prompt: set --sampling.group_size 2 or more")
    num_steps: int = option(10, "denoising steps per rollout", min=1)
    guidance_scale: float = option(1.0, "classifier-free guidance scale (1 = no CFG: RL then distils guidance into "
                                        "the policy, as Flow-GRPO's no-CFG configs; with CFG 2 the embedded model's "
                                        "reward starts saturated at 0.98 and GRPO barely moves)", min=0)
    eta: float = option(0.7, "SDE noise level (eta in DESIGN.md 2.1); 0 = deterministic ODE", positive=True,
                         note="eta = 0 is a deterministic ODE with no policy to optimise")
    kind: str = option("flow", f"SDE kind, one of {SDE_KINDS} (Flow-GRPO, DanceGRPO, coefficient-preserving)")
    sde_window: list[int] | None = option(
        None, "SDE steps [start, end) (two integers): sampled with noise and trained (train.timestep_fraction "
              "may leave the last ones untrained); other steps are deterministic ODE steps. Empty = every step. "
              "A step whose noise std is 0 (the last cps step, sigma_next = 0) is an ODE step whatever the window. "
              "For --algorithm flow_grpo and grpo_guard; mixgrpo and flow_grpo_fast place their own window")


@dataclasses.dataclass
class TrainConfig:
    """Optimisation: steps, LoRA or full fine-tuning, the clipped surrogate and KL."""

    steps: int = option(100, "training steps (one rollout batch and its policy update per step); 100 take ~1 min "
                              "on one CPU core with CFG 1 (40 only dented GRPO's diversity, ~11%)", min=1)
    lr: float = option(1e-3, "learning rate (AdamW); the embedded world's small LoRA needs more than Flow-GRPO's "
                             "3e-4 to move in 40-100 steps, and 3e-3 already destabilises it", positive=True)
    weight_decay: float = option(1e-4, "AdamW weight decay", min=0)
    max_grad_norm: float = option(1.0, "gradient-norm clipping", positive=True)
    lora: bool = option(True, "train LoRA adapters (peft) on model.transformer; false = full fine-tuning "
                              "(the KL reference is then a frozen copy)")
    lora_rank: int = option(8, "LoRA rank", min=1)
    lora_alpha: float = option(16.0, "LoRA alpha", positive=True)
    micro_batch: int = option(32, "samples per forward/backward pass, in rollouts, scoring and training alike (the "
                                  "same chunks keep the first ratio exactly 1); gradients accumulate so the "
                                  "logical batch (prompts_per_step x group_size) fits in memory. The default holds "
                                  "the embedded world's whole batch: fewer, larger forwards are faster on a CPU; "
                                  "lower it for real models", min=1)
    overlap_scoring: bool = option(True, "score each rollout micro-batch while the next one samples: without "
                                         "guidance the micro-batches are sampled one after the other and each "
                                         "is decoded and scored (rewards and perceptual features, on a worker "
                                         "thread and a CUDA side stream; the http reward's requests in flight "
                                         "meanwhile) as soon as it is done. The step still waits for every "
                                         "reward before its advantages, and the metrics equal those of false "
                                         "(score after the whole rollout) bit for bit")
    minibatches: int = option(1, "optimizer updates per rollout batch; the batch is split into this many shuffled "
                                 "minibatches (the first update is exactly on-policy, later ones are clipped)", min=1)
    timestep_fraction: float = option(1.0, "Flow-GRPO's train.timestep_fraction: train the SDE steps among the first "
                                           "int(num_steps x fraction) steps in denoising order (over the whole "
                                           "trajectory, not the SDE window); the later steps are still sampled "
                                           "with noise but not trained. 1.0 = every SDE step; Flow-GRPO's 0.99 "
                                           "trains 9 of 10 steps (5 of 6). A step whose noise std is 0 (the last "
                                           "cps step) is never trained. --algorithm nft: each sample trains a "
                                           "random int(num_steps x fraction) of the num_steps grid points "
                                           "(DiffusionNFT's 0.99: 9 of 10)", positive=True, max=1)
    clip_range: float = option(1e-3, "PPO clip range epsilon of the ratio", positive=True)
    clip_range_high: float | None = option(None, "Clip-Higher (DAPO): the upper clip range eps_high, ratio clipped "
                                                 "to [1 - clip_range, 1 + clip_range_high]; must be >= clip_range "
                                                 "(DAPO: 0.28 against 0.2, i.e. 1.4 x clip_range). Clipping acts "
                                                 "only off-policy (train.minibatches >= 2). Empty = clip_range",
                                           positive=True)
    adv_clip: float = option(5.0, "clamp advantages to [-adv_clip, adv_clip]", positive=True)
    global_std: bool = option(True, "normalise advantages by the batch-global std instead of the per-group std "
                                    "(Flow-GRPO's configs do; per-group std turns saturated groups' noise into "
                                    "unit advantages)")
    kl_beta: float = option(0.0, "weight of the KL to the reference policy (adapter-off / frozen copy); 0 = off", min=0)
    kl_units: str = option("exact", f"units of the KL that kl_beta weighs, one of {KL_UNITS}: 'exact' = the "
                                    "Gaussian KL |dmu|^2/(2 s^2) of each step; 'flow_grpo' = Flow-GRPO's, which "
                                    "for kind flow is |dt| times the exact one (~10x weaker at 10 steps), equal "
                                    "for cps, undefined for dance. Use flow_grpo with a beta quoted from Flow-GRPO")
    stop_after: int | None = option(None, "stop after this many finished steps (>= 1) in this invocation, as if "
                                          "interrupted (for resume tests); empty = run to `steps`", min=1,
                                    note="empty = run to train.steps")
    max_bad_steps: int = option(3, "stop the run after this many consecutive steps whose optimizer update was "
                                   "skipped (non-finite loss or gradient, or no valid sample group)", min=1)


@dataclasses.dataclass
class PerceptualConfig:
    """Perceptual spaces: which encoders are logged and which one the regulariser uses."""

    spaces: list[str] = option(["classifier", "simclr", "autoencoder"],
                               "encoders (pec.perceptual.ENCODERS) whose perceptual entropy is logged and evaluated")
    space: str = option("simclr", "encoder used by the PEC / PCGS regulariser")
    estimator: str = option("knn", f"entropy estimator for the regulariser, one of {ESTIMATORS}")
    k: int = option(2, "k of the kNN estimator (must be < group_size)", min=1)
    per_dim: bool = option(True, "divide surprisals by the feature dimension, so they are commensurate with the "
                                 "mean-reduced policy log-prob")
    scope: str = option("group", "what the regulariser's surprisal is measured against: 'group' (the other samples "
                                 "of the prompt group, the paper's) or 'batch' (every sample of the step, over all "
                                 "processes)")
    batch_metric: bool = option(True, "log the kNN entropy of the regulariser's space over the step's whole batch "
                                      "(perc_knn_batch/<space>; with several processes it all-gathers B x D features)")
    bank_steps: int = option(0, "also log the step's surprisal against a bank of the last N steps' features "
                                "(perc_knn_bank/<space>, knn_entropy's reference mode); 0 = no bank", min=0,
                             note="0 = no bank")
    video_pool: str = option("concat", f"video models (wan): a video's feature from its frames' features in each "
                                       f"space, one of {VIDEO_POOLS}: 'concat' joins the features of "
                                       f"perceptual.video_frames frames spread over the clip (so that motion "
                                       f"counts: two clips of the same frames in another order differ), 'mean' "
                                       f"averages them (what is shown, not when)")
    video_frames: int = option(4, "video models (wan): frames spread evenly over each clip (first and last "
                                  "included) whose features make the video's feature; at most the clip's frames "
                                  "(0 = every frame)", min=0)


@dataclasses.dataclass
class PecConfig:
    """PEC: R~_t = R + lambda * omega_t * surprisal (DESIGN.md 2.4)."""

    lambda_: float = option(0.5, "weight of the perceptual surprisal bonus. Scale it to the reward: the paper's "
                                 "0.05-0.10 suit PickScore/26 (group std ~0.02); the embedded digit reward's "
                                 "spread is ~10x larger", min=0)
    lambda_end: float | None = option(None, "lambda at the last step: lambda moves linearly from pec.lambda at "
                                            "step 1 to this at train.steps (e.g. 0 lets the reward climb as far as "
                                            "plain RL's by the end while the bonus keeps diversity early); empty = "
                                            "constant", min=0)
    omega: str = option("uniform", f"per-step weight omega_t, one of {OMEGAS}")


@dataclasses.dataclass
class PcgsConfig:
    """PCGS: reward form R~ = R - lambda*omega_t*(log p_perc - log p_theta), or guided sampling (DESIGN.md 2.5)."""

    form: str = option("reward", f"one of {PCGS_FORMS}")
    lambda_: float = option(0.3, "weight of the one-sample KL term (reward form); scaled to the reward like "
                                 "pec.lambda (the paper's 0.03-0.10 suit PickScore/26)", min=0)
    omega: str = option("uniform", f"per-step weight omega_t, one of {OMEGAS}")
    guidance_weight: float = option(0.05, "gamma (guided form): the velocity shift that pushes each group apart "
                                          "in perceptual space has gamma times the velocity's norm, per sample "
                                          "(scale-free: one value serves every model); > 0 raises diversity "
                                          "(0.05: +14% within-group SimCLR distance on the embedded model, "
                                          "reward -4%; see pec.experiments.guidance_sweep)", min=0)
    guidance_window: list[int] | None = option(
        None, "guided form: guide only steps [start, end) (two integers), e.g. `0 5` for the high-noise half "
              "where structure forms (as CADS / Particle Guidance); empty = every step")
    generation_density: str = option(
        "policy", f"reward form: what log p_gen is, one of {GENERATION_DENSITIES}. 'policy' (default: the paper's "
                  "project-page formula) = the behaviour policy's step log-prob, which does not depend on theta, so "
                  "the reward form is PEC plus zero-mean noise; 'latent_group' = the sample's log-density under "
                  "its group's Gaussian fit in the generated latent space (theta-dependent through the samples)")


@dataclasses.dataclass
class EntropyBonusConfig:
    """Entropy regularisation: entropy_bonus (loss -= coef * H(pi), analytic and independent of theta),
    perc_entropy_bonus (R += coef * the batch's perceptual entropy), entropy_sample (R_t -= sample_coef * log pi_t)."""

    coef: float = option(0.01, "weight of the analytic entropy bonus: the policy entropy in the loss "
                               "(entropy_bonus) or the batch's perceptual entropy in the reward "
                               "(perc_entropy_bonus); neither depends on the sample, so neither changes the gradient",
                       min=0)
    sample_coef: float = option(0.5, "entropy_sample: weight of the per-sample bonus -log pi(x'|x) added to each "
                                     "trained step's reward (0.5 = pec.lambda's default: the mean-reduced log-prob "
                                     "and the per-dim surprisal are commensurate)", min=0)


@dataclasses.dataclass
class CovConfig:
    """Clip-Cov and KL-Cov (Cui et al. 2025): covariance of log pi (or the perceptual log-density) with A."""

    variant: str = option("native", f"one of {COV_VARIANTS}: the covariance of each (sample, trained step) entry "
                                    "uses the policy log-prob (native) or the sample's perceptual log-density "
                                    "-surprisal in perceptual.space (perceptual, the paper's PickScore rows)")
    band: float = option(0.2, "clip_cov: the band is this top fraction of the step's entries by covariance (batch "
                              "quantiles: the LLM paper's absolute band [1, 5] selects nothing on images)",
                        min=0, max=1)
    detach_fraction: float = option(0.1, "clip_cov: fraction r of the band whose gradient is detached (random, "
                                         "seeded by seed and step; at least 1 entry when > 0). Default: 6 of 320 "
                                         "entries on the embedded world", min=0, max=1)
    kl_fraction: float = option(0.02, "kl_cov: top fraction of the step's entries by covariance that get the "
                                      "penalty (at least 1 when > 0). Default: 6 of 320 entries on the embedded world",
                                min=0, max=1)
    kl_coef: float = option(1.0, "kl_cov: beta of the penalty beta*|log pi_old - log pi|; its gradient is 0 "
                                 "on-policy, so it acts from the second minibatch on (train.minibatches >= 2)", min=0)


@dataclasses.dataclass
class NftConfig:
    """DiffusionNFT (--algorithm nft, DESIGN.md 2.7): the defaults are the authors' SD3.5-M PickScore preset
    (NVlabs/DiffusionNFT @24af555, config/nft.py)."""

    beta: float = option(1.0, "beta of the implicit policies v+ = beta v_theta + (1 - beta) v_old, "
                              "v- = (1 + beta) v_old - beta v_theta; the loss is divided by it (the authors' "
                              "config.beta: 1.0 for PickScore / HPSv2 / GenEval, 0.1 for OCR and multi-reward)",
                         positive=True)
    decay: int = option(1, "the old (sampling) policy's decay schedule after each step, theta_old <- d theta_old + "
                           "(1 - d) theta with s = optimizer steps so far: 0 = d 0 (the old policy is theta); "
                           "1 = min(0.001 s, 0.5) (the authors' PickScore / HPSv2 / GenEval / multi-reward); "
                           "2 = 0 until s = 75, then min(0.0075 (s - 75), 0.999) (their OCR)", min=0, max=2)
    ref_coef: float = option(1e-4, "weight of the velocity penalty mean (v_theta - v_ref)^2 to the base model "
                                   "(adapters off, or the frozen copy under full fine-tuning), added to the "
                                   "loss unscaled; 0 = off. The authors call it train.beta (1e-4 in every preset); "
                                   "it is not --nft.beta, nor Flow-GRPO's --train.kl_beta", min=0)
    loss_scale: float | None = option(None, "factor on the policy loss, which matters under gradient clipping; "
                                            "empty = --train.adv_clip (5), tied as in the authors' code, whose "
                                            "factor is their adv_clip_max (the same number clips A and maps it "
                                            "to r = A / (2 adv_clip) + 1/2, so tied, the advantage's part of "
                                            "the gradient does not change with the clip)", positive=True,
                                      note="empty = train.adv_clip")
    solver: str = option("dpm2", f"the old policy's deterministic sampler, one of {NFT_SOLVERS}: 'dpm2' = the "
                                 f"authors' DPM-Solver++(2M) in data prediction, 'euler' = x + dt v")


@dataclasses.dataclass
class LoggingConfig:
    """What the run folder receives."""

    tensorboard: bool = option(True, "write TensorBoard event files next to metrics.jsonl")
    checkpoint_every: int = option(1, "write a checkpoint every this many steps (and always at the end, and on "
                                      "SIGTERM/SIGINT)", min=1)
    keep_checkpoints: int = option(2, "keep the newest this many checkpoints in RUN/checkpoints (older ones are "
                                      "deleted once a newer one is on disk)", min=1)
    milestone_every: int = option(0, "also keep a snapshot every this many steps in RUN/milestones, never deleted "
                                     "(for evaluation along training); 0 = none", min=0, note="0 = no milestones")
    grid_samples: int = option(8, "samples per prompt in the start / end PNG sample grids", min=1)
    progress: bool = option(True, "show a tqdm progress bar")
    wandb: str | None = option(None, "Weights & Biases project to log to as well, beside TensorBoard: every step's "
                                     "scalars, the start / end sample grids and the run's config, from rank 0 "
                                     "only; a resumed run continues the same W&B run (its id is kept in "
                                     "RUN/wandb.json). Needs the extra: pip install -e \".[wandb]\". Empty = off")
    wandb_entity: str | None = option(None, "W&B entity (user or team) of the project; empty = your default entity")
    wandb_name: str | None = option(None, "W&B run name; empty = the run folder's name")
    wandb_mode: str | None = option(None, f"W&B mode, one of {WANDB_MODES}: offline writes the run under RUN/wandb "
                                          "(or $WANDB_DIR) for a later `wandb sync`; empty = the environment "
                                          "variable WANDB_MODE, else online (which needs `wandb login` or "
                                          "WANDB_API_KEY)")


@dataclasses.dataclass
class DistConfig:
    """Several processes (`torchrun --nproc_per_node N -m pec.train ...`; see pec/distributed.py)."""

    placement: str = option("contiguous", "where a prompt group's samples live: 'contiguous' (each group on one "
                                          "rank: only rewards travel) or 'spread' (every group over all ranks, as "
                                          "Flow-GRPO's sampler: rewards, masks and features are all-gathered)")
    timeout: float = option(600.0, "seconds a collective waits for the other ranks before the run fails with an "
                                   "error (a rank that died or hangs)", positive=True)
    processes: int = option(1, "number of processes of the run; set from torchrun's WORLD_SIZE and recorded in "
                               "config.yaml (not an input)", min=1)


@dataclasses.dataclass
class EvalConfig:
    """Evaluation: images per prompt on fixed held-out seeds."""

    images_per_prompt: int = option(32, "images generated per prompt", min=1)
    seed: int = option(12345, "seed of the held-out evaluation noise (never used in training)", min=0)
    eta: float = option(0.0, "sampler noise level at evaluation (0 = ODE, as Flow-GRPO evaluates)", min=0)
    num_steps: int | None = option(None, "denoising steps at evaluation (>= 1); empty = the run's "
                                         "sampling.num_steps", min=1, note="empty = the run's sampling.num_steps")
    batch: int = option(64, "images per sampling call", min=1)
    rewards: list[str] | None = option(None, "real models: rewards scored as quality columns beside the runs' "
                                             "--reward terms (e.g. pickscore clipscore hpsv2 aesthetic), each with "
                                             "its --paths.* weights")
    spaces: list[str] | None = option(None, "real models: perceptual spaces (dino, clip, pickscore) of the "
                                            "diversity columns; empty = the runs' real perceptual.spaces plus each "
                                            "of them whose --paths.* weights are given")
    max_prompts: int = option(0, "real models: evaluate the first this many held-out prompts (0 = all)", min=0)
    guidance: bool = option(False, "sample a PCGS guided run with its guidance on (pcgs.guidance_weight in "
                                   "perceptual.space): the 'policy plus guidance' reading; false = the policy alone")


@dataclasses.dataclass
class DataConfig:
    """Training prompts."""

    prompts: str | None = option(None, "prompt source for real models: a .txt (one a line), .jsonl ('prompt' field) "
                                       "or .csv ('prompt' column) file, split 90/10 into train/test with a fixed "
                                       "seed, or a Flow-GRPO dataset folder (train.txt/test.txt or "
                                       "*_metadata.jsonl) with its own split; empty = the embedded digit prompts")


@dataclasses.dataclass
class PathsConfig:
    """Weights of the real rewards and perceptual spaces: each a local path or a Hugging Face hub id (`pec.hub`),
    ORG/NAME for a folder, ORG/NAME/FILE for a file, with an optional revision after a colon (ORG/NAME:REVISION),
    taken from the hub cache (HF_HOME; fetched there unless HF_HUB_OFFLINE is set)."""

    pickscore: str | None = option(None, "PickScore_v1: a transformers CLIPModel folder or hub id (yuvalkirstain/"
                                         "PickScore_v1) (reward and space 'pickscore')")
    pickscore_processor: str | None = option(None, "the CLIPProcessor folder or hub id PickScore uses (laion/CLIP-ViT-"
                                                   "H-14-laion2B-s32B-b79K's tokenizer + preprocessor config); empty = "
                                                   "the pickscore folder")
    clip: str | None = option(None, "open_clip model of the reward 'clipscore' and the space 'clip': a folder (or hub "
                                    "id ORG/NAME) with open_clip_config.json + weights, or a checkpoint file (or "
                                    "ORG/NAME/FILE) with --paths.clip_arch")
    clip_arch: str | None = option(None, "open_clip architecture of a --paths.clip file: a built-in name "
                                         "(ViT-L-14, ViT-H-14, ...) or a model-config JSON file")
    hpsv2: str | None = option(None, "HPSv2 / v2.1 checkpoint (HPS_v2.1_compressed.pt, or the hub id xswu/HPSv2/"
                                     "HPS_v2.1_compressed.pt) or an open_clip folder")
    hpsv2_arch: str | None = option("ViT-H-14", "open_clip architecture of a --paths.hpsv2 file")
    aesthetic: str | None = option(None, "LAION aesthetic head file (sac+logos+ava1-l14-linearMSE.pth; a hub file: "
                                         "ORG/NAME/FILE)")
    aesthetic_clip: str | None = option(None, "transformers CLIP ViT-L/14 folder or hub id (openai/clip-vit-large-"
                                              "patch14) the aesthetic head reads")
    aesthetic_v25: str | None = option(None, "Aesthetic Predictor v2.5 head file (aesthetic_predictor_v2_5.pth of "
                                             "discus0434/aesthetic-predictor-v2-5; a hub file: ORG/NAME/FILE), the "
                                             "reward 'aesthetic_v25'")
    aesthetic_v25_siglip: str | None = option(None, "transformers SigLIP folder or hub id the v2.5 head reads "
                                                    "(google/siglip-so400m-patch14-384, with its "
                                                    "preprocessor_config.json)")
    dino: str | None = option(None, "DINOv2: a transformers Dinov2Model folder or hub id (space 'dino'), e.g. "
                                    "facebook/dinov2-base")
    reward_url: str | None = option(None, "URL of the reward server of the reward 'http' "
                                          "(`python -m pec.rewards.serve NAME --port PORT`)")


@dataclasses.dataclass
class RewardVideoConfig:
    """How the rewards score a video model's clips (pec.rewards.VideoReward)."""

    frames: int = option(4, "frames spread evenly over each clip (first and last included) that the rewards see "
                            "(0 = every frame): an image reward scores each of them and the clip gets their mean; "
                            "a video reward (temporal_smoothness, a video reward server behind 'http') gets them "
                            "as the clip", min=0)


@dataclasses.dataclass
class RewardHttpConfig:
    """The client of the reward 'http' (its server's URL is --paths.reward_url; see pec.rewards.http)."""

    timeout: float = option(60.0, "seconds one request to the reward server may take in all: connecting, sending, "
                                  "scoring and reading the whole answer (a server that trickles it fails then)",
                            positive=True)
    retries: int = option(3, "retries of a request that could not connect, timed out or got a 5xx answer (backoff "
                             "1 s, 2 s, 4 s, ...); a 4xx answer is never retried", min=0)
    token: str | None = option(None, "bearer token of a reward server started with --token; empty = the "
                                     "environment variable PEC_REWARD_TOKEN. A secret: never written to the run's "
                                     "config.yaml or checkpoints, so give it again (or set the variable) to resume",
                               secret=True)
    in_flight: int = option(4, "requests to the reward server in flight at once (the batches of a scoring call, "
                               "sent together; with --train.overlap_scoring, those of several micro-batches)", min=1)


@dataclasses.dataclass
class MixGrpoConfig:
    """MixGRPO (--algorithm mixgrpo): the sliding window of SDE steps (pec.algorithms.mixgrpo; the authors'
    Tencent-Hunyuan/MixGRPO scripts' values are the defaults)."""

    window_size: int = option(4, "w: consecutive SDE steps in the window, the only steps trained (group_size 4 in "
                                 "the authors' scripts)", min=1)
    shift_interval: int = option(25, "tau: training steps the window stays at each position (iters_per_group 25; "
                                     "20 in MixGRPO-Flash)", min=1)
    stride: int = option(1, "steps the window moves at each shift (prog_overlap_step 1; 0 = the window never "
                            "moves, the authors' Flash*)", min=0)
    strategy: str = option("progressive", f"how the window moves, one of {MIXGRPO_STRATEGIES}: progressive (every "
                                          f"tau steps), decay (tau falls linearly from tau_max to tau_min along the "
                                          f"trajectory), exp_decay (tau shrinks exponentially past exp_threshold), "
                                          f"random (a start drawn each step from the run's seed, the same on every "
                                          f"process), frozen (steps [0, w) for good)")
    roll_back: bool = option(True, "past the last position, return the window to step 0 (the scripts' --roll_back); "
                                   "false = stay at the last position")
    limit: int | None = option(None, "M: windows end at or before step M (>= 1); empty = num_steps - 2, the "
                                     "authors' max_timesteps", min=1, note="empty = sampling.num_steps - 2")
    tau_max: int = option(10, "decay: the interval at step 0 (max_iters_per_group 10)", min=1)
    tau_min: int = option(1, "decay: the interval's floor (min_iters_per_group 1)", min=1)
    exp_threshold: int = option(13, "exp_decay: the window start from which the interval decays "
                                    "(exp_decay_thre_timestep 13)", min=0)
    exp_rate: float = option(0.1, "exp_decay: the rate k of tau*exp(-k*(start - exp_threshold)) (exp_decay_k 0.1)",
                             min=0)


@dataclasses.dataclass
class FlowGrpoFastConfig:
    """Flow-GRPO-Fast (--algorithm flow_grpo_fast): a random window of SDE steps per training step
    (pec.algorithms.flow_grpo_fast; yifan123/flow_grpo's *_fast presets are the defaults)."""

    window_size: int = option(3, "w: consecutive SDE steps in the window, the only steps trained "
                                 "(sample.sde_window_size 3)", min=1)
    window_range: list[int] | None = option(
        None, "[r0, r1): the window lies in these steps; its start is drawn uniformly in [r0, r1 - w] once per "
              "training step from the run's seed (the same on every process); empty = [0, num_steps // 2), "
              "the presets' sde_window_range")


@dataclasses.dataclass
class GrpoGuardConfig:
    """GRPO-Guard (--algorithm grpo_guard): Flow-GRPO with the per-step normalised ratio
    log rho = mean((mu_theta - mu_old) xi) (pec.algorithms.grpo_guard)."""

    dt_scaling: bool = option(True, "divide each trained step's clipped surrogate by its |dt| (verl-omni's "
                                    "GRPOGuardLoss and the paper's 1/dt reweighting; Flow-Factory's "
                                    "GRPOGuardTrainer does not: false)")


@dataclasses.dataclass
class GardoConfig:
    """GARDO (--method gardo, arXiv 2512.24138; pec.methods.gardo): the diversity-aware advantage in
    --perceptual.space, and its optional gated KL with reference resets. The default is the advantage alone."""

    scale: str = option("none", f"one of {GARDO_SCALES}: 'none' = the paper's advantage (r - group mean) x w, in "
                                f"the reward's units (no std division); 'global' = divided by the batch's reward "
                                f"std + 1e-4, i.e. GRPO's step size with --train.global_std")
    kl_coef: float = option(0.0, "weight of the gated KL to the reference (the KL of --train.kl_units, averaged over "
                                 "the gated samples of each micro-batch, as the authors' beta); 0 = off (default: "
                                 "the advantage alone). The authors' 0.01-0.07 are in Flow-GRPO's units "
                                 "(--train.kl_units flow_grpo). Needs --gardo.aux_rewards", min=0)
    aux_rewards: list[str] | None = option(None, "auxiliary rewards (pec.rewards names, scored on every sample and "
                                                 "never trained on) whose ranks the gate compares with the main "
                                                 "reward's, e.g. 'contrast smoothness' on the embedded world (the "
                                                 "authors: aesthetic imagereward)")
    gate_fraction: float = option(0.1, "the gate keeps this top fraction of the samples whose main reward ranks "
                                       "better than their auxiliary rewards (by the rank gap): the authors' starting "
                                       "kl_perc 0.1 (they adapt it within [0.02, 0.2])", positive=True, max=1)
    reset_reference: bool = option(True, "with the gated KL: the reference is a copy of the policy, reset to the "
                                         "policy when the previous step's gated KL exceeded --gardo.reset_kl or "
                                         "--gardo.reset_every steps have passed; false = the base model")
    reset_kl: float = option(3e-4, "reset the reference after a step whose mean gated KL (in --train.kl_units) "
                                   "exceeded this (the authors' kl_thres 3e-4, in Flow-GRPO's units)", positive=True)
    reset_every: int = option(15, "reset the reference when this many steps have passed since the last reset (the "
                                  "authors' reset_freq 15; their check `> 15` resets on the 16th)", min=1)


@dataclasses.dataclass
class DiverseGrpoConfig:
    """DiverseGRPO (--method diverse_grpo, arXiv 2512.21514; pec.methods.diverse_grpo): R = Q + beta sqrt(N / n_c)
    with n_c the size of the sample's spectral cluster in its group (--perceptual.space), plus a KL to the
    reference on the first denoising steps. Its code is not public: the cluster count, sigma, the features'
    normalisation and the regularised steps are this project's choices (defaults below; sweep them)."""

    beta: float = option(3.0, "weight of the cluster-size bonus sqrt(N / n_c) added to the reward (the paper's 3)",
                         min=0)
    clusters: int = option(0, "clusters per group: 0 = each group's largest eigengap of its normalised Laplacian "
                              "among 1 .. max_clusters (a collapsed group is then one cluster: no bonus spread); "
                              "k > 0 = k for every group (at most sampling.group_size)", min=0)
    max_clusters: int = option(4, "the most clusters the eigengap may choose (clamped to group_size - 1)", min=1)
    sigma_scale: float = option(0.5, "sigma of the affinity exp(-d^2 / (2 sigma^2)) = this x the median distance "
                                     "between the group's samples (0.5: recovers 2-4 separated clusters of 24 and "
                                     "splits no single Gaussian blob of 4+ dimensions in our checks; 1.0 merges "
                                     "them)", positive=True)
    normalize: bool = option(True, "L2-normalise the features before the distances (cosine geometry, as CLIP / "
                                   "DINO features are compared); false = raw Euclidean")
    kmeans_iters: int = option(10, "Lloyd iterations of the k-means on the spectral embedding (fixed: no "
                                   "convergence test, no host read)", min=1)
    reg_coef: float = option(0.04, "weight of the early-step regulariser: the KL ||mu_theta - mu_ref||^2 / (2 s^2) "
                                   "of --train.kl_units to the reference on the first --diverse_grpo.reg_steps "
                                   "denoising steps; 0 = off (the bonus alone, which --algorithm nft needs)", min=0)
    reg_steps: int = option(3, "the regulariser acts on denoising steps 0 .. reg_steps - 1 that are trained (3 of "
                               "10: where the layout forms)", min=1)


@dataclasses.dataclass
class Config:
    """Everything a training run needs; saved as config.yaml in the run folder."""

    algorithm: str = option("flow_grpo", "RL algorithm (pec.algorithms): flow_grpo (Flow-GRPO's clipped policy "
                                         "gradient on the SDE steps), mixgrpo (a sliding window of SDE steps, ODE "
                                         "elsewhere, shared initial noise per group: --mixgrpo.*), flow_grpo_fast "
                                         "(a random window of SDE steps each step: --flow_grpo_fast.*), grpo_guard "
                                         "(Flow-GRPO with GRPO-Guard's normalised ratio: --grpo_guard.*), nft "
                                         "(DiffusionNFT: deterministic rollouts of an old policy, a loss on the "
                                         "forward process, no log-probs: --nft.*)")
    method: str = option("pec", "regulariser (pec.methods): none (plain RL; also spelled grpo), pec, pcgs (--pcgs.*), "
                                "entropy_bonus / perc_entropy_bonus (the policy / perceptual entropy, analytic: "
                                "constants with no gradient), entropy_sample (per-sample -log pi reward bonus; pec "
                                "is the perceptual per-sample reading), clip_cov / kl_cov (Cui et al.'s Clip-Cov and "
                                "KL-Cov, --cov.*), gardo (GARDO's diversity-aware advantage, --gardo.*), diverse_grpo "
                                "(DiverseGRPO's spectral-cluster bonus and early-step KL, --diverse_grpo.*). GRPO + KL "
                                "is none with --train.kl_beta > 0, Clip-Higher is none with --train.clip_range_high > "
                                "--train.clip_range")
    reward: str = option("digit", "training reward (pec.rewards.REWARDS), or a weighted sum of several: "
                                  "'pickscore:1.0,jpeg:0.1'")
    assets: str | None = option(None, "folder of the reward and perceptual-encoder weights; empty = the ones "
                                      "shipped with the package")
    seed: int = option(0, "seed of model init, rollout noise and minibatch shuffling", min=0)
    device: str = option("auto", "torch device: 'auto' (cuda if available, else cpu), 'cpu', 'cuda', 'cuda:1', ...")
    threads: int | None = option(1, "torch CPU threads; the embedded model's tiny matrix products run fastest on "
                                    "one (several threads mostly wait on each other); 0 or empty = torch's default "
                                    "(one per core)", min=0)
    run_dir: str | None = option(None, "run folder; empty = runs/<method>-<timestamp>")
    resume: bool = option(False, "continue the run in --run-dir from its last checkpoint")
    model: ModelConfig = option(ModelConfig(), "")
    sampling: SamplingConfig = option(SamplingConfig(), "")
    train: TrainConfig = option(TrainConfig(), "")
    perceptual: PerceptualConfig = option(PerceptualConfig(), "")
    pec: PecConfig = option(PecConfig(), "")
    pcgs: PcgsConfig = option(PcgsConfig(), "")
    entropy_bonus: EntropyBonusConfig = option(EntropyBonusConfig(), "")
    cov: CovConfig = option(CovConfig(), "")
    nft: NftConfig = option(NftConfig(), "")
    logging: LoggingConfig = option(LoggingConfig(), "")
    eval: EvalConfig = option(EvalConfig(), "")
    dist: DistConfig = option(DistConfig(), "")
    paths: PathsConfig = option(PathsConfig(), "")
    reward_http: RewardHttpConfig = option(RewardHttpConfig(), "")
    reward_video: RewardVideoConfig = option(RewardVideoConfig(), "")
    data: DataConfig = option(DataConfig(), "")
    mixgrpo: MixGrpoConfig = option(MixGrpoConfig(), "")
    flow_grpo_fast: FlowGrpoFastConfig = option(FlowGrpoFastConfig(), "")
    grpo_guard: GrpoGuardConfig = option(GrpoGuardConfig(), "")
    gardo: GardoConfig = option(GardoConfig(), "")
    diverse_grpo: DiverseGrpoConfig = option(DiverseGrpoConfig(), "")

    def validate(self) -> Config:
        """Raise ValueError, saying what to change, for options that cannot run together; return self.

        Only the options themselves: that the named model, rewards, spaces and files exist is checked above
        the packages that implement them, by `pec.checks.check_run` (which calls this before them)."""
        check_options(self)
        _choice("sampling.kind", self.sampling.kind, SDE_KINDS)
        _choice("perceptual.estimator", self.perceptual.estimator, ESTIMATORS)
        _choice("pec.omega", self.pec.omega, OMEGAS)
        _choice("pcgs.omega", self.pcgs.omega, OMEGAS)
        _choice("pcgs.form", self.pcgs.form, PCGS_FORMS)
        _choice("dist.placement", self.dist.placement, PLACEMENTS)
        _choice("perceptual.scope", self.perceptual.scope, SCOPES)
        _choice("perceptual.video_pool", self.perceptual.video_pool, VIDEO_POOLS)
        if self.perceptual.scope == "batch" and self.perceptual.estimator != "knn":
            raise ValueError("perceptual.scope batch uses the kNN estimator over the whole step: set "
                             "--perceptual.estimator knn")
        _choice("pcgs.generation_density", self.pcgs.generation_density, GENERATION_DENSITIES)
        _choice("train.kl_units", self.train.kl_units, KL_UNITS)
        _choice("cov.variant", self.cov.variant, COV_VARIANTS)
        _choice("nft.solver", self.nft.solver, NFT_SOLVERS)
        if self.logging.wandb_mode is not None:
            _choice("logging.wandb_mode", self.logging.wandb_mode, WANDB_MODES)
        _choice("gardo.scale", self.gardo.scale, GARDO_SCALES)
        if self.train.kl_units == "flow_grpo" and self.sampling.kind == "dance":
            raise ValueError("train.kl_units flow_grpo is defined for sampling.kind flow and cps only (Flow-GRPO has "
                             "no KL for DanceGRPO's SDE): use --train.kl_units exact with --sampling.kind dance")
        s, t = self.sampling, self.train
        if self.perceptual.estimator == "knn" and self.perceptual.k >= s.group_size:
            raise ValueError(f"perceptual.k ({self.perceptual.k}) must be smaller than sampling.group_size "
                             f"({s.group_size}): the kNN estimator needs k neighbours among the other "
                             f"group_size - 1 samples; lower --perceptual.k or raise --sampling.group_size")
        if self.perceptual.space not in self.perceptual.spaces:
            raise ValueError(f"perceptual.space {self.perceptual.space!r} must be one of perceptual.spaces "
                             f"{self.perceptual.spaces}")
        if s.sde_window is not None:
            if len(s.sde_window) != 2 or not 0 <= s.sde_window[0] < s.sde_window[1] <= s.num_steps:
                raise ValueError(f"sampling.sde_window must be two integers start < end within [0, num_steps="
                                 f"{s.num_steps}], got {s.sde_window}")
        _check_trained_steps(s, t)
        w = self.pcgs.guidance_window
        if w is not None and (len(w) != 2 or not 0 <= w[0] < w[1] <= s.num_steps):
            raise ValueError(f"pcgs.guidance_window must be two integers start < end within [0, num_steps="
                             f"{s.num_steps}], got {w}")
        if t.clip_range_high is not None and t.clip_range_high < t.clip_range:
            raise ValueError(f"train.clip_range_high ({t.clip_range_high}) must be >= train.clip_range "
                             f"({t.clip_range}): Clip-Higher widens the upper clip only")
        # With one minibatch every update is on-policy (ratio 1, |log pi_old - log pi| = 0 with zero
        # gradient), so these settings would train GRPO bit for bit without saying so.
        if t.minibatches == 1 and t.clip_range_high is not None and t.clip_range_high > t.clip_range:
            raise ValueError("train.clip_range_high acts only off-policy, and with train.minibatches 1 no ratio "
                             "leaves 1: set --train.minibatches 2 or more for Clip-Higher")
        if t.minibatches == 1 and self.method == "kl_cov" and self.cov.kl_fraction > 0 and self.cov.kl_coef > 0:
            raise ValueError("kl_cov's penalty |log pi_old - log pi| has zero gradient on-policy, and with "
                             "train.minibatches 1 every update is on-policy: set --train.minibatches 2 or more")
        if t.minibatches > s.prompts_per_step * s.group_size:
            raise ValueError(f"train.minibatches ({t.minibatches}) cannot exceed the batch size "
                             f"prompts_per_step x group_size = {s.prompts_per_step * s.group_size}")
        if self.method == "gardo" and self.gardo.kl_coef > 0 and not self.gardo.aux_rewards:
            raise ValueError("gardo.kl_coef gates the KL to the samples whose main reward ranks better than their "
                             "auxiliary rewards, and there are none: name them with --gardo.aux_rewards (e.g. contrast "
                             "smoothness), or use --train.kl_beta for an ungated KL")
        if self.diverse_grpo.clusters > s.group_size:
            raise ValueError(f"diverse_grpo.clusters ({self.diverse_grpo.clusters}) cannot exceed sampling.group_size "
                             f"({s.group_size}): a group has that many samples to cluster")
        if self.resume and not self.run_dir:
            raise ValueError("--resume needs --run-dir: the run folder to continue")
        return self

    @property
    def batch_size(self) -> int:
        """Samples per training step (prompts_per_step x group_size)."""
        return self.sampling.prompts_per_step * self.sampling.group_size


def check_options(cfg: Config) -> None:
    """Check every leaf option of `cfg` on its own: its type (as `apply_dict` converts it; a float must be
    finite) and the range in its field's metadata (`option(..., min=, max=, positive=)`); ValueError naming
    the option. A value set in code is stored converted (`"0.1"` -> 0.1, as from YAML). Cross-option rules
    are `Config.validate`'s."""
    for dotted, f, tp in _walk(type(cfg)):
        section = cfg
        for part in dotted.split(".")[:-1]:
            section = getattr(section, part)
        value = _coerce(dotted, getattr(section, f.name), tp)
        _check_range(dotted, value, f.metadata)
        setattr(section, f.name, value)


def _check_range(name: str, value: Any, meta: typing.Mapping[str, Any]) -> None:
    """ValueError unless the number `value` lies in the range its field's metadata states (None passes)."""
    if value is None or isinstance(value, (bool, str, list)):
        return
    low, high = meta.get("min"), meta.get("max")
    if meta.get("positive") and high is not None and not 0 < value <= high:
        bound = "a fraction in (0, 1]" if high == 1 else f"in (0, {high}]"
    elif meta.get("positive") and not value > 0:
        bound = "> 0"
    elif low is not None and high is not None and not low <= value <= high:
        bound = "a fraction in [0, 1]" if (low, high) == (0, 1) else f"in [{low}, {high}]"
    elif low is not None and high is None and not value >= low:
        bound = f">= {low}"
    elif high is not None and low is None and not value <= high:
        bound = f"<= {high}"
    else:
        return
    note = f" ({meta['note']})" if meta.get("note") else ""
    raise ValueError(f"{name} must be {bound}{note}, got {value!r}")


def check_timestep_fraction(timestep_fraction: float, num_steps: int) -> int:
    """int(num_steps * timestep_fraction), the steps Flow-GRPO trains; ValueError unless the fraction is in
    (0, 1] and leaves at least one step."""
    if (isinstance(timestep_fraction, bool) or not isinstance(timestep_fraction, (int, float))
            or not 0 < timestep_fraction <= 1):
        raise ValueError(f"train.timestep_fraction must be a fraction in (0, 1], got {timestep_fraction!r}")
    n = int(num_steps * timestep_fraction)
    if n < 1:
        raise ValueError(f"train.timestep_fraction {timestep_fraction} trains int({num_steps} x {timestep_fraction}) "
                         f"= 0 of the {num_steps} steps: raise it to at least {1 / num_steps:.4g}")
    return n


def trainable_steps(s: SamplingConfig, t: TrainConfig) -> int:
    """n: whatever the SDE window, only steps [0, n) can train under the one rule (`Rollout.train_steps`):
    the first int(num_steps x train.timestep_fraction), less the last step with kind cps (its noise std is
    0). ValueError for a fraction that leaves no step."""
    n = check_timestep_fraction(t.timestep_fraction, s.num_steps)
    last = s.num_steps - 1 if s.kind == "cps" else s.num_steps  # cps: sigma_next = 0 there, so its std is 0
    return min(n, last)


def _check_trained_steps(s: SamplingConfig, t: TrainConfig) -> None:
    """ValueError unless train.timestep_fraction is in (0, 1] and leaves a step to train: an SDE step of
    sampling.sde_window among the first int(num_steps x fraction), not the last step with kind cps (noise std 0)."""
    n = check_timestep_fraction(t.timestep_fraction, s.num_steps)
    start, end = s.sde_window if s.sde_window is not None else (0, s.num_steps)
    if start >= min(end, trainable_steps(s, t)):
        raise ValueError(f"no step would train: sampling.sde_window {[start, end]} (kind {s.kind}"
                         f"{', whose last step has noise std 0' if s.kind == 'cps' else ''}) and "
                         f"train.timestep_fraction {t.timestep_fraction} (the first {n} of {s.num_steps} steps) "
                         f"share no step; widen the window or raise the fraction")


def _choice(name: str, value: object, choices: Sequence[object]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


# ----------------------------------------------------------------------------------------------
# dict <-> dataclass


def to_dict(cfg: Any) -> dict[str, Any]:
    """Nested plain dict of a config dataclass, with public (YAML) field names. Secret fields
    (`option(..., secret=True)`, e.g. a reward server's token) are None: this dict is what config.yaml
    and checkpoints store, and run folders get shared."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        value = None if f.metadata.get("secret") else getattr(cfg, f.name)
        out[public_name(f.name)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def secret_values(cfg: Any) -> list[str]:
    """The values of the secret options (`option(..., secret=True)`) that are set, as text: what `to_dict` leaves
    out, for what records the command line (W&B, `pec.logging_utils.WandbLog`) to hide."""
    out: list[str] = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            out += secret_values(value)
        elif f.metadata.get("secret") and value not in (None, ""):
            out.append(str(value))
    return out


def apply_dict(cfg: Any, values: dict[str, Any], prefix: str = "") -> None:
    """Set fields of `cfg` from a nested dict (YAML names); unknown keys raise ValueError."""
    fields = {public_name(f.name): f for f in dataclasses.fields(cfg)}
    hints = typing.get_type_hints(type(cfg))
    for key, value in values.items():
        if key not in fields:
            raise ValueError(f"unknown config option {prefix + key!r}; known: {sorted(fields)}")
        f = fields[key]
        current = getattr(cfg, f.name)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, dict):
                raise ValueError(f"config section {prefix + key!r} must be a mapping, got {value!r}")
            apply_dict(current, value, prefix + key + ".")
        else:
            setattr(cfg, f.name, _coerce(prefix + key, value, hints[f.name]))


def load_yaml(path: str | Path, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Read a YAML config file into a dict (an empty file is an empty dict); a file that is missing,
    unreadable or not YAML raises a one-line ValueError naming it.

    A top-level `base: OTHER.yaml` (relative to this file) reads that file first and lays this one's
    options over it, section by section, so a variant of a run is a few lines (pec/configs/*_dino.yaml).
    """
    path = Path(path)
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as err:
        raise ValueError(f"cannot read config file {path}: {err.strerror or err}") from None
    except (yaml.YAMLError, ValueError) as err:  # ValueError: e.g. an int of over 4300 digits
        raise ValueError(f"config file {path} is not valid YAML: {' '.join(str(err).split())}") from None
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping at the top level")
    if "base" not in data:
        return data
    base = path.parent / str(data.pop("base"))
    if base.resolve() in _seen or base.resolve() == path.resolve():
        raise ValueError(f"config file {path}: its base chain comes back to {base}")
    return merge_dicts(load_yaml(base, _seen + (path.resolve(),)), data)


def merge_dicts(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` laid over `base` (nested option dicts): nested mappings merge, anything else replaces."""
    out = dict(base)
    for key, value in over.items():
        out[key] = merge_dicts(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


def save_yaml(cfg: Config, path: str | Path) -> None:
    """Write `cfg` as YAML (the run folder's config.yaml), atomically: a resume rewrites it, and a write cut
    short (a full disk) must leave the old file whole, not one that silently lacks keys."""
    atomic_write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def _unwrap_optional(tp: Any) -> tuple[Any, bool]:
    args = typing.get_args(tp)
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return rest[0], True
    return tp, False


def _coerce(name: str, value: Any, tp: Any) -> Any:
    """Convert a YAML or command-line value to the field's type, with a clear error.

    Strings (the command line's values) are parsed; from YAML a number is only accepted for a number
    option, never a bool (`steps: true` is not 1), an int only from an integral number within 64 bits,
    and a float only when finite (NaN passes every `<` check, so it would slip through the ranges).
    """
    base, optional = _unwrap_optional(tp)
    if value is None or (optional and isinstance(value, str) and value.lower() in ("", "none", "null")):
        if optional:
            return None
        raise ValueError(f"{name} must not be empty")
    origin = typing.get_origin(base)
    if origin is list:
        (item,) = typing.get_args(base)
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split()]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{name} must be a list, got {value!r}")
        return [_coerce(name, v, item) for v in value]
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"{name} must be true or false, got {value!r}")
    if base is str:
        if not isinstance(value, (str, os.PathLike)):
            raise ValueError(f"{name} must be a string, got {value!r}")
        return os.fspath(value)
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)):
        raise ValueError(f"{name} must be of type {base.__name__}, got {value!r}")
    try:
        number = int(value) if base is int and isinstance(value, (str, numbers.Integral)) else float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be of type {base.__name__}, got {value!r}") from None
    except OverflowError:  # float() of an int beyond the float range
        raise ValueError(f"{name} must be a finite number, got an integer of {int(value).bit_length()} bits") from None
    if isinstance(number, float):
        if not math.isfinite(number):
            raise ValueError(f"{name} must be a finite number, got {value!r}")
        if base is float:
            return number
        if not number.is_integer():
            raise ValueError(f"{name} must be of type int, got {value!r}")
    if not -2**63 <= number < 2**63:  # seeds and counts go to torch as C int64 (and such ints have no repr)
        raise ValueError(f"{name} must be an integer within 64 bits, got one of {int(number).bit_length()} bits")
    return int(number)


# ----------------------------------------------------------------------------------------------
# command line


def _walk(cfg_type: type, prefix: str = ""):
    """Yield (dotted public name, field, type hint) for every leaf option of a config dataclass."""
    hints = typing.get_type_hints(cfg_type)
    for f in dataclasses.fields(cfg_type):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            yield from _walk(tp, prefix + public_name(f.name) + ".")
        else:
            yield prefix + public_name(f.name), f, tp


def add_config_arguments(parser: argparse.ArgumentParser, cfg_type: type = Config) -> None:
    """Add one `--section.option` argument per config field, with its help and default."""
    defaults = to_dict(cfg_type())
    parser.add_argument("--config", metavar="YAML", help="YAML file of options (command-line options override it)")
    groups: dict[str, argparse._ArgumentGroup] = {}
    section_docs = {public_name(f.name): (typing.get_type_hints(cfg_type)[f.name].__doc__ or "")
                    for f in dataclasses.fields(cfg_type)}
    for dotted, f, tp in _walk(cfg_type):
        section = dotted.split(".")[0] if "." in dotted else ""
        if section not in groups:
            title = section or "general"
            groups[section] = parser.add_argument_group(title, section_docs.get(section, "").strip() or None)
        default = defaults
        for part in dotted.split("."):
            default = default[part]
        base, _ = _unwrap_optional(tp)
        kwargs: dict[str, Any] = {"dest": dotted, "default": argparse.SUPPRESS,
                                  "help": f"{f.metadata['help']} (default: {default})".replace("%", "%%")}
        if base is bool:
            # `--resume` alone means true; `--train.lora false` also works.
            kwargs.update(nargs="?", const="true", metavar="BOOL")
        elif typing.get_origin(base) is list:
            kwargs.update(nargs="*", metavar="VALUE")
        else:
            kwargs["metavar"] = getattr(base, "__name__", "VALUE").upper()
        flags = [f"--{dotted}"]
        if "_" in dotted:
            flags.append(f"--{dotted.replace('_', '-')}")
        if section and dotted == f"{section}.name":
            flags.append(f"--{section}")  # `--model embedded` selects the component by name
        groups[section].add_argument(*flags, **kwargs)


def config_from_args(args: argparse.Namespace, base: Config | None = None) -> Config:
    """Build a Config: `base` (or defaults), then the YAML file given by --config, then explicit options."""
    cfg = base if base is not None else Config()
    if getattr(args, "config", None):
        apply_dict(cfg, load_yaml(args.config))
    apply_dict(cfg, overrides_from_args(args))
    return cfg


def overrides_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The options given explicitly on the command line, as a nested dict."""
    nested: dict[str, Any] = {}
    for dotted, value in vars(args).items():
        if dotted == "config" or "." not in dotted and dotted not in {public_name(f.name)
                                                                       for f in dataclasses.fields(Config)}:
            continue
        node = nested
        *parents, leaf = dotted.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = None if isinstance(value, list) and not value else value
    return nested


def parse_config(argv: Sequence[str] | None = None, description: str = "") -> Config:
    """Parse command-line arguments into a Config (not yet validated)."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(parser)
    return config_from_args(parser.parse_args(argv))

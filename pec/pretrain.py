"""Train the embedded world that ships in pec/assets: `python -m pec.pretrain [--out DIR] [--only NAME]`.

scikit-learn's digits are cut per class into `train` (60%), `gold` (20%) and `heldout` (20%)
(`pec.data.splits`, seeded). No component trains on `heldout`: the paper table measures fidelity
(precision, recall, coverage) against it, and every component reports its validation on it.
Components, in this order (each seeded, with a progress bar):
  classifier   the digit classifier behind the "digit" reward and the "classifier" perceptual space
               (conv net, `train` split)
  gold         the evaluation-only "gold" classifier: an MLP, another seed, trained on the `gold` split
               alone, which the reward classifier never saw; never used in training
  simclr       the self-supervised (SimCLR) encoder of the "simclr" perceptual space (`train`)
  simclr_eval  a second SimCLR encoder (another seed, `train`): the evaluation-only space
  autoencoder  the denoising autoencoder of the "autoencoder" perceptual space (`train`)
  model        the tiny SD3 flow model (rectified flow, prompt dropout for CFG, EMA weights) on
               `train` and `gold`, i.e. everything but `heldout`
  eval         samples the model with the default sampler and measures recognisability (share of
               samples the classifier reads as the prompted digit) and diversity (mean within-digit
               pairwise distance of samples vs of the held-out digits, in each perceptual space)
The run's settings go to pretrain_config.json, its progress and metrics to pretrain_log.txt and
pretrain_metrics.json, all in --out (default pec/assets). With a fixed --threads it is deterministic;
components may run in separate processes at once (`--only`), each merging its metrics into the file.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import random
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from pec.assets import ASSETS_DIR
from pec.atomic import atomic_write_text
from pec.cli import command_parser, expected_errors
from pec.data import Digits, augment, digit_prompt, load_digits, random_prompt, to_unit
from pec.data.splits import heldout_splits
from pec.models.base import FlowModel
from pec.models.embedded import EmbeddedConfig, EmbeddedFlowModel
from pec.perceptual import EMBEDDED_SPACES, ENCODERS
from pec.perceptual.networks import NETWORKS, Autoencoder, SimCLREncoder, save_network
from pec.rewards import REWARDS
from pec.sampling import cfg_velocities, sample

COMPONENTS = ("classifier", "gold", "simclr", "simclr_eval", "autoencoder", "model", "eval")
PROG = "pec.pretrain"


@dataclass
class PretrainConfig:
    """Settings of one pretraining run (written to pretrain_config.json)."""

    seed: int = 0
    heldout_fraction: float = 0.2
    gold_fraction: float = 0.2
    classifier_steps: int = 2000
    gold_steps: int = 2000
    simclr_steps: int = 1500
    simclr_temperature: float = 0.2
    autoencoder_steps: int = 2000
    model_steps: int = 4000
    model_lr: float = 1e-3
    model_batch_size: int = 64
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    eval_samples_per_digit: int = 100
    eval_num_steps: int = 10
    eval_guidance_scale: float = 2.0
    eval_extra_guidance_scales: tuple[float, ...] = (1.0, 4.0)
    eval_eta: float = 0.7


class RunLog:
    """Appends timestamped lines to pretrain_log.txt and echoes them through tqdm."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(self, message: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} {message}"
        tqdm.write(line)
        with self.path.open("a") as f:
            f.write(line + "\n")


def _batches(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless random mini-batch indices."""
    while True:
        yield torch.randint(0, n, (batch_size,), generator=generator)


def _optimise(name: str, steps: int, params, loss_fn: Callable[[int], torch.Tensor], log: RunLog,
              lr: float = 2e-3, after_step: Callable[[], None] | None = None) -> float:
    """AdamW with linear warm-up and cosine decay; returns the mean loss of the last 100 steps."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    warmup = max(1, steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps))))
    recent: list[float] = []
    bar = tqdm(range(steps), desc=name, dynamic_ncols=True, mininterval=1.0)
    for step in bar:
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
        opt.step()
        sched.step()
        if after_step is not None:
            after_step()
        recent = (recent + [loss.item()])[-100:]
        if (step + 1) % max(1, steps // 10) == 0:
            log(f"{name} step {step + 1}/{steps} loss {statistics.fmean(recent):.4f}")
            bar.set_postfix(loss=f"{statistics.fmean(recent):.4f}")
    return statistics.fmean(recent)


def train_classifier(train: Digits, val: Digits, cfg: PretrainConfig, out: Path, log: RunLog,
                     name: str = "classifier") -> dict:
    """Digit classifier `name` ("classifier": the reward's conv net; "gold": the evaluation-only MLP, another
    seed) on augmented digits (so that it also reads imperfect generated ones)."""
    seed = cfg.seed + (0 if name == "classifier" else 5)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the network's initialisation
    net = NETWORKS[name]()
    images, batches = to_unit(train.images), _batches(len(train), 128, g)

    def loss_fn(_: int) -> torch.Tensor:
        idx = next(batches)
        return F.cross_entropy(net(augment(images[idx], g)), train.labels[idx], label_smoothing=0.05)

    steps = cfg.classifier_steps if name == "classifier" else cfg.gold_steps
    _optimise(name, steps, net.parameters(), loss_fn, log)
    net.eval()
    with torch.no_grad():
        acc = (net(to_unit(val.images)).argmax(1) == val.labels).float().mean().item()
    save_network(net, out / f"{name}.safetensors")
    log(f"{name} validation accuracy {acc:.4f} on {len(val)} held-out digits (trained on {len(train)})")
    return {f"{name}_val_accuracy": acc}


def _nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """SimCLR's normalised-temperature cross-entropy over the 2B views."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    b = z1.shape[0]
    target = torch.cat([torch.arange(b, 2 * b), torch.arange(b)])
    return F.cross_entropy(sim, target)


def _nearest_neighbour_accuracy(encoder: Callable[[torch.Tensor], torch.Tensor], train: Digits, val: Digits) -> float:
    """1-NN label accuracy of val digits against train digits in the encoder's space (a probe only)."""
    with torch.no_grad():
        f_train, f_val = encoder(to_unit(train.images)), encoder(to_unit(val.images))
    nearest = torch.cdist(f_val, f_train).argmin(1)
    return (train.labels[nearest] == val.labels).float().mean().item()


def train_simclr(train: Digits, val: Digits, cfg: PretrainConfig, out: Path, log: RunLog,
                 name: str = "simclr") -> dict:
    """SimCLR encoder `name` ("simclr", or "simclr_eval": the evaluation-only one, another seed) on digit
    augmentations; labels are used only for the 1-NN probe reported at the end."""
    seed = cfg.seed + (1 if name == "simclr" else 4)
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # the network's initialisation
    net = SimCLREncoder()
    images, batches = to_unit(train.images), _batches(len(train), 256, g)

    def view(x: torch.Tensor) -> torch.Tensor:
        x = augment(x, g, max_shift=1, max_rotation=0.3, max_scale=0.15, noise_std=0.1)
        return x * (0.7 + 0.3 * torch.rand(x.shape[0], 1, 1, 1, generator=g))

    def loss_fn(_: int) -> torch.Tensor:
        x = images[next(batches)]
        return _nt_xent(net(view(x)), net(view(x)), cfg.simclr_temperature)

    _optimise(name, cfg.simclr_steps, net.parameters(), loss_fn, log)
    net.eval()
    acc = _nearest_neighbour_accuracy(net.features, train, val)
    save_network(net, out / f"{name}.safetensors")
    log(f"{name} 1-NN probe accuracy {acc:.4f} (labels unused in training)")
    return {f"{name}_1nn_accuracy": acc}


def train_autoencoder(train: Digits, val: Digits, cfg: PretrainConfig, out: Path, log: RunLog) -> dict:
    """Denoising autoencoder: reconstruct clean digits from jittered, noisy ones."""
    g = torch.Generator().manual_seed(cfg.seed + 2)
    torch.manual_seed(cfg.seed + 2)  # the network's initialisation
    net = Autoencoder()
    images, batches = to_unit(train.images), _batches(len(train), 128, g)

    def loss_fn(_: int) -> torch.Tensor:
        x = images[next(batches)]
        noisy = augment(x, g, max_shift=0, max_rotation=0.0, max_scale=0.0, noise_std=0.2)
        return F.binary_cross_entropy_with_logits(net(noisy), x)

    _optimise("autoencoder", cfg.autoencoder_steps, net.parameters(), loss_fn, log)
    net.eval()
    with torch.no_grad():
        val_images = to_unit(val.images)
        mse = F.mse_loss(net(val_images).sigmoid(), val_images).item()
    acc = _nearest_neighbour_accuracy(net.features, train, val)
    save_network(net, out / "autoencoder.safetensors")
    log(f"autoencoder validation reconstruction MSE {mse:.4f}, 1-NN probe accuracy {acc:.4f}")
    return {"autoencoder_val_mse": mse, "autoencoder_1nn_accuracy": acc}


def rectified_flow_loss(model: FlowModel, x0: torch.Tensor, prompts: list[str],
                        generator: torch.Generator) -> torch.Tensor:
    """MSE between the predicted velocity and eps − x0 at x_σ = (1 − σ)x0 + σ·eps, σ ~ U(0, 1), for latents
    x0 (B, ...) of any rank (images, or video latents (B, C, F, h, w))."""
    eps = torch.randn(x0.shape, generator=generator)
    sigma = torch.rand(x0.shape[0], generator=generator)
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    v = model.velocity((1 - s) * x0 + s * eps, sigma, model.encode_prompts(prompts))
    return F.mse_loss(v, eps - x0)


def train_model(train: Digits, cfg: PretrainConfig, out: Path, log: RunLog) -> dict:
    """The tiny SD3 flow model on the digits `train` (everything but the held-out split, from `main`), with
    prompt paraphrases and 10% null prompts."""
    torch.manual_seed(cfg.seed + 3)
    g, rng = torch.Generator().manual_seed(cfg.seed + 3), random.Random(cfg.seed + 3)
    model = EmbeddedFlowModel(EmbeddedConfig())
    ema = copy.deepcopy(model).requires_grad_(False)
    batches = _batches(len(train), cfg.model_batch_size, g)

    def loss_fn(_: int) -> torch.Tensor:
        idx = next(batches)
        prompts = ["" if rng.random() < cfg.prompt_dropout else random_prompt(int(d), rng)
                   for d in train.labels[idx]]
        return rectified_flow_loss(model, train.images[idx], prompts, g)

    @torch.no_grad()
    def update_ema() -> None:
        for p_ema, p in zip(ema.parameters(), model.parameters()):
            p_ema.lerp_(p, 1 - cfg.ema_decay)

    loss = _optimise("model", cfg.model_steps, model.parameters(), loss_fn, log, lr=cfg.model_lr,
                     after_step=update_ema)
    ema.save(out / "embedded")
    params = sum(p.numel() for p in ema.parameters())
    log(f"model saved (EMA weights), {params} parameters, final loss {loss:.4f}")
    return {"model_final_loss": loss, "model_parameters": params}


def _times_ms(fn: Callable[[], object], repeats: int = 20) -> tuple[float, float]:
    """(median, min) wall time of `fn` in ms; on a shared machine the min is the uncontended estimate."""
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3, min(times) * 1e3


def time_model(model: EmbeddedFlowModel, batch: int = 128) -> dict:
    """Median and min CPU times of a CFG forward (2·batch rows) and of a forward + backward of the same."""
    x, sigma = torch.randn(batch, *model.sample_shape), torch.rand(batch)
    with torch.no_grad():  # prompt encodings are computed once per rollout, as in `sample`
        cond = model.encode_prompts([digit_prompt(i % 10) for i in range(batch)])
        uncond = model.encode_prompts([""]).repeat_interleave(batch)
    model.requires_grad_(True)

    def fwd_bwd() -> None:
        v_u, v_c = cfg_velocities(model, x, sigma, cond, uncond)
        (v_u + 4 * (v_c - v_u)).square().mean().backward()

    with torch.no_grad():
        fwd = _times_ms(lambda: cfg_velocities(model, x, sigma, cond, uncond))
    both = _times_ms(fwd_bwd)
    model.zero_grad(set_to_none=True)
    model.requires_grad_(False)
    return {f"cfg_forward_ms_b{batch}_median": fwd[0], f"cfg_forward_ms_b{batch}_min": fwd[1],
            f"cfg_forward_backward_ms_b{batch}_median": both[0], f"cfg_forward_backward_ms_b{batch}_min": both[1],
            "torch_threads": torch.get_num_threads()}


def mean_pairwise_distance(features: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over digits of the mean pairwise L2 distance between features of the same digit."""
    return statistics.fmean(torch.pdist(features[labels == d]).mean().item() for d in labels.unique().tolist())


@torch.no_grad()
def evaluate_model(model: EmbeddedFlowModel, samples_per_digit: int, *, num_steps: int = 10,
                   guidance_scale: float = 2.0, eta: float = 0.7, seed: int = 0,
                   real: Digits | None = None, assets: Path | None = None,
                   spaces: Sequence[str] | None = None) -> dict:
    """Recognisability and diversity of `model`'s samples (see the module docstring).

    Returns recognised (share classified as the prompted digit), digit_reward (mean probability),
    and per perceptual space (`spaces`, default the digits world's): diversity_<space> (samples) and
    real_diversity_<space> (`real` digits, default all 1,797; `pec.pretrain` passes the held-out split).
    """
    prompts = [digit_prompt(d) for d in range(10)]
    rollout = sample(model, prompts, group_size=samples_per_digit, num_steps=num_steps,
                     guidance_scale=guidance_scale, eta=eta, seed=seed)
    labels = torch.arange(10).repeat_interleave(samples_per_digit)
    classifier = ENCODERS.build("classifier", directory=assets).network
    metrics = {
        "recognised": (classifier(rollout.images).argmax(1) == labels).float().mean().item(),
        "digit_reward": REWARDS.build("digit", directory=assets)(rollout.images, rollout.prompts).mean().item(),
    }
    real = real or load_digits()
    for space in spaces or EMBEDDED_SPACES:
        encoder = ENCODERS.build(space, directory=assets)
        metrics[f"diversity_{space}"] = mean_pairwise_distance(encoder(rollout.images), labels)
        metrics[f"real_diversity_{space}"] = mean_pairwise_distance(encoder(to_unit(real.images)), real.labels)
    return metrics


def run_eval(cfg: PretrainConfig, heldout: Digits, out: Path, log: RunLog) -> dict:
    """Evaluate the saved model with the default SDE sampler, the ODE (eta = 0) and other CFG scales against the
    `heldout` digits; time it."""
    model = EmbeddedFlowModel.from_pretrained(out / "embedded")
    settings = [("sde", cfg.eval_eta, cfg.eval_guidance_scale), ("ode", 0.0, cfg.eval_guidance_scale)]
    settings += [(f"sde_cfg{scale:g}", cfg.eval_eta, scale) for scale in cfg.eval_extra_guidance_scales]
    results = {}
    for name, eta, scale in settings:
        metrics = evaluate_model(model, cfg.eval_samples_per_digit, num_steps=cfg.eval_num_steps,
                                 guidance_scale=scale, eta=eta, seed=cfg.seed, real=heldout, assets=out)
        log(f"eval {name} sampler ({cfg.eval_num_steps} steps, CFG {scale}, eta {eta}, "
            f"{cfg.eval_samples_per_digit} samples per digit): "
            + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        results.update({f"{name}_{k}": v for k, v in metrics.items()})
    timing = time_model(model)
    log("timing " + ", ".join(f"{k} {v:.2f}" for k, v in timing.items()))
    return results | timing


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = command_parser("python -m pec.pretrain", __doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ASSETS_DIR, help="output directory (default: pec/assets)")
    parser.add_argument("--only", action="append", choices=COMPONENTS,
                        help="redo only this component (repeatable); default: all, in order")
    parser.add_argument("--seed", type=int, default=PretrainConfig.seed)
    parser.add_argument("--model-steps", type=int, default=PretrainConfig.model_steps)
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="a few steps per component and a tiny evaluation (smoke test; poor weights)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Run the selected components; returns the metrics they reported. Exit codes are those of `pec.cli`
    (2: an option refused before any work, 1: a failure while training, e.g. a full disk)."""
    args = parse_args(argv)
    with expected_errors(PROG, before_work=True):
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        cfg = PretrainConfig(seed=args.seed, model_steps=args.model_steps)
        if args.quick:
            cfg = PretrainConfig(seed=args.seed, classifier_steps=20, gold_steps=20, simclr_steps=20,
                                 autoencoder_steps=20, model_steps=20, eval_samples_per_digit=4, eval_num_steps=4,
                                 eval_extra_guidance_scales=())
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
    with expected_errors(PROG):
        return run_components(cfg, out, [c for c in COMPONENTS if c in (args.only or COMPONENTS)])


def run_components(cfg: PretrainConfig, out: Path, components: Sequence[str]) -> dict:
    """Train `components` (in `COMPONENTS` order) with `cfg` into `out`; returns the metrics they reported,
    each merged into pretrain_metrics.json as it finishes."""
    log = RunLog(out / "pretrain_log.txt")
    log(f"pretrain {list(components)} with {asdict(cfg)}")
    atomic_write_text(out / "pretrain_config.json", json.dumps(asdict(cfg), indent=2) + "\n")
    splits = heldout_splits(load_digits(), cfg.seed, cfg.heldout_fraction, cfg.gold_fraction)
    train, heldout = splits.train, splits.heldout
    steps = {
        "classifier": lambda: train_classifier(train, heldout, cfg, out, log),
        "gold": lambda: train_classifier(splits.gold, heldout, cfg, out, log, name="gold"),
        "simclr": lambda: train_simclr(train, heldout, cfg, out, log),
        "simclr_eval": lambda: train_simclr(train, heldout, cfg, out, log, name="simclr_eval"),
        "autoencoder": lambda: train_autoencoder(train, heldout, cfg, out, log),
        "model": lambda: train_model(splits.pretraining(), cfg, out, log),
        "eval": lambda: run_eval(cfg, heldout, out, log),
    }
    metrics_path = out / "pretrain_metrics.json"
    metrics: dict = {}
    for name in components:
        start = time.perf_counter()
        result = steps[name]()
        result[f"{name}_seconds"] = time.perf_counter() - start
        log(f"{name} done in {result[f'{name}_seconds']:.1f} s")
        # Re-read before writing: other components may run in other processes at the same time.
        merged = json.loads(metrics_path.read_text()) if metrics_path.exists() else {}
        metrics.update(result)
        atomic_write_text(metrics_path, json.dumps(merged | result, indent=2, sort_keys=True) + "\n")
    return metrics


if __name__ == "__main__":
    main()

"""The RL algorithms (`--algorithm`) behind the trainer's loop, each an `Algorithm` (see
`pec.algorithms.base`). Importing this package registers them all in `ALGORITHMS`.

`check_algorithm` decides, before any model loads, whether a regulariser (`pec.methods`) composes with an
algorithm: it does unless it needs something the algorithm does not provide (per-step log-probs, a PPO
ratio, Gaussian steps with a policy entropy), and then the run is refused with one line saying why.
"""
from __future__ import annotations

# Each module registers its algorithm.
from pec.algorithms import flow_grpo, flow_grpo_fast, grpo_guard, mixgrpo, nft  # noqa: F401
from pec.algorithms.base import CAPABILITIES, Algorithm, Learner
from pec.algorithms.registry import ALGORITHMS
from pec.config import Config, apply_dict
from pec.methods import VARIANTS, build_method

__all__ = ["ALGORITHMS", "Algorithm", "algorithm_class", "build_algorithm", "check_algorithm", "composition_table"]


def algorithm_class(cfg: Config) -> type[Algorithm]:
    """The class `cfg.algorithm` names; ValueError naming --algorithm when there is none."""
    if cfg.algorithm not in ALGORITHMS.names():
        raise ValueError(f"algorithm must be one of {ALGORITHMS.names()}, got {cfg.algorithm!r}")
    return ALGORITHMS.get(cfg.algorithm)


def check_algorithm(cfg: Config) -> None:
    """ValueError (one line) unless `cfg.algorithm` exists, accepts its options, and composes with the
    regulariser `cfg.method` (`pec.methods`): what the method needs, the algorithm must provide."""
    cls = algorithm_class(cfg)
    cls.check(cfg)
    method = build_method(cfg)
    for capability, why in method.requirements().items():
        if capability not in cls.provides:
            raise ValueError(f"--method {cfg.method} cannot run with --algorithm {cfg.algorithm}: {why}, and "
                             f"{cfg.algorithm} has no {CAPABILITIES[capability]}")


def build_algorithm(cfg: Config, learner: Learner) -> Algorithm:
    """The algorithm `cfg.algorithm` names, acting on `learner`."""
    return ALGORITHMS.build(cfg.algorithm, cfg=cfg, learner=learner)


def composition_table(base: dict | None = None) -> dict[str, dict[str, str | None]]:
    """{algorithm: {regulariser reading (`pec.methods.VARIANTS`): None where they compose, else the one-line
    refusal}}: what `check_algorithm` decides for every pair, from the options alone (`base`: options laid
    under each pair's)."""
    table: dict[str, dict[str, str | None]] = {}
    for name in ALGORITHMS.names():
        table[name] = {}
        for label, options in VARIANTS.items():
            cfg = Config()
            apply_dict(cfg, {**(base or {}), "algorithm": name})
            apply_dict(cfg, options)
            try:
                check_algorithm(cfg)
            except ValueError as err:
                table[name][label] = str(err)
            else:
                table[name][label] = None
    return table


def composition_markdown() -> str:
    """The algorithm x regulariser table of the README: one row per regulariser reading, one column per
    algorithm, "yes" or "no: why" (printed by `python -m pec.algorithms`)."""
    table = composition_table()
    names = list(table)
    lines = ["| regulariser | " + " | ".join(f"`{n}`" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for label in VARIANTS:
        cells = []
        for name in names:
            why = table[name][label]
            if why is not None and why.startswith("--method "):  # the pair is the row and column already
                why = why.split(": ", 1)[-1]
            cells.append("yes" if why is None else f"no: {why}")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)

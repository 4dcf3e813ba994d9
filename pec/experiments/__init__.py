"""Experiments built on the trainer and the evaluator (`python -m pec.experiments.paper_table`)."""
from __future__ import annotations

import sys
from collections.abc import Sequence


def split_passthrough(argv: Sequence[str] | None) -> tuple[list[str], list[str]]:
    """An experiment's own options, and the `pec.train` options after a `--` (both lists; `argv`
    None means the command line)."""
    args = list(sys.argv[1:] if argv is None else argv)
    if "--" not in args:
        return args, []
    cut = args.index("--")
    return args[:cut], args[cut + 1:]

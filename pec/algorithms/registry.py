"""The registry of RL algorithms (`--algorithm`), apart from `pec.algorithms.__init__` so that each
algorithm's module registers itself without importing the package that imports it."""
from __future__ import annotations

from pec.algorithms.base import Algorithm
from pec.registry import Registry

ALGORITHMS: Registry[Algorithm] = Registry("algorithm")

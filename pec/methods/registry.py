"""The registry of regularisers (`--method`), apart from `pec.methods.__init__` so that each method's module
registers itself without importing the package that imports it."""
from __future__ import annotations

from pec.methods.base import Method
from pec.registry import Registry

METHODS: Registry[Method] = Registry("method")

"""Placeholder: fake (meta) implementations of the torch.ops.pec ops (filled in by the compile work)."""


def register() -> None:
    """Register the fake implementations (idempotent)."""

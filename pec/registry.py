"""A minimal name -> factory registry, used for rewards and perceptual spaces.

A real scorer (PickScore, CLIP, DINO, JPEG compressibility, ...) plugs in by registering a factory
under a new name; configs then refer to it by that name.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named factories of one kind of component (`kind` appears in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator: register `factory` under `name`."""
        def wrap(factory: Callable[..., T]) -> Callable[..., T]:
            if name in self._factories:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._factories[name] = factory
            return factory
        return wrap

    def get(self, name: str) -> Callable[..., T]:
        """The factory registered under `name` (e.g. a class, to read its attributes before building it)."""
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        return self._factories[name]

    def build(self, name: str, **kwargs) -> T:
        """Instantiate the component registered under `name`."""
        return self.get(name)(**kwargs)

    def build_with_options(self, name: str, options: dict, **kwargs) -> T:
        """`build(name, **kwargs)`, plus those of `options` that the factory's signature accepts (so a
        factory registered with fewer parameters, e.g. (device, directory), still builds)."""
        if name not in self._factories:
            raise ValueError(f"unknown {self.kind} {name!r}; choose one of {self.names()}")
        params = inspect.signature(self._factories[name]).parameters
        takes_all = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        kwargs.update({k: v for k, v in options.items() if takes_all or k in params})
        return self._factories[name](**kwargs)

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._factories)

"""A tiny name -> factory registry (timm's pattern): configs name things, factories build them.

A package of parts (policies, backbones) imports all its modules with :func:`import_submodules`,
so that adding a part is adding its module: its ``register`` call makes it buildable by name."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable, Collection
from typing import Any, Generic, TypeVar

from eenn.errors import EENNError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._factories: dict[str, Callable[..., T]] = {}
        self._examples: dict[str, dict[str, Any]] = {}

    def register(self, *names: str, example: dict[str, Any] | None = None) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Make the factory buildable by ``names`` (default: its own name). ``example``: small
        arguments it builds with, for the contract tests (tests/contracts)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            for name in names or (factory.__name__,):
                if name in self._factories:
                    raise RuntimeError(f"{self.kind} {name!r} registered twice")
                self._factories[name] = factory
                self._examples[name] = dict(example or {})
            return factory

        return deco

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, key: object) -> bool:
        return key in self._factories

    def get(self, key: str) -> Callable[..., T]:
        if key not in self._factories:
            raise EENNError(f"{self.config_key}={key!r} is not a known {self.kind}; valid: {', '.join(self.names())}.")
        return self._factories[key]

    def example(self, key: str) -> dict[str, Any]:
        """The small arguments ``key`` was registered with for tests (empty: its defaults)."""
        self.get(key)
        return dict(self._examples[key])

    def build(self, key: str, /, **kwargs: Any) -> T:
        return self.get(key)(**kwargs)


def import_submodules(package: str, skip: Collection[str] = ()) -> None:
    """Import every module of ``package`` but those in ``skip``."""
    path = importlib.import_module(package).__path__
    for info in pkgutil.iter_modules(path):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")

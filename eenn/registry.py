"""A tiny name -> factory registry (timm's pattern): configs name things, factories build them."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from eenn.errors import EENNError

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, config_key: str) -> None:
        self.kind = kind
        self.config_key = config_key
        self._factories: dict[str, Callable[..., T]] = {}

    def register(self, *names: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            for name in names or (factory.__name__,):
                if name in self._factories:
                    raise RuntimeError(f"{self.kind} {name!r} registered twice")
                self._factories[name] = factory
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

    def build(self, key: str, /, **kwargs: Any) -> T:
        return self.get(key)(**kwargs)

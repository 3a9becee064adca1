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
        self._meta: dict[str, dict[str, Any]] = {}
        self._namespaces: list[tuple[str, str, Callable[[str], bool], str]] = []

    def register(
        self, *names: str, example: dict[str, Any] | None = None, **meta: Any
    ) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Make the factory buildable by ``names`` (default: its own name). ``example``: small
        arguments it builds with, for the contract tests (tests/contracts); ``meta``: what the
        registry's users need to know of the part before building it (:meth:`meta`)."""

        def deco(factory: Callable[..., T]) -> Callable[..., T]:
            for name in names or (factory.__name__,):
                if name in self._factories:
                    raise RuntimeError(f"{self.kind} {name!r} registered twice")
                self._factories[name] = factory
                self._examples[name] = dict(example or {})
                self._meta[name] = dict(meta)
            return factory

        return deco

    def add_namespace(self, family: str, argument: str, contains: Callable[[str], bool], what: str) -> None:
        """Let every key that ``contains`` accepts name ``family`` with that key as its ``argument``
        (any timm model name is a ``backbone.name``); ``what`` names the namespace in messages."""
        self._namespaces.append((family, argument, contains, what))

    def resolve(self, key: str, kwargs: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The registered name ``key`` stands for and its arguments: ``key`` itself, or the family
        of the namespace that holds it, given ``key`` as its argument (which ``kwargs`` may repeat,
        or leave null, but not contradict)."""
        if key not in self._factories:
            for family, argument, contains, _ in self._namespaces:
                if contains(key):
                    given = kwargs.get(argument)
                    if given is not None and given != key:
                        group = self.config_key.rsplit(".", 1)[0]
                        raise EENNError(
                            f"{self.config_key}={key!r} names one model and {group}.{argument}={given!r} "
                            "another; give one of them."
                        )
                    return family, {**kwargs, argument: key}
        self.get(key)  # an unknown name is refused here
        return key, kwargs

    def names(self) -> list[str]:
        return sorted(self._factories)

    def __contains__(self, key: object) -> bool:
        return key in self._factories

    def get(self, key: str) -> Callable[..., T]:
        if key not in self._factories:
            spaces = "".join(f", or {what}" for *_, what in self._namespaces)
            raise EENNError(
                f"{self.config_key}={key!r} is not a known {self.kind}; valid: {', '.join(self.names())}{spaces}."
            )
        return self._factories[key]

    def example(self, key: str) -> dict[str, Any]:
        """The small arguments ``key`` was registered with for tests (empty: its defaults)."""
        self.get(key)
        return dict(self._examples[key])

    def meta(self, key: str) -> dict[str, Any]:
        """What ``key`` was registered with besides its factory (an exit head: the features it reads)."""
        self.get(key)
        return dict(self._meta[key])

    def build(self, key: str, /, **kwargs: Any) -> T:
        return self.get(key)(**kwargs)


def import_submodules(package: str, skip: Collection[str] = ()) -> None:
    """Import every module of ``package`` but those in ``skip``."""
    path = importlib.import_module(package).__path__
    for info in pkgutil.iter_modules(path):
        if info.name not in skip:
            importlib.import_module(f"{package}.{info.name}")

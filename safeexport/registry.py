"""Plain-dict registries: ``register(name, obj)`` / ``get(name)``.

Strategies, attacks, models and datasets are registered this way, so adding one is one function
and one line. An unknown name raises a ConfigError that lists the known ones.
"""

from collections.abc import Callable
from typing import Generic, TypeVar

from safeexport.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of objects of one kind (``kind`` is used in error messages)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str, obj: T) -> T:
        """Add ``obj`` under ``name``; a name can be registered once."""
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is already registered")
        self._items[name] = obj
        return obj

    def decorator(self, name: str) -> Callable[[T], T]:
        """``@registry.decorator("name")`` registers the decorated object."""
        return lambda obj: self.register(name, obj)

    def get(self, name: str) -> T:
        """The object registered as ``name``, or a ConfigError listing the known names."""
        try:
            return self._items[name]
        except KeyError:
            raise ConfigError(
                f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}"
            ) from None

    def check(self, names: tuple[str, ...]) -> None:
        """Refuse to load unless the built-in entries are exactly ``names``, their list in
        safeexport.names (called once the module has registered them, before any plugin)."""
        if tuple(self._items) != tuple(names):
            raise RuntimeError(f"the registered {self.kind}s {list(self._items)} differ from "
                               f"their list in safeexport.names {list(names)}")

    def names(self) -> list[str]:
        """Registered names in registration order."""
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

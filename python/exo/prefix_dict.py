"""`PrefixDict` (exo classic's helper): values looked up by which of their keys prefix a string."""

from __future__ import annotations

from typing import Generic, TypeVar

PK = TypeVar("PK", bound=str)
V = TypeVar("V")


class PrefixDict(Generic[PK, V]):
    """A mapping searched by which keys are prefixes of a given string."""

    def __init__(self) -> None:
        self.items: dict[PK, V] = {}

    def add(self, key: PK, value: V) -> None:
        self.items[key] = value

    def find_prefix(self, argument: str) -> list[tuple[PK, V]]:
        """All ``(key, value)`` pairs whose key is a prefix of ``argument``."""
        return [(key, value) for key, value in self.items.items() if argument.startswith(key)]

    def find_longest_prefix(self, argument: str) -> tuple[PK, V] | None:
        """The pair with the longest key that prefixes ``argument``, or None."""
        matches = self.find_prefix(argument)
        if not matches:
            return None
        return max(matches, key=lambda item: len(item[0]))

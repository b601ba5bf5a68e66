"""How sans-IO code reads the state store: it returns `Lookup(keys, then)` and the shell answers.

The h11 way: the core never awaits. The shell fetches the keys and calls `then(values)` (None when the
store is unavailable) until it gets something that is not a Lookup.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
U = TypeVar("U")
Values = list[bytes | None] | None  # None: the store did not answer


@dataclass(slots=True)
class Lookup(Generic[T]):
    keys: tuple[str, ...]
    then: Callable[[Values], T | Lookup[T]]

    def map(self, f: Callable[[T], U | Lookup[U]]) -> Lookup[U]:
        """The same reads, with `f` applied to what they finally decide."""
        def then(values: Values) -> U | Lookup[U]:
            out = self.then(values)
            return out.map(f) if isinstance(out, Lookup) else f(out)
        return Lookup(self.keys, then)


def then(step: T | Lookup[T], f: Callable[[T], U | Lookup[U]]) -> U | Lookup[U]:
    """`f` applied now, or once the reads `step` needs are answered."""
    return step.map(f) if isinstance(step, Lookup) else f(step)

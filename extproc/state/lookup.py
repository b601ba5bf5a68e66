"""How sans-IO code reads the state store: a decision is a generator that yields its reads.

The h11 way: the core never awaits. A decision is written straight-line, `values = yield Reads(keys)`
(`yield from` another decision that reads in turn), and returns what it decided. `start` runs it to
its first read, which the shell sees as a `Lookup`: it fetches the keys and calls `then(values)`
(None when the store is unavailable) until it gets something that is not a Lookup.
"""

from __future__ import annotations

from collections.abc import Callable, Generator
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")
Values = list[bytes | None] | None  # None: the store did not answer


@dataclass(frozen=True, slots=True)
class Reads:
    """The store keys a decision needs before it goes on: one multi-get."""

    keys: tuple[str, ...]


Decision = Generator[Reads, Values, T]  # yields its reads, is sent their values, returns what it decided


@dataclass(frozen=True, slots=True)
class Lookup(Generic[T]):
    """A decision paused at a read, as the shell sees it: the keys, and how to go on with their values."""

    keys: tuple[str, ...]
    then: Callable[[Values], T | Lookup[T]]


def start(decision: Decision[T]) -> T | Lookup[T]:
    """The decision run until it reads (a Lookup) or decides."""
    return _resume(decision, None)


def _resume(decision: Decision[T], values: Values) -> T | Lookup[T]:
    try:
        reads = decision.send(values)
    except StopIteration as decided:
        result: T = decided.value
        return result
    return Lookup(reads.keys, lambda answered: _resume(decision, answered))


def awaited(step: T | Lookup[T]) -> Decision[T]:
    """A step that may be paused at a read, inside another decision: `yield from awaited(step)`."""
    while isinstance(step, Lookup):
        step = step.then((yield Reads(step.keys)))
    return step

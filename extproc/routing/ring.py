"""FNV-1a 64-bit consistent-hash ring with weighted virtual nodes.

Deterministic across processes and restarts (no Python `hash()`), so every sidecar replica
places a key on the same endpoint. Adding or removing one of N endpoints moves about 1/N of keys.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence

FNV64_OFFSET = 0xCBF29CE484222325
FNV64_PRIME = 0x100000001B3
_MASK = 0xFFFFFFFFFFFFFFFF


def fnv1a64(data: bytes) -> int:
    h = FNV64_OFFSET
    for byte in data:
        h = ((h ^ byte) * FNV64_PRIME) & _MASK
    return h


def _mix(h: int) -> int:
    """Finalise an FNV-1a hash (splitmix64 avalanche): raw FNV clusters keys that differ only at the end."""
    h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK
    return h ^ (h >> 31)


def key_hash(key: str) -> int:
    return _mix(fnv1a64(key.encode("utf-8", "surrogatepass")))


class HashRing:
    def __init__(self, nodes: Sequence[tuple[str, int]], vnodes: int = 160):
        """nodes: (name, weight); each gets vnodes * weight points on the ring."""
        if not nodes:
            raise ValueError("a ring needs at least one node")
        points = sorted(
            (key_hash(f"{name}#{i}"), name) for name, weight in nodes for i in range(vnodes * weight)
        )
        self._hashes = [h for h, _ in points]
        self._names = [n for _, n in points]
        self.nodes = tuple(name for name, _ in nodes)

    def lookup(self, key: str) -> str:
        i = bisect.bisect(self._hashes, key_hash(key))
        return self._names[i % len(self._names)]

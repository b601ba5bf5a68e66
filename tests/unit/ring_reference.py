"""An independent model of the endpoint ring, to derive expected placements by hand, not by calling
extproc.routing.ring: FNV-1a 64 over the UTF-8 key, finished by the splitmix64 mixer, and each
endpoint owning 160 points `address#i` per unit of weight; a key belongs to the first point after it,
round the circle. Its two functions are checked against their published vectors."""

from __future__ import annotations

MOD = 2**64


def fnv1a_64(data: bytes) -> int:
    """FNV-1a, 64 bits: offset basis 14695981039346656037, prime 2**40 + 2**8 + 0xb3."""
    h = 14695981039346656037
    for octet in data:
        h = ((h ^ octet) * (2**40 + 2**8 + 0xB3)) % MOD
    return h


def splitmix64_mix(z: int) -> int:
    """The output function of Vigna's splitmix64."""
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) % MOD
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) % MOD
    return z ^ (z >> 31)


FNV_VECTORS = {b"": 0xCBF29CE484222325, b"a": 0xAF63DC4C8601EC8C, b"foobar": 0x85944171F73967E8}
SPLITMIX64_SEED_0 = [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4, 0x06C45D188009454F]  # its first outputs


def point(text: str) -> int:
    return splitmix64_mix(fnv1a_64(text.encode()))


def owner(key: str, endpoints: list[str], vnodes: int = 160) -> str:
    """The endpoint whose point comes first after the key's, clockwise (ties: the smaller address)."""
    h = point(key)
    points = [(point(f"{e}#{i}"), e) for e in endpoints for i in range(vnodes)]
    after = [p for p in points if p[0] > h]
    return min(after or points)[1]

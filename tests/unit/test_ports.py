"""The port allocator of the local stack: no port handed out twice, ranges that never overlap."""

from __future__ import annotations

import pytest

from extproc.local.stack import PortAllocator, free_port, free_ports


def scripted(picks: list[int], busy: frozenset[int] = frozenset()) -> PortAllocator:
    """An allocator whose kernel answers `picks` in turn and whose `busy` ports are held elsewhere."""
    it = iter(picks)
    return PortAllocator(pick=lambda: next(it), bindable=lambda p: p not in busy, attempts=len(picks))


def test_a_port_the_kernel_offers_again_is_not_handed_out_again():
    ports = scripted([5001, 5001, 5003, 5001, 5005])
    assert [ports.take() for _ in range(3)] == [5001, 5003, 5005]


def test_ranges_overlap_neither_each_other_nor_single_ports():
    # Worker 1's gRPC port must not be worker 0's admin port: the second range cannot start at 6001.
    ports = scripted([6000, 6001, 6002, 6003, 6001, 6007])
    assert ports.take(2) == 6000  # 6000-6001
    assert ports.take(2) == 6002  # not 6001: it is inside the first range
    assert ports.take() == 6007  # not 6003 nor 6001: both belong to a range


def test_a_range_needs_every_port_free_and_below_65536():
    ports = scripted([7000, 65535, 7100], busy=frozenset({7001}))
    assert ports.take(2) == 7100


def test_gives_up_after_its_attempts():
    with pytest.raises(RuntimeError, match="no 3 consecutive free ports"):
        scripted([8000, 8000, 8000], busy=frozenset({8002})).take(3)


def test_the_real_allocator_hands_out_distinct_ports():
    singles = [free_port() for _ in range(50)]
    bases = [free_ports(3) for _ in range(10)]
    taken = singles + [b + i for b in bases for i in range(3)]
    assert len(set(taken)) == len(taken) == 80

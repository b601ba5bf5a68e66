"""The FNV-1a ring: known hash values, balance, minimal movement, same answer in every process."""

from __future__ import annotations

import collections
import os
import subprocess
import sys

from extproc.routing.ring import HashRing, fnv1a64

from . import ring_reference as reference

NODES = [f"10.0.0.{i}:8000" for i in range(1, 6)]
KEYS = [f"conversation-{i}" for i in range(10_000)]


def test_fnv1a64_reference_vectors():
    assert fnv1a64(b"") == 0xCBF29CE484222325
    assert fnv1a64(b"a") == 0xAF63DC4C8601EC8C
    assert fnv1a64(b"foobar") == 0x85944171F73967E8


def test_balance_within_bound():
    ring = HashRing([(n, 1) for n in NODES])
    load = collections.Counter(ring.lookup(k) for k in KEYS)
    fair = len(KEYS) / len(NODES)
    assert set(load) == set(NODES)
    assert max(load.values()) < 1.25 * fair and min(load.values()) > 0.75 * fair, load


def test_weights():
    ring = HashRing([(NODES[0], 3), (NODES[1], 1)])
    load = collections.Counter(ring.lookup(k) for k in KEYS)
    assert 2.3 < load[NODES[0]] / load[NODES[1]] < 3.9, load


def test_adding_a_node_moves_about_one_in_n_and_only_to_it():
    before = HashRing([(n, 1) for n in NODES])
    after = HashRing([(n, 1) for n in [*NODES, "10.0.0.9:8000"]])
    moved = [k for k in KEYS if before.lookup(k) != after.lookup(k)]
    assert all(after.lookup(k) == "10.0.0.9:8000" for k in moved)
    assert 0.10 < len(moved) / len(KEYS) < 0.24  # ideal 1/6


def test_removing_a_node_moves_only_its_keys():
    before = HashRing([(n, 1) for n in NODES])
    after = HashRing([(n, 1) for n in NODES[1:]])
    for k in KEYS:
        if before.lookup(k) != NODES[0]:
            assert after.lookup(k) == before.lookup(k)


def test_same_answers_in_another_process():
    code = ("from extproc.routing.ring import HashRing; r = HashRing([(f'10.0.0.{i}:8000', 1) for i in range(1, 6)]);"
            "print(','.join(r.lookup(f'conversation-{i}') for i in range(200)))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    ring = HashRing([(n, 1) for n in NODES])
    assert out.strip() == ",".join(ring.lookup(f"conversation-{i}") for i in range(200))


def test_the_reference_model_matches_the_published_vectors():
    assert {data: reference.fnv1a_64(data) for data in reference.FNV_VECTORS} == reference.FNV_VECTORS
    outputs, state = [], 0
    for _ in reference.SPLITMIX64_SEED_0:
        state = (state + 0x9E3779B97F4A7C15) % reference.MOD
        outputs.append(reference.splitmix64_mix(state))
    assert outputs == reference.SPLITMIX64_SEED_0


def test_placements_agree_with_the_reference_model():
    ring = HashRing([(n, 1) for n in NODES])
    assert all(ring.lookup(k) == reference.owner(k, NODES) for k in KEYS[:40])

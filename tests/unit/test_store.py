"""The three stores behave alike; Redis is the real server (Debian's redis-server)."""

from __future__ import annotations

import asyncio

import pytest

from extproc.state.store import MemoryStore, RedisStore, SQLiteStore, StoreUnavailable


def run(coro):
    return asyncio.run(coro)


@pytest.fixture(params=["memory", "sqlite", "redis"])
def make_store(request, tmp_path):
    """A store factory: Redis clients belong to the event loop they are made in."""
    if request.param == "memory":
        return lambda: MemoryStore(ttl=60, max_entries=1000)
    if request.param == "sqlite":
        return lambda: SQLiteStore(str(tmp_path / "state.db"), ttl=60)
    url = request.getfixturevalue("redis_server").url
    return lambda: RedisStore(url, ttl=60, timeout=1.0)


def test_write_get_delete(make_store):
    async def go():
        store = make_store()
        await store.write([("unit:a", b"1"), ("unit:b", b"2")])
        assert await store.get_many(("unit:a", "unit:b", "unit:missing")) == [b"1", b"2", None]
        await store.write([("unit:a", None), ("unit:b", b"3")])
        assert await store.get_many(("unit:a", "unit:b")) == [None, b"3"]
        await store.close()
    run(go())


def test_memory_store_bounds_and_expires(monkeypatch):
    s = MemoryStore(ttl=10, max_entries=2)
    run(s.write([("a", b"1"), ("b", b"2")]))
    assert run(s.get_many(("a",))) == [b"1"]  # a is now the most recently used
    run(s.write([("c", b"3")]))
    assert run(s.get_many(("a", "b", "c"))) == [b"1", None, b"3"]
    import extproc.state.store as mod
    now = mod.time.monotonic()
    monkeypatch.setattr(mod.time, "monotonic", lambda: now + 11)
    assert run(s.get_many(("a", "c"))) == [None, None]


def test_memory_store_bounds_bytes():
    s = MemoryStore(ttl=10, max_entries=1000, max_bytes=100)
    run(s.write([(f"k{i}", b"x" * 30) for i in range(5)]))
    assert s.size <= 100 and run(s.get_many(("k4", "k0"))) == [b"x" * 30, None]
    run(s.write([("k4", None)]))
    assert s.size == sum(len(k) + len(v) for k, (_, v) in s.data.items())


def test_sqlite_survives_a_restart(tmp_path):
    path = str(tmp_path / "s.db")
    s = SQLiteStore(path, ttl=60)
    run(s.write([("k", b"v")]))
    run(s.close())
    again = SQLiteStore(path, ttl=60)
    assert run(again.get_many(("k",))) == [b"v"]
    run(again.close())


def test_redis_down_is_unavailable_not_a_crash():
    from extproc.local.stack import free_port

    async def go():
        s = RedisStore(f"redis://127.0.0.1:{free_port()}/0", ttl=60, timeout=0.3)
        with pytest.raises(StoreUnavailable):
            await s.get_many(("k",))
        with pytest.raises(StoreUnavailable):
            await s.write([("k", b"v")])
        await s.close()
    run(go())


def test_write_unless_writes_only_while_the_guard_is_absent(make_store):
    """The run's record is written unless the cancel mark is there, in one atomic step (front/background.py)."""
    async def go():
        store = make_store()
        assert await store.write_unless("unit:guard", [("unit:x", b"1"), ("unit:y", b"2")]) is True
        assert await store.get_many(("unit:x", "unit:y")) == [b"1", b"2"]
        await store.write([("unit:guard", b"1")])
        assert await store.write_unless("unit:guard", [("unit:x", b"3"), ("unit:z", b"4")]) is False
        assert await store.get_many(("unit:x", "unit:z")) == [b"1", None]  # nothing of the refused writes
        await store.close()
    run(go())


def test_stores_opened_together_on_one_file_all_start(tmp_path):
    """Workers started at once open one SQLite file: each must come up (WAL switched by one, waited
    out by the others), and all see one table."""
    import threading

    path, errors, stores = str(tmp_path / "shared.db"), [], []
    barrier = threading.Barrier(8)

    def open_one() -> None:
        barrier.wait()
        try:
            stores.append(SQLiteStore(path, 60))
        except Exception as e:  # whatever stopped a store starting is the failure
            errors.append(e)

    threads = [threading.Thread(target=open_one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and len(stores) == 8
    asyncio.run(stores[0].write([("k", b"v")], 60))
    assert asyncio.run(stores[-1].get_many(("k",))) == [b"v"]

"""Key-value stores for response pins and sidecar-held conversations, behind one small async interface.

The exchange logic (`extproc.exchange`, `extproc.state.pinning`) never touches a store: it asks for keys and returns
writes, and the gRPC shell runs them here. Every backend bounds each call by `timeout_ms`; a failed
or slow call raises `StoreUnavailable`, which the exchange turns into ring fallback or a clear error.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import time
from collections import OrderedDict
from collections.abc import Awaitable, Iterator
from typing import Any, Protocol, TypeVar, cast

from extproc.config import State

T = TypeVar("T")

PREFIX = "extproc:"


class StoreUnavailable(Exception):
    """The store did not answer (down, slow, refused)."""


class Store(Protocol):
    async def get_many(self, keys: tuple[str, ...]) -> list[bytes | None]: ...
    async def write(self, writes: list[tuple[str, bytes | None]], ttl: int | None = None) -> None: ...  # None deletes
    async def scan(self, prefix: str) -> list[tuple[str, bytes]]: ...  # for the admin command, not requests
    async def add(self, key: str, value: bytes) -> bytes: ...  # set unless present, never expires; the value kept
    async def incr(self, changes: list[tuple[str, int, int]]) -> list[int]: ...  # counters: (key, by, ttl) -> values
    # the writes (values, no deletes) unless `guard` is present, atomically; True when written
    async def write_unless(self, guard: str, writes: list[tuple[str, bytes]]) -> bool: ...
    async def close(self) -> None: ...


FOREVER = 100 * 365 * 86400  # seconds: records that must not expire (the tenant secret)


class MemoryStore:
    """In-process, bounded in entries and bytes (least recently used first out) with TTL: the default,
    for one replica."""

    def __init__(self, ttl: float, max_entries: int, max_bytes: int = 32 * 1024 * 1024):
        self.ttl = ttl
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0  # bytes of keys and values held
        self.data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def get(self, key: str) -> bytes | None:
        hit = self.data.get(key)
        if hit is None:
            return None
        if hit[0] < time.monotonic():
            self._drop(key)
            return None
        self.data.move_to_end(key)
        return hit[1]

    async def get_many(self, keys: tuple[str, ...]) -> list[bytes | None]:
        return [self.get(k) for k in keys]

    async def write(self, writes: list[tuple[str, bytes | None]], ttl: int | None = None) -> None:
        expires = time.monotonic() + (ttl or self.ttl)
        for key, value in writes:
            self._drop(key)
            if value is not None:
                # A right-sized copy: orjson's bytes keep their whole growth buffer (16 KiB for a
                # 1 KiB record, measured), which a long-lived record would hold on to.
                value = bytes(memoryview(value))
                self.data[key] = (expires, value)
                self.size += len(key) + len(value)
        self._bound()

    def _bound(self) -> None:
        while self.data and (len(self.data) > self.max_entries or self.size > self.max_bytes):
            self._drop(next(iter(self.data)))

    def _drop(self, key: str) -> None:
        old = self.data.pop(key, None)
        if old is not None:
            self.size -= len(key) + len(old[1])

    async def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return [(k, v) for k in list(self.data) if k.startswith(prefix) and (v := self.get(k)) is not None]

    async def add(self, key: str, value: bytes) -> bytes:
        kept = self.get(key)
        if kept is None:
            await self.write([(key, value)], FOREVER)
            kept = value
        return kept

    async def incr(self, changes: list[tuple[str, int, int]]) -> list[int]:
        """Each counter plus its increment; a new one expires `ttl` seconds on, a running one keeps its end."""
        out = []
        for key, by, ttl in changes:
            hit = self.data.get(key)
            now = time.monotonic()
            expires, value = (hit[0], int(hit[1]) + by) if hit is not None and hit[0] >= now else (now + ttl, by)
            self._drop(key)
            raw = str(value).encode()
            self.data[key] = (expires, raw)
            self.size += len(key) + len(raw)
            out.append(value)
        self._bound()
        return out

    async def write_unless(self, guard: str, writes: list[tuple[str, bytes]]) -> bool:
        if self.get(guard) is not None:  # no await between the look and the write: atomic on the loop
            return False
        await self.write(list(writes))
        return True

    async def close(self) -> None:
        self.data.clear()


def _wal(db: sqlite3.Connection, wait: float = 10.0) -> None:
    """Switch to WAL, waiting out another process doing the same: workers started together share one
    file, and SQLite answers a concurrent journal-mode change "database is locked" at once, without
    its busy timeout."""
    deadline = time.monotonic() + wait
    while True:
        try:
            db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)  # start-up only: this runs once, before the store serves anything


class SQLiteStore:
    """A local file, so one replica's restart loses nothing. Calls are short and run inline."""

    def __init__(self, path: str, ttl: float):
        self.ttl = ttl
        self.db = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        _wal(self.db)
        self.db.execute("PRAGMA synchronous=NORMAL")
        self.db.execute("CREATE TABLE IF NOT EXISTS kv (key TEXT PRIMARY KEY, value BLOB NOT NULL, expires REAL NOT NULL)")
        self.db.execute("DELETE FROM kv WHERE expires < ?", (time.time(),))

    async def get_many(self, keys: tuple[str, ...]) -> list[bytes | None]:
        try:
            rows = self.db.execute(f"SELECT key, value FROM kv WHERE expires >= ? AND key IN ({','.join('?' * len(keys))})",
                                   (time.time(), *keys)).fetchall()
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite: {e}") from None
        found = dict(rows)
        return [found.get(k) for k in keys]

    async def write(self, writes: list[tuple[str, bytes | None]], ttl: int | None = None) -> None:
        expires = time.time() + (ttl or self.ttl)
        try:
            with self.db:
                for key, value in writes:
                    if value is None:
                        self.db.execute("DELETE FROM kv WHERE key = ?", (key,))
                    else:
                        self.db.execute("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)", (key, value, expires))
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite: {e}") from None

    async def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        return self.db.execute("SELECT key, value FROM kv WHERE expires >= ? AND substr(key, 1, ?) = ?",
                               (time.time(), len(prefix), prefix)).fetchall()

    async def add(self, key: str, value: bytes) -> bytes:
        try:
            with self.db:
                self.db.execute("INSERT OR IGNORE INTO kv VALUES (?, ?, ?)", (key, value, time.time() + FOREVER))
            kept: bytes = self.db.execute("SELECT value FROM kv WHERE key = ?", (key,)).fetchone()[0]
            return kept
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite: {e}") from None

    async def incr(self, changes: list[tuple[str, int, int]]) -> list[int]:
        now = time.time()
        try:
            with self.db:
                return [self.db.execute(
                    "INSERT INTO kv VALUES (?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                    "value = CASE WHEN expires < ? THEN excluded.value ELSE CAST(value AS INTEGER) + ? END, "
                    "expires = CASE WHEN expires < ? THEN excluded.expires ELSE expires END RETURNING value",
                    (key, by, now + ttl, now, by, now)).fetchone()[0] for key, by, ttl in changes]
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite: {e}") from None

    async def write_unless(self, guard: str, writes: list[tuple[str, bytes]]) -> bool:
        expires = time.time() + self.ttl
        try:
            self.db.execute("BEGIN IMMEDIATE")  # the look and the writes in one write transaction
            try:
                if self.db.execute("SELECT 1 FROM kv WHERE key = ? AND expires >= ?", (guard, time.time())).fetchone():
                    return False
                self.db.executemany("INSERT OR REPLACE INTO kv VALUES (?, ?, ?)",
                                    [(key, value, expires) for key, value in writes])
                return True
            finally:
                self.db.execute("COMMIT")
        except sqlite3.Error as e:
            raise StoreUnavailable(f"sqlite: {e}") from None

    async def close(self) -> None:
        self.db.close()


@contextlib.contextmanager
def _redis_errors() -> Iterator[None]:
    """Redis down, slow, refusing the password or failing TLS verification: all StoreUnavailable."""
    import redis

    try:
        yield
    except (TimeoutError, redis.RedisError, OSError) as e:
        raise StoreUnavailable(f"redis: {e or type(e).__name__}") from None


class RedisStore:
    """Shared by every replica. Keys carry a prefix and the configured TTL; one round trip per call.

    `password` authenticates (Redis `requirepass`, or the ACL user named in the URL); a `rediss://`
    URL verifies the server's certificate and host name against the system store plus `ca_file`."""

    def __init__(self, url: str, ttl: int, timeout: float, password: str | None = None, ca_file: str | None = None):
        import redis.asyncio as aioredis

        self.ttl = ttl
        self.timeout = timeout
        tls: dict[str, Any] = {"ssl_cert_reqs": "required", "ssl_check_hostname": True, "ssl_ca_certs": ca_file} \
            if url.startswith("rediss://") else {}
        self.redis = aioredis.Redis.from_url(url, password=password, socket_timeout=timeout,
                                             socket_connect_timeout=timeout, health_check_interval=30, **tls)

    async def _run(self, coro: Awaitable[T]) -> T:
        with _redis_errors():
            return await asyncio.wait_for(coro, self.timeout)

    async def get_many(self, keys: tuple[str, ...]) -> list[bytes | None]:
        values = await self._run(self.redis.mget([PREFIX + k for k in keys]))
        return cast(list[bytes | None], values)  # no decode_responses: redis answers bytes

    async def write(self, writes: list[tuple[str, bytes | None]], ttl: int | None = None) -> None:
        pipe = self.redis.pipeline(transaction=False)
        for key, value in writes:
            if value is None:
                pipe.delete(PREFIX + key)
            else:
                pipe.set(PREFIX + key, value, ex=ttl or self.ttl)
        await self._run(pipe.execute())

    async def scan(self, prefix: str) -> list[tuple[str, bytes]]:
        with _redis_errors():  # no time bound: the admin command may walk many keys
            keys = [k async for k in self.redis.scan_iter(match=PREFIX + prefix + "*", count=1000)]
        values = await self.get_many(tuple(k.decode()[len(PREFIX):] for k in keys)) if keys else []
        return [(k.decode()[len(PREFIX):], v) for k, v in zip(keys, values, strict=True) if v is not None]

    async def add(self, key: str, value: bytes) -> bytes:
        await self._run(self.redis.set(PREFIX + key, value, nx=True))
        kept = await self._run(self.redis.get(PREFIX + key))
        return cast(bytes, kept) if kept is not None else value  # bytes, as in get_many

    async def incr(self, changes: list[tuple[str, int, int]]) -> list[int]:
        """Per counter a SET NX with its TTL (a new window's) and an INCRBY, in one MULTI round trip: atomic,
        so replicas agree and a counter never outlives its window (any Redis since 2.6.12)."""
        pipe = self.redis.pipeline(transaction=True)
        for key, by, ttl in changes:
            pipe.set(PREFIX + key, 0, ex=ttl, nx=True)
            pipe.incrby(PREFIX + key, by)
        results = await self._run(pipe.execute())
        return [int(v) for v in results[1::2]]

    async def write_unless(self, guard: str, writes: list[tuple[str, bytes]]) -> bool:
        """One Lua script: Redis runs it whole, so no other client's write falls between the look and the sets."""
        keys = [PREFIX + guard, *(PREFIX + k for k, _ in writes)]
        written = await self._run(self.redis.eval(_WRITE_UNLESS, len(keys), *keys, self.ttl, *(v for _, v in writes)))
        return bool(written)

    async def close(self) -> None:
        await self.redis.aclose()


# KEYS[1] the guard, KEYS[2..] the keys; ARGV[1] the TTL, ARGV[2..] the values.
_WRITE_UNLESS = """
if redis.call('exists', KEYS[1]) == 1 then return 0 end
for i = 2, #KEYS do redis.call('set', KEYS[i], ARGV[i], 'ex', ARGV[1]) end
return 1
"""


def open_store(state: State) -> Store:
    if state.store == "redis":
        return RedisStore(state.redis_url or "", state.ttl_seconds, state.timeout_ms / 1000,
                          password=state.redis_password, ca_file=state.redis_ca_file)
    if state.store == "sqlite":
        return SQLiteStore(state.sqlite_path or "", state.ttl_seconds)
    return MemoryStore(state.ttl_seconds, state.max_entries, state.max_memory_bytes)

"""Where replay windows live: in memory, or durably on disk (SQLite in WAL mode).

A stored window is its ``insert`` message re-encoded with :mod:`reliev3r.protocol` (no
pickle): ``b"RPW1"``, the frame count and each frame's length, then the frames. Reading one
back goes through ``protocol.decode``, so a stored window is validated like a received one.
Every payload carries a CRC-32 that :meth:`Storage.get` verifies; a mismatch raises
:class:`CorruptWindow` and the caller removes the window, so it is never served.

:class:`DiskStorage` commits each insert (payload, index row and any evictions) in one
transaction with ``synchronous=FULL``: once :meth:`Storage.put` returns, the window
survives SIGKILL, and a window whose transaction did not commit is absent, never half there.
Inside ``with storage.group():`` puts share one transaction (group commit: one fsync for a
burst of inserts); they are durable only when the block exits, so the caller acknowledges
them after that, and a failed group is rolled back on disk and in the in-memory index.
The ids of recently evicted windows are kept with the store (in the eviction's transaction),
so a window redelivered after its eviction is still recognised after a restart.
Sample counts and priorities change on every sample; they live in memory and reach the disk
at :meth:`Storage.flush` (the service flushes about once a second), so a crash loses at most
that much bookkeeping and never a window.
"""

from __future__ import annotations

import abc
import contextlib
import json
import logging
import os
import random
import sqlite3
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

import numpy as np

from reliev3r import durable, protocol
from reliev3r.recent import Recent

log = logging.getLogger("reliev3r.replay.storage")

PAYLOAD_MAGIC = b"RPW1"
EVICTED_MEMORY = 65536
"""How many recently evicted window ids a store remembers (oldest forgotten first)."""


class CorruptWindow(Exception):
    """A stored window failed its checksum or could not be read; ``key`` names it."""

    def __init__(self, key: int, detail: str):
        super().__init__(f"window {key}: {detail}")
        self.key = key


class StorageFull(Exception):
    """The medium refused a write (disk full, database size limit); nothing was stored."""


# --------------------------------------------------------------------------- payloads

def encode_window(msg: protocol.Message) -> bytes:
    frames = [bytes(f) for f in protocol.encode(msg)]
    head = PAYLOAD_MAGIC + struct.pack(f"<I{len(frames)}Q", len(frames), *map(len, frames))
    return b"".join([head, *frames])


def payload_nbytes(msg: protocol.Message) -> int:
    """``len(encode_window(msg))``, without building the payload (contiguous arrays are not copied)."""
    frames = protocol.encode(msg)
    return len(PAYLOAD_MAGIC) + 4 + 8 * len(frames) + sum(len(f) for f in frames)


def decode_window(payload: bytes | memoryview) -> protocol.Message:
    """Inverse of :func:`encode_window`; raises ``protocol.ProtocolError`` on a bad payload."""
    view = memoryview(payload)
    if bytes(view[:4]) != PAYLOAD_MAGIC or len(view) < 8:
        raise protocol.ProtocolError("bad_payload", "magic")
    (count,) = struct.unpack_from("<I", view, 4)
    if count > 4096 or len(view) < 8 + 8 * count:
        raise protocol.ProtocolError("bad_payload", "frame table")
    lengths = struct.unpack_from(f"<{count}Q", view, 8)
    frames, offset = [], 8 + 8 * count
    for n in lengths:
        frames.append(view[offset: offset + n])
        offset += n
    if offset != len(view):
        raise protocol.ProtocolError("bad_payload", "length")
    return protocol.decode(frames, kinds=("insert",))


def checksum(payload: bytes | memoryview) -> int:
    return zlib.crc32(payload)


# --------------------------------------------------------------------------- index

@dataclass(slots=True)
class Record:
    """Index entry of one stored window (the payload lives in the storage)."""

    key: int
    """Monotonic insertion number: larger is newer; never reused."""
    window_id: str
    nbytes: int
    """Payload size in bytes."""
    inserted_at: float
    """Unix time of the insert."""
    checksum: int
    """CRC-32 of the payload."""
    shape: tuple[int, ...]
    """``frames`` shape [V, H, W, 3]: every window in a store must stack."""
    times_sampled: int = 0
    priority: float = 1.0
    """Sampling priority (reported loss ** alpha for the prioritized sampler)."""
    embedding: np.ndarray | None = None
    """Near-duplicate embedding (float32), kept so the dedup index can be rebuilt."""


@dataclass(slots=True)
class GroupLog:
    """What one :meth:`Storage.group` changed, so that a failed group can be undone."""

    next_key: int
    added: list[int] = field(default_factory=list)
    removed: list[Record] = field(default_factory=list)
    evicted_ids: list[str] = field(default_factory=list)


class Storage(abc.ABC):
    """Shared in-memory index; subclasses keep the payloads. Insertion-ordered, so the
    first record is the oldest (FIFO eviction)."""

    def __init__(self) -> None:
        self.records: dict[int, Record] = {}
        self.by_id: dict[str, int] = {}
        self.nbytes = 0
        self._next_key = 0
        self._state: dict[str, Any] = {}
        self.evicted = Recent(EVICTED_MEMORY)
        """Ids of the most recently evicted windows (at most ``EVICTED_MEMORY``), oldest first."""
        self._group: GroupLog | None = None

    def __len__(self) -> int:
        return len(self.records)

    def __contains__(self, window_id: str) -> bool:
        return window_id in self.by_id

    def put(self, window_id: str, payload: bytes, *, shape: Iterable[int], priority: float = 1.0,
            embedding: np.ndarray | None = None, evict: Iterable[int] = ()) -> Record:
        """Store one window, removing ``evict`` in the same step; return its record.
        Raises :class:`StorageFull` (nothing changed) when the medium refuses the write."""
        evict = [k for k in evict if k in self.records]
        rec = Record(key=self._next_key, window_id=window_id, nbytes=len(payload), inserted_at=time.time(),
                     checksum=checksum(payload), shape=tuple(int(s) for s in shape), priority=float(priority),
                     embedding=None if embedding is None else np.asarray(embedding, np.float32))
        self._write(rec, payload, evict)
        self._next_key += 1
        gone = self._forget(evict)
        self.records[rec.key] = rec
        self.by_id[window_id] = rec.key
        self.nbytes += rec.nbytes
        for old in gone:
            self.evicted[old.window_id] = None
        if self._group is not None:
            self._group.added.append(rec.key)
            self._group.removed.extend(gone)
            self._group.evicted_ids.extend(old.window_id for old in gone)
        return rec

    @contextlib.contextmanager
    def group(self) -> Iterator[GroupLog]:
        """Puts (and removals) inside the block commit together when it exits. Raises
        :class:`StorageFull` (everything in the group undone) when the medium refuses them.
        In memory every put is final at once; nested groups join the outer one."""
        if self._group is not None:
            yield self._group
            return
        self._begin()
        self._group = log = GroupLog(next_key=self._next_key)
        try:
            yield log
            self._commit()
        except BaseException:
            self._rollback()
            self._undo(log)
            raise
        finally:
            self._group = None

    def _undo(self, log: GroupLog) -> None:
        for key in log.added:
            rec = self.records.pop(key, None)
            if rec is not None:
                self.by_id.pop(rec.window_id, None)
                self.nbytes -= rec.nbytes
        for rec in log.removed:
            if rec.key >= log.next_key:  # put by this group, then evicted by it: never there before
                continue
            self.records[rec.key] = rec
            self.by_id[rec.window_id] = rec.key
            self.nbytes += rec.nbytes
        if log.removed:  # keys are insertion numbers: sorting restores the FIFO order
            self.records = dict(sorted(self.records.items()))
        for wid in log.evicted_ids:
            self.evicted.pop(wid, None)
        self._next_key = log.next_key

    # In memory a put is final at once and a failed group is undone by ``_undo`` from its
    # log: there is no medium transaction to begin, commit or roll back.
    def _begin(self) -> None:
        pass

    def _commit(self) -> None:
        pass

    def _rollback(self) -> None:
        pass

    def get(self, key: int) -> bytes:
        """The payload of ``key``, checksum verified; raises :class:`CorruptWindow`."""
        rec = self.records.get(key)
        if rec is None:
            raise KeyError(key)
        payload = self._read(key)
        if checksum(payload) != rec.checksum or len(payload) != rec.nbytes:
            raise CorruptWindow(key, "checksum mismatch")
        return payload

    def remove(self, keys: Iterable[int]) -> None:
        keys = [k for k in keys if k in self.records]
        if keys:
            self._delete(keys)
            gone = self._forget(keys)
            if self._group is not None:
                self._group.removed.extend(gone)

    def touch(self, keys: Iterable[int]) -> None:
        """Count one more sample of each key (duplicates count twice)."""
        for k in keys:
            if k in self.records:
                self.records[k].times_sampled += 1

    def set_priority(self, key: int, priority: float) -> None:
        if key in self.records:
            self.records[key].priority = float(priority)

    def save_state(self, name: str, state: dict) -> None:
        """Keep a component's ``state_dict`` (JSON-able) with the store; written at flush."""
        self._state[name] = state

    def load_state(self, name: str) -> dict | None:
        return self._state.get(name)

    def verify(self) -> list[int]:
        """Keys whose payload fails its checksum (a full scan; for start-up and tests)."""
        bad = []
        for key in list(self.records):
            try:
                self.get(key)
            except CorruptWindow:
                bad.append(key)
        return bad

    def flush(self) -> None:
        """Persist sample counts, priorities and saved states (no-op in memory)."""

    def close(self) -> None:
        self.flush()

    def _forget(self, keys: Iterable[int]) -> list[Record]:
        gone = []
        for k in keys:
            rec = self.records.pop(k)
            self.by_id.pop(rec.window_id, None)
            self.nbytes -= rec.nbytes
            gone.append(rec)
        return gone

    # what a medium provides
    @abc.abstractmethod
    def _write(self, rec: Record, payload: bytes, evict: list[int]) -> None:
        """Store ``payload`` under ``rec`` and drop ``evict``, all or nothing (inside a
        group: as part of the group's transaction)."""

    @abc.abstractmethod
    def _read(self, key: int) -> bytes: ...

    @abc.abstractmethod
    def _delete(self, keys: list[int]) -> None: ...


class MemoryStorage(Storage):
    """Payloads in a dict: fast, lost with the process."""

    def __init__(self) -> None:
        super().__init__()
        self.payloads: dict[int, bytes] = {}

    def _write(self, rec: Record, payload: bytes, evict: list[int]) -> None:
        for k in evict:
            self.payloads.pop(k, None)
        self.payloads[rec.key] = bytes(payload)

    def _read(self, key: int) -> bytes:
        try:
            return self.payloads[key]
        except KeyError:
            raise CorruptWindow(key, "payload missing") from None

    def _delete(self, keys: list[int]) -> None:
        for k in keys:
            self.payloads.pop(k, None)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS windows (
    key INTEGER PRIMARY KEY, window_id TEXT NOT NULL UNIQUE, nbytes INTEGER NOT NULL,
    inserted_at REAL NOT NULL, checksum INTEGER NOT NULL, shape TEXT NOT NULL,
    times_sampled INTEGER NOT NULL DEFAULT 0, priority REAL NOT NULL DEFAULT 1.0, embedding BLOB);
CREATE TABLE IF NOT EXISTS payloads (key INTEGER PRIMARY KEY, data BLOB NOT NULL);
CREATE TABLE IF NOT EXISTS state (name TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS evicted (seq INTEGER PRIMARY KEY AUTOINCREMENT, window_id TEXT NOT NULL);
"""


class DiskStorage(Storage):
    """SQLite database ``<folder>/replay.sqlite``: index rows, payload blobs and component
    states. Reopening the folder restores everything that was committed.

    ``max_pages`` caps the database size in pages (SQLite reports it like a full disk);
    tests use it to exercise the disk-full path.
    """

    def __init__(self, folder: str | Path, *, max_pages: int | None = None):
        super().__init__()
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.path = self.folder / "replay.sqlite"
        try:
            self._open(max_pages)
        except sqlite3.DatabaseError as err:
            if isinstance(err, sqlite3.OperationalError):  # locked, unwritable, ...: not damage
                raise
            # Damaged (a copy cut short, a disk error): the store starts empty beside it, and
            # the file is kept for salvage (``sqlite3 FILE .recover``) instead of failing every start.
            if hasattr(self, "db"):
                self.db.close()
            aside = self.path.with_name(f"replay.sqlite.damaged-{time.strftime('%Y%m%dT%H%M%S')}")
            for suffix in ("", "-wal", "-shm"):
                if Path(f"{self.path}{suffix}").exists():
                    os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
            durable.fsync(self.folder)  # aside for good before the new database takes the name
            log.error("replay database damaged: moved aside, starting empty",
                      extra={"path": str(aside), "detail": str(err)})
            super().__init__()
            self._open(max_pages)

    def _open(self, max_pages: int | None) -> None:
        # isolation_level=None: transactions are explicit BEGIN/COMMIT below.
        self.db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        self.db.execute("PRAGMA journal_mode=WAL")
        # FULL: the WAL is fsynced at every commit, so an acknowledged insert survives a
        # power cut as well as SIGKILL (NORMAL+WAL only guarantees the latter).
        self.db.execute("PRAGMA synchronous=FULL")
        if max_pages is not None:
            self.db.execute(f"PRAGMA max_page_count={int(max_pages)}")
        self.db.executescript(_SCHEMA)
        self._dirty: set[int] = set()
        self._written: dict[str, str] = {}
        self._load()

    def _load(self) -> None:
        rows = self.db.execute("SELECT key, window_id, nbytes, inserted_at, checksum, shape, times_sampled, "
                               "priority, embedding FROM windows ORDER BY key").fetchall()
        for key, wid, nbytes, at, crc, shape, times, prio, emb in rows:
            rec = Record(key=key, window_id=wid, nbytes=nbytes, inserted_at=at, checksum=crc,
                         shape=tuple(json.loads(shape)), times_sampled=times, priority=prio,
                         embedding=None if emb is None else np.frombuffer(emb, np.float32).copy())
            self.records[key] = rec
            self.by_id[wid] = key
            self.nbytes += nbytes
        for name, value in self.db.execute("SELECT name, value FROM state"):
            self._state[name] = json.loads(value)
        newest = self.db.execute("SELECT window_id FROM evicted ORDER BY seq DESC LIMIT ?", (EVICTED_MEMORY,))
        self.evicted = Recent(EVICTED_MEMORY)
        for (wid,) in reversed(newest.fetchall()):
            self.evicted[wid] = None
        # Keys are never reused, even after the newest window was evicted.
        seq = self._state.get("storage", {}).get("next_key", 0)
        self._next_key = max(seq, (max(self.records) + 1) if self.records else 0)

    # Transactions: a put outside a group is its own transaction; inside one it joins the
    # group's, which _commit ends. SQLITE_FULL ("database or disk is full"), ENOSPC and I/O
    # errors become StorageFull: that insert (or group) is refused, the store stays as it was.
    def _begin(self) -> None:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except (sqlite3.OperationalError, OSError) as err:
            raise StorageFull(str(err)) from err

    def _commit(self) -> None:
        try:
            self.db.execute("COMMIT")
        except (sqlite3.OperationalError, OSError) as err:
            raise StorageFull(str(err)) from err

    def _rollback(self) -> None:
        if self.db.in_transaction:  # SQLite may already have rolled back (e.g. on SQLITE_FULL)
            self.db.execute("ROLLBACK")

    @contextlib.contextmanager
    def _transaction(self) -> Iterator[None]:
        """Own transaction outside a group; the group's inside one."""
        if self._group is not None:
            try:
                yield
            except (sqlite3.OperationalError, OSError) as err:
                raise StorageFull(str(err)) from err
            return
        self._begin()
        try:
            yield
        except BaseException as err:
            self._rollback()
            if isinstance(err, (sqlite3.OperationalError, OSError)):
                raise StorageFull(str(err)) from err
            raise
        self._commit()

    def _write(self, rec: Record, payload: bytes, evict: list[int]) -> None:
        emb = None if rec.embedding is None else rec.embedding.tobytes()
        with self._transaction():
            self._delete_rows(evict)
            self.db.execute("INSERT INTO windows (key, window_id, nbytes, inserted_at, checksum, shape, "
                            "times_sampled, priority, embedding) VALUES (?,?,?,?,?,?,?,?,?)",
                            (rec.key, rec.window_id, rec.nbytes, rec.inserted_at, rec.checksum,
                             json.dumps(list(rec.shape)), 0, rec.priority, emb))
            self.db.execute("INSERT INTO payloads (key, data) VALUES (?, ?)", (rec.key, payload))
            self.db.execute("INSERT OR REPLACE INTO state (name, value) VALUES ('storage', ?)",
                            (json.dumps({"next_key": rec.key + 1}),))
            if evict:
                self.db.executemany("INSERT INTO evicted (window_id) VALUES (?)",
                                    [(self.records[k].window_id,) for k in evict])
                self.db.execute("DELETE FROM evicted WHERE seq <= (SELECT MAX(seq) FROM evicted) - ?",
                                (EVICTED_MEMORY,))
        for k in evict:
            self._dirty.discard(k)

    def _read(self, key: int) -> bytes:
        try:
            row = self.db.execute("SELECT data FROM payloads WHERE key = ?", (key,)).fetchone()
        except sqlite3.DatabaseError as err:  # a damaged page: report it like a bad checksum
            raise CorruptWindow(key, f"unreadable: {err}") from None
        if row is None:
            raise CorruptWindow(key, "payload missing")
        return row[0]

    def _undo(self, log: GroupLog) -> None:
        super()._undo(log)
        self._dirty.difference_update(log.added)
        self._dirty.update(rec.key for rec in log.removed)  # their counts may not be on disk yet

    def _delete(self, keys: list[int]) -> None:
        try:
            with self._transaction():
                self._delete_rows(keys)
        except sqlite3.DatabaseError as err:  # StorageFull is an OperationalError's; this is damage
            if self._group is not None:
                raise
            # A damaged page under the rows (a window found corrupt): they cannot be deleted,
            # so they are forgotten here and stay on disk, found corrupt again after a restart.
            log.error("rows on a damaged page left on disk", extra={"keys": keys, "detail": str(err)})
        self._dirty.difference_update(keys)

    def _delete_rows(self, keys: list[int]) -> None:
        if keys:
            rows = [(k,) for k in keys]
            self.db.executemany("DELETE FROM windows WHERE key = ?", rows)
            self.db.executemany("DELETE FROM payloads WHERE key = ?", rows)

    def touch(self, keys: Iterable[int]) -> None:
        keys = list(keys)
        super().touch(keys)
        self._dirty.update(k for k in keys if k in self.records)

    def set_priority(self, key: int, priority: float) -> None:
        super().set_priority(key, priority)
        if key in self.records:
            self._dirty.add(key)

    def flush(self) -> None:
        if self._group is not None:
            return  # the group's commit is the next write; counts flush at the next call
        rows = [(self.records[k].times_sampled, self.records[k].priority, k) for k in self._dirty if k in self.records]
        states = [(n, json.dumps(v)) for n, v in self._state.items() if n != "storage"]
        states = [(n, text) for n, text in states if self._written.get(n) != text]  # skip unchanged
        if not rows and not states:
            return
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                self.db.executemany("UPDATE windows SET times_sampled = ?, priority = ? WHERE key = ?", rows)
                self.db.executemany("INSERT OR REPLACE INTO state (name, value) VALUES (?, ?)", states)
                self.db.execute("COMMIT")
            except BaseException:
                self._rollback()  # one SQLite rolled back itself (a full disk) has none to roll back
                raise
        except (sqlite3.OperationalError, OSError) as err:
            raise StorageFull(str(err)) from err
        self._dirty.clear()
        self._written.update(states)

    def close(self) -> None:
        try:
            self.flush()
        finally:
            self.db.close()


# --------------------------------------------------------------------------- eviction

class FifoEviction:
    """The oldest windows leave first."""

    def victims(self, storage: Storage, nbytes: int, *, max_windows: int, max_bytes: int) -> list[int] | None:
        """Keys to remove so that one more window of ``nbytes`` fits; ``None`` means the
        new window itself is not kept."""
        out, count, total = [], len(storage), storage.nbytes
        for key, rec in storage.records.items():
            if count + 1 <= max_windows and total + nbytes <= max_bytes:
                break
            out.append(key)
            count -= 1
            total -= rec.nbytes
        return out

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class ReservoirEviction:
    """Reservoir sampling (Vitter's algorithm R): once full, the n-th window is kept with
    probability capacity / n, replacing a uniformly random stored one; so the store stays a
    uniform sample of everything ever offered, old and new alike. Full means either limit:
    when the bytes fill first, the capacity is the number of windows stored then (random
    stored ones leave until the new window fits)."""

    def __init__(self, seed: int = 0):
        self.seen = 0
        self.rng = random.Random(seed)

    def victims(self, storage: Storage, nbytes: int, *, max_windows: int, max_bytes: int) -> list[int] | None:
        self.seen += 1
        if len(storage) + 1 <= max_windows and storage.nbytes + nbytes <= max_bytes:
            return []
        if self.rng.random() >= min(len(storage), max_windows) / self.seen:
            return None
        keys = list(storage.records)
        self.rng.shuffle(keys)
        out, count, total = [], len(storage), storage.nbytes
        for key in keys:
            if count + 1 <= max_windows and total + nbytes <= max_bytes:
                break
            out.append(key)
            count -= 1
            total -= storage.records[key].nbytes
        return out

    def state_dict(self) -> dict:
        version, internal, gauss = self.rng.getstate()
        return {"seen": self.seen, "rng": [version, list(internal), gauss]}

    def load_state_dict(self, state: dict) -> None:
        self.seen = int(state["seen"])
        version, internal, gauss = state["rng"]
        self.rng.setstate((version, tuple(internal), gauss))

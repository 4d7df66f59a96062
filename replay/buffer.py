"""The replay buffer: Storage + Sampler + RateLimiter (+ Dedup), and the writer rules.

:meth:`ReplayBuffer.insert` is the writer: it validates a labelled window (shape of the
store, finite labels, size), drops exact and near duplicates, asks the eviction policy for
room and stores the window with its evictions in one step; :meth:`ReplayBuffer.insert_many`
does the same for a burst of windows in one storage group (one commit, one fsync).
:meth:`ReplayBuffer.sample`
draws keys, reads and verifies the payloads (a corrupt one is removed and replaced by a
fresh draw) and stacks them into a ``batch`` message with its sample info. No sockets
here: the service (``replay/service.py``) owns those.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from typing import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from reliev3r import protocol
from reliev3r.recent import Recent
from replay.config import ReplayConfig
from replay.dedup import Dedup
from replay.rate_limiter import RateLimiter
from replay.sampler import Sampler, make_sampler
from replay.storage import (EVICTED_MEMORY, CorruptWindow, DiskStorage, FifoEviction, GroupLog, MemoryStorage,
                            ReservoirEviction, Storage, StorageFull, decode_window, encode_window,
                            payload_nbytes)

log = logging.getLogger("reliev3r.replay")

OPTIONAL_BATCH_ARRAYS = ("teacher_depth", "teacher_valid", "gt_depth", "gt_cam_to_world")
MAX_META_DEPTH = 8
"""How deeply a stored window's teacher meta may nest maps and lists."""


def teacher_meta_problem(teacher: object) -> str | None:
    """Why an insert's ``teacher`` meta cannot be stored, or None. The learner reads each window's
    ``teacher.depth.space`` to train on its labels and writes the meta into its snapshots as
    JSON, and a stored window is drawn again and again: a map of plain JSON (text, finite
    numbers, booleans, null, lists and maps with text keys) whose ``depth``, when given, is a
    map whose ``space``, when given, is one of :data:`protocol.TEACHER_SPACES`."""
    if not isinstance(teacher, dict) or not _plain_json(teacher, MAX_META_DEPTH):
        return "bad_teacher_meta"
    depth = teacher.get("depth", {})
    if not isinstance(depth, dict):
        return "bad_teacher_meta"
    if "space" in depth and depth["space"] not in protocol.TEACHER_SPACES:
        return "unknown_teacher_space"
    return None


def _plain_json(value: object, depth: int) -> bool:
    """Whether ``value`` is JSON as it is (no bytes, no keys but text, no NaN), nested at most
    ``depth`` deep."""
    if value is None or isinstance(value, (str, bool, int)):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    if depth <= 0:
        return False
    if isinstance(value, list):
        return all(_plain_json(v, depth - 1) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _plain_json(v, depth - 1) for k, v in value.items())
    return False


class BatchTooLarge(Exception):
    """A batch's arrays would exceed what its receiver takes (:meth:`ReplayBuffer.sample`'s
    ``max_bytes``): ``windows``, ``nbytes`` and ``limit`` say by how much."""

    def __init__(self, windows: int, nbytes: int, limit: int):
        super().__init__(f"a batch of {windows} windows is {nbytes} bytes ({nbytes / 2**20:.1f} MiB), over the "
                         f"{limit} bytes ({limit / 2**20:.1f} MiB) a reply may carry: lower learner.batch_size, "
                         f"or the windows' size (streamer.views, streamer.height, streamer.width)")
        self.windows, self.nbytes, self.limit = windows, nbytes, limit


@dataclass(frozen=True, slots=True)
class InsertResult:
    status: str
    """"stored", "duplicate" or "rejected" (the ``insert_ack`` status)."""
    reason: str = ""
    key: int = -1


class ReplayBuffer:
    def __init__(self, cfg: ReplayConfig, storage: Storage, *, seed: int = 0, dedup: Dedup | None = None):
        self.cfg = cfg
        self.storage = storage
        self.sampler: Sampler = make_sampler(cfg.sampler, seed=seed, halflife=cfg.recency_halflife,
                                             alpha=cfg.priority_alpha)
        self.limiter = RateLimiter(min_size=cfg.min_size, samples_per_insert=cfg.samples_per_insert,
                                   tolerance=cfg.tolerance, limit_inserts=cfg.limit_inserts)
        self.eviction = ReservoirEviction(seed) if cfg.eviction == "reservoir" else FifoEviction()
        self.dedup = dedup
        self.counts: Counter[str] = Counter()
        """inserts, duplicates, samples (windows), evictions, corrupt, rejected:<reason>."""
        self._skipped = Recent(EVICTED_MEMORY)
        """Window ids the reservoir declined (bounded; in memory). Evicted ids live with the
        storage (``storage.evicted``, persisted), so a late redelivery is a duplicate."""
        self._grouping = False
        self.refused: str | None = None
        """Why the storage refused the last insert it was offered (a full disk: "database or disk
        is full"), None once it stores one again."""
        self.shape: tuple[int, ...] | None = None
        """``frames`` shape of the store's first window; every later window must match."""
        self._restore()

    @classmethod
    def open(cls, rc: ReplayConfig, run_dir: str | Path, *, seed: int = 0) -> "ReplayBuffer":
        """On disk under ``<run_dir>/replay`` when ``rc.durable``, else in memory."""
        storage = DiskStorage(Path(run_dir) / "replay") if rc.durable else MemoryStorage()
        dedup = Dedup(rc.dedup_threshold) if rc.dedup else None
        return cls(rc, storage, seed=seed, dedup=dedup)

    def _restore(self) -> None:
        """Rebuild sampler, dedup index and component states from what the storage holds."""
        st = self.storage
        for rec in st.records.values():
            self.sampler.add(rec.key, rec.priority)
            if self.dedup is not None and rec.embedding is not None:
                self.dedup.add(rec.key, rec.embedding)
        saved = st.load_state("buffer") or {}
        if "sampler" in saved:
            self.sampler.load_state_dict(saved["sampler"])
        if "eviction" in saved:
            self.eviction.load_state_dict(saved["eviction"])
        if "limiter" in saved:
            self.limiter.load_state_dict(saved["limiter"])
        self.counts.update(saved.get("counts", {}))
        # The limiter state is flushed periodically; the storage is the truth about size.
        self.limiter.insert(max(0, len(st) - self.limiter.inserts))  # those stored since the last flush
        self.limiter.deletes = self.limiter.inserts - len(st)
        shape = saved.get("shape")
        if shape is None and st.records:
            shape = next(iter(st.records.values())).shape
        self.shape = tuple(shape) if shape is not None else None

    # ------------------------------------------------------------------ writer
    def check(self, msg: protocol.Message) -> InsertResult | None:
        """The verdict on an insert that needs no write (reject or exact duplicate), else None.
        Cheap; the service calls it before holding an insert back for the rate limiter."""
        wid = msg.meta.get("window_id")
        if not isinstance(wid, str) or not wid:
            return InsertResult("rejected", "bad_window_id")
        if problem := teacher_meta_problem(msg.meta.get("teacher")):
            return InsertResult("rejected", problem)
        if wid in self.storage:
            return InsertResult("duplicate", "window_id")
        if wid in self.storage.evicted or wid in self._skipped:  # redelivered after it left
            return InsertResult("duplicate", "evicted")
        # max_window_bytes bounds the arrays; capacity_bytes the stored payload, as eviction counts it
        if msg.nbytes() > self.cfg.max_window_bytes or payload_nbytes(msg) > self.cfg.capacity_bytes:
            return InsertResult("rejected", "oversize")
        frames = msg.arrays["frames"]
        if self.shape is not None and tuple(frames.shape) != self.shape:
            return InsertResult("rejected", "shape_mismatch")
        depth = msg.arrays.get("teacher_depth")
        if depth is not None and not np.isfinite(depth).all():
            return InsertResult("rejected", "non_finite_label")
        return None

    def insert(self, msg: protocol.Message) -> InsertResult:
        """Validate, deduplicate, make room and store one ``insert`` message."""
        result = self.check(msg) or self._write(msg)
        self.counts["inserts" if result.status == "stored" else
                    "duplicates" if result.status == "duplicate" else f"rejected:{result.reason}"] += 1
        return result

    def insert_many(self, msgs: Sequence[protocol.Message]) -> list[InsertResult]:
        """Insert a burst in order as one storage group: on disk, one transaction and one
        fsync for all of them; every result holds only once this returns (acknowledge after).
        If the medium refuses the group, it is undone and the windows are inserted one by
        one, so one refused window costs only itself."""
        if len(msgs) <= 1:
            return [self.insert(m) for m in msgs]
        saved = (self.limiter.state_dict(), self.eviction.state_dict(), Counter(self.counts), self.shape,
                 len(self._skipped))
        refused = self.refused  # an insert put in the group clears it, though the group's commit may fail
        self._grouping = True
        group = None
        try:
            with self.storage.group() as group:
                return [self.insert(m) for m in msgs]
        except StorageFull as err:  # the storage has undone its part; undo ours
            if group is not None:  # None: the group could not even begin
                self._undo_group(group, saved)
            self.refused = refused
            if refused is None:  # while the storage refuses inserts (a full disk), each group is not said
                log.warning("group insert refused; inserting one by one",
                            extra={"windows": len(msgs), "detail": str(err)})
        finally:
            self._grouping = False
        return [self.insert(m) for m in msgs]

    def _undo_group(self, group: GroupLog, saved: tuple) -> None:
        limiter, eviction, counts, shape, skipped = saved
        for key in group.added:
            self.sampler.remove(key)
            if self.dedup is not None:
                self.dedup.remove(key)
        for rec in group.removed:
            if rec.key >= group.next_key:  # put by this group, then evicted by it: never there before
                continue
            self.sampler.add(rec.key, rec.priority)
            if self.dedup is not None and rec.embedding is not None:
                self.dedup.add(rec.key, rec.embedding)
        self.limiter.load_state_dict(limiter)
        self.eviction.load_state_dict(eviction)
        self.counts, self.shape = counts, shape
        while len(self._skipped) > skipped:
            self._skipped.popitem(last=True)

    def _write(self, msg: protocol.Message) -> InsertResult:
        frames = msg.arrays["frames"]
        vec = None
        if self.dedup is not None:
            vec = self.dedup.embed(frames)
            if self.dedup.is_duplicate(vec):
                self.limiter.arrive()
                return InsertResult("duplicate", "near_duplicate")
        payload = encode_window(protocol.Message("insert", dict(msg.meta), dict(msg.arrays)))
        victims = self.eviction.victims(self.storage, len(payload), max_windows=self.cfg.capacity_windows,
                                        max_bytes=self.cfg.capacity_bytes)
        if victims is None:
            self._skipped[msg.meta["window_id"]] = None
            self.limiter.arrive()
            return InsertResult("rejected", "reservoir_skip")
        priority = 1.0
        if hasattr(self.sampler, "max_priority"):
            priority = self.sampler.max_priority
        try:
            rec = self.storage.put(msg.meta["window_id"], payload, shape=frames.shape, priority=priority,
                                   embedding=vec, evict=victims)
        except StorageFull as err:
            if self._grouping:
                raise  # the whole group is refused and undone; insert_many retries one by one
            if self.refused != str(err):  # said once while it refuses alike; each counted (rejected:storage_full)
                log.warning("insert refused by storage", extra={"detail": str(err)})
            self.refused = str(err)
            return InsertResult("rejected", "storage_full")
        self.refused = None
        self._forget(victims)
        self.counts["evictions"] += len(victims)
        self.sampler.add(rec.key, rec.priority)
        if self.dedup is not None:
            self.dedup.add(rec.key, vec)
        self.limiter.insert()
        if self.shape is None:
            self.shape = rec.shape
        return InsertResult("stored", "", rec.key)

    def _forget(self, keys: list[int]) -> None:
        for k in keys:
            self.sampler.remove(k)
            if self.dedup is not None:
                self.dedup.remove(k)
        self.limiter.delete(len(keys))

    # ------------------------------------------------------------------ sampling
    def can_insert(self, n: int = 1) -> bool:
        return self.limiter.can_insert(n)

    def can_sample(self, n: int) -> bool:
        return len(self.storage) >= self.cfg.min_size and self.limiter.can_sample(n)

    def sample_wait(self, n: int) -> str:
        """Why a sample of ``n`` windows waits (said to the client with its ``not_ready``)."""
        stored = len(self.storage)
        if stored < self.cfg.min_size:
            return f"stores {stored} window{'' if stored == 1 else 's'}, fewer than replay.min_size {self.cfg.min_size}"
        return (f"its rate limiter holds samples back (replay.samples_per_insert "
                f"{self.limiter.samples_per_insert:g}): the learners are ahead of the windows inserted")

    def max_batch(self) -> int:
        """The largest batch the limiter can ever grant (a larger one would wait forever)."""
        if not self.limiter.enabled:
            return 1 << 30
        return int(2 * self.limiter.tolerance - self.limiter.samples_per_insert)

    def sample(self, n: int, rank: int = 0, *, max_bytes: int | None = None) -> protocol.Message:
        """Draw ``n`` windows (with replacement) and stack them into a ``batch`` message.
        Call only when :meth:`can_sample`; raises ``LookupError`` if corrupt windows emptied
        the store meanwhile, and :class:`BatchTooLarge` if the batch's arrays would exceed
        ``max_bytes`` (nothing counted then: no limiter credit, no sample)."""
        windows, keys, probs = [], [], []
        while len(windows) < n:
            if len(self.storage) == 0:
                raise LookupError("no readable windows left")
            draw_keys, draw_probs = self.sampler.sample(n - len(windows), rank)
            for key, prob in zip(draw_keys.tolist(), draw_probs.tolist()):
                try:
                    msg = decode_window(self.storage.get(key))
                except KeyError:
                    continue  # removed as corrupt earlier in this loop
                except (CorruptWindow, protocol.ProtocolError) as err:
                    log.error("corrupt window removed", extra={"key": key, "detail": str(err)})
                    self.storage.remove([key])
                    self._forget([key])
                    self.counts["corrupt"] += 1
                    continue
                windows.append(msg)
                keys.append(key)
                probs.append(prob)
        arrays = self._stack(windows)
        if max_bytes is not None and (nbytes := sum(a.nbytes for a in arrays.values())) > max_bytes:
            raise BatchTooLarge(n, nbytes, max_bytes)
        self.storage.touch(keys)
        self.limiter.sample(n)
        self.counts["samples"] += n
        recs = [self.storage.records[k] for k in keys]
        meta = {"window_ids": [r.window_id for r in recs], "keys": keys, "probabilities": probs,
                "times_sampled": [r.times_sampled for r in recs], "inserted_at": [r.inserted_at for r in recs],
                "priorities": [r.priority for r in recs],
                # each window's teacher: a durable store may hold windows of teachers of both
                # spaces, and the learner reads each window's labels in its own
                "teachers": [w.meta.get("teacher", {}) for w in windows],
                "teacher": windows[0].meta.get("teacher", {}),  # the first window's (older learners)
                "sources": [w.meta.get("source", "") for w in windows],
                "frame_indices": [w.meta.get("frame_indices", []) for w in windows]}
        return protocol.Message("batch", meta, arrays)

    @staticmethod
    def _stack(windows: list[protocol.Message]) -> dict[str, np.ndarray]:
        """The arrays of a batch of ``windows``."""
        arrays = {name: np.stack([w.arrays[name] for w in windows]) for name in ("frames", "intrinsics")}
        for name in OPTIONAL_BATCH_ARRAYS:
            if all(name in w.arrays for w in windows):
                arrays[name] = np.stack([w.arrays[name] for w in windows])
        # protocol.BATCH_MATCH_COLUMNS: the window's index in the batch, then the window's columns
        matches = [np.concatenate([np.full((len(w.arrays["matches"]), 1), b, np.float32), w.arrays["matches"]], 1)
                   for b, w in enumerate(windows)]
        arrays["matches"] = (np.concatenate(matches).astype(np.float32) if matches
                             else np.zeros((0, len(protocol.BATCH_MATCH_COLUMNS)), np.float32))
        if any("match_triangulation" in w.arrays for w in windows):
            # aligned with the stacked matches; windows labelled without it get zero rows (no weight)
            arrays["match_triangulation"] = np.concatenate(
                [w.arrays.get("match_triangulation", np.zeros((len(w.arrays["matches"]), 3), np.float32))
                 for w in windows]).astype(np.float32)
        return arrays

    def update_priorities(self, window_ids: list[str], losses: list[float]) -> int:
        """Report per-window losses; return how many stored windows were updated."""
        pairs = [(self.storage.by_id[w], loss) for w, loss in zip(window_ids, losses) if w in self.storage.by_id]
        new = self.sampler.update([k for k, _ in pairs], [loss for _, loss in pairs])
        for key, priority in new.items():
            self.storage.set_priority(key, priority)
        self.counts["priority_updates"] += len(new)
        return len(new)

    # ------------------------------------------------------------------ bookkeeping
    def stats(self) -> dict:
        c = self.counts
        rejected = {k.split(":", 1)[1]: v for k, v in c.items() if k.startswith("rejected:")}
        return {"windows": len(self.storage), "bytes": self.storage.nbytes, "inserts": c["inserts"],
                "samples": c["samples"], "evictions": c["evictions"], "duplicates": c["duplicates"],
                "rejected": rejected, "rejected_total": sum(rejected.values()), "corrupt": c["corrupt"],
                "priority_updates": c["priority_updates"], "samples_per_insert": self.limiter.ratio(),
                "target_samples_per_insert": self.cfg.samples_per_insert, "min_size": self.cfg.min_size,
                "sampler": self.cfg.sampler, "durable": isinstance(self.storage, DiskStorage),
                "capacity_windows": self.cfg.capacity_windows, "capacity_bytes": self.cfg.capacity_bytes}

    def state_dict(self) -> dict:
        return {"sampler": self.sampler.state_dict(), "eviction": self.eviction.state_dict(),
                "limiter": self.limiter.state_dict(), "counts": dict(self.counts),
                "shape": list(self.shape) if self.shape is not None else None}

    def flush(self) -> None:
        self.storage.save_state("buffer", self.state_dict())
        self.storage.flush()

    def close(self) -> None:
        self.storage.save_state("buffer", self.state_dict())
        self.storage.close()

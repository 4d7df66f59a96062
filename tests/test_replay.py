"""Replay components without sockets: storage, eviction, samplers, rate limiter, dedup, buffer."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from reliev3r import protocol
from replay.buffer import BatchTooLarge, InsertResult, ReplayBuffer
from replay.config import ReplayConfig
from replay.dedup import Dedup, NumpyIndex, embed, faiss
from replay.rate_limiter import RateLimiter
from replay.sampler import PrioritizedSampler, RecencySampler, Sampler
from replay.storage import (CorruptWindow, DiskStorage, FifoEviction, MemoryStorage, ReservoirEviction,
                            StorageFull, decode_window, encode_window)

SEVEN_SCENES = Path(__file__).parents[1].parent / "shared" / "data" / "7scenes-redkitchen"


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# --------------------------------------------------------------------------- storage

@pytest.mark.parametrize("kind", ["memory", "disk"])
def test_storage_round_trip(make_insert, tmp_path, kind):
    storage = MemoryStorage() if kind == "memory" else DiskStorage(tmp_path)
    msg = make_insert(3)
    rec = storage.put("w3", encode_window(msg), shape=msg.arrays["frames"].shape)
    back = decode_window(storage.get(rec.key))
    assert back.meta == msg.meta
    for name, arr in msg.arrays.items():
        np.testing.assert_array_equal(back.arrays[name], arr)
    assert "w3" in storage and len(storage) == 1 and storage.nbytes == rec.nbytes
    storage.close()


def test_disk_storage_restart_restores_index_and_state(make_insert, tmp_path):
    storage = DiskStorage(tmp_path)
    keys = [storage.put(f"w{i}", encode_window(make_insert(i)), shape=(2, 16, 16, 3)).key for i in range(4)]
    storage.remove([keys[3]])  # the newest key must still not be reused
    storage.touch([keys[0], keys[0], keys[1]])
    storage.set_priority(keys[2], 7.5)
    storage.save_state("thing", {"a": [1, 2]})
    storage.close()

    again = DiskStorage(tmp_path)
    assert list(again.records) == keys[:3]
    assert [again.records[k].times_sampled for k in keys[:3]] == [2, 1, 0]
    assert again.records[keys[2]].priority == 7.5
    assert again.load_state("thing") == {"a": [1, 2]}
    assert again.put("w9", encode_window(make_insert(9)), shape=(2, 16, 16, 3)).key == keys[3] + 1
    assert again.verify() == []
    again.close()


def test_disk_checksum_detects_a_flipped_byte(make_insert, tmp_path):
    storage = DiskStorage(tmp_path)
    msg = make_insert(0)
    marker = np.full((2, 16, 16, 3), 173, np.uint8)
    marker[0, 0, 0] = [11, 22, 33]  # a byte pattern we can find in the file
    msg.arrays["frames"] = marker
    rec = storage.put("w0", encode_window(msg), shape=marker.shape)
    storage.close()  # checkpoints the WAL into the main file

    path = tmp_path / "replay.sqlite"
    raw = bytearray(path.read_bytes())
    at = raw.find(bytes([11, 22, 33, 173, 173, 173]))
    assert at > 0
    raw[at + 10] ^= 0xFF
    path.write_bytes(bytes(raw))

    again = DiskStorage(tmp_path)
    with pytest.raises(CorruptWindow):
        again.get(rec.key)
    assert again.verify() == [rec.key]
    again.close()


def test_memory_checksum_detects_corruption(make_insert):
    storage = MemoryStorage()
    rec = storage.put("w0", encode_window(make_insert(0)), shape=(2, 16, 16, 3))
    payload = bytearray(storage.payloads[rec.key])
    payload[-5] ^= 1
    storage.payloads[rec.key] = bytes(payload)
    with pytest.raises(CorruptWindow):
        storage.get(rec.key)


def test_buffer_never_serves_a_corrupt_window(make_insert, tmp_path):
    cfg = ReplayConfig(min_size=1)
    buf = ReplayBuffer(cfg, MemoryStorage())
    for i in range(3):
        assert buf.insert(make_insert(i)).status == "stored"
    bad = buf.storage.by_id["w1"]
    buf.storage.payloads[bad] = buf.storage.payloads[bad][:-1] + b"\x00"
    batch = buf.sample(30)
    assert "w1" not in batch.meta["window_ids"] and len(batch.meta["window_ids"]) == 30
    assert buf.counts["corrupt"] == 1 and "w1" not in buf.storage and len(buf.sampler) == 2


def test_a_waiting_sample_is_told_which_of_min_size_and_the_rate_limiter_holds_it(make_insert):
    """The words a ``not_ready`` answer carries: how many windows against ``min_size``, else the
    rate limiter (here two windows inserted at 2 samples per insert, tolerance 2: 100 samples wait)."""
    buf = ReplayBuffer(ReplayConfig(min_size=2, samples_per_insert=2.0, tolerance=2.0), MemoryStorage())
    assert buf.insert(make_insert(0)).status == "stored"
    assert not buf.can_sample(1) and buf.sample_wait(1) == "stores 1 window, fewer than replay.min_size 2"
    assert buf.insert(make_insert(1)).status == "stored"
    assert buf.can_sample(1) and not buf.can_sample(100)
    assert buf.sample_wait(100).startswith("its rate limiter holds samples back (replay.samples_per_insert 2)")


def test_disk_full_is_a_rejected_insert(make_insert, tmp_path):
    storage = DiskStorage(tmp_path, max_pages=40)  # ~160 KiB database
    buf = ReplayBuffer(ReplayConfig(min_size=1), storage)
    results = [buf.insert(make_insert(i, size=32)) for i in range(40)]
    statuses = Counter(r.status for r in results)
    assert statuses["stored"] >= 2 and statuses["rejected"] >= 1
    assert {r.reason for r in results if r.status == "rejected"} == {"storage_full"}
    assert storage.verify() == [] and len(storage) == statuses["stored"]
    assert buf.sample(2).arrays["frames"].shape == (2, 2, 32, 32, 3)  # still serving
    storage.close()


def test_a_flush_the_full_disk_refuses_says_so_and_is_written_once_it_has_room(make_insert, small_disk):
    """Sample counts flushed to a disk that is full: SQLite has rolled the transaction back itself,
    and the flush's own ROLLBACK failed in turn, so its StorageFull said "cannot rollback - no
    transaction is active" in place of the full disk. It says the disk is full now, and the
    counts reach the disk at the next flush once there is room."""
    disk = small_disk(4 << 20)
    storage = DiskStorage(disk.path / "replay")
    for i in range(3):
        storage.put(f"w{i}", bytes(4096), shape=(1,))
    disk.fill()
    storage.touch([0, 0, 1])
    with pytest.raises(StorageFull, match="database or disk is full"):
        storage.flush()
    disk.free()
    storage.flush()
    storage.close()
    again = DiskStorage(disk.path / "replay")
    assert [again.records[k].times_sampled for k in (0, 1, 2)] == [2, 1, 0]
    again.close()


# --------------------------------------------------------------------------- eviction

def fill(storage, n, *, policy, max_windows, max_bytes, size=100):
    kept = []
    for i in range(n):
        victims = policy.victims(storage, size, max_windows=max_windows, max_bytes=max_bytes)
        if victims is None:
            continue
        storage.put(f"w{i}", bytes(size), shape=(1,), evict=victims)
        kept.append(i)
        assert len(storage) <= max_windows and storage.nbytes <= max_bytes
    return kept


def test_fifo_eviction_by_windows_and_bytes():
    s = MemoryStorage()
    fill(s, 10, policy=FifoEviction(), max_windows=4, max_bytes=10**9)
    assert sorted(s.by_id) == ["w6", "w7", "w8", "w9"]
    s = MemoryStorage()
    fill(s, 10, policy=FifoEviction(), max_windows=100, max_bytes=350)
    assert sorted(s.by_id) == ["w7", "w8", "w9"]


@pytest.mark.parametrize("bound", ["windows", "bytes"])
def test_reservoir_eviction_keeps_a_uniform_sample(bound):
    # Over many runs, every one of 40 offered windows ends up stored with chance 10/40,
    # whichever limit fills first: 10 windows, or 10 windows' bytes (100 each).
    limits = ({"max_windows": 10, "max_bytes": 10**9} if bound == "windows"
              else {"max_windows": 10**6, "max_bytes": 1050})
    hits = Counter()
    runs = 400
    for seed in range(runs):
        s = MemoryStorage()
        fill(s, 40, policy=ReservoirEviction(seed), **limits)
        assert len(s) == 10
        hits.update(int(w[1:]) for w in s.by_id)
    counts = np.array([hits[i] for i in range(40)], float)
    # chi-square, 39 dof: mean 39, 99.9th percentile ~ 73
    assert chi_square(counts, np.full(40, 1 / 40)) < 73
    s = MemoryStorage()
    fill(s, 30, policy=ReservoirEviction(1), max_windows=100, max_bytes=350)
    assert len(s) == 3 and s.nbytes == 300


def test_reservoir_state_dict_resumes_the_same_choices():
    a, b = ReservoirEviction(5), ReservoirEviction(0)
    s1 = MemoryStorage()
    fill(s1, 15, policy=a, max_windows=5, max_bytes=10**9)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))  # stored as JSON
    for _ in range(15):
        assert a.victims(s1, 100, max_windows=5, max_bytes=10**9) == \
            b.victims(s1, 100, max_windows=5, max_bytes=10**9)
    assert b.seen == a.seen == 30


# --------------------------------------------------------------------------- samplers

def draw_counts(sampler, keys, n=20000, rank=0):
    drawn, probs = sampler.sample(n, rank)
    counts = Counter(drawn.tolist())
    return np.array([counts[k] for k in keys], float), probs


def test_uniform_sampler_distribution_and_removal():
    s = Sampler(seed=0)
    for k in range(20):
        s.add(k)
    for k in (3, 7):
        s.remove(k)
    keys = [k for k in range(20) if k not in (3, 7)]
    counts, probs = draw_counts(s, keys)
    assert np.allclose(probs, 1 / 18)
    assert chi_square(counts, np.full(18, 1 / 18)) < 41  # 17 dof, p ~ 0.001


def test_recency_sampler_favours_new_windows():
    s = RecencySampler(seed=1, halflife=5.0)
    for k in range(20):
        s.add(k)
    keys = list(range(20))
    weights = np.exp2((np.array(keys) - 19) / 5.0)
    expected = weights / weights.sum()
    ks, ps = s.probabilities()
    np.testing.assert_allclose(ps[np.argsort(ks)], expected)
    counts, _ = draw_counts(s, keys)
    assert chi_square(counts, expected) < 43.8  # 19 dof, p ~ 0.001
    assert counts[19] > 7 * counts[4]


def test_prioritized_sampler_follows_reported_losses():
    s = PrioritizedSampler(seed=2, alpha=1.0)
    for k in range(4):
        s.add(k)
    s.update([0, 1, 2, 3], [1.0, 2.0, 3.0, 4.0])
    counts, _ = draw_counts(s, [0, 1, 2, 3])
    expected = np.array([1, 2, 3, 4]) / 10
    assert chi_square(counts, expected) < 16.3  # 3 dof, p ~ 0.001
    s.add(4)  # a new window gets the largest priority so far
    assert s.priority(4) == pytest.approx(4.0)
    half = PrioritizedSampler(alpha=0.5)
    half.add(0)
    assert half.update([0, 99], [16.0, 1.0]) == {0: pytest.approx(4.0)}


def test_sampler_rank_streams_are_independent_and_resumable():
    def fresh():
        s = PrioritizedSampler(seed=7)
        for k in range(50):
            s.add(k)
        return s

    a, b = fresh(), fresh()
    a.sample(5, rank=1)  # drawing for another rank must not disturb rank 0
    assert np.array_equal(a.sample(32, 0)[0], b.sample(32, 0)[0])
    assert not np.array_equal(fresh().sample(32, 0)[0], fresh().sample(32, 1)[0])
    state = json.loads(json.dumps(a.state_dict()))  # stored as JSON
    c = fresh()
    c.load_state_dict(state)
    assert np.array_equal(a.sample(32, 0)[0], c.sample(32, 0)[0])
    assert np.array_equal(a.sample(32, 1)[0], c.sample(32, 1)[0])


# --------------------------------------------------------------------------- rate limiter

@pytest.mark.parametrize("spi, insert_rate, sample_rate", [(4.0, 1, 50), (4.0, 50, 2), (0.5, 3, 3)])
def test_rate_limiter_holds_the_ratio(spi, insert_rate, sample_rate):
    """Each tick the inserter tries ``insert_rate`` inserts and the sampler
    ``sample_rate`` batches of 2; whichever is faster must be held to the ratio."""
    tol, min_size, batch = 8.0, 4, 2
    lim = RateLimiter(min_size=min_size, samples_per_insert=spi, tolerance=tol)
    for tick in range(500):
        for _ in range(insert_rate):
            if lim.can_insert():
                lim.insert()
        for _ in range(sample_rate):
            if lim.can_sample(batch):
                lim.sample(batch)
        if lim.inserts >= min_size:
            error = lim.inserts * spi - lim.samples - spi * min_size
            assert -tol - batch <= error <= tol + spi, (tick, lim.state_dict())
    assert lim.inserts > 20 and lim.samples > 20
    assert abs(lim.ratio() - spi) <= (tol + spi * min_size + batch) / lim.inserts


def test_rate_limiter_bounds_samples_alone():
    """``limit_inserts=False``: every insert goes ahead; the samples stay within ``spi`` per
    insert plus the tolerance; a learner that fell behind banks no more than the tolerance, so
    once fast it trains on the new windows no more often than the ratio."""
    spi, tol, min_size, batch = 4.0, 8.0, 4, 2
    lim = RateLimiter(min_size=min_size, samples_per_insert=spi, tolerance=tol, limit_inserts=False)
    for phase, (insert_rate, sample_rate) in enumerate([(50, 2), (1, 50), (3, 50)]):
        inserts0, samples0 = lim.inserts, lim.samples
        for _ in range(300):
            for _ in range(insert_rate):
                assert lim.can_insert()
                lim.insert()
            for _ in range(sample_rate):
                if lim.can_sample(batch):
                    lim.sample(batch)
            assert lim.samples <= spi * (lim.inserts - min_size) + tol  # never above the ratio
        inserts, samples = lim.inserts - inserts0, lim.samples - samples0
        if phase == 0:  # the slow learner was never held back
            assert samples == 300 * sample_rate * batch
        else:  # fast: the ratio, within the banked tolerance either side
            assert abs(samples - spi * inserts) <= 2 * tol + batch, (phase, inserts, samples)
    other = RateLimiter(min_size=min_size, samples_per_insert=spi, tolerance=tol, limit_inserts=False)
    other.load_state_dict(lim.state_dict())
    assert [other.can_sample(n) for n in range(1, 40)] == [lim.can_sample(n) for n in range(1, 40)]


def test_rate_limiter_min_size_and_disabled():
    lim = RateLimiter(min_size=3)
    assert not lim.can_sample(1)
    lim.insert(3)
    assert lim.can_sample(1000) and lim.can_insert()
    lim.delete(1)
    assert not lim.can_sample(1)
    other = RateLimiter(min_size=3)
    other.load_state_dict(lim.state_dict())
    assert other.size == 2
    with pytest.raises(ValueError, match="tolerance"):
        RateLimiter(samples_per_insert=8, tolerance=2)


# --------------------------------------------------------------------------- dedup

def _stored_count(windows, threshold, backend="auto"):
    d = Dedup(threshold, backend=backend)
    for key, frames in enumerate(windows):
        vec = d.embed(frames)
        if not d.is_duplicate(vec):
            d.add(key, vec)
    return len(d)


def _seven_scenes_windows(views=4, count=25):
    cv2 = pytest.importorskip("cv2")
    if not SEVEN_SCENES.is_dir():
        pytest.skip(f"7-Scenes frames not found at {SEVEN_SCENES}")

    def load(i):
        img = cv2.imread(str(SEVEN_SCENES / f"frame-{i:06d}.color.jpg"))[:, :, ::-1]
        return cv2.resize(img, (64, 48), interpolation=cv2.INTER_AREA)

    frames = [load(i) for i in range(0, 2 * views * count, 2)]
    moving = [np.stack(frames[s: s + views]) for s in range(0, len(frames) - views + 1, views)]
    rng = np.random.default_rng(0)
    still = frames[0].astype(np.float32)
    static = [np.clip(np.stack([still] * views) + rng.normal(0, 3, (views, *still.shape)), 0, 255).astype(np.uint8)
              for _ in range(len(moving))]
    return moving, static


@pytest.mark.parametrize("backend", ["numpy", "faiss"])
def test_dedup_static_camera_stores_far_fewer_windows(backend):
    if backend == "faiss" and faiss is None:
        pytest.skip("faiss not installed (pip install faiss-cpu)")
    moving, static = _seven_scenes_windows()
    threshold = ReplayConfig().dedup_threshold
    n_moving = _stored_count(moving, threshold, backend)
    n_static = _stored_count(static, threshold, backend)
    assert n_static == 1
    assert n_moving >= 0.8 * len(moving)


def test_dedup_synthetic_and_index_agreement():
    rng = np.random.default_rng(3)
    base = rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)
    brighter = np.clip(base.astype(int) * 1.1 + 5, 0, 255).astype(np.uint8)
    assert ((embed(base) - embed(brighter)) ** 2).sum() < 0.01  # brightness/contrast invariant
    assert np.linalg.norm(embed(base)) == pytest.approx(1.0, abs=1e-5)
    vecs = [embed(rng.integers(0, 256, (2, 24, 24, 3), dtype=np.uint8)) for _ in range(30)]
    ref = NumpyIndex(vecs[0].size)
    for k, v in enumerate(vecs[:20]):
        ref.add(k, v)
    ref.remove(5)
    if faiss is not None:
        d = Dedup(0.01, backend="faiss")
        for k, v in enumerate(vecs[:20]):
            d.add(k, v)
        d.remove(5)
        for v in vecs[20:] + [vecs[5], vecs[6]]:
            k1, d1 = ref.nearest(v)
            k2, d2 = d.nearest(v)
            assert k1 == k2 and d1 == pytest.approx(d2, abs=1e-4)
    assert ref.nearest(vecs[6]) == (6, pytest.approx(0.0, abs=1e-6))


# --------------------------------------------------------------------------- buffer

def test_buffer_rejects_bad_windows_and_duplicates(make_insert):
    buf = ReplayBuffer(ReplayConfig(min_size=1, max_window_bytes=20_000), MemoryStorage())
    assert buf.insert(make_insert(0)).status == "stored"
    assert buf.insert(make_insert(0)).reason == "window_id"
    assert buf.insert(make_insert(1, size=8)).reason == "shape_mismatch"
    nan = make_insert(2)
    nan.arrays["teacher_depth"] = nan.arrays["teacher_depth"].copy()
    nan.arrays["teacher_depth"][0, 0, 0] = np.nan
    assert buf.insert(nan).reason == "non_finite_label"
    big = make_insert(3, views=2, size=16)
    big.arrays["gt_depth"] = np.zeros((2, 16, 16), np.float32)
    big.arrays["matches"] = np.zeros((1000, 7), np.float32)
    assert buf.insert(big).reason == "oversize"
    assert buf.stats()["rejected"] == {"shape_mismatch": 1, "non_finite_label": 1, "oversize": 1}
    assert buf.stats()["duplicates"] == 1 and buf.stats()["inserts"] == 1


def test_buffer_capacity_bytes_counts_the_stored_payload(make_insert):
    """capacity_bytes bounds what eviction counts, the stored payload (arrays, meta and framing):
    a window whose arrays fit but whose payload does not is refused, never stored over the
    limit (each insert then evicting the whole store); one that fits exactly is stored."""
    msgs = [make_insert(i) for i in (0, 3, 6)]  # one match each, ids of one length: equal payloads
    payload = len(encode_window(msgs[0]))
    assert {len(encode_window(m)) for m in msgs} == {payload} and msgs[0].nbytes() < payload
    buf = ReplayBuffer(ReplayConfig(capacity_bytes=msgs[0].nbytes() + 10, min_size=1), MemoryStorage())
    assert [buf.insert(m).reason for m in msgs] == ["oversize"] * 3
    assert len(buf.storage) == 0 and buf.counts["evictions"] == 0
    buf = ReplayBuffer(ReplayConfig(capacity_bytes=payload, min_size=1), MemoryStorage())
    assert [buf.insert(m).status for m in msgs] == ["stored"] * 3
    assert len(buf.storage) == 1 and buf.storage.nbytes == payload and buf.counts["evictions"] == 2


def _with_teacher(msg: protocol.Message, teacher) -> protocol.Message:
    """``msg`` with ``teacher`` as its teacher meta, as the replay service decodes it off the wire
    (msgpack: bytes stay bytes, tuples become lists)."""
    out = protocol.Message(msg.kind, {**msg.meta, "teacher": teacher}, msg.arrays)
    return protocol.decode([bytes(f) for f in protocol.encode(out)])


@pytest.mark.parametrize("teacher, reason", [
    ({"depth": {"name": "fake", "version": "1", "space": "metric"}}, "unknown_teacher_space"),
    ({"depth": {"name": "fake", "version": "1", "space": b"depth"}}, "bad_teacher_meta"),
    ({"depth": {"name": "fake", "version": "1", "space": None}}, "unknown_teacher_space"),
    ({"depth": {"name": b"fake", "version": "1", "space": "depth"}}, "bad_teacher_meta"),
    ({"depth": {"name": "fake", b"version": "1"}}, "bad_teacher_meta"),
    ({"depth": {"name": "fake", "version": float("nan")}}, "bad_teacher_meta"),
    ({"depth": {"name": "fake", "extra": [[[[[[[[[["deep"]]]]]]]]]]}}, "bad_teacher_meta"),
    ({"depth": "fake"}, "bad_teacher_meta"),
    ("fake", "bad_teacher_meta"),
])
def test_buffer_refuses_teacher_meta_the_learner_cannot_read(make_insert, teacher, reason):
    """The learner reads each window's depth space to train on its labels and writes the teacher
    meta into its snapshots as JSON: a window whose space is neither "depth" nor "disparity", or
    whose teacher meta is not plain JSON (text, numbers, lists and maps of them), is refused
    at the insert, by name, instead of being stored and failing the learner each time it is drawn."""
    buf = ReplayBuffer(ReplayConfig(min_size=1), MemoryStorage())
    assert buf.insert(_with_teacher(make_insert(0), teacher)).reason == reason
    assert buf.stats()["rejected"] == {reason: 1} and buf.stats()["windows"] == 0
    plain = [{"depth": {"name": "fake", "version": "1"}},  # no space: the learner's default, depth
             {"depth": {"name": "hf:x", "version": "2", "space": "disparity", "size": [518, 518], "scale": 0.5}},
             {"depth": {"name": "none"}, "matches": {"name": "sift", "version": "4.10"}}, {}]
    for i, teacher in enumerate(plain, start=1):
        assert buf.insert(_with_teacher(make_insert(i), teacher)).status == "stored", teacher


def test_a_stored_window_the_wire_format_now_refuses_is_removed_at_its_first_draw(make_insert, tmp_path):
    """A durable store may hold windows stored before the wire format refused them (all-zero
    intrinsics, a match far outside its frame): each is read back through the wire format's
    checks, so it is counted as corrupt and removed at its first draw, never served."""
    buf = ReplayBuffer(ReplayConfig(min_size=1), DiskStorage(tmp_path / "replay"))
    try:
        zero = make_insert(0)
        zero.arrays["intrinsics"] = np.zeros((2, 3, 3), np.float32)
        far = make_insert(1)
        far.arrays["matches"] = np.array([[0, 1, 1e30, 3, 4, 4, 1.0]], np.float32)
        for msg in (zero, far, make_insert(2)):  # the buffer takes decoded messages: no wire check here
            assert buf.insert(msg).status == "stored"
        batch = buf.sample(8)
        assert batch.meta["window_ids"] == ["w2"] * 8
        assert buf.stats()["corrupt"] == 2 and buf.stats()["windows"] == 1
    finally:
        buf.close()


def test_a_looped_archive_keeps_a_learner_bounded_on_its_side_going(make_insert):
    """With the bound on the learner's side alone, a window delivered again (a near-duplicate:
    the next pass over a finite archive) earns samples as a stored one does; under the
    two-sided limiter it does not."""
    for limit_inserts, granted in ((False, True), (True, False)):
        cfg = ReplayConfig(min_size=1, samples_per_insert=2.0, tolerance=2.0, limit_inserts=limit_inserts)
        buf = ReplayBuffer(cfg, MemoryStorage(), dedup=Dedup(cfg.dedup_threshold))
        first = make_insert(0)
        assert buf.insert(first).status == "stored"
        drawn = 0
        while buf.can_sample(1):  # diff = 2 x 1 - samples; a draw goes ahead while diff - 1 >= 2 - 2
            buf.sample(1)
            drawn += 1
        assert drawn == 2
        again = protocol.Message("insert", {**first.meta, "window_id": "w0-pass1"}, first.arrays)
        assert buf.insert(again).reason == "near_duplicate"
        assert buf.can_sample(1) is granted and buf.stats()["windows"] == 1


def test_buffer_batch_layout_and_optional_arrays(make_insert):
    buf = ReplayBuffer(ReplayConfig(min_size=1, sampler="recency"), MemoryStorage(), seed=0)
    buf.insert(make_insert(0))
    buf.insert(make_insert(1, teacher=False))
    batch = buf.sample(8)
    ids = batch.meta["window_ids"]
    assert set(ids) == {"w0", "w1"}  # seeded: deterministic (and likely anyway: 1 - 2**-7)
    assert batch.arrays["frames"].shape == (8, 2, 16, 16, 3)
    assert "teacher_depth" not in batch.arrays  # w1 has none
    m = batch.arrays["matches"]
    assert m.shape[1] == 8 and sorted(set(m[:, 0].astype(int))) == list(range(8))
    for b, wid in enumerate(ids):
        assert (m[:, 0] == b).sum() == 1 + int(wid[1:]) % 3
    protocol.decode([bytes(f) for f in protocol.encode(batch)])  # a valid wire message
    assert batch.meta["probabilities"][0] > 0 and len(batch.meta["times_sampled"]) == 8


def test_buffer_refuses_a_batch_over_max_bytes_before_it_counts(make_insert):
    """A batch whose arrays would exceed ``max_bytes`` (what its receiver accepts) raises
    BatchTooLarge with its size, before anything is counted: no limiter credit, no samples,
    no times_sampled. The size is the built batch's to the byte (windows with and without the
    optional arrays: same seed, same draws)."""
    def filled() -> ReplayBuffer:
        buf = ReplayBuffer(ReplayConfig(min_size=1, samples_per_insert=1.0, tolerance=8.0), MemoryStorage(), seed=0)
        triangulated = make_insert(0)
        triangulated.arrays["match_triangulation"] = np.ones((1, 3), np.float32)
        for msg in (triangulated, make_insert(1, teacher=False), make_insert(2)):
            assert buf.insert(msg).status == "stored"
        return buf

    def counted(buf: ReplayBuffer) -> tuple:
        return buf.limiter.state_dict(), buf.stats(), [r.times_sampled for r in buf.storage.records.values()]

    nbytes = filled().sample(6).nbytes()
    assert filled().sample(6, max_bytes=nbytes).nbytes() == nbytes  # at the limit: served
    buf = filled()
    before = counted(buf)
    with pytest.raises(BatchTooLarge) as refused:
        buf.sample(6, max_bytes=nbytes - 1)
    assert (refused.value.windows, refused.value.nbytes, refused.value.limit) == (6, nbytes, nbytes - 1)
    assert counted(buf) == before


def test_a_batch_names_each_windows_teacher(make_insert):
    """Windows of teachers of both spaces (a durable store resumed after ``labeler.teacher``
    changed) are stacked into one batch with each window's teacher beside its id, which the
    learner reads each window's labels by."""
    buf = ReplayBuffer(ReplayConfig(min_size=1), MemoryStorage(), seed=0)
    spaces = {"w0": "depth", "w1": "disparity"}
    for i, space in enumerate(spaces.values()):
        msg = make_insert(i)
        msg.meta["teacher"] = {"depth": {"name": f"t{i}", "version": "1", "space": space}}
        buf.insert(msg)
    batch = buf.sample(16)
    ids, teachers = batch.meta["window_ids"], batch.meta["teachers"]
    assert set(ids) == set(spaces) and len(teachers) == 16  # seeded: both drawn (and likely anyway: 1 - 2**-15)
    assert [t["depth"]["space"] for t in teachers] == [spaces[w] for w in ids]


def test_buffer_reopens_with_sampler_and_limiter_state(make_insert, tmp_path):
    cfg = ReplayConfig(min_size=1, sampler="prioritized", durable=True)
    buf = ReplayBuffer(cfg, DiskStorage(tmp_path), seed=4)
    for i in range(5):
        buf.insert(make_insert(i))
    buf.update_priorities(["w0", "w1"], [10.0, 0.1])
    buf.sample(3)
    buf.close()
    again = ReplayBuffer(cfg, DiskStorage(tmp_path), seed=4)
    assert len(again.storage) == 5 and again.counts["samples"] == 3
    assert again.sampler.priority(again.storage.by_id["w0"]) == pytest.approx(10.0 ** 0.6, rel=1e-5)
    assert again.limiter.inserts == 5 and again.limiter.samples == 3
    assert again.insert(make_insert(11, size=8)).reason == "shape_mismatch"  # shape remembered
    again.close()


def test_buffer_redelivery_of_an_evicted_window_is_a_duplicate(make_insert):
    buf = ReplayBuffer(ReplayConfig(min_size=1, capacity_windows=2), MemoryStorage())
    for i in range(3):
        assert buf.insert(make_insert(i)).status == "stored"
    assert "w0" not in buf.storage and buf.counts["evictions"] == 1
    assert buf.insert(make_insert(0)) == InsertResult("duplicate", "evicted")


def test_evicted_ids_survive_a_restart(make_insert, tmp_path):
    cfg = ReplayConfig(min_size=1, capacity_windows=2, durable=True)
    buf = ReplayBuffer(cfg, DiskStorage(tmp_path))
    for i in range(4):
        assert buf.insert(make_insert(i)).status == "stored"
    buf.close()  # w0 and w1 were evicted
    again = ReplayBuffer(cfg, DiskStorage(tmp_path))
    assert list(again.storage.evicted) == ["w0", "w1"]
    assert again.insert(make_insert(0)) == InsertResult("duplicate", "evicted")
    assert again.insert(make_insert(1)) == InsertResult("duplicate", "evicted")
    assert again.insert(make_insert(4)).status == "stored"
    again.close()


def test_group_insert_commits_once_and_matches_single_inserts(make_insert, tmp_path):
    cfg = ReplayConfig(min_size=1, capacity_windows=5, durable=True)
    one = ReplayBuffer(cfg, DiskStorage(tmp_path / "one"))
    many = ReplayBuffer(cfg, DiskStorage(tmp_path / "many"))
    msgs = [make_insert(i) for i in range(8)] + [make_insert(3), make_insert(0)]  # a repeat, an evicted one
    commits = []
    many.storage.db.set_trace_callback(lambda sql: commits.append(sql) if sql == "COMMIT" else None)
    results = many.insert_many(msgs)
    assert len(commits) == 1  # one transaction (one fsync) for the whole burst
    assert results == [one.insert(m) for m in msgs]
    assert [r.status for r in results[-2:]] == ["duplicate", "duplicate"]
    assert list(many.storage.by_id) == list(one.storage.by_id) == [f"w{i}" for i in range(3, 8)]
    assert many.stats() == {**one.stats(), "durable": True}
    many.close()
    reopened = DiskStorage(tmp_path / "many")  # what was committed is the whole group
    assert list(reopened.by_id) == [f"w{i}" for i in range(3, 8)] and reopened.verify() == []
    assert list(reopened.evicted) == ["w0", "w1", "w2"]
    reopened.close()
    one.close()


def test_refused_group_is_undone_and_retried_one_by_one(make_insert, tmp_path):
    storage = DiskStorage(tmp_path, max_pages=40)  # ~160 KiB: a few 32x32 windows fit, not a burst of 12
    buf = ReplayBuffer(ReplayConfig(min_size=1, sampler="prioritized"), storage)
    assert buf.insert(make_insert(100, size=32)).status == "stored"
    results = buf.insert_many([make_insert(i, size=32) for i in range(12)])
    statuses = Counter(r.status for r in results)
    assert statuses["stored"] >= 1 and statuses["rejected"] >= 1  # the group failed; singles partly fit
    assert {r.reason for r in results if r.status == "rejected"} == {"storage_full"}
    stored = [f"w{i}" for i, r in zip(range(12), results) if r.status == "stored"]
    assert set(storage.by_id) == {"w100", *stored}
    assert len(buf.sampler) == len(storage) and buf.limiter.size == len(storage)
    assert buf.stats()["inserts"] == 1 + statuses["stored"]
    assert buf.sample(2).arrays["frames"].shape == (2, 2, 32, 32, 3)
    storage.close()
    again = DiskStorage(tmp_path)
    assert set(again.by_id) == set(storage.by_id) and again.verify() == []
    again.close()


def test_a_refused_group_that_evicted_its_own_window_leaves_no_trace_of_it(make_insert, tmp_path):
    """A group in which a window put early is evicted by a later one (capacity 2), then refused
    (the disk is full): undone, nothing of that window is left (it was answered "duplicate" on
    the retry though never stored, so the labeler acknowledged a lost window), and the retry
    stores every window that fits, with the index, sampler and byte count as on disk."""
    storage = DiskStorage(tmp_path, max_pages=60)
    buf = ReplayBuffer(ReplayConfig(min_size=1, capacity_windows=2, dedup=False), storage)
    for i in (100, 101):
        assert buf.insert(make_insert(i, size=32)).status == "stored"
    big = make_insert(3, size=32)
    big.arrays["matches"] = np.zeros((20000, 7), np.float32)  # about 560 KB: the group cannot fit
    results = buf.insert_many([make_insert(i, size=32) for i in range(3)] + [big])
    assert [r.status for r in results] == ["stored", "stored", "stored", "rejected"], results
    on_disk = [w for (w,) in storage.db.execute("SELECT window_id FROM windows ORDER BY key")]
    assert list(storage.by_id) == on_disk == ["w1", "w2"]
    assert sorted(storage.records) == sorted(buf.sampler.probabilities()[0].tolist())
    assert storage.nbytes == sum(r.nbytes for r in storage.records.values())
    storage.close()


def test_a_damaged_page_costs_its_windows_and_the_buffer_goes_on(make_insert, tmp_path):
    """A damaged database page under stored payloads (a disk error): the windows on it are found
    corrupt when sampled, counted and forgotten (their rows cannot even be deleted), the others
    are served, and the same holds after a restart (before, the failed delete killed the replay
    at its first sample, at every start)."""
    cfg = ReplayConfig(durable=True, dedup=False, min_size=1)
    buf = ReplayBuffer.open(cfg, tmp_path)
    for i in range(6):
        buf.insert(make_insert(i, size=64))  # about 64 KB each: pages of their own
    buf.close()
    db = tmp_path / "replay" / "replay.sqlite"
    raw = bytearray(db.read_bytes())
    middle = len(raw) // 4096 // 2 * 4096
    raw[middle:middle + 64] = b"\xff" * 64
    db.write_bytes(bytes(raw))
    for _ in range(2):  # the restart finds the same damage
        buf = ReplayBuffer.open(cfg, tmp_path)
        before = buf.counts["corrupt"]  # counted over the buffer's life, restarts included
        for _ in range(20):
            if not buf.can_sample(2):
                break
            assert buf.sample(2).arrays["frames"].shape == (2, 2, 64, 64, 3)
        assert 0 < buf.counts["corrupt"] - before == 6 - len(buf.storage)
        buf.close()


def test_a_database_that_is_not_one_is_moved_aside_and_the_buffer_starts_empty(make_insert, tmp_path):
    """A replay database overwritten or cut to garbage: the buffer starts empty and takes new
    windows, and the damaged file is kept beside it for salvage (before, every start failed)."""
    cfg = ReplayConfig(durable=True, dedup=False, min_size=1)
    buf = ReplayBuffer.open(cfg, tmp_path)
    buf.insert(make_insert(0))
    buf.close()
    db = tmp_path / "replay" / "replay.sqlite"
    db.write_bytes(b"not a database" * 500)
    buf = ReplayBuffer.open(cfg, tmp_path)
    assert len(buf.storage) == 0 and buf.insert(make_insert(1)).status == "stored"
    buf.close()
    kept = list((tmp_path / "replay").glob("replay.sqlite.damaged-*"))
    assert [k.read_bytes()[:14] for k in kept if not k.name.endswith(("-wal", "-shm"))] == [b"not a database"]


def test_a_damaged_database_moved_aside_stays_aside_after_a_power_loss(make_insert, tmp_path, folder_fsyncs):
    """The damaged database was renamed aside without its folder flushed: after a power loss it
    could stand again under its own name (and the new store's first windows be lost with it).
    The folder is flushed once it names the file aside, before the new database is made."""
    storage = DiskStorage(tmp_path)
    storage.put("w0", encode_window(make_insert(0)), shape=(2, 16, 16, 3))
    storage.close()
    (tmp_path / "replay.sqlite").write_bytes(b"not a database" * 500)
    flushed = folder_fsyncs(tmp_path, lambda: ((tmp_path / "replay.sqlite").exists(),
                                               len(list(tmp_path.glob("replay.sqlite.damaged-*")))))
    storage = DiskStorage(tmp_path)
    assert len(storage) == 0
    storage.close()
    assert flushed and flushed[0] == (False, 1)  # aside, and the new database not made yet


def test_sum_tree_prioritized_sampler_matches_its_weights():
    from replay.sampler import SumTree

    tree = SumTree(8)
    tree.build(np.array([1.0, 0.0, 3.0, 4.0]))
    assert tree.total == 8.0
    assert tree.find(np.array([0.0, 0.99, 1.0, 3.99, 4.0, 7.99])).tolist() == [0, 0, 2, 2, 3, 3]
    tree.set([1, 3], [2.0, 0.0])
    assert tree.total == 6.0 and tree.find(np.array([1.5, 5.0])).tolist() == [1, 2]

    sampler = PrioritizedSampler(seed=1, alpha=1.0)
    for key in range(40):  # crosses the tree's first growth (16 -> 32 -> 64 leaves)
        sampler.add(key)
    for key in range(0, 40, 3):
        sampler.remove(key)
    kept = [k for k in range(40) if k % 3]
    sampler.update(kept, [float(1 + k % 5) for k in kept])
    keys, probs = sampler.probabilities()
    assert sampler._tree.total == pytest.approx(sum(1 + k % 5 for k in kept))
    draws, draw_probs = sampler.sample(40_000)
    assert set(draws.tolist()) <= set(kept)
    order = np.argsort(keys)
    counts = np.array([np.sum(draws == k) for k in keys[order]])
    assert chi_square(counts, probs[order]) < 60  # 26 keys: 25 dof, p ~ 1e-4
    lookup = dict(zip(keys.tolist(), probs.tolist()))
    assert np.allclose(draw_probs, [lookup[k] for k in draws.tolist()])


def test_batch_keeps_match_triangulation_aligned_with_the_matches(make_insert):
    buf = ReplayBuffer(ReplayConfig(min_size=1, sampler="recency"), MemoryStorage(), seed=0)
    with_tri = make_insert(1)  # 2 matches
    with_tri.arrays["match_triangulation"] = np.array([[2.0, 3.0, 0.5], [4.0, 5.0, 1.0]], np.float32)
    assert buf.insert(with_tri).status == "stored"
    assert buf.insert(make_insert(2)).status == "stored"  # 3 matches, labelled without triangulation
    batch = buf.sample(8)
    matches, tri = batch.arrays["matches"], batch.arrays["match_triangulation"]
    assert tri.shape == (len(matches), 3)
    for b, window_id in enumerate(batch.meta["window_ids"]):
        rows = tri[matches[:, 0] == b]
        expected = with_tri.arrays["match_triangulation"] if window_id == "w1" else np.zeros((3, 3), np.float32)
        np.testing.assert_array_equal(rows, expected)
    protocol.decode([bytes(f) for f in protocol.encode(batch)])  # a valid batch message

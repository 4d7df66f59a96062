"""``labeler.cpu_threads``: the labeler's per-frame and per-pair CPU work on a thread pool gives
exactly the serial result (same matches, same order, same triangulation, bit for bit), whatever
thread runs which item and however the threads interleave. No timing and no core count is
assumed: a pool of 3 threads runs on one core as well."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from labelers.config import LabelerConfig
from labelers.matches import (OpenCVMatcher, make_matcher, match_windows, triangulate_many, triangulate_matches,
                              verify)
from labelers.service import Labeler
from reliev3r import geometry, synthetic
from reliev3r.config import PipelineConfig, build
from reliev3r.protocol import Message
from streamer_media import panning_frames

KW = dict(long_pairs=2, min_matches=12, max_matches_per_pair=64, threshold_px=1.0)


@pytest.fixture(scope="module")
def world_window():
    """A 4-view window of the synthetic world (textured room, moving camera: real parallax, so
    the essential matrices and triangulations are not degenerate) and its intrinsics."""
    torch.manual_seed(0)
    world, path = synthetic.random_world(np.random.default_rng(3))
    poses = torch.from_numpy(synthetic.trajectory(path, 24)[[0, 2, 4, 6]])
    h, w = 96, 128
    K = geometry.intrinsics_from_fov(60.0, w, h)
    with torch.inference_mode():
        images, _ = synthetic.render_views(world, poses, K, h, w)
    return images.numpy(), np.tile(K.numpy().astype(np.float32), (4, 1, 1))


def projected_pair(seed: int, n: int = 120) -> tuple[np.ndarray, np.ndarray]:
    """Exact matches (rows (0, 1, x_0, y_0, x_1, y_1, 1)) of random points seen by two cameras
    with parallax, and their intrinsics [2, 3, 3]."""
    rng = np.random.default_rng(seed)
    K = geometry.intrinsics_from_fov(60.0, 320, 240, dtype=torch.float64).numpy()
    axis = rng.normal(size=3)
    R = geometry.axis_angle_to_matrix(torch.from_numpy(axis / np.linalg.norm(axis) * np.radians(3.0))).numpy()
    pts = np.stack([rng.uniform(-1.0, 1.0, n), rng.uniform(-0.7, 0.7, n), rng.uniform(2.0, 6.0, n)], 1)
    uv_0, uv_1 = pts @ K.T, (pts @ R.T + [0.4, 0.05, 0.1]) @ K.T
    matches = np.ones((n, 7), np.float32)
    matches[:, 0], matches[:, 1] = 0, 1
    matches[:, 2:4], matches[:, 4:6] = uv_0[:, :2] / uv_0[:, 2:], uv_1[:, :2] / uv_1[:, 2:]
    return matches, np.stack([K, K]).astype(np.float32)


def windows(world_window) -> list[np.ndarray]:
    """The world window and two panning texture windows of other sizes (several shapes)."""
    return [world_window[0], panning_frames(4, 160, 120, step=6, seed=1), panning_frames(3, 128, 96, step=5, seed=2)]


def assert_same(serial, threaded):
    assert len(serial) == len(threaded)
    for (m1, p1), (m2, p2) in zip(serial, threaded):
        assert p1 == p2
        assert m1.dtype == m2.dtype and m1.shape == m2.shape
        assert m1.tobytes() == m2.tobytes()


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_match_windows_threaded_is_serial_bit_for_bit(world_window, kind):
    data = windows(world_window)
    matcher = OpenCVMatcher(kind, cache_frames=0)  # every call detects: threads against the serial detection
    serial = match_windows(data, matcher, **KW)
    assert sum(len(m) for m, _ in serial) > 50, "too few matches for the comparison to mean anything"
    for threads in (2, 3):
        with ThreadPoolExecutor(threads) as pool:
            for _ in range(2):  # twice: other interleavings, threads that already hold tools
                assert_same(serial, match_windows(data, matcher, **KW, pool=pool))
    assert_same(serial, match_windows(data, matcher, **KW))  # and serial again afterwards


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_a_frame_seen_again_reuses_its_features_and_matches_the_same(world_window, kind):
    """Neighbouring windows share views: a frame the matcher has seen (by its pixels) is not
    detected again, and the windows' matches are those of detecting every frame, bit for bit;
    the cache holds ``cache_frames`` frames, the least recently used go first."""
    frames = np.concatenate([world_window[0], panning_frames(2, 128, 96, step=6, seed=4)])  # 6 frames
    first, second = frames[:4], frames[2:]  # two windows sharing two views
    fresh = OpenCVMatcher(kind, cache_frames=0)
    want = match_windows([first], fresh, **KW) + match_windows([second], fresh, **KW)
    assert fresh.computed == 8
    cached = OpenCVMatcher(kind, cache_frames=4)
    with ThreadPoolExecutor(2) as pool:
        got = match_windows([first], cached, **KW, pool=pool) + match_windows([second], cached, **KW, pool=pool)
    assert_same(want, got)
    assert cached.computed == 6  # frames 2 and 3 once
    cached.features(np.ascontiguousarray(frames[0]))  # evicted: 4 frames since (2, 3, 4, 5)
    assert cached.computed == 7
    cached.features(np.ascontiguousarray(frames[5]))
    assert cached.computed == 7
    cached.forget()
    cached.features(np.ascontiguousarray(frames[5]))
    assert cached.computed == 8


def knn_reference(matcher, a, b):
    """The ratio test as the labeler ran it before: ``BFMatcher.knnMatch`` and a Python loop."""
    import cv2

    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32))
    if a.descriptors is None or b.descriptors is None or len(b.descriptors) < 2:
        return empty
    ia, ib, score = [], [], []
    for pair in cv2.BFMatcher(matcher.norm).knnMatch(a.descriptors, b.descriptors, k=2):
        if len(pair) < 2:
            continue
        best, second = pair
        if second.distance <= 0:
            continue
        r = best.distance / second.distance
        if r < matcher.ratio:
            ia.append(best.queryIdx)
            ib.append(best.trainIdx)
            score.append(1.0 - r)
    if not ia:
        return empty
    return np.array(ia), np.array(ib), np.maximum(np.array(score, np.float32), 1e-3)


@pytest.mark.parametrize("kind", ["sift", "orb"])
def test_array_ratio_test_is_knnmatch_exactly(world_window, kind):
    """``cv2.batchDistance`` + the ratio test on arrays: knnMatch's matches, order and scores;
    ``KeyPoint_convert``: the keypoints' own coordinates."""
    import cv2

    matcher = make_matcher(kind)
    detector = matcher._detector()
    pairs = 0
    for frames in windows(world_window) + [np.ascontiguousarray(world_window[0][:, ::-1])]:
        feats = matcher.features_many(frames)
        for f, rgb in zip(feats, frames):
            keypoints, _ = detector.detectAndCompute(cv2.cvtColor(np.ascontiguousarray(rgb), cv2.COLOR_RGB2GRAY), None)
            assert f.xy.tobytes() == np.array([k.pt for k in keypoints], np.float32).reshape(-1, 2).tobytes()
        for i in range(len(frames)):
            for j in range(len(frames)):
                got, want = matcher.match(feats[i], feats[j]), knn_reference(matcher, feats[i], feats[j])
                assert [(x.dtype, x.tobytes()) for x in got] == [(x.dtype, x.tobytes()) for x in want]
                pairs += len(want[0]) > 0
    assert pairs > 10


def test_usac_is_seeded_per_call_not_per_thread():
    """OpenCV's USAC takes its sampler's state from its parameters on every call: neither
    OpenCV's global generator nor the calling thread changes a verification."""
    import cv2

    rng = np.random.default_rng(0)
    a = rng.uniform(0, 200, (300, 2))
    b = a + rng.normal(0, 0.5, a.shape) + [5.0, 1.0]
    b[::3] = rng.uniform(0, 200, (100, 2))  # a third outliers: the sampler matters
    want = verify(a, b, threshold_px=1.0)
    assert 150 < want.sum() < 300
    cv2.setRNGSeed(12345)
    assert (verify(a, b, threshold_px=1.0) == want).all()
    with ThreadPoolExecutor(3) as pool:
        for got in pool.map(lambda _: verify(a, b, threshold_px=1.0), range(9)):
            assert (got == want).all()


def test_triangulate_many_threaded_is_serial_bit_for_bit(world_window):
    frames, K = world_window
    matches, _ = match_windows([frames], make_matcher("sift"), **KW)[0]
    items = [projected_pair(seed) for seed in range(3)]
    work = [(matches, K)] + items + [(np.zeros((0, 7), np.float32), K)]
    serial = [triangulate_matches(m, k) for m, k in work]
    assert (serial[0][:, 2] > 0).sum() > 20 and all((s[:, 2] > 0).sum() > 20 for s in serial[1:4])
    assert all(a.tobytes() == b.tobytes() for a, b in zip(serial, triangulate_many(work)))
    with ThreadPoolExecutor(3) as pool:
        for _ in range(2):
            got = triangulate_many(work, pool=pool)
            assert all(a.tobytes() == b.tobytes() for a, b in zip(serial, got))
        assert triangulate_matches(*work[0], pool=pool).tobytes() == serial[0].tobytes()


def test_labeler_cpu_threads_gives_the_same_inserts(world_window):
    frames, K = world_window
    msgs = [Message("window", {"window_id": f"s:0:{n}", "source": "s", "frame_indices": list(range(len(f)))},
                    {"frames": f, "intrinsics": np.tile(K[:1], (len(f), 1, 1))})
            for n, f in enumerate(windows(world_window))]
    out = {}
    for threads in (1, 3):
        labeler = Labeler(build(PipelineConfig, {"labeler": {"teacher": "none", "cpu_threads": threads}}))
        assert (labeler.pool is None) == (threads == 1)
        try:
            out[threads] = labeler.label_many(msgs)
        finally:
            labeler.close()
    assert any((insert.arrays["match_triangulation"][:, 2] > 0).any() for insert, _, _ in out[1])
    for (a, reason_a, flags_a), (b, reason_b, flags_b) in zip(out[1], out[3]):
        assert (reason_a, flags_a) == (reason_b, flags_b) == ("", [])
        assert a.meta == b.meta and a.arrays.keys() == b.arrays.keys()
        for key in a.arrays:
            assert a.arrays[key].tobytes() == b.arrays[key].tobytes(), key


def test_cpu_threads_is_validated():
    assert LabelerConfig().cpu_threads == 1
    with pytest.raises(ValueError, match="cpu_threads"):
        LabelerConfig(cpu_threads=0)


class _HeldLink:
    """A ReplayLink stand-in whose inserts wait until the test lets them through."""

    def __init__(self):
        import threading

        self.gate, self.seen, self.closed = threading.Semaphore(0), [], False

    def insert(self, msg):
        self.gate.acquire()
        self.seen.append(msg.meta["window_id"])
        return "stored", ""

    def close(self):
        self.closed = True


def test_inserts_keep_order_and_hold_the_labelling_while_replay_holds_them():
    """``labelers.service.Inserts``: inserts go out in the order they were put, each result comes
    back once, and with ``depth`` windows waiting a further ``put`` blocks until replay answers
    one (replay's backpressure reaches the labelling). Synchronised on events, not on time."""
    import contextlib
    import threading

    from labelers.service import Inserts

    link = _HeldLink()
    inserts = Inserts(link, lambda stage: contextlib.nullcontext(), depth=2)
    msg = [Message("insert", {"window_id": f"w{n}"}, {}) for n in range(4)]
    for n in range(3):  # one taken by the thread (held at the gate), two waiting: the queue is full
        inserts.put(f"w{n}", msg[n], [f"f{n}"])
    fourth = threading.Thread(target=inserts.put, args=("w3", msg[3], []))
    fourth.start()
    fourth.join(0.2)
    assert fourth.is_alive() and inserts.finished() == []  # blocked: nothing was answered yet
    for _ in range(4):
        link.gate.release()
    fourth.join(60)  # bounds a hang only
    got = []
    while len(got) < 4:
        got += inserts.finished()
    assert [g[0] for g in got] == link.seen == ["w0", "w1", "w2", "w3"]
    assert got[0] == ("w0", ["f0"], ("stored", "")) and inserts.pending == 0
    inserts.close(timeout_s=60)
    assert not inserts.thread.is_alive() and link.closed


def test_an_error_on_the_insert_thread_fails_the_labelling():
    """A bug inside an insert must fail the labeler process (the supervisor restarts it, as when
    it inserted inline), not leave a dead thread that the next ``put`` waits on for ever."""
    import contextlib

    from labelers.service import Inserts

    class Broken(_HeldLink):
        def insert(self, msg):
            raise ValueError("boom")

    link = Broken()
    inserts = Inserts(link, lambda stage: contextlib.nullcontext(), depth=1)
    inserts.put("w0", Message("insert", {"window_id": "w0"}, {}), [])
    inserts.thread.join(60)  # bounds a hang only: the thread ends on the error
    with pytest.raises(RuntimeError, match="insert thread failed") as info:
        for n in range(1, 4):  # the queue is full once the thread is gone: put raises, not waits
            inserts.put(f"w{n}", Message("insert", {"window_id": f"w{n}"}, {}), [])
    assert isinstance(info.value.__cause__, ValueError) and link.closed
    with pytest.raises(RuntimeError):
        inserts.finished()

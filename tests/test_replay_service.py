"""The replay service over real ZeroMQ on 127.0.0.1, in a thread and as a killed process."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import subprocess
import threading
import time

import msgpack
import numpy as np
import pytest
import zmq

from reliev3r import config as rconfig
from reliev3r import protocol
from reliev3r.security import CurveConfig, generate_keys
from reliev3r.service import Runtime
from replay import service
from replay.client import Prefetcher, ReplayClient, ReplayError
from replay.storage import DiskStorage, decode_window

KILLS = int(os.environ.get("RELIEV3R_REPLAY_KILLS", "20"))
"""SIGKILLs in the fault test (20 by default; lower it for a quick local run)."""
WRITERS = 3
HANG_S = 120.0
"""Client timeouts, joins and waits: they bound a hang only (every wait ends when the thing happened)."""


REPLAY = ("replay.sample_wait_s=0.2", "replay.min_size=2")
"""Every in-thread test's replay settings (``make_cfg`` and ``make_insert``: tests/conftest.py)."""


@contextlib.contextmanager
def serving(cfg: rconfig.PipelineConfig):
    runtime = Runtime("replay", cfg, install_signals=False, serve_metrics=False)
    result = {}
    thread = threading.Thread(target=lambda: result.setdefault("rc", service.run(cfg, runtime)), daemon=True)
    thread.start()
    try:
        yield cfg.network.connect(cfg.network.replay_port), runtime
    finally:
        runtime.stop()
        thread.join(timeout=HANG_S)
        runtime.close()
    assert result.get("rc") == 0


def metric(runtime: Runtime, name: str, **labels) -> float:
    return runtime.metrics.registry.get_sample_value(f"reliev3r_{name}", labels) or 0.0


def test_a_sample_that_times_out_on_a_replay_short_of_min_size_says_how_short(make_cfg, make_insert):
    """A learner's sample on a replay holding fewer than ``replay.min_size`` windows timed out
    with "answers not_ready: it stores fewer than replay.min_size windows, or its rate limiter
    holds samples back": the replay knew which, and how many it held, but its reply said neither."""
    cfg = make_cfg("replay.sample_wait_s=0.2", "replay.min_size=3")
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=30) as client:
        client.insert(make_insert(0))
        with pytest.raises(TimeoutError) as err:
            client.sample(2, timeout_s=1.0)  # a few not_ready answers, then the timeout
    assert "stores 1 window, fewer than replay.min_size 3" in str(err.value), err.value


def test_insert_duplicate_sample_stats(make_cfg, make_insert):
    cfg = make_cfg(*REPLAY)
    # retry_s well above any reply's time on a loaded machine: the test asserts no retry was needed
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=30) as client:
        assert client.insert(make_insert(0)) == {"window_id": "w0", "status": "stored", "reason": ""}
        assert client.insert(make_insert(0))["status"] == "duplicate"

        # Fewer than min_size windows: sample() waits (through not_ready replies) until a
        # labeler inserts more, here once the service has answered the sample not_ready.
        def insert_once_sample_waits():
            deadline = time.monotonic() + HANG_S
            while metric(runtime, "replay_not_ready_total", kind="sample") < 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            ReplayClient(endpoint, ctx=client.ctx, timeout_s=HANG_S).insert(make_insert(1))

        later = threading.Thread(target=insert_once_sample_waits)
        later.start()
        batch = client.sample(3, rank=1)
        later.join(HANG_S)
        assert metric(runtime, "replay_not_ready_total", kind="sample") >= 1
        assert batch.arrays["frames"].shape == (3, 2, 16, 16, 3)
        assert batch.arrays["teacher_depth"].shape == (3, 2, 16, 16)
        assert set(batch.meta["window_ids"]) <= {"w0", "w1"}
        assert batch.meta["probabilities"] == [0.5] * 3 and batch.meta["teacher"]["depth"]["name"] == "fake"
        w = batch.meta["window_ids"][0]
        np.testing.assert_array_equal(batch.arrays["frames"][0], make_insert(int(w[1:])).arrays["frames"])

        stats = client.stats()
        assert stats["windows"] == 2 and stats["inserts"] == 2 and stats["duplicates"] == 1
        assert stats["samples"] == 3 and stats["samples_per_insert"] == 1.5
        assert runtime.status == {"stored": 2, "inserted": 2, "sampled": 3}
        assert metric(runtime, "replay_windows") == 2 and metric(runtime, "replay_samples_total") == 3
        assert metric(runtime, "replay_batches_total") == 1  # one batch of 3 windows
        assert metric(runtime, "replay_duplicates_total", reason="window_id") == 1
        assert client.retries == 0

        client.report(["w0", "w1", "nope"], [1.0, 2.0, 3.0])  # no reply; uniform sampler ignores it
        assert client.stats()["windows"] == 2


def test_a_full_disk_refuses_inserts_by_name_and_they_are_stored_again_once_it_has_room(make_cfg, make_insert,
                                                                                        small_disk):
    """The durable store on a disk that fills up: each insert it cannot hold is answered
    "rejected" with the reason storage_full (the replay serves on, its windows intact and still
    sampled), the status says the store's writes are refused, and once space is freed the next
    inserts are stored and the status says nothing more, with no restart."""
    disk = small_disk(8 << 20)
    cfg = make_cfg(*REPLAY, f"run.dir={disk.path / 'run'}", "replay.durable=true")
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=30) as client:
        for i in range(3):
            assert client.insert(make_insert(i, size=64))["status"] == "stored"
        disk.fill()
        acks = [client.insert(make_insert(i, size=64)) for i in range(3, 9)]
        assert {(a["status"], a["reason"]) for a in acks} == {("rejected", "storage_full")}
        assert client.stats()["windows"] == 3  # a round trip: the turn that answered the last insert is over
        assert runtime.status["write_error"].startswith("inserts: "), runtime.status
        assert metric(runtime, "replay_rejected_total", reason="storage_full") == 6
        assert client.sample(2).arrays["frames"].shape == (2, 2, 64, 64, 3)  # serving what it holds
        disk.free()
        assert client.insert(make_insert(9, size=64))["status"] == "stored"
        assert client.stats()["windows"] == 4 and "write_error" not in runtime.status
    assert DiskStorage(disk.path / "run" / "replay").verify() == []


def test_a_hundred_inserts_the_full_disk_refuses_are_said_once_and_counted(make_cfg, make_insert, small_disk, ctx,
                                                                           caplog):
    """While the disk stays full, every insert is refused: each wrote two warning lines (the
    buffer's and the service's; three in a burst's group), tens a second for as long as it lasted.
    The refusal is said once per change of reason, the rest counted (``replay_rejected_total``
    by reason), and the end of the run of refusals once, with how many there were."""
    disk = small_disk(8 << 20)
    cfg = make_cfg(*REPLAY, f"run.dir={disk.path / 'run'}", "replay.durable=true")
    caplog.set_level(logging.INFO, logger="reliev3r.replay")
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=30) as client:
        assert client.insert(make_insert(0, size=64))["status"] == "stored"
        disk.fill()
        acks = [client.insert(make_insert(i, size=64)) for i in range(1, 91)]
        burst = ctx.socket(zmq.DEALER)  # ten at once: a burst read in one turn is stored as one group
        burst.setsockopt(zmq.LINGER, 0)
        burst.connect(endpoint)
        for i in range(91, 101):
            burst.send_multipart(protocol.encode(make_insert(i, size=64)))
        for _ in range(10):
            assert burst.poll(int(HANG_S * 1000))
            acks.append(protocol.decode(burst.recv_multipart()).meta)
        assert len(acks) == 100 and {(a["status"], a["reason"]) for a in acks} == {("rejected", "storage_full")}
        client.stats()  # a round trip: the turn that answered the last insert is over
        assert metric(runtime, "replay_rejected_total", reason="storage_full") == 100
        disk.free()
        assert client.insert(make_insert(101, size=64))["status"] == "stored"
        assert client.stats()["windows"] == 2
    said = {}
    for record in caplog.records:
        said.setdefault(record.getMessage(), []).append(record)
    assert [r.reason for r in said["insert rejected"]] == ["storage_full"], said.keys()
    assert len(said["insert refused by storage"]) == 1
    assert len(said.get("group insert refused; inserting one by one", [])) <= 1
    assert [(r.reason, r.rejected) for r in said["inserts stored again"]] == [("storage_full", 100)]


def test_malformed_and_bad_inserts_are_rejected_and_counted(make_cfg, make_insert):
    cfg = make_cfg(*REPLAY, "replay.max_window_bytes=20000")
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=2) as client:
        raw = client.ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(endpoint)
        raw.send_multipart([b"garbage", b"\x00\x01"])
        assert raw.poll(int(HANG_S * 1000))
        assert protocol.decode(raw.recv_multipart()).meta["reason"] == "malformed"
        frames = protocol.encode(make_insert(5))
        raw.send_multipart([*frames[:-1], b"short"])  # a buffer of the wrong size
        assert raw.poll(int(HANG_S * 1000)) and protocol.decode(raw.recv_multipart()).kind == "error"
        raw.close()
        assert metric(runtime, "messages_rejected_total", stage="replay", reason="bad_magic") == 1
        assert metric(runtime, "messages_rejected_total", stage="replay", reason="size_mismatch") == 1

        with pytest.raises(ReplayError, match="malformed"):  # the client learns at once, no timeout
            client.request(protocol.Message("heartbeat", {"stage": "x", "pid": 1}), reply_kinds=("stats",))

        assert client.insert(make_insert(0))["status"] == "stored"
        big = make_insert(1)
        big.arrays["matches"] = np.zeros((2000, 7), np.float32)
        assert client.insert(big) == {"window_id": "w1", "status": "rejected", "reason": "oversize"}
        assert client.insert(make_insert(2, size=8))["reason"] == "shape_mismatch"
        nan = make_insert(3)
        nan.arrays["teacher_depth"] = np.full((2, 16, 16), np.inf, np.float32)
        assert client.insert(nan)["reason"] == "non_finite_label"
        assert client.insert(make_insert(4))["status"] == "stored"
        stats = client.stats()
        assert stats["rejected"] == {"oversize": 1, "shape_mismatch": 1, "non_finite_label": 1}
        assert stats["windows"] == 2
        assert metric(runtime, "replay_rejected_total", reason="oversize") == 1
        assert client.sample(2).arrays["frames"].shape == (2, 2, 16, 16, 3)  # still serving


def test_arrays_numpy_cannot_build_are_answered_malformed_and_the_replay_keeps_serving(make_cfg, make_insert):
    """One message whose array has more dimensions than numpy takes, or is empty with sides
    that overflow numpy's size, costs itself: an ``error`` reply, a count by reason, and the
    replay answers the next request as before."""
    cfg = make_cfg(*REPLAY)
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=30) as client:
        assert client.insert(make_insert(0))["status"] == "stored"
        raw = client.ctx.socket(zmq.DEALER)
        raw.setsockopt(zmq.LINGER, 0)
        raw.connect(endpoint)
        try:
            absurd = ((["x", "uint8", [1] * 65], b"\x00"), (["frames", "uint8", [0, 1 << 39, 1 << 39, 3]], b""))
            for spec, buf in absurd:
                header = msgpack.packb({"kind": "insert", "meta": {}, "arrays": [spec]}, use_bin_type=True)
                raw.send_multipart([protocol.MAGIC, header, buf])
                assert raw.poll(int(HANG_S * 1000))
                assert protocol.decode(raw.recv_multipart()).meta == {"reason": "malformed", "detail": "bad_shape"}
        finally:
            raw.close()
        assert metric(runtime, "messages_rejected_total", stage="replay", reason="bad_shape") == 2
        assert client.stats()["windows"] == 1
        assert client.insert(make_insert(1))["status"] == "stored"
        assert client.sample(2).arrays["frames"].shape == (2, 2, 16, 16, 3)


def test_windows_no_camera_can_have_taken_are_refused_and_the_senders_next_ones_stored(make_cfg, make_insert):
    """Finite but impossible windows (all-zero intrinsics, a match far outside its frame) would
    make every learner step that draws them non-finite: the replay refuses each on receipt with
    a counted reason, and the windows the same sender inserts next are stored and served."""
    cfg = make_cfg(*REPLAY)
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=30) as client:
        zero = make_insert(0)
        zero.arrays["intrinsics"] = np.zeros((2, 3, 3), np.float32)
        far = make_insert(1)
        far.arrays["matches"] = np.array([[0, 1, 1e30, 3, 4, 4, 1.0]], np.float32)
        for poisoned, why in ((zero, "bad_intrinsics"), (far, "match_outside_frame")):
            with pytest.raises(ReplayError, match=rf"malformed \({why}\)") as refused:  # the sender learns why
                client.insert(poisoned)
            assert refused.value.reason == "malformed" and refused.value.detail == why
        assert metric(runtime, "messages_rejected_total", stage="replay", reason="bad_intrinsics") == 1
        assert metric(runtime, "messages_rejected_total", stage="replay", reason="match_outside_frame") == 1
        for i in (2, 3):
            assert client.insert(make_insert(i))["status"] == "stored"
        assert set(client.sample(4).meta["window_ids"]) <= {"w2", "w3"}
        assert client.stats()["windows"] == 2


def test_rate_limiter_backpressure_and_priorities(make_cfg, make_insert):
    cfg = make_cfg(*REPLAY, "replay.samples_per_insert=2.0", "replay.tolerance=4", "replay.min_size=1",
                   "replay.sampler=prioritized", "replay.priority_alpha=1.0")
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=2) as client:
        # Nobody samples: the limiter takes an insert while 2 x (inserts + 1) - samples <=
        # 2 x min_size + tolerance = 6, i.e. 3 of them; the 4th is held back for good (answered
        # rate_limited until the client gives up), on any machine.
        acked = 3
        for i in range(acked):
            assert client.insert(make_insert(i), timeout_s=60)["status"] == "stored"
        with pytest.raises(TimeoutError):
            client.insert(make_insert(acked), timeout_s=1.0)
        assert metric(runtime, "replay_not_ready_total", kind="insert") >= 1
        with pytest.raises(ReplayError, match="batch_too_large"):
            client.sample(64)
        for _ in range(4):
            client.sample(2)
        assert client.insert(make_insert(100))["status"] in ("stored", "duplicate")
        stats = client.stats()
        assert stats["samples"] == 8 and abs(stats["samples_per_insert"] - 2.0) <= (4 + 2 + 2) / stats["inserts"]

        # prioritized: a window with a much larger reported loss dominates the draws
        ids = [f"w{i}" for i in range(acked)]
        client.report(ids, [100.0] + [0.01] * (acked - 1))
        assert client.stats()["priority_updates"] == acked
        batch = client.sample(2)
        assert batch.meta["window_ids"] == ["w0", "w0"]  # P = 100 / (100 + 1 + 0.01 * k) each


def test_rate_limiter_on_the_learner_side_alone(make_cfg, make_insert):
    """``replay.limit_inserts=false``: nobody sampling holds no insert back, and the learner gets
    at most ``samples_per_insert`` per insert (plus the tolerance) and then waits."""
    cfg = make_cfg(*REPLAY, "replay.samples_per_insert=2.0", "replay.tolerance=4", "replay.min_size=1",
                   "replay.limit_inserts=false")
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=2) as client:
        for i in range(8):
            assert client.insert(make_insert(i), timeout_s=60)["status"] == "stored"
        assert metric(runtime, "replay_not_ready_total", kind="insert") == 0
        # diff = 2 x inserts - samples - forgone stays <= 2 x min_size + tolerance = 6 (the rest of
        # the idle learner's credit is dropped); a draw of 2 goes ahead while diff - 2 >= 2 - 4:
        # four of them, then one per insert.
        for _ in range(4):
            client.sample(2)
        with pytest.raises(TimeoutError):
            client.sample(2, timeout_s=1.0)
        # The request given up on may still be served when credit comes (to nobody): two inserts'
        # worth leave a draw for the next one either way, and the bound holds.
        for i in (100, 101):
            assert client.insert(make_insert(i))["status"] == "stored"
        client.sample(2)
        stats = client.stats()
        assert stats["samples"] <= 2 * (stats["inserts"] - 1) + 4


def test_a_batch_over_the_reply_limit_is_refused_with_its_size(make_cfg, make_insert, monkeypatch):
    """A batch larger than a client takes (protocol.DEFAULT_MAX_BYTES; here a few windows'
    worth, for service and client alike) is refused at once as batch_too_large, naming its size,
    the limit and what to change; before, the service sent it, the client dropped it as a broken
    reply and asked again until its timeout. No retry, no sample counted; a smaller batch is served."""
    limit = 4 * max(make_insert(i).nbytes() for i in range(3))  # a batch of 2 fits, one of 8 does not
    monkeypatch.setattr(service, "MAX_REPLY_BYTES", limit, raising=False)
    cfg = make_cfg(*REPLAY)
    with serving(cfg) as (endpoint, runtime), \
            ReplayClient(endpoint, timeout_s=HANG_S, retry_s=HANG_S / 4, max_bytes=limit) as client:
        for i in range(3):
            assert client.insert(make_insert(i))["status"] == "stored"
        with pytest.raises(ReplayError, match="batch_too_large") as refused:
            client.sample(8)
        assert client.retries == 0
        assert f"over the {limit} bytes" in refused.value.detail and "learner.batch_size" in refused.value.detail
        assert client.stats()["samples"] == 0
        assert client.sample(2).arrays["frames"].shape[0] == 2


def test_each_client_is_served_batches_up_to_its_own_limit(make_cfg, make_insert, monkeypatch):
    """A sample request carries its client's ``max_bytes`` (protocol version 3): the replay
    refuses a batch over the requester's limit, capped at MAX_REPLY_BYTES, as batch_too_large
    naming that limit, and serves the same batch to a client that takes it. Before, every
    request was held to MAX_REPLY_BYTES alone: a client of a smaller ``max_bytes`` was sent the
    batch, dropped it as a broken reply and asked again until its timeout. A request that names
    no limit (an older sender's) is held to MAX_REPLY_BYTES; so is its prefetcher's."""
    window = max(make_insert(i).nbytes() for i in range(3))
    small, cap = 3 * window, 12 * window  # a batch of 2 fits the small client, one of 8 the cap
    monkeypatch.setattr(service, "MAX_REPLY_BYTES", cap)
    cfg = make_cfg(*REPLAY)
    with serving(cfg) as (endpoint, runtime), \
            ReplayClient(endpoint, timeout_s=HANG_S, retry_s=HANG_S / 4, max_bytes=small) as little, \
            ReplayClient(endpoint, timeout_s=HANG_S, retry_s=HANG_S / 4, max_bytes=100 * window) as big:
        for i in range(3):
            assert little.insert(make_insert(i))["status"] == "stored"
        with pytest.raises(ReplayError, match="batch_too_large") as refused:
            little.sample(8)
        assert little.retries == 0 and f"over the {small} bytes" in refused.value.detail, refused.value.detail
        assert big.sample(8).arrays["frames"].shape[0] == 8
        assert little.sample(2).arrays["frames"].shape[0] == 2
        fetch = little.prefetch(8, depth=1)
        with pytest.raises(ReplayError, match="batch_too_large"):
            next(fetch)
        fetch.close()
        monkeypatch.setattr(service, "MAX_REPLY_BYTES", 4 * window)  # the replay's cap holds for every client
        with pytest.raises(ReplayError, match="batch_too_large") as refused:
            big.sample(8)
        assert f"over the {4 * window} bytes" in refused.value.detail, refused.value.detail
        unnamed = protocol.Message("sample", {"batch_size": 8, "rank": 0})
        with pytest.raises(ReplayError, match="batch_too_large") as refused:
            big.request(unnamed, reply_kinds=("batch",))
        assert f"over the {4 * window} bytes" in refused.value.detail, refused.value.detail
        for bad in (0, -1, True, 1.5, "big"):
            with pytest.raises(ReplayError, match="bad_sample_request"):
                big.request(protocol.Message("sample", {"batch_size": 2, "max_bytes": bad}), reply_kinds=("batch",))
        assert big.stats()["samples"] == 8 + 2


def test_a_sample_of_a_rank_past_the_most_ranks_is_refused_naming_it(make_cfg, make_insert):
    """The sampler keeps a random stream for every rank a sample names (and saves them with the
    store); the service checked only ``rank >= 0``, so a client naming rank after rank grew that
    state without bound. A rank of ``protocol.MAX_RANKS`` or more is refused at once as
    bad_sample_request, naming the rank and the limit, and counted; the ranks below it are served."""
    cfg = make_cfg(*REPLAY)
    with serving(cfg) as (endpoint, runtime), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=30) as client:
        for i in range(3):
            assert client.insert(make_insert(i))["status"] == "stored"
        for rank in (protocol.MAX_RANKS, 10 ** 12):
            with pytest.raises(ReplayError, match="bad_sample_request") as refused:
                client.sample(2, rank=rank)
            assert f"rank {rank}" in refused.value.detail, refused.value.detail
            assert f"protocol.MAX_RANKS {protocol.MAX_RANKS}" in refused.value.detail, refused.value.detail
        assert client.retries == 0
        assert metric(runtime, "messages_rejected_total", stage="replay", reason="bad_sample_request") == 2
        assert client.sample(2, rank=protocol.MAX_RANKS - 1).arrays["frames"].shape[0] == 2
        assert client.stats()["samples"] == 2


def test_prefetch_and_restart_with_retry(make_cfg, make_insert, wait_for):
    cfg = make_cfg(*REPLAY, "replay.durable=true")
    endpoint = cfg.network.connect(cfg.network.replay_port)
    with serving(cfg), ReplayClient(endpoint, timeout_s=HANG_S, retry_s=1) as client:
        for i in range(3):
            client.insert(make_insert(i))
        fetch = client.prefetch(2, rank=0, depth=2)
        batches = [next(fetch) for _ in range(3)]
        fetch.close()
        assert all(b.arrays["frames"].shape == (2, 2, 16, 16, 3) for b in batches)
        # prepare: run in the thread, each batch handed out with what it made of it
        fetch = Prefetcher(endpoint, 2, 0, depth=1, ctx=client.ctx, timeout_s=HANG_S, retry_s=1,
                           prepare=lambda b: (threading.current_thread().name, b.arrays["frames"].sum()))
        pairs = [fetch.get(HANG_S) for _ in range(2)]
        fetch.close()
        for batch, (thread, total) in pairs:
            assert thread.startswith("replay-prefetch") and total == batch.arrays["frames"].sum()
    # the service is down: a request sent now is lost; the client retries on a fresh socket
    # and gets its answer from the restarted (durable) service.
    client = ReplayClient(endpoint, timeout_s=120, retry_s=0.5)
    box = {}
    asker = threading.Thread(target=lambda: box.setdefault("stats", client.stats()))
    asker.start()
    wait_for(lambda: client.retries >= 1, 60, "the client to retry")  # nobody answers while the service is down
    with serving(cfg):
        asker.join(timeout=120)
        assert box["stats"]["windows"] == 3 and box["stats"]["samples"] >= 6  # prefetch runs ahead
        assert client.retries >= 1
        client.close()


def test_prefetcher_close_ends_a_request_that_waits_for_a_silent_replay(ctx, wait_for):
    """close() while the thread waits for a reply that never comes (a replay that is down or
    hung): the wait ends at once instead of running out its timeout, and the thread ends."""
    timeout_s = 60.0  # the request's own wait: close() must not sit it out
    silent = ctx.socket(zmq.ROUTER)  # takes the request, never answers
    silent.setsockopt(zmq.LINGER, 0)
    port = silent.bind_to_random_port("tcp://127.0.0.1")
    fetch = Prefetcher(f"tcp://127.0.0.1:{port}", 2, 0, depth=1, ctx=ctx, timeout_s=timeout_s, retry_s=timeout_s)
    try:
        wait_for(lambda: silent.poll(0, zmq.POLLIN), HANG_S, "the prefetcher's sample request")
        start = time.monotonic()
        fetch.close()
        assert time.monotonic() - start < timeout_s / 2
        assert not fetch._thread.is_alive()
        assert fetch.get(0.0) is None  # the stop is no error handed to a consumer
    finally:
        fetch._stop.set()
        fetch._thread.join(timeout=HANG_S)
        silent.close(linger=0)


def test_curve_replay_refuses_clients_without_keys(tmp_path, make_cfg, make_insert, wait_for):
    generate_keys(tmp_path / "keys", clients=("client", "stranger"))
    cfg = make_cfg(*REPLAY)
    cfg.network.curve = CurveConfig.from_folder(tmp_path / "keys")
    stranger = CurveConfig.from_folder(tmp_path / "keys")
    stranger.client_secret_key = str(tmp_path / "keys" / "stranger.key_secret")
    stranger.client_public_key = str(tmp_path / "keys" / "stranger.key")
    (tmp_path / "keys" / "authorized_clients" / "stranger.key").unlink()  # a valid key pair, not authorised
    with serving(cfg) as (endpoint, runtime):
        for curve in (None, stranger):
            with ReplayClient(endpoint, timeout_s=1.0, retry_s=0.4, curve=curve) as outsider:
                # refused: every call times out; calls until one retried (a stalled machine can
                # reach the 1 s timeout before the first 0.4 s attempt is over)
                deadline = time.monotonic() + HANG_S
                while outsider.retries < 1 and time.monotonic() < deadline:
                    with pytest.raises(TimeoutError):
                        outsider.insert(make_insert(0))
                assert outsider.retries >= 1  # each retry's fresh socket was refused as well
        wait_for(lambda: metric(runtime, "auth_failures_total", stage="replay") >= 1, HANG_S,
                 "the unauthorised key counted as an auth failure")
        with ReplayClient(endpoint, timeout_s=HANG_S, retry_s=2, curve=cfg.network.curve) as client:
            assert client.insert(make_insert(1))["status"] == "stored"
            assert client.insert(make_insert(2))["status"] == "stored"
            fetch = client.prefetch(2)  # the prefetch thread's socket carries the keys too
            assert next(fetch).arrays["frames"].shape == (2, 2, 16, 16, 3)
            fetch.close()
            stats = client.stats()
        assert stats["windows"] == 2 and stats["inserts"] == 2  # nothing from the outsiders arrived


@contextlib.contextmanager
def refused_client(tmp_path, make_cfg):
    """A replay serving CURVE and a client whose key (``late``) is not in its authorized_clients,
    once a request has seen the refusal: yields the client and what authorises its key."""
    keys = tmp_path / "keys"
    generate_keys(keys, clients=("client", "late"))
    cfg = make_cfg(*REPLAY)
    cfg.network.curve = CurveConfig.from_folder(keys)
    late = CurveConfig.from_folder(keys)
    late.client_secret_key, late.client_public_key = str(keys / "late.key_secret"), str(keys / "late.key")
    (keys / "authorized_clients" / "late.key").unlink()
    with serving(cfg) as (endpoint, runtime):
        with ReplayClient(endpoint, timeout_s=1.0, retry_s=0.4, curve=late) as client:
            said, deadline = "", time.monotonic() + HANG_S  # bounds a hang only: one handshake tells
            while "not in the replay's authorized_clients" not in said and time.monotonic() < deadline:
                with pytest.raises(TimeoutError) as refused:
                    client.stats()
                said = str(refused.value)
            assert "not in the replay's authorized_clients" in said  # the socket left was refused
            authorised = keys / "authorized_clients" / "late.key"
            yield client, lambda: authorised.write_bytes((keys / "late.key").read_bytes())


def test_a_replay_client_refused_by_curve_gets_through_once_its_key_is_authorised(tmp_path, make_cfg, make_insert,
                                                                                   wait_for):
    """A learner or labeler whose key replay did not hold waited until replay restarted (it read
    authorized_clients once). The same client, kept running, now gets through once the key is
    copied in: replay reads the folder again, and each retry of a request is a fresh socket."""
    with refused_client(tmp_path, make_cfg) as (client, authorise):
        authorise()
        assert client.insert(make_insert(1), timeout_s=HANG_S)["status"] == "stored"


def test_a_priority_report_never_blocks_on_a_link_curve_refused(tmp_path, make_cfg):
    """``report`` is fire and forget, sent by the learner's training thread: on a socket whose
    key the replay refused (ZeroMQ drops its pipe) its blocking send never returned, and the
    learner would have hung at its next step. It now returns at once, the report dropped (a
    priority is advice); once the key is authorised, reports alone get a fresh socket through."""
    with refused_client(tmp_path, make_cfg) as (client, authorise):
        reported = threading.Thread(target=lambda: [client.report(["w"], [1.0]) for _ in range(3)], daemon=True)
        reported.start()
        reported.join(HANG_S)  # bounds a hang only: a send that does not block returns at once
        assert not reported.is_alive(), "report blocked on the refused link"
        # authorised: reports alone (no request) replace the refused socket after the link's back-off
        authorise()
        deadline = time.monotonic() + HANG_S  # bounds a hang only: the back-off is seconds
        while not client.link.up and time.monotonic() < deadline:
            client.report(["w"], [1.0])
            time.sleep(0.2)
            client.link.poll()
        assert client.link.up, client.link.why()


# --------------------------------------------------------------------------- fault test

@pytest.mark.slow
def test_sigkill_loses_no_acknowledged_window(tmp_path, make_insert, reliev3r_process):
    """Three writers insert continuously (so the service stores their inserts in group
    commits) while it is SIGKILLed ``KILLS`` times at random moments and restarted: every
    acknowledged window is stored intact afterwards."""
    port = rconfig.free_port()
    cfg_path = tmp_path / "replay.yaml"
    cfg_path.write_text("replay:\n  min_size: 1\n  sample_wait_s: 0.2\n  flush_interval_s: 0.2\n")
    run_dir = tmp_path / "run"
    endpoint = f"tcp://127.0.0.1:{port}"
    acked: dict[str, str] = {}
    stop = threading.Event()
    errors: list[BaseException] = []

    def writer(first: int):
        client = ReplayClient(endpoint, timeout_s=120, retry_s=0.3)  # bounds a hang: a restart is seconds
        i = first
        try:
            while not stop.is_set():
                ack = client.insert(make_insert(i))
                assert ack["status"] in ("stored", "duplicate"), ack  # duplicate: a retry after a kill
                acked[ack["window_id"]] = ack["status"]
                i += 1
        except BaseException as err:  # surfaced in the main thread
            if not stop.is_set():
                errors.append(err)
        finally:
            client.close()

    def spawn() -> subprocess.Popen:
        return reliev3r_process("replay", "--config", cfg_path, "replay.durable=true", f"run.dir={run_dir}",
                                f"network.replay_port={port}", "monitoring.enabled=false", "run.log_level=WARNING",
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    rng = random.Random(0)
    proc = spawn()
    threads = [threading.Thread(target=writer, args=(n * 1_000_000,), daemon=True) for n in range(WRITERS)]
    for thread in threads:
        thread.start()
    start = time.monotonic()
    try:
        for kill in range(KILLS):
            before = len(acked)
            deadline = time.monotonic() + 120  # bounds a hang, whatever the machine's speed
            while len(acked) <= before and time.monotonic() < deadline and not errors:
                time.sleep(0.02)  # wait until this incarnation has acknowledged something
            assert not errors and len(acked) > before, f"no progress after restart {kill}"
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=HANG_S)
            proc = spawn()
        time.sleep(0.5)
    finally:
        stop.set()
        for thread in threads:
            thread.join(timeout=HANG_S)
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=HANG_S)
        stderr = proc.stderr.read().decode(errors="replace")
    assert not errors, errors
    assert rc == 0, stderr[-2000:]
    elapsed = time.monotonic() - start

    storage = DiskStorage(run_dir / "replay")
    try:
        assert storage.verify() == []  # every stored payload passes its checksum
        missing = [w for w in acked if w not in storage]
        assert not missing, f"{len(missing)} acknowledged windows lost: {missing[:5]}"
        for key in storage.records:  # nothing half-present: each window is whole and exact
            window = decode_window(storage.get(key))
            want = make_insert(int(window.meta["window_id"][1:]))
            for name, arr in want.arrays.items():
                np.testing.assert_array_equal(window.arrays[name], arr)
        assert len(storage) >= len(acked) and len(storage) <= len(acked) + WRITERS * KILLS
    finally:
        storage.close()
    print(f"{KILLS} kills, {len(acked)} acknowledged windows, {elapsed:.1f} s")

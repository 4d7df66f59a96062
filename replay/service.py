"""The replay process: a ZeroMQ ROUTER in front of a :class:`ReplayBuffer`.

Requests come from DEALER peers (labelers insert, learners sample); each reply goes to the
peer's identity and echoes the request's ``meta.request_id`` when it has one, so a client
that retried can drop stale replies.

* ``insert``  -> ``insert_ack`` {window_id, status, reason}, sent only after the window is
  stored (committed to disk in durable mode). Rejections and duplicates are answered at once.
  The inserts of one burst of requests (up to 64 read in one loop turn, e.g. from several
  labelers) are stored as one group commit, and each is acknowledged after that commit.
  When the rate limiter holds inserts back, the insert waits on the service up to
  ``replay.sample_wait_s``, then gets ``error`` {reason: "rate_limited", window_id}: the
  client sends it again (re-sending is safe: a stored window_id answers "duplicate").
  More than ``replay.max_pending`` waiting inserts: ``insert_ack`` rejected "overloaded".
* ``sample``  -> ``batch`` as soon as ``min_size`` windows are stored and the limiter allows;
  the request waits on the service (the event loop never blocks) up to
  ``replay.sample_wait_s``, then gets ``error`` {reason: "not_ready"} and the client asks
  again, until its own timeout. A batch larger than the limiter can ever grant gets
  ``error`` "batch_too_large" at once; so does one whose arrays would exceed what its client
  takes (the request's ``max_bytes``, at most :data:`MAX_REPLY_BYTES`; that, for a request
  without one), when it is drawn, with ``detail``: its size, the limit and what to change
  (nothing counted: no limiter credit spent).
* ``priorities`` -> no reply (learners fire and forget); unknown window ids are ignored.
* ``stats``   -> ``stats`` with the buffer's counters and the number of waiting requests.
* anything malformed -> ``error`` {reason: "malformed", detail: the decoder's reason} (already
  counted by the runtime).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import zmq

from monitoring.metrics import Metrics
from reliev3r import protocol, security
from reliev3r.config import PipelineConfig
from reliev3r.service import Runtime, serve
from replay.buffer import BatchTooLarge, ReplayBuffer
from replay.storage import StorageFull

KINDS = ("insert", "sample", "priorities", "stats")
POLL_MS = 100
MAX_REPLY_BYTES = protocol.DEFAULT_MAX_BYTES
"""The most bytes of arrays a batch may carry: what a :class:`replay.client.ReplayClient` takes
by default (its ``max_bytes``), and what the replay assumes of a ``sample`` request that names
no ``max_bytes`` (a sender older than protocol version 3). A request's own ``max_bytes`` lowers
the limit for its batch, never raises it past this: a larger batch would be dropped by the
client as a broken reply."""


def _whole(value) -> bool:
    """An int of the request's meta (msgpack's; a bool is none)."""
    return isinstance(value, int) and not isinstance(value, bool)


@dataclass(slots=True)
class _Waiting:
    identity: bytes
    msg: protocol.Message
    deadline: float


class ReplayMetrics:
    """The replay's Prometheus series (the buffer's counters are copied in by
    :meth:`ReplayService.publish`)."""

    def __init__(self, m: Metrics):
        self.windows = m.gauge("replay_windows", "Windows stored")
        self.bytes = m.gauge("replay_bytes", "Payload bytes stored")
        self.ratio = m.gauge("replay_samples_per_insert", "Actual sampled windows per inserted window")
        self.waiting = m.gauge("replay_waiting_requests", "Requests held back", ["kind"])
        self.inserts = m.counter("replay_inserts_total", "Windows stored")
        self.samples = m.counter("replay_samples_total", "Windows sampled (batch_size per batch)")
        self.batches = m.counter("replay_batches_total", "Batches served")
        self.evictions = m.counter("replay_evictions_total", "Windows evicted to make room")
        self.duplicates = m.counter("replay_duplicates_total", "Inserts answered duplicate", ["reason"])
        self.rejected = m.counter("replay_rejected_total", "Inserts rejected, by reason", ["reason"])
        self.corrupt = m.counter("replay_corrupt_total", "Stored windows that failed their checksum")
        self.not_ready = m.counter("replay_not_ready_total", "Requests answered not_ready/rate_limited", ["kind"])
        self.insert_s = m.histogram("replay_insert_seconds", "Time to store a window (its group commit)",
                                    buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0))
        self.sample_s = m.histogram("replay_sample_seconds", "Time to read and stack one batch",
                                    buckets=(1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 1.0))


class ReplayService:
    """The ROUTER socket and the buffer behind it, and the requests waiting on the buffer;
    ``step()`` is one loop turn."""

    def __init__(self, cfg: PipelineConfig, runtime: Runtime, metrics: ReplayMetrics):
        sock = runtime.ctx.socket(zmq.ROUTER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.MAXMSGSIZE, protocol.DEFAULT_MAX_BYTES + (1 << 20))
        try:
            # CURVE (when network.curve is enabled) must be set before bind: libzmq copies the
            # socket's options into the listener at bind time, as it does MAXMSGSIZE above.
            security.secure_server(sock, cfg.network.curve, runtime.metrics)
            # Bind before opening the store: a second instance fails here, before it could
            # touch the store the first one is serving.
            sock.bind(cfg.network.bind(cfg.network.replay_port))
            buffer = ReplayBuffer.open(cfg.replay, cfg.run_dir, seed=cfg.run.seed)
        except BaseException:
            sock.close(linger=0)
            raise
        self.buffer, self.sock, self.runtime, self.metrics = buffer, sock, runtime, metrics
        self.cfg = buffer.cfg
        self.inserts: deque[_Waiting] = deque()
        self.samples: deque[_Waiting] = deque()
        self.group: list[tuple[bytes, protocol.Message]] = []
        """Inserts of this loop turn, stored together by :meth:`commit_group`."""
        self.rejecting: str | None = None
        """The reason of the inserts rejected since the last one stored (said once), None when the
        last insert answered was stored."""
        self.rejected = 0
        """How many inserts were rejected for :attr:`rejecting` in a row."""
        try:
            if buffer.storage.records:
                runtime.log.info("replay store restored", extra={"windows": len(buffer.storage),
                                                                 "bytes": buffer.storage.nbytes})
            self._seen = dict(buffer.counts)
            self.publish()
            runtime.log.info("replay serving", extra={"endpoint": cfg.network.bind(cfg.network.replay_port),
                                                      "durable": cfg.replay.durable, "sampler": cfg.replay.sampler})
        except BaseException:
            self.close()
            raise
        self.last_flush = time.monotonic()

    def close(self) -> None:
        self.sock.close(linger=0)
        try:
            self.buffer.close()
        except StorageFull as err:  # its windows are safe: only the bookkeeping since the last flush is lost
            self.runtime.log.warning("replay flush at close failed: sample counts and priorities since the last "
                                     "flush are lost", extra={"detail": str(err)})

    # ------------------------------------------------------------------ replies
    def _send(self, identity: bytes, reply: protocol.Message, request: protocol.Message | None) -> None:
        if request is not None and "request_id" in request.meta:
            reply.meta["request_id"] = request.meta["request_id"]
        try:
            self.sock.send_multipart([identity, *protocol.encode(reply)], copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:  # peer's queue full or gone: it will time out and retry
            self.runtime.log.warning("reply dropped", extra={"kind": reply.kind})

    def _ack(self, identity: bytes, msg: protocol.Message, status: str, reason: str) -> None:
        meta = {"window_id": msg.meta.get("window_id", ""), "status": status, "reason": reason}
        self._send(identity, protocol.Message("insert_ack", meta), msg)

    # ------------------------------------------------------------------ requests
    def handle(self, identity: bytes, msg: protocol.Message | None) -> None:
        if msg is None:
            if identity is not None:
                self._send(identity, protocol.error_reply("malformed", self.runtime.rejected), None)
            return
        if msg.kind == "insert":
            self._on_insert(identity, msg)
        elif msg.kind == "sample":
            self._on_sample(identity, msg)
        elif msg.kind == "priorities":
            ids, losses = msg.meta.get("window_ids"), msg.meta.get("losses")
            if isinstance(ids, list) and isinstance(losses, list) and len(ids) == len(losses):
                self.buffer.update_priorities([str(i) for i in ids],
                                              [x if isinstance(x, (int, float)) else float("nan") for x in losses])
            else:
                self.runtime.metrics.reject("bad_priorities")
        elif msg.kind == "stats":
            meta = {**self.buffer.stats(), "waiting_inserts": len(self.inserts), "waiting_samples": len(self.samples)}
            self._send(identity, protocol.Message("stats", meta), msg)

    def _on_insert(self, identity: bytes, msg: protocol.Message) -> None:
        verdict = self.buffer.check(msg)
        if verdict is not None:
            self._answer(identity, msg, self.buffer.insert(msg))  # counts it; writes nothing
        elif self.inserts or not self.buffer.can_insert(len(self.group) + 1):
            if len(self.inserts) >= self.cfg.max_pending:
                self.buffer.counts["rejected:overloaded"] += 1
                self._ack(identity, msg, "rejected", "overloaded")
            else:
                self.inserts.append(_Waiting(identity, msg, time.monotonic() + self.cfg.sample_wait_s))
        else:
            self.group.append((identity, msg))

    def commit_group(self) -> None:
        """Store this turn's inserts in one group commit, then acknowledge each."""
        if not self.group:
            return
        group, self.group = self.group, []
        start = time.perf_counter()
        results = self.buffer.insert_many([msg for _, msg in group])
        elapsed = time.perf_counter() - start
        for (identity, msg), result in zip(group, results):
            if result.status == "stored":
                self.metrics.insert_s.observe(elapsed)
            self._answer(identity, msg, result)

    def _answer(self, identity: bytes, msg: protocol.Message, result) -> None:
        """Acknowledge an insert. A rejected one is said once per change of reason (a full disk
        refuses every insert, tens a second, for as long as it lasts): the rest are counted in
        ``replay_rejected_total`` by reason, and the first stored after more than one rejected says
        how many were."""
        if result.status == "duplicate":
            self.metrics.duplicates.labels(result.reason).inc()
        elif result.status == "rejected":
            if result.reason != self.rejecting:
                self.runtime.log.warning("insert rejected", extra={
                    "window_id": msg.meta.get("window_id"), "reason": result.reason,
                    "note": "said once while inserts are rejected for this reason; each is counted"})
                self.rejecting, self.rejected = result.reason, 0
            self.rejected += 1
        elif result.status == "stored" and self.rejecting is not None:
            if self.rejected > 1:  # one was said by its own line
                self.runtime.log.info("inserts stored again", extra={"reason": self.rejecting,
                                                                     "rejected": self.rejected})
            self.rejecting, self.rejected = None, 0
        self._ack(identity, msg, result.status, result.reason)

    def _on_sample(self, identity: bytes, msg: protocol.Message) -> None:
        n, rank, limit = msg.meta.get("batch_size"), msg.meta.get("rank", 0), msg.meta.get("max_bytes", 1)
        if not (_whole(n) and 1 <= n <= protocol.MAX_SAMPLE_WINDOWS and _whole(rank) and rank >= 0
                and _whole(limit) and limit >= 1):
            self.runtime.metrics.reject("bad_sample_request")
            self._send(identity, protocol.error_reply("bad_sample_request"), msg)
        elif rank >= protocol.MAX_RANKS:  # each rank has a random stream in the sampler: bounded
            self.runtime.metrics.reject("bad_sample_request")
            detail = f"rank {rank}: a learner rank is below protocol.MAX_RANKS {protocol.MAX_RANKS}"
            self._send(identity, protocol.error_reply("bad_sample_request", detail), msg)
        elif n > (most := self.buffer.max_batch()):
            detail = (f"a batch of {n} windows; the rate limiter grants at most {most}: lower learner.batch_size, "
                      f"or raise replay.tolerance")
            self._send(identity, protocol.error_reply("batch_too_large", detail), msg)
        else:
            self.samples.append(_Waiting(identity, msg, time.monotonic() + self.cfg.sample_wait_s))

    # ------------------------------------------------------------------ waiting requests
    def serve_waiting(self) -> None:
        """Answer what the buffer now allows, in arrival order; expire the rest."""
        self.commit_group()
        while self.inserts and self.buffer.can_insert(len(self.group) + 1):
            w = self.inserts.popleft()
            self.group.append((w.identity, w.msg))
        self.commit_group()
        while self.samples and self.buffer.can_sample(self.samples[0].msg.meta["batch_size"]):
            w = self.samples.popleft()
            start = time.perf_counter()
            try:
                limit = min(w.msg.meta.get("max_bytes", MAX_REPLY_BYTES), MAX_REPLY_BYTES)
                batch = self.buffer.sample(w.msg.meta["batch_size"], w.msg.meta.get("rank", 0), max_bytes=limit)
            except LookupError:
                self.samples.appendleft(w)
                break
            except BatchTooLarge as err:
                self.runtime.log.warning("sample refused: batch too large", extra={"detail": str(err)})
                self._send(w.identity, protocol.error_reply("batch_too_large", str(err)), w.msg)
                continue
            self.metrics.sample_s.observe(time.perf_counter() - start)
            self.metrics.batches.inc()  # before the send: a client that has its batch sees it counted
            self._send(w.identity, batch, w.msg)
        now = time.monotonic()
        for queue, kind, reason in ((self.inserts, "insert", "rate_limited"), (self.samples, "sample", "not_ready")):
            while queue and queue[0].deadline <= now:
                w = queue.popleft()
                self.metrics.not_ready.labels(kind).inc()
                reply = protocol.error_reply(reason, self.buffer.sample_wait(w.msg.meta["batch_size"])
                                             if kind == "sample" else "")
                if kind == "insert":
                    reply.meta["window_id"] = w.msg.meta.get("window_id", "")
                self._send(w.identity, reply, w.msg)

    def publish(self) -> None:
        """Copy the buffer's counters into metrics and the status line."""
        b, c = self.buffer, self.buffer.counts
        for key, counter in (("inserts", self.metrics.inserts), ("samples", self.metrics.samples),
                             ("evictions", self.metrics.evictions), ("corrupt", self.metrics.corrupt)):
            counter.inc(c[key] - self._seen.get(key, 0))
        for key, value in c.items():
            delta = value - self._seen.get(key, 0)
            if delta and key.startswith("rejected:"):
                self.metrics.rejected.labels(key.split(":", 1)[1]).inc(delta)
        self._seen = dict(c)
        self.metrics.windows.set(len(b.storage))
        self.metrics.bytes.set(b.storage.nbytes)
        self.metrics.ratio.set(b.limiter.ratio())
        self.metrics.waiting.labels("insert").set(len(self.inserts))
        self.metrics.waiting.labels("sample").set(len(self.samples))
        self.runtime.status.update({"stored": len(b.storage), "inserted": c["inserts"], "sampled": c["samples"]})
        if b.refused is not None:  # a full disk: inserts are answered rejected/storage_full until it has room
            self.runtime.status["write_error"] = f"inserts: {b.refused}"
        else:
            self.runtime.status.pop("write_error", None)

    def step(self, timeout_ms: int = POLL_MS) -> None:
        """Handle a burst of requests (at most 64, so waiting ones are not starved), then
        answer waiting requests, refresh metrics and, every ``replay.flush_interval_s``,
        flush the buffer's bookkeeping."""
        if self.sock.poll(timeout_ms, zmq.POLLIN):
            for _ in range(64):
                self.handle(*self.runtime.receive(self.sock, kinds=KINDS, routed=True))
                if not self.sock.poll(0, zmq.POLLIN):
                    break
        self.serve_waiting()
        self.publish()
        if time.monotonic() - self.last_flush >= self.cfg.flush_interval_s:
            self.last_flush = time.monotonic()
            try:
                self.buffer.flush()
            except StorageFull as err:  # bookkeeping only; windows are already safe
                self.runtime.log.warning("replay flush failed", extra={"detail": str(err)})


def run(cfg: PipelineConfig, runtime: Runtime) -> int:
    return serve(ReplayService(cfg, runtime, ReplayMetrics(runtime.metrics)), runtime)

"""Client of the replay service for labelers (insert) and learners (sample, report).

Every request carries ``meta.request_id``; the service echoes it, so a late reply to an
earlier attempt is recognised and dropped. A request that gets no reply within ``retry_s``
(service restarting, message lost with a killed process) is sent again on a fresh DEALER
socket: re-sending is safe, since a stored window_id answers "duplicate" and a sample is
idempotent from the client's view. A socket whose CURVE key the replay refused is replaced
before the next request too (ZeroMQ never offers the key again on it), so a client whose key
is authorised later gets through without a restart. Not thread-safe: one client per thread (``prefetch``
opens its own).
"""

from __future__ import annotations

import itertools
import os
import queue
import threading
import time
from typing import Any, Callable, Iterator

import numpy as np
import zmq

from reliev3r import protocol, security
from reliev3r.security import CurveConfig

RETRY_REASONS = ("not_ready", "rate_limited")
WAIT_SLICE_S = 0.1
"""A request waits for its reply in slices this long, checking its client's ``stop`` between them."""


class ReplayError(RuntimeError):
    """The service refused a request for a reason retrying will not fix; ``reason`` says why
    (``detail``: what was malformed about it, where the service says)."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason} ({detail})" if detail else reason)
        self.reason, self.detail = reason, detail


class Cancelled(Exception):
    """A request given up because its client's ``stop`` was set (:meth:`Prefetcher.close`)."""


class ReplayClient:
    def __init__(self, endpoint: str, *, ctx: zmq.Context | None = None, timeout_s: float = 60.0,
                 retry_s: float = 5.0, max_bytes: int = protocol.DEFAULT_MAX_BYTES,
                 curve: CurveConfig | None = None, stop: threading.Event | None = None):
        """``timeout_s``: how long a call may take in all; ``retry_s``: how long one attempt
        waits for any reply before re-sending on a fresh socket (keep it above the
        service's ``replay.sample_wait_s``); ``curve``: the client keys for a CURVE-enabled
        service (``cfg.network.curve``), applied to every socket this client opens; ``max_bytes``:
        the most bytes of arrays a reply may carry (larger ones are dropped as broken), sent with
        each sample request so the replay refuses a larger batch as ``batch_too_large``; ``stop``:
        once set (by another thread), a request waiting for its reply raises :class:`Cancelled`
        within ``WAIT_SLICE_S``."""
        if timeout_s <= 0 or retry_s <= 0:
            raise ValueError("timeout_s and retry_s must be > 0")
        self.endpoint = endpoint
        self.timeout_s, self.retry_s, self.max_bytes = timeout_s, retry_s, max_bytes
        self.curve, self.stop = curve, stop
        self._own_ctx = ctx is None
        self.ctx = ctx or zmq.Context()
        self._ids = itertools.count()
        self._prefix = f"{os.getpid()}-{id(self):x}-"
        self._sock: zmq.Socket | None = None
        self.link = security.LinkWatch(endpoint, "replay", "replay_port", curve)
        """The link's state across this client's sockets: a timeout says why nothing came back."""
        self.last_answer = self.last_detail = ""
        """The last "try again" answer (``not_ready``, ``rate_limited``) to the request under way,
        and the service's words on it (a sample's: how many windows it stores against min_size)."""
        self.retries = 0
        """Requests re-sent after a silent attempt (a restarted or overloaded service)."""

    # ------------------------------------------------------------------ plumbing
    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            sock = self.ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            security.secure_client(sock, self.curve)  # also on the fresh socket of a retry
            self.link.watch(sock)
            sock.connect(self.endpoint)
            self._sock = sock
        return self._sock

    def _reset(self) -> None:
        if self._sock is not None:
            self.link.close()
            self._sock.close(linger=0)
            self._sock = None

    def _send(self, msg: protocol.Message, *, request: bool = True) -> None:
        """Send ``msg`` without blocking on a socket that can take it. A socket whose key the
        replay refused takes no message (a blocking send there never returned) and never offers
        the key again, so it is replaced by a fresh one (the replay admits a key authorised since
        without a restart): before a ``request``, as a retry's is; before a report only when the
        link's back-off says (:meth:`reliev3r.security.LinkWatch.rejoin_due`: reports come at
        every training step, and each fresh socket is a handshake the replay refuses and counts).
        A send the socket does not take now (refused, or its queue full) is dropped: a request's
        silence retries it; a priority report is advice."""
        self.link.poll()
        if self.link.refused and (request or self.link.rejoin_due()):
            self._reset()
        try:
            self._socket().send_multipart(protocol.encode(msg), copy=False, flags=zmq.NOBLOCK)
        except zmq.Again:
            pass

    def request(self, msg: protocol.Message, *, reply_kinds: tuple[str, ...],
                timeout_s: float | None = None) -> protocol.Message:
        """Send ``msg`` and return its reply (one of ``reply_kinds``); retry ``error``
        replies "not_ready"/"rate_limited" and silent attempts until ``timeout_s``; raise
        ``TimeoutError`` then, or :class:`ReplayError` on any other ``error`` reply;
        :class:`Cancelled` once ``stop`` is set."""
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        kinds = (*reply_kinds, "error")
        self.last_answer = self.last_detail = ""
        while True:
            rid = self._prefix + str(next(self._ids))
            msg.meta["request_id"] = rid
            self._send(msg)
            attempt_end = min(deadline, time.monotonic() + self.retry_s)
            reply = None
            while reply is None:
                if self.stop is not None and self.stop.is_set():
                    raise Cancelled(f"replay {self.endpoint}: {reply_kinds[0]} request given up (stop)")
                left = attempt_end - time.monotonic()
                if left <= 0:
                    break
                if not self._socket().poll(int(min(left, WAIT_SLICE_S) * 1000) + 1, zmq.POLLIN):
                    continue
                try:
                    got = protocol.decode(self._socket().recv_multipart(copy=False), max_bytes=self.max_bytes,
                                          kinds=kinds)
                except protocol.ProtocolError:
                    continue  # a broken reply: treat like silence for this attempt
                # The service answers a message it could not decode with an error that
                # has no request_id; one request is in flight per socket, so it is ours.
                if got.meta.get("request_id") == rid or (got.kind == "error" and "request_id" not in got.meta):
                    reply = got
            if reply is not None and reply.kind != "error":
                return reply
            if reply is not None and reply.meta.get("reason") not in RETRY_REASONS:
                raise ReplayError(str(reply.meta.get("reason")), str(reply.meta.get("detail", "")))
            if reply is not None:
                self.last_answer = str(reply.meta.get("reason"))
                self.last_detail = str(reply.meta.get("detail", ""))
            if time.monotonic() >= deadline:
                raise TimeoutError(f"replay {self.endpoint}: no {reply_kinds[0]} within the timeout ({self.why()})")
            if reply is None:  # silence: the request or its reply may be lost with a dead peer
                self.retries += 1
                self._reset()

    def why(self) -> str:
        """Why no reply came: the link's state (:class:`reliev3r.security.LinkWatch`: nothing
        answers, CURVE refused ...) or, when it is up, the service's last "try again" answer."""
        said = {"not_ready": "answers not_ready: it stores fewer than replay.min_size windows, or its rate limiter "
                             "holds samples back",
                "rate_limited": "answers rate_limited: its rate limiter holds inserts back until the learners sample"}
        if self.last_answer == "not_ready" and self.last_detail:  # the service's own words: which, how many
            return self.link.why(f"answers not_ready: it {self.last_detail}")
        return self.link.why(said.get(self.last_answer, "has not answered"))

    # ------------------------------------------------------------------ API
    def insert(self, msg: protocol.Message | None = None, /, *, timeout_s: float | None = None,
               meta: dict | None = None, **arrays: np.ndarray) -> dict:
        """Store one labelled window: an ``insert`` message, or its ``meta`` and arrays as
        keywords. Returns the ack meta {window_id, status, reason}."""
        if msg is None:
            msg = protocol.Message("insert", dict(meta or {}), arrays)
        elif msg.kind != "insert":
            raise ValueError(f"msg: expected an insert message, got {msg.kind!r}")
        msg = protocol.Message("insert", dict(msg.meta), msg.arrays)
        ack = self.request(msg, reply_kinds=("insert_ack",), timeout_s=timeout_s).meta
        ack.pop("request_id", None)
        return ack

    def sample(self, batch_size: int, rank: int = 0, *, timeout_s: float | None = None) -> protocol.Message:
        """A ``batch`` message of ``batch_size`` windows; blocks until the service has one
        (``min_size`` reached, rate limiter open) or raises ``TimeoutError``."""
        msg = protocol.Message("sample", {"batch_size": int(batch_size), "rank": int(rank),
                                          "max_bytes": int(self.max_bytes)})
        return self.request(msg, reply_kinds=("batch",), timeout_s=timeout_s)

    def report(self, window_ids: list[str], losses: list[float]) -> None:
        """Per-window losses for the prioritized sampler (fire and forget, no reply; never blocks
        the caller, the learner's training thread: dropped where the link takes nothing now)."""
        meta = {"window_ids": [str(w) for w in window_ids], "losses": [float(x) for x in losses]}
        self._send(protocol.Message("priorities", meta), request=False)

    def stats(self, *, timeout_s: float | None = None) -> dict:
        reply = self.request(protocol.Message("stats", {}), reply_kinds=("stats",), timeout_s=timeout_s)
        reply.meta.pop("request_id", None)
        return reply.meta

    def prefetch(self, batch_size: int, rank: int = 0, depth: int = 2) -> "Prefetcher":
        """Iterator of batches fetched ahead by a background thread (its own socket)."""
        return Prefetcher(self.endpoint, batch_size, rank, depth=depth, ctx=self.ctx,
                          timeout_s=self.timeout_s, retry_s=self.retry_s, curve=self.curve, max_bytes=self.max_bytes)

    def close(self) -> None:
        self._reset()
        self.link.close()
        if self._own_ctx:
            self.ctx.term()

    def __enter__(self) -> "ReplayClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Prefetcher:
    """Keeps up to ``depth`` batches ready in a thread with its own socket (ZeroMQ sockets
    are not thread-safe); iterate, or ``get(timeout)``, to take them; ``close()`` to stop.

    An error in the thread (e.g. ``TimeoutError``) goes to ``on_error(err)`` when given: if it
    returns True the thread carries on sampling (a learner waiting out a replay restart),
    otherwise (and without ``on_error``) the error is raised by the next ``next()``/``get()``
    and the thread ends. With ``prepare``, each batch is handed out as ``(batch,
    prepare(batch))``, ``prepare`` run in the thread (the learner copies the arrays into pinned
    host memory there, off its training thread); an exception it raises is the batch's error."""

    def __init__(self, endpoint: str, batch_size: int, rank: int, *, depth: int, ctx: zmq.Context,
                 timeout_s: float, retry_s: float, curve: CurveConfig | None = None,
                 max_bytes: int = protocol.DEFAULT_MAX_BYTES,
                 on_error: Callable[[Exception], bool] | None = None,
                 prepare: Callable[[protocol.Message], Any] | None = None):
        if depth < 1:
            raise ValueError("depth must be >= 1")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._on_error = on_error
        self._prepare = prepare
        self._args = (endpoint, batch_size, rank, ctx, timeout_s, retry_s, curve, max_bytes)
        self._thread = threading.Thread(target=self._loop, name=f"replay-prefetch-{rank}", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        endpoint, batch_size, rank, ctx, timeout_s, retry_s, curve, max_bytes = self._args
        client = ReplayClient(endpoint, ctx=ctx, timeout_s=timeout_s, retry_s=retry_s, curve=curve, max_bytes=max_bytes,
                              stop=self._stop)
        try:
            while not self._stop.is_set():
                try:
                    item = client.sample(batch_size, rank, timeout_s=timeout_s)
                    if self._prepare is not None:
                        item = (item, self._prepare(item))
                except Cancelled:  # close(): the wait for a reply ends with it
                    return
                except Exception as err:  # the policy or the consumer decides
                    if self._on_error is not None and self._on_error(err):
                        continue
                    item = err
                while not self._stop.is_set():
                    try:
                        self._queue.put(item, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if isinstance(item, Exception):
                    return
        finally:
            client.close()

    def __iter__(self) -> Iterator[Any]:
        return self

    def __next__(self) -> Any:
        while True:
            try:
                item = self._queue.get(timeout=0.1)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise StopIteration from None
                continue
            if isinstance(item, Exception):
                raise item
            return item

    def get(self, timeout: float = 0.1) -> Any:
        """The next batch (with ``prepare``: the pair), or None if none is ready within
        ``timeout`` seconds."""
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            raise item
        return item

    def close(self) -> None:
        """Stop the thread; a request it is waiting on is given up within ``WAIT_SLICE_S``
        (a ``prepare`` under way runs to its end)."""
        self._stop.set()
        self._thread.join(timeout=10)

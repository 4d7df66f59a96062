"""The streamer process: sources -> windows -> labelers, with credits and at-least-once delivery.

Labelers connect a DEALER to our ROUTER and send ``ready`` {credits: n}: the number of
windows they can take *now* (absolute, not added: a labeler may repeat it as a keep-alive).
Each window sent spends one credit and enters the in-flight table until a ``done`` for its
id arrives from any labeler. At ``max_in_flight`` the streamer stops decoding (backpressure:
memory is bounded by the table). A window whose ``done`` has not come within
``resend_timeout_s`` goes to any labeler with credit again (replay stores each id once).
Credits of a labeler not heard from for ``peer_timeout_s`` expire, so a dead labeler is
never waited on; its windows come back through the resend timeout.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import zmq

from reliev3r import protocol
from reliev3r.config import PipelineConfig
from reliev3r.service import Runtime
from streamer import sources as srcs
from streamer.windows import Window, windows_of

MAX_ATTEMPTS = 5
"""A window sent this many times without a ``done`` is abandoned (a poison window must not
circulate forever)."""
POLL_MS = 100


@dataclass(slots=True)
class InFlight:
    frames: list
    sent_at: float
    peer: bytes
    attempts: int


class Dispatcher:
    """Credit and in-flight bookkeeping, free of sockets (the clock is injectable for tests)."""

    def __init__(self, *, max_in_flight: int, resend_timeout_s: float, peer_timeout_s: float,
                 clock: Callable[[], float] = time.monotonic):
        self.max_in_flight = max_in_flight
        self.resend_timeout_s = resend_timeout_s
        self.peer_timeout_s = peer_timeout_s
        self.clock = clock
        self.credits: dict[bytes, list] = {}  # peer -> [credits, last_seen]
        self.in_flight: dict[str, InFlight] = {}
        self.resend: deque[str] = deque()

    def on_ready(self, peer: bytes, credits: int) -> None:
        self.credits[peer] = [max(0, credits), self.clock()]

    def on_done(self, peer: bytes, window_id: str) -> bool:
        """True when the id was in flight (a late duplicate ``done`` returns False)."""
        if peer in self.credits:
            self.credits[peer][1] = self.clock()
        return self.in_flight.pop(window_id, None) is not None

    def expire(self) -> tuple[list[str], list[str]]:
        """Queue timed-out windows for resending; forget silent peers. Returns
        (timed-out ids, abandoned ids)."""
        now = self.clock()
        for peer in [p for p, (_, seen) in self.credits.items() if now - seen > self.peer_timeout_s]:
            del self.credits[peer]
        timed_out, abandoned = [], []
        queued = set(self.resend)
        for wid, entry in list(self.in_flight.items()):
            if wid in queued or now - entry.sent_at <= self.resend_timeout_s:
                continue
            if entry.attempts >= MAX_ATTEMPTS:
                del self.in_flight[wid]
                abandoned.append(wid)
            else:
                self.resend.append(wid)
                timed_out.append(wid)
        return timed_out, abandoned

    def peer(self) -> bytes | None:
        """The labeler with the most credits, or None."""
        best = max(self.credits.items(), key=lambda kv: kv[1][0], default=None)
        return best[0] if best is not None and best[1][0] > 0 else None

    def can_take_new(self) -> bool:
        return len(self.in_flight) < self.max_in_flight and self.peer() is not None

    def next_resend(self) -> str | None:
        while self.resend:
            wid = self.resend.popleft()
            if wid in self.in_flight:
                return wid
        return None

    def sent(self, window_id: str, frames: list, peer: bytes) -> None:
        self.credits[peer][0] -= 1
        entry = self.in_flight.get(window_id)
        if entry is None:
            self.in_flight[window_id] = InFlight(frames, self.clock(), peer, 1)
        else:
            entry.sent_at, entry.peer, entry.attempts = self.clock(), peer, entry.attempts + 1

    def lost_peer(self, peer: bytes) -> None:
        self.credits.pop(peer, None)


def window_stream(make_sources: Callable[[], list], cfg, *, on_frame: Callable[[str], None],
                  on_error: srcs.ErrorSink, log) -> Iterator[Window]:
    """Windows from every source, ``cfg.interleave`` sources at a time in round robin.
    With ``cfg.loop`` archives start again with the pass number in the window ids, so the
    learner keeps getting fresh ids (and replay keeps recency right)."""
    pass_index = 0
    while True:
        pending = deque(make_sources())
        active: list[tuple[str, Iterator[Window]]] = []
        produced = 0
        while pending or active:
            while pending and len(active) < cfg.interleave:
                source = pending.popleft()
                active.append((source.name, windows_of(source.name, _counted(source, on_frame), cfg,
                                                       pass_index=pass_index)))
            for entry in list(active):
                name, it = entry
                try:
                    window = next(it)
                except StopIteration:
                    active.remove(entry)
                    continue
                except Exception as err:  # a bug or odd input in one source must not stop the others
                    on_error(name, "source_failed", f"{type(err).__name__}: {err}")
                    active.remove(entry)
                    continue
                produced += 1
                yield window
        if not cfg.loop:
            return
        if produced == 0:
            log.error("no source produced a window in a whole pass; not looping")
            return
        pass_index += 1
        log.info("sources exhausted, starting again", extra={"pass": pass_index})


def _counted(source, on_frame):
    for frame in source.frames():
        on_frame(source.name)
        yield frame


def run(cfg: PipelineConfig, runtime: Runtime) -> int:
    scfg = cfg.streamer
    m = runtime.metrics
    frames_total = m.counter("decode_frames_total", "Frames decoded, by source", ["source"])
    errors_total = m.counter("decode_errors_total", "Decode problems, by source and reason", ["source", "reason"])
    sent_total = m.counter("windows_sent_total", "Windows sent to labelers (first sends)")
    acked_total = m.counter("windows_acked_total", "Windows reported done by a labeler, by status", ["status"])
    resent_total = m.counter("windows_resent_total", "Windows sent again after the resend timeout")
    abandoned_total = m.counter("windows_abandoned_total", "Windows given up after repeated timeouts")
    in_flight_gauge = m.gauge("windows_in_flight", "Windows sent and not yet done")
    labelers_gauge = m.gauge("labelers_with_credit", "Labelers currently holding credits")
    log = runtime.log

    def on_error(source: str, reason: str, detail: str) -> None:
        errors_total.labels(source, reason).inc()
        log.warning("source problem", extra={"source": source, "reason": reason, "detail": detail})

    def make_sources() -> list:
        if scfg.sources:
            return srcs.discover(scfg.sources, fov_deg=scfg.fov_deg, on_error=on_error)
        try:
            return srcs.synthetic_sources(cfg.run_dir, scfg.synthetic, fov_deg=scfg.fov_deg, on_error=on_error)
        except Exception as err:  # rendering failed: say so, stream nothing rather than crash-loop
            on_error("synthetic", "synthetic_failed", f"{type(err).__name__}: {err}")
            return []

    windows = window_stream(make_sources, scfg, on_frame=lambda s: frames_total.labels(s).inc(),
                            on_error=on_error, log=log)
    disp = Dispatcher(max_in_flight=scfg.max_in_flight, resend_timeout_s=scfg.resend_timeout_s,
                      peer_timeout_s=scfg.peer_timeout_s)
    sock = runtime.ctx.socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished labeler fails instead of vanishing
    endpoint = cfg.network.bind(cfg.network.work_port)
    sock.bind(endpoint)
    log.info("streamer up", extra={"endpoint": endpoint, "sources": scfg.sources or "synthetic"})
    counts = {"sent": 0, "acked": 0}
    exhausted = False

    def send(window_id: str, frames: list) -> bool:
        peer = disp.peer()
        if peer is None:
            return False
        try:
            sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as err:  # EHOSTUNREACH (gone) or EAGAIN (its queue is full)
            log.info("labeler unreachable, dropping its credits", extra={"error": str(err)})
            disp.lost_peer(peer)
            return False
        disp.sent(window_id, frames, peer)
        return True

    try:
        while not runtime.stopping:
            idle = not (disp.resend or (not exhausted and disp.can_take_new()))
            if sock.poll(POLL_MS if idle else 0):
                for _ in range(256):  # drain what is queued, bounded so sending is not starved
                    peer, msg = runtime.receive(sock, kinds=("ready", "done"), routed=True)
                    if msg is not None:
                        _handle(msg, peer, disp, acked_total, counts, runtime)
                    if not sock.poll(0):
                        break
            timed_out, abandoned = disp.expire()
            for wid in abandoned:
                abandoned_total.inc()
                log.error("window abandoned after repeated timeouts", extra={"window_id": wid})
            if timed_out:
                log.info("windows timed out, resending", extra={"count": len(timed_out)})
            wid = disp.next_resend()
            while wid is not None:
                if not send(wid, disp.in_flight[wid].frames):
                    disp.resend.appendleft(wid)
                    break
                resent_total.inc()
                wid = disp.next_resend()
            if not exhausted and not disp.resend and disp.can_take_new():
                try:
                    window = next(windows)  # decoding happens here, only when there is room
                except StopIteration:
                    exhausted = True
                    log.info("all sources done", extra={"sent": counts["sent"]})
                else:
                    frames = protocol.encode(window.to_message())
                    if not send(window.window_id, frames):
                        # the chosen labeler vanished between check and send: keep it for later
                        disp.in_flight[window.window_id] = InFlight(frames, 0.0, b"", 0)
                        disp.resend.append(window.window_id)
                    counts["sent"] += 1
                    sent_total.inc()
            in_flight_gauge.set(len(disp.in_flight))
            labelers_gauge.set(sum(1 for c, _ in disp.credits.values() if c > 0))
            runtime.status.update(sent=counts["sent"], acked=counts["acked"], in_flight=len(disp.in_flight))
            if exhausted and not disp.in_flight:
                log.info("every window done", extra=runtime.status)
                return 0 if counts["sent"] else 1
        return 0
    finally:
        sock.close(linger=0)


def _handle(msg: protocol.Message, peer: bytes, disp: Dispatcher, acked_total, counts: dict,
            runtime: Runtime) -> None:
    if msg.kind == "ready":
        credits = msg.meta.get("credits")
        if isinstance(credits, bool) or not isinstance(credits, int) or not 0 <= credits <= 1 << 16:
            runtime.metrics.reject("bad_credits")
            return
        disp.on_ready(peer, credits)
        return
    window_id, status = msg.meta.get("window_id"), msg.meta.get("status")
    if not isinstance(window_id, str) or status not in ("stored", "duplicate", "dropped"):
        runtime.metrics.reject("bad_done")
        return
    if disp.on_done(peer, window_id):
        acked_total.labels(status).inc()
        counts["acked"] += 1
        if status == "dropped":
            runtime.log.info("labeler dropped window",
                             extra={"window_id": window_id, "reason": msg.meta.get("reason", "")})

"""The streamer process: sources -> windows -> labelers, with credits and at-least-once delivery.

Labelers connect a DEALER to our ROUTER and send ``ready`` {credits: n}: the number of
windows they can take *now* (absolute, not added: a labeler may repeat it as a keep-alive).
Each window sent spends one credit and enters the in-flight table until a ``done`` for its
id arrives from any labeler. At ``max_in_flight`` the streamer stops decoding (backpressure:
memory is bounded by the table). A window whose ``done`` has not come within
``resend_timeout_s`` goes to any labeler with credit again (replay stores each id once).
Credits of a labeler not heard from for ``peer_timeout_s`` expire, so a dead labeler is
never waited on; the windows it holds go to another labeler with credit as soon as there is
one (a SIGKILLed labeler's restart, say), not ``resend_timeout_s`` after they were sent. A
labeler that was only slow (a long batch) and comes back before then keeps its windows; one
that answers after they went elsewhere has its ``done`` ignored, and replay stores each id once.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Iterator

import zmq

from monitoring.metrics import Metrics
from reliev3r import durable, protocol, security
from reliev3r.config import PipelineConfig
from reliev3r.recent import Recent
from reliev3r.service import Runtime, serve
from streamer import sources as srcs
from streamer import workers
from streamer.live import LiveSource, is_live
from streamer.progress import Progress, generation_pass, window_first_frame
from streamer.windows import Window, windows_of
from streamer.workers import segments_of, source_windows, worker_count

MAX_ATTEMPTS = 5
"""A window sent this many times without a ``done`` is abandoned (a poison window must not
circulate forever)."""
SETTLE_RECHECK_S = 0.5
"""How often a file still being written (``streamer.settle_s``) is looked at again."""
POLL_MS = 100
FEED_POLL_MS = 5
"""Poll timeout while there is room for a window but the producers have none ready yet."""
LAST_PEER_SOURCES = 4096
"""Sources whose last labeler the dispatcher remembers, the most recently sent (a live run meets
new source names for as long as it lives; a source forgotten goes to the labeler with the most
credits, as a new one does)."""
SOURCE_SERIES = 256
"""Sources whose series (``decode_frames_total``, ``decode_errors_total``, the live feeds') the
endpoint keeps, the most recently heard of: a folder or a glob names a source per file, and one
that receives files for as long as a run lives names new ones for ever. An older source's series
are removed (Prometheus keeps what it scraped; heard of again, they start from 0)."""
PROGRESS_RETRY_S = 1.0
"""How often a progress file the disk refused (full) is tried again (it is kept in memory meanwhile)."""
WORLD_RETRY_S = (1.0, 60.0)
"""The wait before the synthetic world the disk refused is rendered again: the first, doubled
after each refusal up to the second (each try renders its missing scenes again)."""


class FirstSeen:
    """``seen(key)`` is True the first time ``key`` comes among the last ``keep`` distinct keys
    (thread-safe): a looped archive meets the same problem again on every pass, and it is
    logged once (the error series counts every one)."""

    def __init__(self, keep: int = 1024):
        self._keys = Recent(keep)
        self._lock = threading.Lock()

    def __call__(self, key) -> bool:
        with self._lock:
            new = key not in self._keys
            self._keys[key] = None
            return new


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
        self.silent: set[bytes] = set()  # peers whose credits expired, still holding windows
        self.last_peer = Recent(LAST_PEER_SOURCES)  # source -> the peer its last window went to

    def on_ready(self, peer: bytes, credits: int) -> None:
        self.credits[peer] = [max(0, credits), self.clock()]
        self.silent.discard(peer)

    def on_done(self, peer: bytes, window_id: str) -> bool:
        """True when the id was in flight (a late duplicate ``done`` returns False)."""
        if peer in self.credits:
            self.credits[peer][1] = self.clock()
        return self.in_flight.pop(window_id, None) is not None

    def expire(self) -> tuple[list[str], list[str]]:
        """Forget peers silent for ``peer_timeout_s``; queue for resending the windows that
        timed out, and those of silent peers while another peer has credit. Returns
        (queued ids, abandoned ids)."""
        now = self.clock()
        for peer in [p for p, (_, seen) in self.credits.items() if now - seen > self.peer_timeout_s]:
            del self.credits[peer]
            self.silent.add(peer)
        orphans = self.silent if self.peer() is not None else set()
        timed_out, abandoned = [], []
        queued = set(self.resend)
        for wid, entry in list(self.in_flight.items()):
            if wid in queued or (entry.peer not in orphans and now - entry.sent_at <= self.resend_timeout_s):
                continue
            if entry.attempts >= MAX_ATTEMPTS:
                del self.in_flight[wid]
                abandoned.append(wid)
            else:
                self.resend.append(wid)
                timed_out.append(wid)
        self.silent &= {entry.peer for entry in self.in_flight.values()}
        return timed_out, abandoned

    def peer(self, source: str | None = None) -> bytes | None:
        """The labeler for a window of ``source``: the one the source's last window went to while
        it has a credit (neighbouring windows share views, whose features a labeler keeps:
        ``labelers.matches.OpenCVMatcher``), else the one with the most credits; None when no
        labeler has a credit."""
        last = self.last_peer.get(source) if source is not None else None
        if last is not None and self.credits.get(last, (0,))[0] > 0:
            return last
        best = max(self.credits.items(), key=lambda kv: kv[1][0], default=None)
        return best[0] if best is not None and best[1][0] > 0 else None

    def can_take_new(self) -> bool:
        return len(self.in_flight) < self.max_in_flight and self.peer() is not None

    def poll_ms(self, wants_window: bool, window_ready: bool) -> int:
        """How long a loop turn waits for labelers' messages: not at all while a window can be
        sent now (one to resend with a labeler to take it, or ``window_ready``: a new one made
        while a new one may go), briefly while a new one may go (``wants_window``), else
        :data:`POLL_MS`. Windows to resend and no labeler with a credit wait for a ``ready``
        (a teacher refresh stops the labelers: the streamer must not spin meanwhile)."""
        if window_ready or (self.resend and self.peer() is not None):
            return 0
        return FEED_POLL_MS if wants_window else POLL_MS

    def next_resend(self) -> str | None:
        while self.resend:
            wid = self.resend.popleft()
            if wid in self.in_flight:
                return wid
        return None

    def sent(self, window_id: str, frames: list, peer: bytes, source: str | None = None) -> None:
        self.credits[peer][0] -= 1
        if source is not None:
            self.last_peer[source] = peer
        entry = self.in_flight.get(window_id)
        if entry is None:
            self.in_flight[window_id] = InFlight(frames, self.clock(), peer, 1)
        else:
            entry.sent_at, entry.peer, entry.attempts = self.clock(), peer, entry.attempts + 1

    def lost_peer(self, peer: bytes) -> None:
        self.credits.pop(peer, None)


class GroundTruthGate:
    """Windows without the ground truth a training stage needs for every view
    (``PipelineConfig.ground_truth_needed``): each is counted under ``no_ground_truth`` with the
    detail of its source's first (the log says it once: :class:`FirstSeen`), and how many a
    source had is said when it ends. Sent, such a window would end a supervised learner at the
    first batch that sampled it (and the oracle labeler drops one without depth)."""

    def __init__(self, needed: tuple[str, ...], on_error: srcs.ErrorSink, log):
        self.needed, self.on_error, self.log = tuple(needed), on_error, log
        self.counts: dict[str, int] = {}
        self.said: dict[str, str] = {}

    def lacking(self, window: Window) -> str | None:
        """What of it ``window`` lacks (``Window.lacking``), or None: then it is sent."""
        return window.lacking(self.needed) if self.needed else None

    def refuse(self, name: str, key: str, lacking: str) -> None:
        """Report a window of source ``name`` (progress key ``key``) that :meth:`lacking` said lacks it."""
        self.counts[key] = self.counts.get(key, 0) + 1
        self.on_error(name, "no_ground_truth", self.said.setdefault(name, (
            f"{lacking}: not sent, nor any other window of this source without the ground truth training needs "
            f"({', '.join(self.needed)} of every view; counted, the first named)")))

    def ended(self, key: str) -> None:
        if count := self.counts.pop(key, 0):
            self.log.warning("windows without ground truth skipped", extra={
                "source": key, "windows": count, "reason": "no_ground_truth", "needed": list(self.needed)})


def window_stream(make_sources: Callable[[], list], cfg, *, on_frame: Callable[[str], None],
                  on_error: srcs.ErrorSink, log, progress: Progress | None = None,
                  stop: threading.Event | None = None, needed: tuple[str, ...] = ()) -> Iterator[Window]:
    """Windows from every archive source, ``cfg.interleave`` sources at a time (with
    ``decode_workers: 0``, no more than the workers: one per core) in round robin:
    one window from each in turn, where a source decoded by a worker (``streamer.workers``) that
    has no window ready yet is passed over for the next one that has (a slow or windowless source
    does not hold the others back); only when none has one does the stream wait. Each source's
    windows keep their order; across sources the order follows which windows are ready first
    (decoded in this process alone, the order is fixed). With ``cfg.loop`` archives start again
    with the pass number in the window ids, so the learner keeps getting fresh ids (and replay
    keeps recency right). With ``progress``, each source resumes where the last run stopped and
    acknowledged windows are not made again. A video file written to within ``cfg.settle_s``
    (still arriving) waits until it has been still that long (:func:`streamer.sources.unsettled`),
    re-checked every :data:`SETTLE_RECHECK_S`; the pass waits for it once nothing else is left,
    unless it loops and made a window (the next pass finds the file again). Without ``cfg.loop``,
    a file that grew after it was opened is read on from its last window (reported as ``grew``)
    before the stream ends, and one replaced under its name (another file renamed over it, as
    rsync and ``mv`` do) is read from the start as new content (reported as ``replaced``), its
    window ids other than the old content's (``streamer.progress``). With ``progress``, a file
    found after a restart as another than the one read before is new content alike, and a
    finished one that grew meanwhile is read on from its last window. A window without the ground
    truth ``needed`` for every view is not yielded (:class:`GroundTruthGate`): with ``progress``
    it counts as acknowledged, so a restart does not make it again."""
    stop = stop or threading.Event()
    gate = GroundTruthGate(needed, on_error, log)
    pass_index = progress.pass_index if progress is not None else 0
    # with workers one per core, a source beyond them would be decoded in this process, on the
    # workers' cores (0.78x and 0.67x of the workers' bound at 2 and 8 such sources on 2 cores
    # against 0.98x without: docs/BENCHMARKS.md, issue 18, fourteenth pass)
    at_once = cfg.interleave if cfg.decode_workers else worker_count(cfg)
    while not stop.is_set():
        try:
            pending = deque((source, None) for source in make_sources())
        except Exception as err:  # discovery reports per source; this is a last resort, not a crash
            on_error("streamer", "discovery_failed", f"{type(err).__name__}: {err}")
            pending = deque()
        # pending: (source, segment or None); a long video with decode workers to share it is
        # replaced by its segments (streamer.segments), each decoded and resumed as a source of
        # its own under the progress key name@first_frame, at most one per decode worker at a
        # time (more would be decoded in this process, on the workers' cores).
        # active: (name, progress key, windows, a segment's), the next to ask first
        active: deque[tuple[str, str, Iterator[Window], bool]] = deque()
        produced = 0
        # progress keys that made a window in this pass, or resumed after one made before a restart
        made: set[str] = set()
        waiting: list = []  # sources of files still being written (streamer.sources.unsettled)
        recheck = 0.0  # when to look at them again (time.monotonic)
        opened: dict[str, tuple] = {}  # a whole file's key -> (its source, streamer.sources.file_state when opened)
        last: dict[str, tuple[int, tuple[float, ...]]] = {}  # key -> its last window's first frame, blur_history
        # a file grown or replaced since it was read: its key -> where it is read on (0 when replaced)
        read_on: dict[str, tuple[int, tuple[float, ...]]] = {}
        generation: dict[str, int] = {}  # a video file's source name -> the generation of its content read
        while not stop.is_set():
            if not (pending or active or waiting):
                if cfg.loop or not (pending := _changed(opened, last, read_on, generation, progress, on_error)):
                    break
            if waiting and time.monotonic() >= recheck:
                still = [s for s in waiting if srcs.unsettled(getattr(s, "path", None), cfg.settle_s)]
                pending.extend((s, None) for s in waiting if s not in still)
                waiting = still
                recheck = time.monotonic() + SETTLE_RECHECK_S
            while pending and len(active) < at_once:
                if pending[0][1] is not None and sum(e[3] for e in active) >= worker_count(cfg):
                    break  # the next is a segment and every worker has one: wait for one to end
                source, segment = pending.popleft()
                if segment is None and (wait := srcs.unsettled(getattr(source, "path", None), cfg.settle_s)):
                    log.info("source still being written, waiting for it", extra={"source": source.name,
                                                                                   "wait_s": round(wait, 3)})
                    soon = time.monotonic() + min(wait, SETTLE_RECHECK_S)
                    recheck = min(recheck, soon) if waiting else soon
                    waiting.append(source)
                    continue
                state = srcs.file_state(getattr(source, "path", None)) if segment is None else None
                if segment is None and source.name not in read_on:
                    if progress is not None and state is not None:
                        generation[source.name] = _recognised(source, state, progress, on_error)
                    parts = segments_of(source, cfg)
                    if parts:
                        log.info("source in segments", extra={"source": source.name, "segments": len(parts)})
                        pending.extendleft((source, part) for part in reversed(parts))
                        continue
                key = source.name if segment is None else f"{source.name}@{segment.start}"
                if state is not None:
                    opened[key] = (source, state)
                if key in read_on:  # grew since it was read: on from its last window (made again, skipped)
                    start, history = read_on[key]
                else:
                    start = progress.start_frame(key) if progress is not None else 0
                    if start is None:
                        produced += 1  # finished before a restart: the pass did produce it
                        progress.finished_before += 1
                        continue
                    if start:
                        made.add(key)
                        log.info("resuming source", extra={"source": key, "frame": start, "pass": pass_index})
                    # the blur test resumes with the sharpness values the resumed window was tested against
                    history = progress.blur_history(key) if start else ()
                # (a resumed source may rightly have too few frames left for a window); in a
                # decode worker of its own where cfg.decode_workers allows
                passed = generation_pass(pass_index, generation.get(source.name, 0))
                active.append((source.name, key, source_windows(source, cfg, start=start, pass_index=passed,
                                                                 on_frame=on_frame, on_error=on_error,
                                                                 segment=segment, blur_history=history),
                               segment is not None))
            if not active:
                if waiting and not pending:
                    if cfg.loop and produced:
                        break  # the next pass finds them again; the sources read meanwhile loop on
                    stop.wait(max(0.0, recheck - time.monotonic()))
                continue
            seen = workers.arrivals()
            entry = _next_ready(active)
            if entry is None:  # every source is a worker's, none has a window in yet
                workers.wait_for_arrival(seen, 0.1)
                continue
            name, key, it, _ = entry
            try:
                window = next(it)
            except StopIteration:
                active.remove(entry)
                gate.ended(key)
                # one that made no window (too short for one) is not done: a restart that took it
                # as finished would exit 0 with no window ever made, and ``up`` wait for them forever
                if progress is not None and key in made:
                    progress.source_done(key)
                continue
            except Exception as err:  # a bug or odd input in one source must not stop the others
                on_error(name, "source_failed", f"{type(err).__name__}: {err}")
                active.remove(entry)
                continue
            first = window_first_frame(window.window_id)
            if key in read_on and first <= read_on[key][0] and key in last:
                continue  # made before it grew
            last[key] = (first, window.blur_history)
            lacking = gate.lacking(window)
            produced += lacking is None  # a pass of windows none of which can be sent does not loop
            made.add(key)
            if progress is not None:
                if progress.is_acked(window.window_id, key):
                    progress.skipped += 1
                    continue  # acknowledged before a restart
                progress.made(key, window.window_id, window.blur_history)
            if lacking is not None:
                gate.refuse(name, key, lacking)
                if progress is not None:
                    progress.acked(window.window_id)  # done with: it must not hold the resume point back
                continue
            yield window
        if not cfg.loop or stop.is_set():
            return
        if produced == 0:
            log.error("no source produced a window in a whole pass; not looping")
            return
        pass_index += 1
        if progress is not None:
            progress.new_pass(pass_index)
        log.info("sources exhausted, starting again", extra={"pass": pass_index})


def _changed(opened: dict[str, tuple], last: dict[str, tuple[int, tuple[float, ...]]],
             read_on: dict[str, tuple[int, tuple[float, ...]]], generation: dict[str, int],
             progress: Progress | None, on_error: srcs.ErrorSink) -> deque:
    """The whole files of ``opened`` changed since they were opened (``opened`` forgets them),
    as (source, None) entries to read, each set in ``read_on``: one that grew, reported as
    ``grew``, to be read on from its last window (``last``; from the start where it made none);
    one replaced under its name (another size or time, but not by growing), reported
    as ``replaced``, to be read from the start as new content (a generation more). A video file's
    source is made anew (``VideoSource.reopened``): a synthetic video's ground truth, read when
    its source was made, would be the old content's."""
    again: deque = deque()
    for key, (source, before) in list(opened.items()):
        after = srcs.file_state(source.path)
        if after is None or srcs.same_content(before, after):
            continue
        del opened[key]
        if srcs.grew(before, after):
            read_on[key] = last.get(key, (0, ()))
            if progress is not None:
                progress.grown(key, after)
            on_error(source.name, "grew", f"{source.path}: {before[2]} bytes when opened, {after[2]} now: read on "
                                          f"from frame {read_on[key][0]}")
        else:
            read_on[key] = (0, ())
            last.pop(key, None)
            generation[key] = progress.replaced(key, after) if progress is not None else generation.get(key, 0) + 1
            on_error(source.name, "replaced", f"{source.path}: {_replacement(before, after)} since it was opened: "
                                              f"read from the start as new content")
        again.append((source.reopened() if isinstance(source, srcs.VideoSource) else source, None))
    return again


def _recognised(source, state: tuple, progress: Progress, on_error: srcs.ErrorSink) -> int:
    """The generation of the content of ``source``'s video file, now of identity ``state``
    (``streamer.sources.file_state``), against the one ``progress`` kept (a restart's included):
    another file under its name is new content, read from the start (reported as ``replaced``);
    a finished one that grew since is read on from its resume point (reported as ``grew``)."""
    before, generation = progress.file(source.name)
    if before == state:
        return generation
    if before is None or srcs.same_content(before, state):  # first opened (or kept by a progress
        progress.opened(source.name, state)  # file without identities), or copied with its times kept
        return generation
    if srcs.grew(before, state):
        if progress.grown(source.name, state):
            on_error(source.name, "grew", f"{source.path}: {before[2]} bytes when read, {state[2]} now: read on "
                                          f"from frame {progress.start_frame(source.name)}")
        return generation
    on_error(source.name, "replaced", f"{source.path}: {_replacement(before, state)} since it was read: read from "
                                      f"the start as new content")
    return progress.replaced(source.name, state)


def _replacement(before: tuple, after: tuple) -> str:
    """How file identity ``after`` differs from ``before`` (``streamer.sources.file_state``)."""
    if before[:2] != after[:2]:
        return f"another file under its name (inode {before[1]} of {before[2]} bytes, now {after[1]} of {after[2]})"
    return f"rewritten ({before[2]} bytes, modified at {before[3]} ns; now {after[2]}, at {after[3]} ns)"


def _next_ready(active: deque) -> tuple | None:
    """The first entry of ``active`` whose source has a window ready (one decoded in this
    process always has: asking decodes it), turned to the back; None when none has."""
    for _ in range(len(active)):
        entry = active[0]
        active.rotate(-1)
        if getattr(entry[2], "ready", True):
            return entry
    return None


def live_stream(source, cfg, *, on_frame: Callable[[str], None], gate: GroundTruthGate | None = None
                ) -> Iterator[Window]:
    """Windows of one live feed (ids carry the session: frame numbers restart per process);
    those ``gate`` refuses (no ground truth that training needs: a live feed carries none) are
    counted, not yielded."""
    for window in windows_of(source.name, _counted(source, on_frame, 0), cfg, pass_index=source.session):
        if gate is None or (lacking := gate.lacking(window)) is None:
            yield window
        else:
            gate.refuse(source.name, source.name, lacking)


def _counted(source, on_frame, start: int = 0):
    for frame in source.frames(start):
        on_frame(source.name)
        yield frame


class WindowFeed:
    """Windows made in background threads (one for the archives, one per live feed) into a
    small bounded queue: the socket loop never blocks on decoding or on a dead feed, and a
    full queue stops the producers (memory stays bounded by ``max_in_flight`` + the queue)."""

    def __init__(self, streams: list[Iterator[Window]], *, depth: int = 2, on_error: srcs.ErrorSink):
        self.queue: queue.Queue[Window] = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.on_error = on_error
        self.threads = [threading.Thread(target=self._pump, args=(s,), daemon=True, name=f"feed-{i}")
                        for i, s in enumerate(streams)]
        for t in self.threads:
            t.start()

    def _pump(self, stream: Iterator[Window]) -> None:
        try:
            for window in stream:
                while not self.stop.is_set():
                    try:
                        self.queue.put(window, timeout=0.1)
                        break
                    except queue.Full:
                        continue
                if self.stop.is_set():
                    return
        except Exception as err:  # never let a producer die silently
            self.on_error("streamer", "producer_failed", f"{type(err).__name__}: {err}")

    def get(self) -> Window | None:
        try:
            return self.queue.get_nowait()
        except queue.Empty:
            return None

    @property
    def exhausted(self) -> bool:
        """Every producer has ended and left nothing queued. Their liveness is read first: a
        producer may put its last window and end between the two reads, and once all are seen
        dead nothing more can come (the queue read first, its window would be left in it)."""
        return not any(t.is_alive() for t in self.threads) and self.queue.empty()

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(2.0)


class SourceSeries:
    """The series labelled by source of the most recent ``keep`` sources heard of: a source's
    first report beyond them removes every series of the one heard of longest ago (thread-safe:
    the producers count frames and problems, the socket loop the rest)."""

    def __init__(self, keep: int):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self._used = Recent(keep)  # source -> the (metric, label values) of its series
        self._lock = threading.Lock()

    def inc(self, metric, values: tuple[str, ...], amount: float = 1.0) -> None:
        """Add ``amount`` to ``metric``'s series of ``values`` (the source first)."""
        with self._lock:
            self._series(metric, values).inc(amount)

    def set(self, metric, values: tuple[str, ...], value: float) -> None:
        with self._lock:
            self._series(metric, values).set(value)

    def _series(self, metric, values: tuple[str, ...]):
        used = self._used.recall(values[0])
        if used is None:
            if len(self._used) >= self._used.keep:
                _, old = self._used.popitem(last=False)
                for old_metric, old_values in old:
                    old_metric.remove(*old_values)
            used = self._used[values[0]] = set()
        used.add((metric, values))
        return metric.labels(*values)


class StreamerMetrics:
    """The streamer's Prometheus series (those labelled by source through :attr:`sources`:
    :data:`SOURCE_SERIES` sources at most)."""

    def __init__(self, m: Metrics):
        self.sources = SourceSeries(SOURCE_SERIES)
        self.frames = m.counter("decode_frames_total",
                                "Frames read, by source (decoded, or left undecoded where no keyframe test "
                                "needed them)", ["source"])
        self.errors = m.counter("decode_errors_total", "Decode problems, by source and reason", ["source", "reason"])
        self.sent = m.counter("windows_sent_total", "Windows sent to labelers (first sends)")
        self.acked = m.counter("windows_acked_total", "Windows reported done by a labeler, by status", ["status"])
        self.resent = m.counter("windows_resent_total", "Windows sent again after the resend timeout")
        self.abandoned = m.counter("windows_abandoned_total", "Windows given up after repeated timeouts")
        self.in_flight = m.gauge("windows_in_flight", "Windows sent and not yet done")
        self.labelers = m.gauge("labelers_with_credit", "Labelers currently holding credits")
        self.reconnects = m.counter("stream_reconnects_total", "Live feed reconnect attempts", ["source"])
        self.gaps = m.counter("stream_gaps_total", "Outages of a live feed that ended with frames again", ["source"])
        self.gap_seconds = m.counter("stream_gap_seconds_total", "Seconds without frames from a live feed", ["source"])
        self.dropped = m.counter("stream_dropped_frames_total", "Live frames dropped (consumer behind)", ["source"])
        self.connected = m.gauge("stream_connected", "1 while a live feed is connected", ["source"])
        self.skipped = m.counter("windows_skipped_acked_total", "Windows not made again: acknowledged before a restart")
        self.progress_failures = m.counter("progress_write_failures_total",
                                           "Writes of the progress file the disk refused (ENOSPC: full, EIO: an I/O "
                                           "error), by errno name: each try, one a second while it is refused",
                                           ["reason"])
        self.world_failures = m.counter("world_write_failures_total",
                                        "Renders of the synthetic world (the default sources) into the run folder "
                                        "the disk refused (ENOSPC: full, EIO: an I/O error), by errno name: each "
                                        "try, tried again after 1 s, doubled up to 60 s while it is refused",
                                        ["reason"])


class StreamerService:
    """The sources' window feed, the dispatcher and the ROUTER socket the labelers talk to;
    ``step()`` is one loop turn: read requests, resend, send one new window."""

    def __init__(self, cfg: PipelineConfig, runtime: Runtime, metrics: StreamerMetrics):
        scfg = self.cfg = cfg.streamer
        self.ground_truth = cfg.trains_on_ground_truth
        self.runtime, self.metrics = runtime, metrics
        self.log = log = runtime.log
        self.problems_seen = FirstSeen()
        on_error = self.on_error
        self.refused: str | None = None
        """Why the disk refused the progress file's last write (the status's ``write_error``), None
        once it is written again."""
        self.world_said: str | None = None
        """Why the disk refused the synthetic world's last render (:meth:`world_refused`, from the
        producer thread), None once it is rendered."""
        self.world_path = srcs.world_folder(cfg.run_dir)
        archive_specs = [s for s in scfg.sources if not is_live(s)]
        live_specs = [s for s in scfg.sources if is_live(s)]

        def make_sources() -> list:
            if archive_specs:
                return srcs.discover(archive_specs, fov_deg=scfg.fov_deg, on_error=on_error,
                                     ground_truth=self.ground_truth, decoder=scfg.decoder)
            if live_specs:
                return []
            wait = WORLD_RETRY_S[0]
            while not stop.is_set():
                try:
                    made = srcs.synthetic_sources(cfg.run_dir, scfg.synthetic, fov_deg=scfg.fov_deg,
                                                  on_error=on_error, ground_truth=self.ground_truth,
                                                  decoder=scfg.decoder)
                except OSError as err:
                    if err.errno not in durable.REFUSED:
                        on_error("synthetic", "synthetic_failed", f"{type(err).__name__}: {err}")
                        return []
                    self.world_refused(err)  # a full disk: said, counted, tried again
                    stop.wait(wait)
                    wait = min(2 * wait, WORLD_RETRY_S[1])
                    continue
                except Exception as err:  # rendering failed: say so, stream nothing rather than crash-loop
                    on_error("synthetic", "synthetic_failed", f"{type(err).__name__}: {err}")
                    return []
                self.world_refused(None)
                return made
            return []

        self.progress = progress = Progress(cfg.run_dir / "streamer" / "progress.json" if scfg.resume else None)
        stop = threading.Event()
        on_frame = lambda s: metrics.sources.inc(metrics.frames, (s,))  # noqa: E731
        streams = []
        if archive_specs or not live_specs:
            streams.append(_skip_counted(window_stream(make_sources, scfg, on_frame=on_frame, on_error=on_error,
                                                       log=log, progress=progress, stop=stop,
                                                       needed=cfg.ground_truth_needed),
                                         progress, metrics.skipped))
        for spec in live_specs:
            live = LiveSource(spec, fov_deg=scfg.fov_deg, on_error=on_error, on_event=self.on_event, stop=stop,
                              open_timeout_s=scfg.live_open_timeout_s, read_timeout_s=scfg.live_read_timeout_s,
                              stall_timeout_s=scfg.live_stall_timeout_s, backoff_initial_s=scfg.reconnect_initial_s,
                              backoff_max_s=scfg.reconnect_max_s)
            streams.append(live_stream(live, scfg, on_frame=on_frame,
                                       gate=GroundTruthGate(cfg.ground_truth_needed, on_error, log)))
        self.feed = WindowFeed(streams, on_error=on_error)
        self.feed.stop = stop
        self.disp = Dispatcher(max_in_flight=scfg.max_in_flight, resend_timeout_s=scfg.resend_timeout_s,
                               peer_timeout_s=scfg.peer_timeout_s)
        self.sock = runtime.ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a send to a vanished labeler fails instead of vanishing
        security.secure_server(self.sock, cfg.network.curve, runtime.metrics)
        endpoint = cfg.network.bind(cfg.network.work_port)
        self.sock.bind(endpoint)
        log.info("streamer up", extra={"endpoint": endpoint, "sources": scfg.sources or "synthetic"})
        self.counts = {"sent": 0, "acked": 0}
        self.exhausted = False
        self.retry_at = 0.0

    def close(self) -> None:
        self.feed.close()
        self.save_progress(closing=True)
        self.sock.close(linger=0)

    def save_progress(self, *, closing: bool = False) -> None:
        """Write the progress file where it changed. One the disk refuses (full, an I/O error) is
        said once while it fails alike (an error line with the errno's name, the status's
        ``write_error``, which the status line of ``reliev3r up`` shows) and counted at each try
        (``progress_write_failures_total``, for the alert); the progress stays in
        memory and is tried again every :data:`PROGRESS_RETRY_S` while windows flow on (a restart
        meanwhile sends again the windows acknowledged since the last write: replay stores each
        once). At ``closing``, a refused write is a warning."""
        if self.refused is not None and not closing and time.monotonic() < self.retry_at:
            return
        try:
            saved = self.progress.save()
        except OSError as err:
            reason = durable.errno_name(err)
            self.metrics.progress_failures.labels(reason).inc()
            said = f"progress: {durable.refusal(err)}"
            extra = {"reason": reason, "detail": str(err), "path": str(self.progress.path)}
            if closing:
                self.log.warning("progress not written at close: the windows acknowledged since the last write "
                                 "are sent again at the next start", extra=extra)
            elif said != self.refused:
                self.log.error("progress not written: kept in memory and written once the disk has room; windows "
                               "flow on", extra=extra)
            self.refused, self.retry_at = said, time.monotonic() + PROGRESS_RETRY_S
            self.runtime.status["write_error"] = said
            return
        if saved and self.refused is not None:
            self.log.info("progress written again", extra={"path": str(self.progress.path)})
            self.refused = None
            if self.world_said is None:
                self.runtime.status.pop("write_error", None)
            else:
                self.runtime.status["write_error"] = self.world_said

    def world_refused(self, err: OSError | None) -> None:
        """The synthetic world's render met ``err``, one of a disk that refuses a write
        (``reliev3r.durable.REFUSED``; a run's first start on a full disk, where the streamer made
        no window, exited 1 and was restarted into the same disk): said once while it fails
        alike (an error line with the errno's name and the path, the status's ``write_error``),
        counted at each try (``world_write_failures_total``, for the alert); the producer thread
        tries again after :data:`WORLD_RETRY_S` while the service serves on. ``None``: rendered
        (said where it was refused)."""
        if err is None:
            if self.world_said is not None:
                self.log.info("synthetic world rendered", extra={"path": str(self.world_path)})
                self.world_said = None
                if self.refused is None:
                    self.runtime.status.pop("write_error", None)
            return
        reason = durable.errno_name(err)
        self.metrics.world_failures.labels(reason).inc()
        said = f"synthetic world: {durable.refusal(err)}"
        if said != self.world_said:
            self.log.error("synthetic world not rendered: tried again once the disk has room; the streamer "
                           "waits", extra={"reason": reason, "detail": str(err),
                                           "path": str(err.filename or self.world_path)})
        self.world_said = self.runtime.status["write_error"] = said

    def on_error(self, source: str, reason: str, detail: str) -> None:
        self.metrics.sources.inc(self.metrics.errors, (source, reason))
        first = self.problems_seen((source, reason, detail))
        (self.log.warning if first else self.log.debug)(
            "source problem" if first else "source problem again",
            extra={"source": source, "reason": reason, "detail": detail})

    def on_event(self, source: str, event: str, value: float) -> None:
        metrics, series = self.metrics, self.metrics.sources
        if event == "reconnect":
            series.inc(metrics.reconnects, (source,))
        elif event == "gap":
            series.inc(metrics.gaps, (source,))
            series.inc(metrics.gap_seconds, (source,), value)
            self.log.info("live feed back", extra={"source": source, "gap_s": round(value, 3)})
        elif event == "dropped":
            series.inc(metrics.dropped, (source,), value)
        elif event == "connected":
            series.set(metrics.connected, (source,), value)

    def send(self, window_id: str, frames: list, source: str | None = None) -> bool:
        """Send a window to a labeler (``source``: the window's, for :meth:`Dispatcher.peer`)."""
        disp = self.disp
        peer = disp.peer(source)
        if peer is None:
            return False
        try:
            self.sock.send_multipart([peer, *frames], flags=zmq.NOBLOCK, copy=False)
        except zmq.ZMQError as err:  # EHOSTUNREACH (gone) or EAGAIN (its queue is full)
            self.log.info("labeler unreachable, dropping its credits", extra={"error": str(err)})
            disp.lost_peer(peer)
            return False
        disp.sent(window_id, frames, peer, source)
        return True

    def step(self) -> int | None:
        """One loop turn; the exit status once every window is done, else None: 1 when nothing
        could be produced (no window sent, none acknowledged before a restart, no source
        finished before one), else 0 (an early exit 1 is a failed start to the supervisor)."""
        disp, feed, sock, progress, metrics, counts = (self.disp, self.feed, self.sock, self.progress,
                                                       self.metrics, self.counts)
        runtime, log, scfg = self.runtime, self.log, self.cfg
        wants_window = not self.exhausted and disp.can_take_new()
        if sock.poll(disp.poll_ms(wants_window, wants_window and not feed.queue.empty())):
            for _ in range(256):  # drain what is queued, bounded so sending is not starved
                peer, msg = runtime.receive(sock, kinds=("ready", "done"), routed=True)
                if msg is not None:
                    _handle(msg, peer, disp, metrics.acked, counts, runtime, progress)
                if not sock.poll(0):
                    break
        timed_out, abandoned = disp.expire()
        for wid in abandoned:
            metrics.abandoned.inc()
            progress.acked(wid)  # given up: it must not hold the resume point back for ever
            log.error("window abandoned after repeated timeouts", extra={"window_id": wid})
        self.save_progress()
        if timed_out:
            log.info("windows timed out, resending", extra={"count": len(timed_out)})
        wid = disp.next_resend()
        while wid is not None:
            if not self.send(wid, disp.in_flight[wid].frames):
                disp.resend.appendleft(wid)
                break
            metrics.resent.inc()
            wid = disp.next_resend()
        if not self.exhausted and not disp.resend and disp.can_take_new():
            window = feed.get()  # made ahead by the producers, at most the queue's depth
            if window is None:
                if feed.exhausted:
                    self.exhausted = True
                    log.info("all sources done", extra={"sent": counts["sent"]})
            else:
                msg = window.to_message()
                if scfg.payload != "raw":
                    msg = protocol.compress_frames(msg, scfg.payload, scfg.jpeg_quality)
                frames = protocol.encode(msg)
                if not self.send(window.window_id, frames, window.source):
                    # the chosen labeler vanished between check and send: keep it for later
                    disp.in_flight[window.window_id] = InFlight(frames, 0.0, b"", 0)
                    disp.resend.append(window.window_id)
                counts["sent"] += 1
                metrics.sent.inc()
        metrics.in_flight.set(len(disp.in_flight))
        metrics.labelers.set(sum(1 for c, _ in disp.credits.values() if c > 0))
        runtime.status.update(sent=counts["sent"], acked=counts["acked"], in_flight=len(disp.in_flight))
        if self.exhausted and not disp.in_flight:
            log.info("every window done", extra=runtime.status)
            if counts["sent"]:
                return 0
            if progress.finished_before or progress.skipped:
                log.info("every source finished in an earlier run",
                         extra={"sources": progress.finished_before, "windows_skipped": progress.skipped})
                return 0
            return 1
        return None


def run(cfg: PipelineConfig, runtime: Runtime) -> int:
    return serve(StreamerService(cfg, runtime, StreamerMetrics(runtime.metrics)), runtime)


def _skip_counted(windows: Iterator[Window], progress: Progress, skipped_total) -> Iterator[Window]:
    """Count windows window_stream skipped as acknowledged (it keeps no metrics itself)."""
    seen = 0
    for window in windows:
        yield window
        skipped = progress.skipped - seen
        if skipped:
            skipped_total.inc(skipped)
            seen += skipped


def _handle(msg: protocol.Message, peer: bytes, disp: Dispatcher, acked_total, counts: dict,
            runtime: Runtime, progress: Progress) -> None:
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
        progress.acked(window_id)
        acked_total.labels(status).inc()
        counts["acked"] += 1
        if status == "dropped":
            runtime.log.info("labeler dropped window",
                             extra={"window_id": window_id, "reason": msg.meta.get("reason", "")})

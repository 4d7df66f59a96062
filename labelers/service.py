"""The labeler process: windows from the streamer -> teacher labels -> replay -> ``done``.

Up to ``labeler.batch_windows`` held windows are labelled together (their frames share the
depth teacher's batches; on CUDA the uploads are pinned, non-blocking copies on a side stream,
the forward bf16 and compiled; their view pairs share the match teacher's batches:
``labelers.matches.match_windows``). The ``depth``, ``matches`` and ``triangulation`` stage
latencies are then those of the whole batch. The per-frame and per-pair CPU work of matching,
verification and triangulation runs on ``labeler.cpu_threads`` threads (same results). A depth
teacher on a GPU runs its batch on a thread of its own beside the matching (the ``depth`` and
``matches`` latencies then overlap; a window whose depth fails is dropped after both).
Per window: check the frames, run the depth teacher and the match teacher, send an ``insert``
to replay and wait for its ``insert_ack`` (timeout, then a fresh socket and a retry: the
"lazy pirate" pattern; replay stores each window id once, so a retry is harmless), then
tell the streamer ``done``. Two waits overlap the labelling: the ``ready`` that asks for the
next windows goes out as a batch starts (they travel while it is labelled), and the inserts
run on a thread of their own (:class:`Inserts`: replay stores one batch while the next is
labelled; at most ``labeler.batch_windows`` labelled windows wait for it, so replay's
backpressure still stops the labelling). A ``done`` still follows the durable insert.

Bad input, decided per case (every case counted in ``reliev3r_labeler_dropped_total{reason}``
or ``reliev3r_labeler_flags_total{flag}``):

* frames smaller than 16 px, or fewer than 2 views: drop (``too_small``, ``too_few_views``).
* frames smaller than the matcher takes (XFeat: 32 px, ``labelers.matches.size_problem``): no
  matches in any pair; with a depth teacher keep, flag ``too_small_for_matcher`` (and
  ``no_matches``: its depth labels still teach shape), without one drop (``too_small``).
* a blank frame (grey standard deviation below ``blank_std``: black, white, a test card's
  flat field): drop (``blank_frame``): it gives no matches and a teacher's depth of nothing
  is noise that the depth loss would fit.
* grayscale-like frames (R = G = B): keep, flag ``grayscale`` (geometry is all there).
* teacher output non-finite everywhere: drop (``teacher_non_finite``); partly: those pixels
  are invalid. A teacher that needs what the window lacks: drop (``teacher_needs_gt``).
* no verified match in any pair: drop (``no_matches``) when there is no depth teacher (the
  window would carry no label at all); keep with flag ``no_matches`` otherwise (depth labels
  still teach shape).

A dropped window is reported ``done`` with status ``dropped`` so the streamer does not resend it.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor

import cv2
import numpy as np
import zmq

from labelers.depth import TeacherError, make_teacher
from labelers.depth_models import describe_runtime
from labelers.matches import make_matcher, match_windows, size_problem, triangulate_many
from monitoring.metrics import Metrics
from reliev3r import protocol, security
from reliev3r.config import PipelineConfig
from reliev3r.protocol import Message
from reliev3r.service import Runtime, serve

POLL_MS = 100
INSERT_POLL_MS = 2  # the idle poll while inserts are out: their done goes out within this
MIN_SIZE = 16
LINK_SAY_S = 30.0
"""While the streamer link is not up, the labeler says why this often (and whenever the reason changes)."""


class Labeler:
    """Turns ``window`` messages into ``insert`` messages or drop reasons (no sockets).

    :meth:`label_many` labels several windows together: their frames go through the depth
    teacher in shared batches (what a GPU teacher needs to be busy), and their view pairs through
    the match teacher in shared batches (one LightGlue forward for XFeat; verification per pair).
    """

    def __init__(self, cfg: PipelineConfig, metrics=None):
        self.cfg = cfg.labeler
        self.teacher = make_teacher(self.cfg.teacher, self.cfg.device, batch_frames=self.cfg.batch_frames,
                                    precision=self.cfg.precision, compile=self.cfg.compile)
        self.matcher = make_matcher(self.cfg.matcher, self.cfg.device)
        self.metrics = metrics
        self.pool = (ThreadPoolExecutor(self.cfg.cpu_threads, thread_name_prefix="labeler-cpu")
                     if self.cfg.cpu_threads > 1 else None)
        self.beside = (ThreadPoolExecutor(1, thread_name_prefix="labeler-depth")
                       if self.teacher.produces_labels and getattr(self.teacher, "cuda", False) else None)
        """A thread for a GPU depth teacher: its batch runs beside the matching on the CPU threads
        (on a CPU the two would only share the cores)."""

    def close(self) -> None:
        for pool in (self.pool, self.beside):
            if pool is not None:
                pool.shutdown(wait=True)
        self.pool = self.beside = None

    def teachers(self) -> dict:
        return {"depth": self.teacher.describe(), "matches": {"name": self.matcher.name,
                                                               "version": self.matcher.version}}

    def label(self, msg: Message, timer=None) -> tuple[Message | None, str, list[str]]:
        """(insert message or None, drop reason, flags)."""
        return self.label_many([msg], timer)[0]

    def _check(self, frames: np.ndarray, flags: list[str]) -> str:
        """Drop reason of a window's frames ("" = fine); appends quality flags."""
        views, height, width = frames.shape[:3]
        if min(height, width) < MIN_SIZE:
            return "too_small"
        if views < 2:
            return "too_few_views"
        # OpenCV's grey and its standard deviation (0.06 ms for 4 views at 168x224; a float
        # copy of the window took 2.6 ms, outside every timed stage)
        if any(cv2.meanStdDev(cv2.cvtColor(view, cv2.COLOR_RGB2GRAY))[1][0, 0] < self.cfg.blank_std
               for view in frames):
            return "blank_frame"
        if size_problem(self.matcher, height, width):  # XFeat's 32 px: no matches (match_windows)
            if not self.teacher.produces_labels:
                return "too_small"  # nothing to label the window with
            flags.append("too_small_for_matcher")
        if all(np.array_equal(f[..., 0], f[..., 1]) and np.array_equal(f[..., 1], f[..., 2])
               for f in (frames[:, ::8, ::8], frames)):  # a sample first: colour frames stop there
            flags.append("grayscale")
        return ""

    def label_many(self, msgs: list[Message], timer=None) -> list[tuple[Message | None, str, list[str]]]:
        timer = timer or (lambda stage: _NullTimer())
        results: list = [None] * len(msgs)
        flags: list[list[str]] = [[] for _ in msgs]
        todo = []
        for n, msg in enumerate(msgs):
            reason = self._check(msg.arrays["frames"], flags[n])
            if reason:
                results[n] = (None, reason, flags[n])
            else:
                todo.append(n)
        depths: dict[int, tuple | TeacherError] = {}

        checked = list(todo)  # the windows the teacher sees (todo shrinks below)

        def predict() -> dict[int, tuple | TeacherError]:
            with timer("depth"):
                out = self.teacher.predict_many([msgs[n].arrays["frames"] for n in checked],
                                                gt_depths=[msgs[n].arrays.get("gt_depth") for n in checked],
                                                window_ids=[msgs[n].meta["window_id"] for n in checked])
            return dict(zip(checked, out))

        pending = None
        if self.teacher.produces_labels and todo:
            if self.beside is not None:  # the GPU's depth beside the CPU's matching; same labels
                pending = self.beside.submit(predict)
            else:
                depths = predict()
                todo = [n for n in todo if not isinstance(depths[n], TeacherError)]
        matched = {}
        try:
            if todo:
                seen = (getattr(self.matcher, "computed", 0), getattr(self.matcher, "reused", 0))
                with timer("matches"):
                    out = match_windows([msgs[n].arrays["frames"] for n in todo], self.matcher,
                                        long_pairs=self.cfg.long_pairs, min_matches=self.cfg.min_matches,
                                        max_matches_per_pair=self.cfg.max_matches_per_pair,
                                        threshold_px=self.cfg.ransac_threshold_px, pool=self.pool)
                matched = dict(zip(todo, out))
                if self.metrics is not None:
                    self.metrics.observe_features(getattr(self.matcher, "computed", 0) - seen[0],
                                                  getattr(self.matcher, "reused", 0) - seen[1])
        finally:
            if pending is not None:  # also when matching failed: no teacher call outlives its batch
                depths = pending.result()
        for n, depth in depths.items():
            if isinstance(depth, TeacherError):
                results[n] = (None, depth.reason, flags[n])
        todo = [n for n in todo if results[n] is None]
        for n in todo:
            per_pair = matched[n][1]
            if self.metrics is not None:
                for k in per_pair:
                    self.metrics.observe_pair(k)
            if len(matched[n][0]) == 0:
                if not self.teacher.produces_labels:
                    results[n] = (None, "no_matches", flags[n])
                    continue
                flags[n].append("no_matches")
        todo = [n for n in todo if results[n] is None]
        triangulated = {}
        if todo:
            with timer("triangulation"):
                out = triangulate_many([(matched[n][0], msgs[n].arrays["intrinsics"]) for n in todo],
                                       threshold_px=self.cfg.ransac_threshold_px, pool=self.pool)
            triangulated = dict(zip(todo, out))
        for n in todo:
            msg, arrays = msgs[n], dict(msgs[n].arrays)
            if self.teacher.produces_labels:
                depth, valid = depths[n]
                arrays["teacher_depth"] = depth
                arrays["teacher_valid"] = valid.astype(np.uint8)
            arrays["matches"] = matched[n][0]
            arrays["match_triangulation"] = triangulated[n]
            meta = {k: msg.meta[k] for k in ("window_id", "source", "frame_indices", "timestamps") if k in msg.meta}
            meta["teacher"] = self.teachers()
            results[n] = (Message("insert", meta, arrays), "", flags[n])
        return results


class _NullTimer:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


class LabelerMetrics:
    """The labeler's Prometheus series."""

    def __init__(self, m: Metrics):
        self.windows = m.counter("labeler_windows_total", "Windows handled, by outcome", ["status"])
        self.dropped = m.counter("labeler_dropped_total", "Windows dropped, by reason", ["reason"])
        self.flags = m.counter("labeler_flags_total", "Windows kept with a quality flag", ["flag"])
        self.stage = m.histogram("labeler_stage_seconds", "Time per labelling stage", ["stage"],
                                 buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        self.pairs = m.histogram("matches_per_pair", "Verified matches kept per view pair",
                                 buckets=(0, 1, 8, 16, 32, 64, 128, 256, 512, 1024))

        self.features = m.counter("labeler_frames_total", "Frames matched, by whether their features were "
                                  "detected or reused (a view of an earlier window)", ["features"])

    def observe_pair(self, k: int) -> None:
        self.pairs.observe(k)

    def observe_features(self, detected: int, reused: int) -> None:
        if detected:
            self.features.labels("detected").inc(detected)
        if reused:
            self.features.labels("reused").inc(reused)

    def timer(self, stage: str):
        return self.stage.labels(stage).time()


class ReplayLink:
    """Insert with acknowledgement over our own DEALER: wait ``timeout_s`` for the matching
    ``insert_ack``, then drop the socket (and whatever it queued) and try again."""

    def __init__(self, runtime: Runtime, endpoint: str, *, timeout_s: float, retries: int):
        self.runtime, self.endpoint, self.timeout_s, self.retries = runtime, endpoint, timeout_s, retries
        self.sock = None
        self.link = security.LinkWatch(endpoint, "replay", "replay_port", runtime.cfg.network.curve)
        """The link's state across the fresh sockets of the retries: a retry says why it retries."""

    def _connect(self):
        self.close()
        self.sock = self.runtime.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(self.sock, self.runtime.cfg.network.curve)
        self.link.watch(self.sock)
        self.sock.connect(self.endpoint)

    def close(self) -> None:
        if self.sock is not None:
            self.link.close()
            self.sock.close(linger=0)
            self.sock = None

    def insert(self, msg: Message) -> tuple[str, str] | None:
        """(status, reason) from replay, or None when it never answered."""
        frames = protocol.encode(msg)
        window_id = msg.meta["window_id"]
        for attempt in range(1 + self.retries):
            if self.sock is None:
                self._connect()
            self.sock.send_multipart(frames, copy=False)
            deadline = time.monotonic() + self.timeout_s
            while time.monotonic() < deadline and not self.runtime.stopping:
                if not self.sock.poll(POLL_MS):
                    continue
                _, reply = self.runtime.receive(self.sock, kinds=("insert_ack", "error"))
                if reply is None:
                    continue
                if reply.kind == "error":
                    if reply.meta.get("reason") == "rate_limited" and reply.meta.get("window_id") == window_id:
                        # replay held the insert as long as it may (backpressure from the
                        # learner's sampling rate): ask again, this is no failed attempt
                        self.sock.send_multipart(frames, copy=False)
                        deadline = time.monotonic() + self.timeout_s
                        continue
                    detail = f":{reply.meta['detail']}" if reply.meta.get("detail") else ""
                    return "dropped", f"replay_error:{reply.meta.get('reason', '')}{detail}"
                if reply.meta.get("window_id") != window_id:
                    continue  # a late ack of an earlier window's retry
                status = reply.meta.get("status")
                reason = str(reply.meta.get("reason", ""))
                if status in ("stored", "duplicate"):
                    return status, reason
                return "dropped", f"replay_{status}:{reason}"
            if self.runtime.stopping:
                return None
            self.runtime.log.warning("no insert_ack from replay, retrying",
                                     extra={"window_id": window_id, "attempt": attempt + 1, "reason": self.link.why()})
            self.close()
        return None


class Inserts:
    """The inserts of labelled windows, on a thread that owns the :class:`ReplayLink`, in the
    order they were put; :meth:`finished` hands back ``(window_id, flags, result)`` of those
    replay answered (``result`` as :meth:`ReplayLink.insert` returns it). :meth:`put` blocks
    while ``depth`` windows wait, so a replay that holds its inserts holds the labelling too.
    An error on the thread is raised again in the caller's next :meth:`put` or
    :meth:`finished` (the process fails, as it did when it inserted inline, and is restarted)."""

    def __init__(self, link: ReplayLink, timer, depth: int):
        self.link, self.timer = link, timer
        self.todo: queue.Queue = queue.Queue(maxsize=depth)
        self.results: queue.Queue = queue.Queue()
        self.pending = 0  # put and not yet handed back by finished()
        self.closing = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="labeler-insert", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self.closing.is_set():
                try:
                    window_id, insert, flags = self.todo.get(timeout=0.05)
                except queue.Empty:
                    continue
                with self.timer("insert"):
                    result = self.link.insert(insert)
                self.results.put((window_id, flags, result))
        except BaseException as err:
            self.error = err
        finally:
            self.link.close()

    def _check(self) -> None:
        if self.error is not None:
            raise RuntimeError("the insert thread failed") from self.error

    def put(self, window_id: str, insert: Message, flags: list[str]) -> None:
        while True:
            self._check()
            try:
                self.todo.put((window_id, insert, flags), timeout=0.1)
                self.pending += 1
                return
            except queue.Full:
                continue

    def finished(self) -> list[tuple[str, list[str], tuple[str, str] | None]]:
        self._check()
        out = []
        while True:
            try:
                out.append(self.results.get_nowait())
            except queue.Empty:
                self.pending -= len(out)
                return out

    def close(self, timeout_s: float) -> None:
        """Stop after the insert in progress (one that replay has not acknowledged by then
        is left to the streamer's resend, as any unacknowledged window is)."""
        self.closing.set()
        self.thread.join(timeout_s)


class LabelerService:
    """A labeler process's sockets (work from the streamer, the link to replay) and the
    windows it holds; ``step()`` labels one batch of held windows, or waits for work."""

    def __init__(self, cfg: PipelineConfig, runtime: Runtime, metrics: LabelerMetrics):
        self.cfg = cfg.labeler
        self.runtime, self.metrics = runtime, metrics
        self.labeler = Labeler(cfg, metrics)
        self.curve = cfg.network.curve
        endpoint = cfg.network.connect(cfg.network.work_port)
        self.link = security.LinkWatch(endpoint, "streamer", "work_port", cfg.network.curve)
        """The streamer link's state, said when it changes (no window is all a labeler sees otherwise)."""
        self.work = self._connect()
        self.link_said = time.monotonic()
        link = ReplayLink(runtime, cfg.network.connect(cfg.network.replay_port),
                          timeout_s=self.cfg.insert_timeout_s, retries=self.cfg.insert_retries)
        self.inserts = Inserts(link, metrics.timer, depth=self.cfg.batch_windows)
        runtime.log.info("labeler up", extra={"teachers": self.labeler.teachers(),
                                              "runtime": describe_runtime(self.labeler.teacher)})
        self.held: deque[Message] = deque()
        self.counts = {"labelled": 0, "dropped": 0}
        self.last_ready = 0.0
        try:
            self.ready()
        except BaseException:
            self.close()
            raise

    def _connect(self) -> zmq.Socket:
        """A fresh DEALER to the streamer, with this labeler's CURVE keys, watched by :attr:`link`."""
        sock = self.runtime.ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        security.secure_client(sock, self.curve)
        self.link.watch(sock)
        sock.connect(self.link.endpoint)
        return sock

    def close(self) -> None:
        self.inserts.close(timeout_s=self.cfg.insert_timeout_s)
        self.link.close()
        self.work.close(linger=0)
        self.labeler.close()

    def rejoin(self) -> None:
        """Replace the streamer socket whose key the streamer refused, when the link's back-off
        says (:meth:`reliev3r.security.LinkWatch.rejoin_due`): ZeroMQ never offers the key again
        on that socket, and the streamer admits a key authorised since without a restart. A
        refused socket got no window; a window that came over an earlier one is acknowledged by
        its id over the new one, or resent by the streamer as any unacknowledged window is."""
        if not self.link.rejoin_due():
            return
        self.link.close()
        self.work.close(linger=0)
        self.work = self._connect()
        self.ready()

    def send(self, msg: Message) -> bool:
        """Send to the streamer without blocking; False when the link takes nothing (one its CURVE
        refused is dropped by ZeroMQ until :meth:`rejoin` replaces it, and a blocking send there
        never returned: the labeler could not stop). An unsent ``ready`` is repeated by the keep-alive; an unsent
        ``done`` leaves the window to the streamer's resend, as a lost one does."""
        try:
            self.work.send_multipart(protocol.encode(msg), flags=zmq.NOBLOCK)
            return True
        except zmq.Again:
            return False

    def ready(self) -> None:
        credits = max(0, self.cfg.credits - len(self.held))
        self.send(Message("ready", {"credits": credits}))
        self.last_ready = time.monotonic()

    def done(self, window_id: str, status: str, reason: str) -> None:
        if not self.send(Message("done", {"window_id": window_id, "status": status, "reason": reason})):
            self.runtime.log.warning("done not sent: the streamer link takes nothing, the streamer resends the window",
                                     extra={"window_id": window_id, "reason": self.link.state})

    def take(self) -> None:
        while self.work.poll(0):
            with self.metrics.timer("decode"):
                _, msg = self.runtime.receive(self.work, kinds=("window",))
            if msg is None:
                continue
            if not isinstance(msg.meta.get("window_id"), str) or not msg.meta["window_id"]:
                self.runtime.metrics.reject("bad_window_id")
                continue
            self.held.append(msg)

    def finish(self, window_id: str, insert: Message | None, reason: str, flags: list[str]) -> None:
        """A dropped window is acknowledged now; a labelled one goes to :attr:`inserts` and is
        acknowledged by :meth:`acknowledge` once replay has stored it."""
        if insert is not None:
            self.inserts.put(window_id, insert, flags)
        else:
            self._outcome(window_id, "dropped", reason, flags)

    def acknowledge(self) -> None:
        """``done`` for every window whose insert replay has answered."""
        for window_id, flags, result in self.inserts.finished():
            if result is None:
                # no done: the streamer resends after its timeout (at-least-once)
                self.metrics.windows.labels("insert_failed").inc()
                self.runtime.log.warning("replay unreachable, window left to the streamer's resend",
                                         extra={"window_id": window_id})
            else:
                self._outcome(window_id, *result, flags)

    def _outcome(self, window_id: str, status: str, reason: str, flags: list[str]) -> None:
        """Count a window's outcome (``dropped``, or replay's ``stored``/``duplicate``) and tell
        the streamer ``done``."""
        metrics, counts = self.metrics, self.counts
        for flag in flags:
            metrics.flags.labels(flag).inc()
        metrics.windows.labels(status).inc()
        if status == "dropped":
            metrics.dropped.labels(reason.split(":")[0]).inc()
            counts["dropped"] += 1
        else:
            counts["labelled"] += 1
        self.runtime.status.update(counts)  # before the done, so a peer that sees it sees this
        self.done(window_id, status, reason)

    def say_link(self) -> None:
        """Log the streamer link's state when it changed (up, or why the labeler waits), and
        again every :data:`LINK_SAY_S` while it is not up (a host that never answers changes nothing)."""
        now = time.monotonic()
        if self.link.poll() or (not self.link.up and now - self.link_said >= LINK_SAY_S):
            self.link_said = now
            if self.link.up:
                self.runtime.log.info(self.link.state)
            else:
                reason = self.link.state
                if self.link.refused:  # the socket does not offer the key again: rejoin() replaces it
                    reason += (f": this labeler tries again with a new socket, at most {security.REJOIN_MAX_S:.0f} s "
                               "apart, and connects once the streamer's authorized_clients holds its key")
                self.runtime.log.warning("waiting for the streamer", extra={"endpoint": self.link.endpoint,
                                                                           "reason": reason})

    def step(self) -> None:
        """Label up to ``labeler.batch_windows`` held windows (having asked for the next ones
        first), hand their inserts to :attr:`inserts`, acknowledge what replay has stored, and
        ask for more; with none held, wait up to one poll for work (a short one while inserts
        are out, so their ``done`` is not held back) and send the keep-alive ``ready`` when due."""
        log, labeler, timer = self.runtime.log, self.labeler, self.metrics.timer
        self.say_link()
        self.rejoin()
        if not self.held and self.work.poll(POLL_MS if not self.inserts.pending else INSERT_POLL_MS):
            self.take()
        self.acknowledge()
        if not self.held:
            if time.monotonic() - self.last_ready > self.cfg.ready_interval_s:
                self.ready()  # keep-alive; also re-registers with a restarted streamer
            return
        batch = [self.held.popleft() for _ in range(min(len(self.held), self.cfg.batch_windows))]
        self.ready()  # the next windows travel while these are labelled
        with timer("labelling"):  # the batch's whole time: its depth and matches may overlap
            try:
                outcomes = labeler.label_many(batch, timer)
            except Exception:  # a bug on odd input must cost one window, not the worker:
                log.exception("batched labelling failed; labelling the windows one by one",
                              extra={"windows": [m.meta["window_id"] for m in batch]})
                outcomes = []
                for msg in batch:
                    try:
                        outcomes.append(labeler.label(msg, timer))
                    except Exception as err:
                        log.exception("labelling failed", extra={"window_id": msg.meta["window_id"]})
                        outcomes.append((None, f"labeler_error:{type(err).__name__}", []))
        for msg, (insert, reason, flags) in zip(batch, outcomes):
            self.finish(msg.meta["window_id"], insert, reason, flags)
        self.acknowledge()
        self.take()
        self.ready()


def run(cfg: PipelineConfig, runtime: Runtime) -> int:
    return serve(LabelerService(cfg, runtime, LabelerMetrics(runtime.metrics)), runtime)

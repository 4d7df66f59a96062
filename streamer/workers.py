"""Decode-and-window workers: archive sources decoded, analysed and cut into windows in
processes of their own, so several sources use several cores (``streamer.decode_workers``).

``source_windows`` is what ``streamer.service.window_stream`` iterates per source: the same
windows, in the same order and with the same ids as ``windows_of`` in the caller's thread,
and the same ``on_frame``/``on_error`` calls (made in the caller, from the worker's reports).
A source is handed to an idle worker; when every worker is busy (more sources at once than
workers) or the source is of a kind a worker cannot rebuild from its path, it is decoded in
the caller's thread as without workers.

Between the streamer and its workers travel only the wire format's ``window`` messages
(``reliev3r.protocol``, validated on receipt) and msgpack-encoded reports (a window's carries
its ``Window.blur_history``, which the message does not), over a private pipe per worker; a
worker reads ahead at most ``PREFETCH`` windows. A worker that dies (a crash in a decoder)
fails its source with ``source_failed`` and is replaced; the other sources go on.
"""

from __future__ import annotations

import atexit
import json
import multiprocessing as mp
import os
import queue
import threading
from typing import Callable, Iterator

import cv2
import msgpack
import numpy as np

from reliev3r import protocol
from reliev3r.config_base import build, to_dict
from streamer import segments
from streamer import sources as srcs
from streamer.config import StreamerConfig
from streamer.windows import View, Wanted, Window, windows_of

PREFETCH = 4
"""Windows a worker's source may be ahead of the caller (memory: this many windows per worker)."""
IDLE_EXIT_S = 60.0
"""A worker without a source for this long exits (the pool starts another when needed)."""


def available_cores() -> int:
    """Cores this process may run on (``os.sched_getaffinity``; ``os.cpu_count`` where absent)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def worker_count(cfg: StreamerConfig) -> int:
    """Worker processes for ``cfg``: ``decode_workers``, or with 0 one per available core but
    no more than ``interleave`` (the sources decoded at once)."""
    return cfg.decode_workers or min(available_cores(), cfg.interleave)


# ----------------------------------------------------------------------------- messages

def window_message_frames(window: Window) -> list[bytes]:
    return [bytes(f) for f in protocol.encode(window.to_message())]


def window_from_frames(frames: list[bytes]) -> Window:
    msg = protocol.decode(frames, kinds=("window",))
    a, meta = msg.arrays, msg.meta
    views = [View(int(i), float(t), a["frames"][v], a["intrinsics"][v].astype(np.float64),
                  a["gt_depth"][v] if "gt_depth" in a else None,
                  a["gt_cam_to_world"][v].astype(np.float64) if "gt_cam_to_world" in a else None)
             for v, (i, t) in enumerate(zip(meta["frame_indices"], meta["timestamps"]))]
    return Window(meta["window_id"], meta["source"], views)


def _job_of(source) -> dict | None:
    """What a worker needs to rebuild ``source`` (None: a kind it cannot)."""
    if type(source) is srcs.VideoSource:  # one decoder thread: the workers are the parallelism
        return {"kind": "video", "path": str(source.path), "fov_deg": source.fov_deg, "decode_threads": 1,
                "ground_truth": source.ground_truth, "decoder": source.decoder}
    if type(source) is srcs.ImageSequenceSource:
        return {"kind": "images", "path": str(source.path), "fov_deg": source.fov_deg,
                "depth_scale": source.depth_scale, "ground_truth": source.ground_truth}
    return None


# ----------------------------------------------------------------------------- worker side

def _worker_main(conn, cfg_doc: dict) -> None:
    # A worker is one core's worth of decoding and analysis, and the workers share the cores.
    # OpenCV's own threads (one per core by default) cost the streamer path 1.2-1.5x the CPU per
    # frame, for 1.1-1.2x one stream's speed, where the second of 2 cores was idle, and the same
    # CPU for no speed where other work kept both busy (docs/BENCHMARKS.md, sixth pass of issue 18).
    cv2.setNumThreads(1)
    cfg = build(StreamerConfig, cfg_doc)

    def send(head: list, frames: list[bytes] = ()) -> None:
        conn.send_bytes(msgpack.packb([*head, len(frames)]))
        for f in frames:
            conn.send_bytes(f)

    while True:
        try:
            if not conn.poll(IDLE_EXIT_S):
                return  # idle: give the memory back
            job = msgpack.unpackb(conn.recv_bytes())
        except (EOFError, OSError):
            return
        counted = [0]

        def on_error(source: str, reason: str, detail: str) -> None:
            send(["error", source, reason, detail])

        try:
            if job["kind"] == "video":
                source = srcs.VideoSource(job["path"], fov_deg=job["fov_deg"], on_error=on_error,
                                          decode_threads=job["decode_threads"], ground_truth=job["ground_truth"],
                                          decoder=job["decoder"])
            else:
                source = srcs.ImageSequenceSource(job["path"], fov_deg=job["fov_deg"], on_error=on_error,
                                                  depth_scale=job["depth_scale"], ground_truth=job["ground_truth"])

            wanted = Wanted()

            def count(n: int) -> None:
                counted[0] += n

            segment = job.get("segment")
            if segment is not None:
                segment = segments.Segment(**{**segment, "pts": tuple(segment["pts"])})
            frames = srcs.read_frames(source, job["start"], wanted, count, segment)

            for window in windows_of(source.name, frames, cfg, pass_index=job["pass_index"],
                                     on_error=on_error if job["report_short"] else None, wanted=wanted,
                                     blur_history=job["blur_history"]):
                send(["window", counted[0], list(window.blur_history)], window_message_frames(window))
                counted[0] = 0
            send(["end", counted[0]])
        except Exception as err:  # reported to the caller as the source's failure
            send(["failed", counted[0], f"{type(err).__name__}: {err}"])


# ----------------------------------------------------------------------------- caller side

class _Worker:
    def __init__(self, ctx, cfg_doc: dict):
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=_worker_main, args=(child, cfg_doc), daemon=True, name="streamer-decode")
        self.process.start()
        child.close()

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join(5)
        self.conn.close()


class WorkerPool:
    """``count`` decode worker processes (spawned: the streamer has threads and sockets)."""

    def __init__(self, cfg: StreamerConfig, count: int):
        self.ctx = mp.get_context("spawn")
        self.cfg_doc = to_dict(cfg)
        self.count = count
        self.idle: list[_Worker] = []
        self.started = 0
        self.lock = threading.Lock()

    def take(self) -> _Worker | None:
        with self.lock:
            while self.idle:
                worker = self.idle.pop()
                if worker.process.is_alive():
                    return worker
                self.started -= 1  # exited while idle
                worker.conn.close()
            if self.started < self.count:
                self.started += 1
                return _Worker(self.ctx, self.cfg_doc)
            return None

    def give_back(self, worker: _Worker, healthy: bool) -> None:
        with self.lock:
            if healthy:
                self.idle.append(worker)
                return
            self.started -= 1
        worker.close()

    def close(self) -> None:
        with self.lock:
            idle, self.idle = self.idle, []
        for worker in idle:
            worker.close()


_pools: dict[tuple, WorkerPool] = {}
_pools_lock = threading.Lock()


def pool_for(cfg: StreamerConfig) -> WorkerPool | None:
    """The process's worker pool for ``cfg`` (None with ``decode_workers: 1``: no workers)."""
    count = worker_count(cfg)
    if count <= 1:
        return None
    key = (json.dumps(to_dict(cfg), sort_keys=True), count)  # workers build their own copy of cfg
    with _pools_lock:
        pool = _pools.get(key)
        if pool is None:
            pool = _pools[key] = WorkerPool(cfg, count)
        return pool


@atexit.register
def _close_pools() -> None:
    with _pools_lock:
        pools = list(_pools.values())
        _pools.clear()
    for pool in pools:
        pool.close()


def source_windows(source, cfg: StreamerConfig, *, start: int, pass_index: int | str,
                   on_frame: Callable[[str], None], on_error: srcs.ErrorSink,
                   pool: WorkerPool | None = None, segment: segments.Segment | None = None,
                   blur_history: tuple[float, ...] = ()) -> Iterator[Window]:
    """Windows of one archive source from ``start`` (``on_error`` also for a source too short
    for a window, unless resumed: a resumed source may rightly have too few frames left), or of
    one ``segment`` of a video (``streamer.segments``; never said of a segment: a segment
    without windows says nothing of the video's others). A worker starts on the source at once,
    before the first window is asked for. ``blur_history``: where ``start`` resumes at a
    window's first frame, that window's ``Window.blur_history``."""
    pool = pool if pool is not None else pool_for(cfg)
    job = _job_of(source) if pool is not None else None
    worker = pool.take() if job is not None else None
    report_short = start == 0 and segment is None
    if worker is None:
        wanted = Wanted()
        return windows_of(source.name, _counted(source, on_frame, start, wanted, segment), cfg, pass_index=pass_index,
                          on_error=on_error if report_short else None, wanted=wanted, blur_history=blur_history)
    return _from_worker(pool, worker, {**job, "start": start, "pass_index": pass_index, "report_short": report_short,
                                       "segment": None if segment is None else segment_doc(segment),
                                       "blur_history": list(blur_history)},
                        source.name, on_frame, on_error)


def segment_doc(segment: segments.Segment) -> dict:
    """A segment as a worker's job carries it (msgpack: the stamps as a list)."""
    return {"start": segment.start, "stop": segment.stop, "seek_pts": segment.seek_pts, "pts": list(segment.pts),
            "last": segment.last}


def segments_of(source, cfg: StreamerConfig) -> list[segments.Segment]:
    """The segments a video archive is decoded in by several workers (``streamer.segments``);
    [] where it is decoded whole: no worker pool, not a video file, or too short to split."""
    job = _job_of(source)
    if pool_for(cfg) is None or job is None or job["kind"] != "video":
        return []
    return segments.plan_cached(source.path, segments.SEGMENT_FRAMES)


def _counted(source, on_frame, start: int, wanted: Wanted | None = None, segment: segments.Segment | None = None):
    def count(n: int) -> None:
        for _ in range(n):
            on_frame(source.name)

    yield from srcs.read_frames(source, start, wanted, count, segment)


def _from_worker(pool: WorkerPool, worker: _Worker, job: dict, name: str, on_frame, on_error) -> Iterator[Window]:
    """Send ``job`` to ``worker`` now; the generator returned yields its windows."""
    ahead: queue.Queue = queue.Queue(maxsize=PREFETCH)
    stop = threading.Event()

    def read() -> None:
        """Reports from the pipe into ``ahead`` until the job ends (a thread: the worker runs
        ahead of the caller while the caller sends)."""
        try:
            while not stop.is_set():
                head = msgpack.unpackb(worker.conn.recv_bytes())
                frames = [worker.conn.recv_bytes() for _ in range(head[-1])]
                _put(ahead, (head[:-1], frames), stop)
                _arrived()
                if head[0] in ("end", "failed"):
                    return
        except Exception as err:  # EOFError/OSError: the worker died; anything else: garbled reports
            _put(ahead, (["died", 0, f"decode worker lost ({worker.process.exitcode}): {type(err).__name__}: {err}"],
                         []), stop)
            _arrived()

    reader = threading.Thread(target=read, daemon=True, name=f"decode-{name[:20]}")
    worker.conn.send_bytes(msgpack.packb(job))
    reader.start()
    return WorkerWindows(_drain(pool, worker, reader, ahead, stop, name, on_frame, on_error), ahead)


class WorkerWindows:
    """A worker's windows, in order, and whether the next report is in already (``ready``): the
    caller may take windows from the sources that have one instead of waiting on one that is
    still decoding (``streamer.service.window_stream``)."""

    def __init__(self, windows: Iterator[Window], ahead: queue.Queue):
        self.windows, self.ahead = windows, ahead

    def __iter__(self) -> "WorkerWindows":
        return self

    def __next__(self) -> Window:
        return next(self.windows)

    @property
    def ready(self) -> bool:
        """Whether ``next`` returns (a window, the end or a failure) without waiting on the worker;
        it may wait still after an error report, which comes before the source's next window."""
        return not self.ahead.empty()


_arrivals = 0
_arrival = threading.Condition()


def arrivals() -> int:
    """Reports that have come in from any worker so far (for :func:`wait_for_arrival`)."""
    with _arrival:
        return _arrivals


def wait_for_arrival(seen: int, timeout: float) -> None:
    """Wait until a worker's report comes in after :func:`arrivals` returned ``seen`` (or ``timeout``
    seconds pass)."""
    with _arrival:
        _arrival.wait_for(lambda: _arrivals != seen, timeout)


def _arrived() -> None:
    global _arrivals
    with _arrival:
        _arrivals += 1
        _arrival.notify_all()


def _drain(pool: WorkerPool, worker: _Worker, reader: threading.Thread, ahead: queue.Queue, stop: threading.Event,
           name: str, on_frame, on_error) -> Iterator[Window]:
    healthy = False
    try:
        while True:
            head, frames = ahead.get()
            kind = head[0]
            if kind == "error":
                on_error(head[1], head[2], head[3])
                continue
            for _ in range(head[1]):
                on_frame(name)
            if kind == "window":
                window = window_from_frames(frames)
                window.blur_history = tuple(head[2])
                yield window
            elif kind == "end":
                healthy = True
                return
            else:  # "failed" in the worker, or the worker died
                healthy = kind == "failed"
                raise RuntimeError(head[2])
    finally:
        stop.set()
        if not healthy:  # closed early or dead: the worker may be mid-job; replace it
            pool.give_back(worker, False)
        reader.join(5)
        if healthy:
            pool.give_back(worker, True)


def _put(q: queue.Queue, item, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            q.put(item, timeout=0.1)
            return
        except queue.Full:
            continue

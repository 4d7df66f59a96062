"""Live feeds through PyAV: ``rtsp://`` (TCP transport), ``http(s)://``, ``tcp://`` and
``udp://`` MPEG-TS, and webcams (``/dev/videoN``, V4L2).

A live feed never ends; it drops, stalls and comes back. Three layers keep frames coming:

* read timeouts inside FFmpeg: PyAV's ``timeout=(open, read)`` (an interrupt callback that
  aborts any blocking call) plus the protocols' own socket timeouts (``rw_timeout`` for every
  AVIO protocol, ``timeout`` for rtsp/tcp/udp/http; all in microseconds, see FFmpeg's
  protocols and rtsp documentation), so a silent server turns into an error, not a hang;
* a watchdog: a reader thread decodes; if no frame arrives for ``stall_timeout_s`` (a server
  that keeps the socket open but sends nothing decodable) the watchdog abandons that reader
  (it exits when its bounded read returns) and starts a fresh connection;
* reconnects with exponential backoff and full jitter (``backoff_initial_s`` doubling up to
  ``backoff_max_s``), counted as ``reconnect`` events; the time without frames is reported as
  a ``gap`` event when frames flow again, and the first frame after it carries
  ``discontinuity`` so no window spans the gap.

Lost or damaged packets are counted (``corrupt_packet``); what the decoder conceals until the
next keyframe is dropped (``streamer.sources.DamageGate``) and the next frame kept carries
``discontinuity`` as well. A feed with a display matrix (a phone held upright streams landscape
pixels and a rotation) is turned upright, as a recording of it read as a file is.

The reader keeps decoding in real time whatever the consumer does: frames wait in a short
drop-oldest queue (a live feed cannot be paused; ``dropped`` events count what was lost). As
decoded, not converted: the consumer glances at a frame from its planes when a test looks at it,
and converts it to RGB only when it becomes a view (``streamer.sources.frame_pixels``); an
intra-only feed (MJPEG from IP cameras and webcams) is not even decoded until then
(``streamer.sources.IntraDecoder``).
"""

from __future__ import annotations

import functools
import hashlib
import random
import re
import threading
import time
from collections import deque
from typing import Callable, Iterator

import numpy as np

from reliev3r.imaging import TRANSPOSE
from streamer.sources import (DamageGate, ErrorSink, Frame, IntraDecoder, _log_error, fov_intrinsics, frame_pixels,
                              upright, video_stream)

LIVE_SCHEMES = ("rtsp://", "rtsps://", "http://", "https://", "tcp://", "udp://", "rtp://", "srt://")
EventSink = Callable[[str, str, float], None]
"""(source, event, value): ``reconnect`` (1), ``gap`` (seconds), ``dropped`` (frames),
``connected`` (1 or 0)."""


def is_live(spec: str) -> bool:
    return spec.startswith(LIVE_SCHEMES) or bool(re.fullmatch(r"/dev/video\d+", spec))


def live_name(url: str) -> str:
    """Stable per URL, free of credentials and colons (window ids split on ':')."""
    bare = re.sub(r"//[^/@]*@", "//", url)  # rtsp://user:pass@host -> rtsp://host
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", bare.split("://")[-1].split("?")[0])[:40].strip("_") or "live"
    return f"{stem}-{hashlib.sha1(url.encode()).hexdigest()[:6]}"


def open_options(url: str, read_timeout_s: float) -> tuple[dict[str, str], str | None]:
    """(FFmpeg options, format) for a live URL."""
    us = str(int(read_timeout_s * 1e6))
    options = {"rw_timeout": us}
    fmt = None
    if url.startswith(("rtsp://", "rtsps://")):
        # TCP interleaved: no UDP ports to open through firewalls, no lost RTP packets.
        # ``timeout`` is the rtsp socket I/O timeout (``stimeout`` before FFmpeg 5).
        options.update(rtsp_transport="tcp", timeout=us)
    elif url.startswith("udp://"):
        # overrun_nonfatal: a burst that overflows the receive FIFO drops packets, not the feed.
        options.update(timeout=us, overrun_nonfatal="1", fifo_size="50000")
    elif url.startswith(("tcp://", "http://", "https://")):
        options.update(timeout=us)
    elif url.startswith("/dev/video"):
        options, fmt = {}, "v4l2"
    return options, fmt


class LiveSource:
    """One live feed; ``frames()`` yields until ``stop`` is set (never ends on its own)."""

    def __init__(self, url: str, *, fov_deg: float = 60.0, on_error: ErrorSink = _log_error,
                 on_event: EventSink | None = None, open_timeout_s: float = 5.0, read_timeout_s: float = 5.0,
                 stall_timeout_s: float = 8.0, backoff_initial_s: float = 0.5, backoff_max_s: float = 10.0,
                 queue_frames: int = 16, stop: threading.Event | None = None, rng: random.Random | None = None):
        self.url = url
        self.path = url
        self.name = live_name(url)
        self.session = time.strftime("%Y%m%dT%H%M%S")
        """Window ids carry it: frame numbers restart with every streamer process."""
        self.fov_deg = fov_deg
        self.on_error = on_error
        self.on_event = on_event or (lambda source, event, value: None)
        self.open_timeout_s, self.read_timeout_s, self.stall_timeout_s = open_timeout_s, read_timeout_s, stall_timeout_s
        self.backoff_initial_s, self.backoff_max_s = backoff_initial_s, backoff_max_s
        self.stop = stop or threading.Event()
        self.rng = rng or random.Random()
        self.position = 0
        self.reconnects = 0
        self._queue: deque[Frame] = deque(maxlen=queue_frames)
        self._cond = threading.Condition()
        self._generation = 0
        self._last_frame_at = 0.0
        self._reading_since: float | None = None  # a connection is open and being read
        self._outage_since: float | None = None
        self._index = 0
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ consumer + watchdog
    def frames(self, start: int = 0) -> Iterator[Frame]:
        """Frames as they arrive. ``start`` is ignored: a live feed cannot be rewound."""
        self._start_reader(first=True)
        try:
            while not self.stop.is_set():
                with self._cond:
                    if not self._queue:
                        self._cond.wait(0.1)
                    frame = self._queue.popleft() if self._queue else None
                if frame is not None:
                    self.position = frame.index + 1
                    yield frame
                    continue
                self._watchdog()
        finally:
            with self._cond:
                self._generation += 1  # the reader exits after its current (bounded) read
                self._cond.notify_all()

    def _watchdog(self) -> None:
        with self._cond:
            reading = self._reading_since is not None
            quiet = time.monotonic() - max(self._last_frame_at, self._reading_since or 0.0)
        if reading and quiet > self.stall_timeout_s:
            self.on_error(self.name, "stalled", f"{self.url}: no frame for {self.stall_timeout_s:.1f}s, reconnecting")
            self._start_reader(first=False)

    def _start_reader(self, *, first: bool) -> None:
        with self._cond:
            self._generation += 1
            self._reading_since = None
            generation = self._generation
            self._last_frame_at = time.monotonic()
            if not first and self._outage_since is None:
                self._outage_since = self._last_frame_at
        threading.Thread(target=self._read_loop, args=(generation, first), daemon=True,
                         name=f"live-{self.name}").start()

    def _current(self, generation: int) -> bool:
        return generation == self._generation and not self.stop.is_set()

    # ------------------------------------------------------------------ reader
    def _read_loop(self, generation: int, first: bool) -> None:
        delay = self.backoff_initial_s
        attempt_is_reconnect = not first
        while self._current(generation):
            if attempt_is_reconnect:
                self.reconnects += 1
                self.on_event(self.name, "reconnect", 1.0)
            got_frames = self._read_once(generation)
            attempt_is_reconnect = True
            if got_frames:
                delay = self.backoff_initial_s
            with self._cond:
                if self._current(generation) and self._outage_since is None:
                    self._outage_since = time.monotonic()
            self.on_event(self.name, "connected", 0.0)
            # Full jitter: many streamers cut off by one server restart do not return in step.
            wait = self.rng.uniform(0, delay)
            delay = min(self.backoff_max_s, delay * 2)
            if self.stop.wait(wait):
                return

    def _read_once(self, generation: int) -> bool:
        import av  # here, not at the top: a streamer of image folders runs without PyAV
        from av.video.reformatter import VideoReformatter

        options, fmt = open_options(self.url, self.read_timeout_s)
        try:
            container = av.open(self.url, format=fmt, options=options,
                                timeout=(self.open_timeout_s, self.read_timeout_s))
        except (av.error.FFmpegError, OSError) as err:
            self.on_error(self.name, "connect_failed", f"{self.url}: {err}")
            return False
        got = False
        try:
            stream = video_stream(container)
            if stream is None:
                self.on_error(self.name, "no_video_stream", self.url)
                return False
            self.on_event(self.name, "connected", 1.0)
            with self._cond:
                if generation == self._generation:
                    self._reading_since = time.monotonic()
            reformatter = VideoReformatter()  # used by the consumer alone, which converts the frames
            # MJPEG (IP cameras, webcams): each frame decoded by the consumer when a test looks at it
            intra = IntraDecoder.for_live(stream, self.url) if IntraDecoder.applies(stream) else None
            lost = functools.partial(self.on_error, self.name)  # a frame that fails when looked at
            # Lost or damaged packets: what the decoder conceals up to the next keyframe is dropped
            # and the next frame starts a new window (a receiver that joins mid-stream waits for
            # its first keyframe the same way; that is not counted).
            gate = DamageGate()
            for packet in container.demux(stream):
                if not self._current(generation):
                    return got
                damaged = gate.fed(packet)
                try:
                    decoded = packet.decode() if intra is None else intra.frames(packet)
                except av.error.FFmpegError as err:
                    damaged = damaged or not gate.suspect
                    gate.damaged()
                    decoded = ()
                    detail = str(err)
                else:
                    detail = "flagged by the demuxer (lost packets)"
                if damaged and got:
                    self.on_error(self.name, "corrupt_packet", f"{self.url}: {detail}")
                for vframe in decoded:
                    keep, report = gate.check(vframe)
                    if report == "corrupt_frame" and got:
                        self.on_error(self.name, report, f"{self.url}: a frame flagged corrupt by the decoder")
                    if keep:  # converted by the consumer, only where a test looks or a view is made
                        orientation = upright(vframe)  # a phone's feed as players show it, as archives
                        rgb, look = frame_pixels(reformatter, vframe, lost, orientation, index=self._index)
                        w, h = vframe.width, vframe.height
                        size = (h, w) if orientation & TRANSPOSE else (w, h)
                        self._push(rgb, size, generation, damaged=gate.take_gap(), glance=look)
                        got = True
                    else:  # damaged, not stalled: the watchdog must not reconnect a feed that decodes
                        with self._cond:
                            if generation == self._generation:
                                self._last_frame_at = time.monotonic()
            self.on_error(self.name, "feed_ended", f"{self.url}: end of stream")
        except av.error.FFmpegError as err:
            self.on_error(self.name, "read_failed", f"{self.url}: {err}")
        finally:
            with self._cond:
                if generation == self._generation:
                    self._reading_since = None
            container.close()
        return got

    def _push(self, rgb: np.ndarray | Callable[[], np.ndarray], size: tuple[int, int], generation: int, *,
              damaged: bool = False, glance: Callable | None = None) -> None:
        """Queue a frame of ``size`` (width, height): its RGB, or a function that makes it (and
        ``glance``, one that makes its glance: ``Frame``)."""
        now = time.monotonic()
        with self._cond:
            if generation != self._generation:
                return
            # A gap is time without frames after frames had flowed (a slow first connect is not one).
            gap = self._outage_since is not None and self._index > 0
            if gap:
                self.on_event(self.name, "gap", now - self._outage_since)
            self._outage_since = None
            if len(self._queue) == self._queue.maxlen:
                self.on_event(self.name, "dropped", 1.0)
                oldest = self._queue.popleft()
                if oldest.discontinuity:  # the gap it marked is still there: mark the next frame
                    if self._queue:
                        self._queue[0].discontinuity = True
                    else:
                        gap = True
            w, h = size
            self._queue.append(Frame(self._index, now - self._t0, rgb, fov_intrinsics(self.fov_deg, w, h),
                                     discontinuity=gap or damaged, glance=glance))
            self._index += 1
            self._last_frame_at = now
            self._cond.notify_all()

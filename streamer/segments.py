"""A long video in segments, so that several decode workers share one source
(``streamer.workers``): each segment starts at a keyframe the decoder can seek to and ends
where the next begins, and a worker decodes it from there as if it were a source of its own.

A segment's frames keep the indices, timestamps and pixels of decoding the whole file
(``VideoSource.frames(segment=...)``): a frame's index is the rank of its presentation stamp
among every frame's stamps in the file, read by one pass of the demuxer (packets only, no
decoding), so it does not depend on where the seek lands. Windows never span a boundary (the
window builder starts afresh in each segment), and window ids stay ``source:pass:first_frame``.

A file is split only where its stamps can be trusted for that: every packet has a presentation
stamp, no two the same, the stamps never start again, and where the codec reorders frames
(B-frames) it is H.264 or HEVC (MPEG-4 Part 2 packed in AVI, as Megamind.avi of the shared
videos, gives decoded frames stamps out of display order) and the stamps are not in decode order
(files whose muxer wrote decode stamps as presentation stamps, as box.mp4: their display order
is known only from decoding). Stamps start again where recordings are joined end to end (``cat
a.ts b.ts``): decoded whole, the second recording's frames come after the first's (the source
reports ``stamps_reset``), not where their stamps rank among the first's. So a keyframe stamped
before a packet decoded before it, or a packet stamped before more packets decoded before it
than a decoder holds back (``REORDER_LIMIT`` with B-frames, none without), leaves the file
whole. A file left whole is logged (``not split``) with a named reason: ``unreadable``,
``no_video``, ``too_short``, ``missing_stamps``, ``repeated_stamps``, ``stamps_reset``,
``untrusted_codec``, ``decode_order_stamps`` or ``no_boundary``.
A boundary is a *closed* keyframe: every packet before it in decode order is shown before it
and every one after it, after, so nothing decoded after the seek belongs to the segment before
and nothing of its own was decoded before it.
"""

from __future__ import annotations

import bisect
import heapq
import logging
import threading
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("reliev3r.streamer.segments")

SEGMENT_FRAMES = 1500
"""Frames a segment holds at least (a minute at 25 frames/s): a boundary costs the views of
about one window (the builder starts afresh) and one seek, and a file shorter than two
segments is not split."""


REORDERING_CODECS = frozenset({"h264", "hevc"})
"""Codecs with B-frames whose decoded frames carry their packets' presentation stamps."""
REORDER_LIMIT = 16
"""Packets decoded before a packet that an H.264 or HEVC decoder may show after it (its
reordering: at most 16 frames in H.264, fewer in HEVC)."""


@dataclass(frozen=True, slots=True)
class Whole:
    """Why a file is decoded whole: ``reason`` (a name, module docstring) and ``detail``."""

    reason: str
    detail: str = ""


@dataclass(frozen=True, slots=True)
class Segment:
    """Frames ``start`` (inclusive) to ``stop`` (exclusive) of a video, display order."""

    start: int
    stop: int
    seek_pts: int | None
    """Presentation stamp of the keyframe at ``start`` (the decoder seeks to it); None for the
    first segment (decoded from the beginning)."""
    pts: tuple[int, ...]
    """Presentation stamps of frames ``start`` .. ``stop - 1``, in display order."""
    last: bool
    """The segment ends where the file ends (its end is checked against the header's duration)."""

    def after(self, pts: int | None) -> bool:
        """Whether a decoded frame of this stamp is shown after the segment's last frame."""
        return pts is not None and not self.last and pts > self.pts[-1]

    def index_of(self, pts: int | None) -> int | None:
        """Display index of a decoded frame by its stamp; None for a frame not in the segment."""
        if pts is None:
            return None
        at = bisect.bisect_left(self.pts, pts)
        return self.start + at if at < len(self.pts) and self.pts[at] == pts else None


def plan(path: Path, length: int = SEGMENT_FRAMES) -> list[Segment]:
    """Segments of at least ``length`` frames (the last at least ``length // 2``); [] when the
    file is shorter than two segments, cannot be read, or its stamps cannot be trusted (module
    docstring; logged as ``not split`` with the reason). Reads every packet of the video stream
    once, decoding none."""
    split = _plan(path, length)
    if isinstance(split, Whole):
        log.info("not split", extra={"path": str(path), "reason": split.reason, "detail": split.detail})
        return []
    return split


def _plan(path: Path, length: int) -> list[Segment] | Whole:
    from streamer.sources import _open_video, video_stream

    try:
        container = _open_video(str(path))
    except Exception as err:  # the source itself reports an unreadable file when it decodes
        return Whole("unreadable", f"{type(err).__name__}: {err}")
    try:
        stream = video_stream(container)
        if stream is None:
            return Whole("no_video", "no video stream")
        packets = [(p.pts, bool(p.is_keyframe)) for p in container.demux(stream) if p.size]
        reorders = bool(stream.codec_context.has_b_frames)
        codec = stream.codec_context.name
    except Exception as err:  # a damaged container: decode it whole, the damage gate copes
        return Whole("unreadable", f"{type(err).__name__}: {err}")
    finally:
        container.close()
    if reorders and codec not in REORDERING_CODECS:
        return Whole("untrusted_codec", f"{codec} with B-frames: its decoded frames' stamps may not follow "
                                        f"display order")
    return _split([p for p, _ in packets], [k for _, k in packets], reorders, length)


def _split(pts: list, keyframes: list[bool], reorders: bool, length: int) -> list[Segment] | Whole:
    """Segments from the packets' stamps and keyframe flags in decode order (see :func:`plan`),
    or why the file is read whole."""
    n = len(pts)
    if n < 2 * length:
        return Whole("too_short", f"{n} frames; two segments hold {2 * length}")
    if any(p is None for p in pts):
        return Whole("missing_stamps", f"packet {pts.index(None)} in decode order has no presentation stamp")
    if len(set(pts)) != n:
        return Whole("repeated_stamps", f"{n - len(set(pts))} packets repeat another's presentation stamp")
    reset = _stamps_reset(pts, keyframes, REORDER_LIMIT if reorders else 0)
    if reset is not None:
        return Whole("stamps_reset", reset)
    if reorders and all(a < b for a, b in zip(pts, pts[1:])):
        return Whole("decode_order_stamps", "B-frames, and the stamps increase in decode order: decode stamps "
                                            "where presentation stamps belong")
    shown = sorted(pts)
    later_min = [0] * n  # the lowest stamp of the packets after each one in decode order
    low = float("inf")
    for i in range(n - 1, -1, -1):
        later_min[i] = low
        low = min(low, pts[i])
    # a boundary: every packet before it in decode order is shown before it, every one after, after
    starts, high = [], pts[0]
    for i in range(1, n):
        if keyframes[i] and high < pts[i] < later_min[i]:
            starts.append(bisect.bisect_left(shown, pts[i]))
        high = max(high, pts[i])
    bounds = [0]
    for s in starts:
        if s - bounds[-1] >= length and n - s >= length // 2:
            bounds.append(s)
    if len(bounds) < 2:
        return Whole("no_boundary", f"no closed keyframe {length} frames from the start and {length // 2} "
                                    f"from the end")
    bounds.append(n)
    return [Segment(a, b, None if a == 0 else shown[a], tuple(shown[a:b]), b == n)
            for a, b in zip(bounds, bounds[1:])]


def _stamps_reset(pts: list, keyframes: list[bool], limit: int) -> str | None:
    """Where the stamps start again (recordings joined end to end), said for people; None where
    they do not. A decoder shows every frame decoded before a keyframe before it, and shows a
    frame before at most ``limit`` frames decoded before it: a keyframe stamped before a packet
    decoded before it, or a packet stamped before more than ``limit`` of them, is not shown where
    its stamp ranks."""
    top: list = []  # the limit + 1 highest stamps so far (a min-heap)
    high = None
    for i, (p, key) in enumerate(zip(pts, keyframes)):
        if key and high is not None and p < high:
            return f"keyframe {i} in decode order is stamped before a packet decoded before it (recordings joined?)"
        if len(top) > limit and p < top[0]:
            return (f"packet {i} in decode order is stamped before {limit + 1} or more packets decoded before it "
                    f"(recordings joined?)")
        if len(top) <= limit:
            heapq.heappush(top, p)
        elif p > top[0]:
            heapq.heapreplace(top, p)
        high = p if high is None else max(high, p)
    return None


_cache: dict[tuple, list[Segment]] = {}
_cache_lock = threading.Lock()


def plan_cached(path: Path, length: int = SEGMENT_FRAMES) -> list[Segment]:
    """:func:`plan`, kept per file (path, size, modification time) for the next pass."""
    try:
        st = Path(path).stat()
    except OSError:
        return []
    key = (str(path), st.st_size, st.st_mtime_ns, length)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    segments = plan(path, length)
    with _cache_lock:
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = segments
    return segments

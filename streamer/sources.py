"""Frame sources: video files (anything FFmpeg decodes, through PyAV), image-sequence folders
(with optional intrinsics and 7-Scenes style ground truth, or a ScanNet scene's) and the synthetic world.

A source yields :class:`Frame` objects lazily. Decoding problems never escape a source:
they are reported through ``on_error(source_name, reason, detail)`` (the streamer counts
them as ``reliev3r_decode_errors_total{source, reason}`` and logs them) and the source
ends or skips on, keeping every frame decoded before the problem. Frames the decoder
conceals after an error (up to the next keyframe) and unreadable images are dropped, and the
next frame kept carries ``discontinuity``, so no window spans the damage. ``discover`` never
raises either: a path it cannot use is reported with its reason and the others are returned.
"""

from __future__ import annotations

import bisect
import errno
import functools
import glob
import hashlib
import logging
import math
import os
import re
import stat
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterator, Protocol

import cv2
import numpy as np

from reliev3r import imaging
from reliev3r.imaging import TRANSPOSE, display_orientation, shown_intrinsics
from streamer.glance import MOTION_WIDTH, Glance, glance_of_rgb, glance_of_video_frame

if TYPE_CHECKING:  # PyAV is imported where a video is read: matching or image folders need no PyAV
    from av.video.reformatter import VideoReformatter

    from streamer.segments import Segment

log = logging.getLogger("reliev3r.streamer.sources")

VIDEO_SUFFIXES = frozenset({".mp4", ".mkv", ".avi", ".mov", ".webm", ".ts", ".m4v", ".mpg", ".mpeg",
                            ".flv", ".wmv", ".3gp", ".ogv", ".y4m", ".gif"})
TEMPORARY_SUFFIXES = frozenset({".part", ".partial", ".tmp", ".temp", ".crdownload", ".download", ".filepart",
                                ".!sync", ".!qb", ".opdownload"})
"""Suffixes of files a download or a copy writes before it renames them into place (browsers'
``.part``, ``.crdownload``; WinSCP's ``.filepart``; Resilio's ``.!sync``; Syncthing's ``.tmp``)."""
MAX_CONSECUTIVE_DECODE_ERRORS = 50
"""A stream that fails this many packets in a row is given up (it is garbage, not glitches)."""
MIN_FRAME_SIDE = 16
"""Frames narrower or lower than this (the smallest window side) are refused as ``too_small``:
upscaled, they carry no geometry to learn from."""

ErrorSink = Callable[[str, str, str], None]


class SourceError(Exception):
    """A source that cannot be opened at all. ``reason`` is a short, countable label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class FrameLost(SourceError):
    """A frame whose pixels could not be decoded when first asked for (an image its source
    decodes only when a test looks at it): the source has reported it with its reason, and the
    window builder takes it as a gap (``streamer.windows``)."""


class _Once:
    """A function of no arguments whose result is made on the first call and kept. A
    SourceError it raises is reported once through ``report(reason, detail)`` and raised as
    :class:`FrameLost` on that call and every later one."""

    __slots__ = ("make", "value", "report")

    def __init__(self, make: Callable[[], np.ndarray], report: Callable[[str, str], None]):
        self.make, self.value, self.report = make, None, report

    def __call__(self) -> np.ndarray:
        if self.make is not None:
            make, self.make = self.make, None
            try:
                self.value = make()
            except SourceError as err:
                self.value = FrameLost(err.reason)
                self.value.args = err.args
                self.report(err.reason, str(err))
        if isinstance(self.value, FrameLost):
            raise self.value
        return self.value


def _log_error(source: str, reason: str, detail: str) -> None:
    # said in the message too: a console that shows messages alone (teacher-train) names the source
    said = detail if detail.startswith(reason) else f"{reason}: {detail}"
    log.warning("decode error: %s: %s", source, said, extra={"source": source, "reason": reason, "detail": detail})


class Frame:
    """One frame of a source. ``rgb``, ``gt_depth`` and ``gt_cam_to_world`` may be given as
    functions of no arguments: they run on first access (a source converts to RGB, or reads
    ground truth, only for the frames that become views) and their result is kept."""

    __slots__ = ("index", "timestamp", "_rgb", "intrinsics", "_gt_depth", "_gt_cam_to_world", "discontinuity",
                 "_glance", "reduced")

    def __init__(self, index: int, timestamp: float, rgb, intrinsics: np.ndarray, gt_depth=None,
                 gt_cam_to_world=None, discontinuity: bool = False, glance=None, reduced=None):
        self.index = index
        """Frame number in its source (0-based, decode order of presentation)."""
        self.timestamp = timestamp
        """Seconds from the start of the source, increasing: a video's from its stream's start
        time (:class:`FrameClock`; recordings joined end to end follow one another), an image
        folder's frame index."""
        self._rgb = rgb
        self.intrinsics = intrinsics
        """float64 [3, 3] in pixels of ``rgb`` (known or assumed from the field of view)."""
        self._gt_depth = gt_depth
        self._gt_cam_to_world = gt_cam_to_world
        self.discontinuity = discontinuity
        """First frame after a gap (a live feed that reconnected, frames dropped after damage, an
        unreadable image): windows do not span it."""
        self._glance = glance
        self.reduced = reduced
        """(factor, RGB image decoded at 1/factor, (height, width) of ``rgb``) where the source
        decodes the frame at a reduced scale for its glance (a JPEG; the image may be a function
        of no arguments that decodes it, once): a view small enough is made from it and ``rgb``
        is never decoded (``streamer.windows.fit_rgb_reduced``)."""

    @property
    def rgb(self) -> np.ndarray:
        """uint8 [H, W, 3]."""
        if callable(self._rgb):
            self._rgb = self._rgb()
        return self._rgb

    @property
    def glance(self):
        """``streamer.glance.Glance`` made by the source, on first access when given as a
        function (None: made from ``rgb`` when needed)."""
        if callable(self._glance):
            self._glance = self._glance()
        return self._glance

    @glance.setter
    def glance(self, value) -> None:
        self._glance = value

    @property
    def gt_depth(self) -> np.ndarray | None:
        """float32 [H', W'] z-depth in metres (0 = unknown), any resolution of the same view."""
        if callable(self._gt_depth):
            self._gt_depth = self._gt_depth()
        return self._gt_depth

    @property
    def gt_cam_to_world(self) -> np.ndarray | None:
        """float64 [4, 4]."""
        if callable(self._gt_cam_to_world):
            self._gt_cam_to_world = self._gt_cam_to_world()
        return self._gt_cam_to_world


def resolved_path(path: Path) -> str:
    """The absolute path with every link on the way resolved (the file or folder read), or its
    absolute spelling where it cannot be resolved (a symlink loop, an unknown ``~user``, a NUL
    byte). Never raises."""
    try:
        return str(Path(path).expanduser().resolve())
    except (OSError, RuntimeError, ValueError):  # RuntimeError: a symlink loop (before Python 3.13)
        return os.path.abspath(path)


def source_name(path: Path) -> str:
    """Stable across restarts and unique per file: the stem of the file or folder read (a link
    is named after its target, so a link and its target are one source) plus a short hash of
    its absolute path's bytes. ASCII whatever the path (it is a metric label and part of every
    window id on the wire): the stem's other characters, a name's bytes that are not valid
    UTF-8 among them (which Python spells with surrogates), become ``_``. Never raises: a path
    that cannot be resolved (a symlink loop, an unknown ``~user``) or whose target does not
    exist is named after its own stem and absolute spelling."""
    absolute = resolved_path(path)
    try:
        raw = os.fsencode(absolute)  # the name's own bytes, those that are not UTF-8 included
    except UnicodeError:  # a surrogate no file name decodes to
        raw = absolute.encode("utf-8", "surrogatepass")
    shown = Path(absolute) if os.path.exists(absolute) else Path(path)  # a dangling link: its own name
    stem = re.sub(r"[^A-Za-z0-9_.-]", "_", shown.stem)[:40] or "source"
    return f"{stem}-{hashlib.sha1(raw).hexdigest()[:6]}"


def path_problem(err: BaseException) -> str:
    """A short, countable reason for an exception met while looking at a path."""
    if isinstance(err, SourceError):
        return err.reason
    if isinstance(err, RuntimeError) and "loop" in str(err).lower():  # Path.resolve before 3.13
        return "symlink_loop"
    if isinstance(err, RuntimeError) and "home directory" in str(err):  # Path.expanduser: ~nosuchuser
        return "bad_path"
    if isinstance(err, OSError):
        return {errno.ELOOP: "symlink_loop", errno.EACCES: "permission_denied", errno.EPERM: "permission_denied",
                errno.ENOENT: "missing", errno.ENAMETOOLONG: "bad_path", errno.ENOTDIR: "missing"
                }.get(err.errno, "unreadable")
    if isinstance(err, (ValueError, UnicodeError)):  # a NUL byte or an unencodable name
        return "bad_path"
    return "discovery_failed"


def inspect_path(path: Path) -> str:
    """``"dir"`` or ``"file"``; raise SourceError naming why the path is neither (``missing``,
    ``dangling_symlink``, ``symlink_loop``, ``permission_denied``, ``not_a_file``, ...)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError) as err:
        reason = path_problem(err)
        if reason == "missing" and os.path.islink(path):
            reason = "dangling_symlink"
            target = os.readlink(path)
            raise SourceError(reason, f"{path} -> {target}: the link's target does not exist") from None
        raise SourceError(reason, f"{path}: {err}") from None
    if stat.S_ISDIR(mode):
        return "dir"
    if stat.S_ISREG(mode):
        return "file"
    kind = ("a named pipe" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode)
            else "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a regular file")
    raise SourceError("not_a_file", f"{path}: {kind}")


def fov_intrinsics(fov_deg: float, width: int, height: int) -> np.ndarray:
    # Same formula as reliev3r.geometry.intrinsics_from_fov, in numpy (no torch in the decode path).
    f = 0.5 * width / math.tan(math.radians(fov_deg) / 2)
    return np.array([[f, 0.0, (width - 1) / 2], [0.0, f, (height - 1) / 2], [0.0, 0.0, 1.0]])


def read_intrinsics(path: Path) -> np.ndarray:
    """A 3x3 matrix, one line ``fx fy cx cy`` or a 4x4 whose top-left is the 3x3
    (``reliev3r.imaging.read_intrinsics``); raise SourceError ``bad_intrinsics`` when none."""
    try:
        return imaging.read_intrinsics(path)
    except OSError as err:
        raise SourceError("bad_intrinsics", f"{path}: {err}") from None
    except ValueError as err:
        raise SourceError("bad_intrinsics", str(err)) from None


class Source(Protocol):
    """One stream of frames. ``position`` is the next frame index to read (resumable progress:
    persist it and pass it back as ``start``)."""

    name: str
    path: Path
    position: int

    def frames(self, start: int = 0, wanted: Callable[[int], bool] | None = None) -> Iterator[Frame]: ...


class DamageGate:
    """Which decoded frames to trust after damage. A decode error, a packet the demuxer flags
    corrupt (MPEG-TS continuity errors: lost packets) or a frame the decoder flags corrupt make
    every frame that comes out afterwards suspect: the decoder conceals what it lost with
    smeared or stale pictures that look like frames, and frames that reference a damaged one
    (B-frames shown before it too) inherit the damage. Trust returns with a keyframe whose
    packet entered the decoder after the damage. The first frame trusted again carries
    ``discontinuity`` (:meth:`take_gap`). With frame threads (FFmpeg's default: the host's cores
    + 1, at most 16) a decode error surfaces up to that many packets after the packet it belongs
    to; a keyframe fed in between is not trusted, so one more group of pictures is dropped."""

    def __init__(self):
        self.suspect = False
        self.recovery: float | None = None
        """Presentation stamp of the first keyframe packet fed after the damage (None: not yet)."""
        self.dropped = 0
        """Suspect frames dropped since the last :meth:`report_dropped`."""
        self.gap = False

    def damaged(self) -> None:
        self.suspect = self.gap = True
        self.recovery = None

    def fed(self, packet) -> bool:
        """Note a packet going into the decoder; True when the demuxer flagged it corrupt (then
        the stream is damaged from here)."""
        if getattr(packet, "is_corrupt", False):
            first = not self.suspect
            self.damaged()
            return first
        if self.suspect and self.recovery is None and getattr(packet, "is_keyframe", False):
            self.recovery = float(packet.pts) if packet.pts is not None else -math.inf
        return False

    def check(self, vframe) -> tuple[bool, str | None]:
        """(keep this decoded frame, reason to report or None)."""
        report = None
        if getattr(vframe, "is_corrupt", False):
            report = None if self.suspect else "corrupt_frame"
            self.damaged()
        elif (self.suspect and self.recovery is not None and vframe.key_frame
              and (vframe.pts is None or vframe.pts >= self.recovery)):
            self.suspect = False
            report = "skipped_to_keyframe" if self.dropped else None
        if self.suspect:
            self.dropped += 1
            return False, report
        return True, report

    def report_dropped(self) -> int:
        dropped, self.dropped = self.dropped, 0
        return dropped

    def take_gap(self) -> bool:
        gap, self.gap = self.gap, False
        return gap


class FrameClock:
    """Seconds of each decoded frame of a video from the start of its stream (its header's
    start time: an MPEG-TS stream's stamps start at 1.4 s, say), increasing. A frame keeps the
    time its stamp gives when that is after the time given the frame before. A frame without a
    stamp (a raw H.264/HEVC stream has none) is timed one frame period (``1 / rate``) after the
    frame before, from 0. A stamp no later than the time given before (the stamp of the frame
    before again, from a broken mux; stamps in decode order, as some containers carry them: AVI
    with packed B-frames) is timed halfway from the time given before to one period after the
    last stamp kept (``anchor``): such frames, one or more in a row, stay within that period,
    and the frames after them keep their own stamps (timed a whole period on, each pushed the
    next stamp out of reach and every later frame a period late). A stamp more than
    ``RESET_PERIODS`` periods before the time given before starts a new recording (files joined
    end to end, ``cat a.ts b.ts``: the stamps start again): it is timed one period after the
    frame before, and the frames after it keep their stamps' spacing from there (``offset``)."""

    RESET_PERIODS = 16
    """How far back (frame periods) a stamp must go to start a new recording: further than a
    decoder's reordering (at most 16 frames in H.264) puts a stamp out of order."""

    def __init__(self, rate: float, start: float = 0.0):
        self.period = 1.0 / rate
        self.start = start
        """Seconds of the stream's own stamps at which its time is 0 (:func:`stream_start`)."""
        self.offset = -start
        """Added to a stamp's seconds to give its time (moved at each new recording)."""
        self.time = 0.0
        """The time given the last frame."""
        self.anchor = 0.0
        """The last stamp kept (or time a frame without one was given): ``time`` lies within a
        period after it."""
        self.pts: int | None = None
        """The stamp of the last frame."""
        self.restarted = False
        """The last frame's stamp started a new recording (its jump back: ``jump``, seconds)."""
        self.jump = 0.0

    def tick(self, index: int, vframe) -> bool:
        """Time the next frame (``index``: its index, 0 for the first of the video); True when its
        stamp repeats the stamp of the frame before (a duplicate: timed as a stamp out of order)."""
        t, duplicate = vframe.time, vframe.pts is not None and vframe.pts == self.pts
        self.pts = vframe.pts
        self.restarted = False
        if t is not None:
            t = float(t) + self.offset
        if t is not None and (index == 0 or t > self.time):
            self.time = self.anchor = t
        elif t is None:
            self.time = self.anchor = self.time + self.period if index > 0 else 0.0
        elif t < self.time - self.RESET_PERIODS * self.period:
            self.restarted, self.jump = True, self.time - t
            self.time = self.anchor = self.time + self.period
            self.offset += self.time - t
        else:
            self.time = (self.time + self.anchor + self.period) / 2
        return duplicate


def stream_start(stream) -> float:
    """Seconds of a stream's own stamps at which it starts (its header's start time; 0 when
    the header does not say): a frame's time counts from there (:class:`FrameClock`)."""
    if stream.start_time is None or not stream.time_base:
        return 0.0
    return float(stream.start_time * stream.time_base)


DECODERS = ("cpu", "cuda")
"""Where a video is decoded (``streamer.decoder``): FFmpeg on the CPU, or NVIDIA's video decoder
(NVDEC) through FFmpeg's ``cuda`` hardware acceleration, its frames copied back as NV12; a codec
or stream NVDEC cannot decode is decoded on the CPU."""


@functools.cache
def cuda_decoder_problem() -> str | None:
    """Why FFmpeg cannot open a CUDA device for decoding in this process (no GPU, a driver or
    container without NVIDIA's video decoder), or None where it can."""
    import av

    try:
        from av.codec.hwaccel import HWAccel
    except ImportError:
        return f"PyAV {av.__version__} decodes on the CPU only (hardware decoding needs PyAV >= 14)"
    try:
        HWAccel("cuda").create(av.Codec("h264", "r"))
    except Exception as err:  # PyAV raises its FFmpegError subclasses, or a RuntimeError
        return f"no CUDA video decoder ({type(err).__name__}: {err})"
    return None


GPU_DECODE_THREADS = ("SLICE", 1)
"""FFmpeg's thread type and count for a stream NVDEC decodes: one thread, as measured in the
streamer path (docs/BENCHMARKS.md, twenty-first and twenty-second passes of issue 18). FFmpeg's
own threads (``AUTO/0``, ``AUTO/4``) cut NVDEC's CPU time 2-3x in a probe of decoding alone,
but cost more CPU a frame in the streamer path: 4-37 % more on every file NVDEC decodes with
``AUTO/0`` (37 % on 4K HEVC), up to 34 % with ``AUTO/4`` (one file 2 % less)."""


ATTACHED_PIC = 0x0400
"""FFmpeg's ``AV_DISPOSITION_ATTACHED_PIC``: a picture attached to a file (cover art), shown as
a video stream of one frame."""


def video_stream(container):
    """The recording of a file with several video streams: the first that is not a still
    picture (a cover attached to the file, or a thumbnail track of one frame, which some cameras
    and editors put first), as players take it; None where the file has no video stream."""
    videos = list(container.streams.video)
    for stream in videos:
        if int(getattr(stream, "disposition", 0)) & ATTACHED_PIC:
            continue
        seconds, rate = stream_seconds(stream), float(stream.average_rate or 0)
        if stream.frames == 1 or (seconds is not None and rate and seconds * rate <= 1):
            continue
        return stream
    return videos[0] if videos else None


def packets_from_keyframe(container, stream, pts: int) -> Iterator:
    """The packets of ``stream`` from its keyframe of presentation stamp ``pts`` on (where a
    segment starts: every packet before it in decode order is shown before it, every one after,
    after). A seek lands at or before that keyframe in most containers, but some demuxers seek
    by decode stamps and land on the packet after it (MPEG-TS: every frame up to the next
    keyframe would be lost); a seek that lands past it is made again, further back (one second,
    then doubling), and the packets before the keyframe are read, not decoded."""
    back = max(1, round(1 / stream.time_base)) if stream.time_base else 90000
    target = pts
    while True:
        container.seek(target, stream=stream, backward=True, any_frame=False)
        packets = container.demux(stream)
        for packet in packets:
            if packet.pts is None or packet.pts < pts:
                continue  # before the keyframe
            if packet.pts == pts:
                yield packet
                yield from packets
                return
            break  # past it: the seek landed after the keyframe
        else:
            return  # the file ends before it
        if target < (stream.start_time or 0) - back:
            return  # from the file's start and still past it: nothing of this segment is left
        target, back = target - back, back * 2


def stream_seconds(stream) -> float | None:
    """A stream's duration from its header: its own (MP4, MPEG-TS), else Matroska's per-track
    ``DURATION`` tag; None when neither says."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    tag = re.fullmatch(r"(\d+):(\d+):(\d+(?:\.\d*)?)", str((stream.metadata or {}).get("DURATION", "")).strip())
    return int(tag[1]) * 3600 + int(tag[2]) * 60 + float(tag[3]) if tag else None


def promised_end(container, stream) -> float | None:
    """When the header says the video stream ends, in seconds of its timestamps: from the
    stream's own duration (:func:`stream_seconds`), else the container's (every stream's: an
    audio track that runs on past the video moves it); None when unknown."""
    seconds = stream_seconds(stream)
    if seconds is None:
        return container.duration / 1e6 if container.duration else None
    return stream_start(stream) + seconds


def _open_video(path: str, decoder: str = "cpu"):
    """``av.open`` for reading, with tags that are not UTF-8 ignored where PyAV takes the
    keyword: PyAV 19 dropped ``metadata_errors`` (a TypeError there failed every video).
    ``decoder="cuda"`` raises ``av.error.FFmpegError`` where no CUDA device can be opened."""
    import av

    kwargs = {}
    if decoder == "cuda":
        from av.codec.hwaccel import HWAccel

        kwargs["hwaccel"] = HWAccel("cuda", allow_software_fallback=True)
    try:
        return av.open(path, metadata_errors="ignore", **kwargs)
    except TypeError as err:
        if "metadata_errors" not in str(err):
            raise
        return av.open(path, **kwargs)


def _pose_lost(source, reason: str, detail: str) -> None:
    """Report a frame of ``source`` (a :class:`VideoSource` or :class:`ImageSequenceSource`) that
    goes without its ground-truth pose: every one is reported (and counted), each reason with
    the detail of the first frame of the source that had it (``source._poses_lost``), so the
    streamer's log says it once (``streamer.service.FirstSeen``), not once a frame."""
    said = (f"{detail}. The frame streams without a pose, as does each other frame of this source reported so "
            "(counted, the first named)")
    source.on_error(source.name, reason, source._poses_lost.setdefault(reason, said))


class VideoSource:
    """A video file in any container and codec FFmpeg decodes. A synthetic video's frames carry
    the ground truth stored beside it (``reliev3r.synthetic.load_ground_truth``); a frame whose
    stored pose is no pose streams without one, reported as ``bad_pose`` when a view asks for it."""

    def __init__(self, path: Path, *, fov_deg: float = 60.0, on_error: ErrorSink = _log_error,
                 decode_threads: int = 0, ground_truth: bool = True, decoder: str = "cpu"):
        """``ground_truth=False``: frames carry no depth or pose even where the video has them (a
        synthetic video's intrinsics still come from its ground truth)."""
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, not {decoder!r}")
        self.path = Path(path)
        self.decoder = decoder
        """``cpu`` or ``cuda`` (:data:`DECODERS`); ``cuda`` turns to ``cpu`` for this object's
        later passes, reported once as ``gpu_decode_unavailable``, where no CUDA device opens (no
        GPU, or a driver without the video decoder)."""
        self.ground_truth = ground_truth
        self.name = source_name(self.path)
        self.fov_deg = fov_deg
        self.decode_threads = decode_threads
        """Decoder threads (0: FFmpeg's choice, about one per core); a decode worker uses 1."""
        self.on_error = on_error
        self.position = 0
        self.undecoded = 0
        """Frames from ``start`` on that the last ``frames`` call left undecoded (``wanted``); it
        grows before the frame after them is yielded, and at the end for those after the last."""
        self.gt = _load_synthetic_gt(self.path)
        self._poses_lost: dict[str, str] = {}  # reason -> the detail of its first frame (:func:`_pose_lost`)

    def reopened(self) -> VideoSource:
        """A source made anew for this one's path, with its options (and its decoder: a ``cuda``
        one turned to ``cpu`` stays so): for the file read again once it was replaced or grew,
        whose ground truth (read when a source is made) may be another's now."""
        return VideoSource(self.path, fov_deg=self.fov_deg, on_error=self.on_error, decode_threads=self.decode_threads,
                           ground_truth=self.ground_truth, decoder=self.decoder)

    def _open(self):
        import av

        if not self.path.exists():
            raise SourceError("missing", str(self.path))
        if self.path.stat().st_size == 0:
            raise SourceError("empty_file", str(self.path))
        if self.decoder == "cuda" and (problem := cuda_decoder_problem()) is not None:
            self.on_error(self.name, "gpu_decode_unavailable", f"{self.path}: {problem}; decoding on the CPU")
            self.decoder = "cpu"  # said once: this source decodes on the CPU from now on
        try:
            container = _open_video(str(self.path), self.decoder)
        except av.error.FFmpegError as err:
            raise SourceError("open_failed", f"{self.path}: {err}") from None
        if not container.streams.video:
            container.close()
            raise SourceError("no_video_stream", str(self.path))
        return container

    def frames(self, start: int = 0, wanted: Callable[[int], bool] | None = None,
               segment: Segment | None = None) -> Iterator[Frame]:
        """Frames from index ``start``. With ``wanted`` (a frame index -> whether the caller
        will look at it), a frame not wanted may be left undecoded when nothing else needs it
        (see :class:`FrameSkipper`): the frames yielded then have gaps in ``index``. With
        ``segment`` (``streamer.segments``) only its frames, from ``max(start, segment.start)``:
        the decoder seeks to the segment's keyframe, and each frame's index comes from its
        stamp (the index of decoding the whole file); every frame is decoded (``wanted`` unused).
        An intra-only video's frames (MJPEG, ProRes, ...) are decoded only when first looked at
        (:class:`IntraDecoder`)."""
        try:
            container = self._open()
        except SourceError as err:
            self.on_error(self.name, err.reason, str(err))
            return
        try:
            yield from self._decode(container, start, wanted, segment)
        finally:
            container.close()

    def _decode(self, container, start: int, wanted: Callable[[int], bool] | None = None,
                segment: Segment | None = None) -> Iterator[Frame]:
        """Frames in display order; frames the decoder concealed after damage are dropped up to
        the next keyframe (see :class:`DamageGate`), and the next frame kept carries
        ``discontinuity``: no window spans the damage."""
        import av
        from av.video.reformatter import VideoReformatter

        stream = video_stream(container)
        intra = IntraDecoder(self.path) if IntraDecoder.applies(stream) else None
        if getattr(stream.codec_context, "is_hwaccel", False):  # PyAV < 14 has no hardware decoding
            stream.thread_type, stream.thread_count = GPU_DECODE_THREADS
        else:
            stream.thread_type = "AUTO" if intra is None else "SLICE"
            if self.decode_threads:
                stream.thread_count = self.decode_threads
        index, errors_in_row, ended = 0, 0, False
        skipper = FrameSkipper.for_stream(stream, start, wanted) if segment is None else None
        if segment is not None:
            start = max(start, segment.start)
        self.undecoded = 0
        gate = DamageGate()
        clock = FrameClock(float(stream.average_rate or 0) or 25.0, stream_start(stream))
        restarted = False  # a new recording began: the next frame kept is a discontinuity
        intrinsics = None
        reformatter = VideoReformatter()  # one for the stream: a frame's own is set up anew each frame
        lost = functools.partial(self.on_error, self.name)  # a lazily decoded frame that fails when looked at
        packets = container.demux(stream) if segment is None or segment.seek_pts is None \
            else packets_from_keyframe(container, stream, segment.seek_pts)
        while True:
            try:
                packet = next(packets)
            except StopIteration:
                break
            except av.error.FFmpegError as err:
                # The demuxer cannot read on (cut or garbled container): keep what we have.
                self.on_error(self.name, "demux_error", f"{self.path} after frame {index}: {err}")
                packet = None  # flush the decoder: threaded decoders still hold frames
            if skipper is not None and packet is not None:
                skipper.fed(packet, index)
            if packet is not None and gate.fed(packet):
                self.on_error(self.name, "corrupt_packet", f"{self.path} near frame {index}: flagged by the demuxer")
            if skipper is not None and gate.suspect:  # damage: every frame decoded from here
                skipper.stop()
            if intra is not None and intra.failures >= MAX_CONSECUTIVE_DECODE_ERRORS:
                self.on_error(self.name, "gave_up", f"{self.path}: {intra.failures} frames in a row not decoded")
                return
            try:
                if packet is None:
                    decoded = stream.codec_context.decode(None)
                else:
                    decoded = packet.decode() if intra is None else intra.frames(packet)
                errors_in_row = 0
            except av.error.EOFError:
                break  # already flushed
            except av.error.FFmpegError as err:
                errors_in_row += 1
                gate.damaged()
                self.on_error(self.name, "corrupt_packet", f"{self.path} near frame {index}: {err}")
                if errors_in_row >= MAX_CONSECUTIVE_DECODE_ERRORS:
                    self.on_error(self.name, "gave_up", f"{self.path}: {errors_in_row} bad packets in a row")
                    return
                continue
            if packet is None:
                decoded = list(decoded)
            for vframe in decoded:
                if skipper is not None:
                    index = skipper.index_of(vframe, index)
                    self.undecoded = skipper.skipped
                    if not skipper.active:
                        skipper = None
                if segment is None:
                    i = index
                    index += 1
                else:  # the index of decoding the whole file, by stamp; others belong elsewhere
                    if segment.after(vframe.pts):
                        ended = True  # a frame of the next segment: this one is complete
                        break
                    found = segment.index_of(vframe.pts)
                    if found is None:
                        continue
                    i = index = found
                    index += 1
                duplicate = clock.tick(i, vframe)  # decoders emit display order; stamps may not follow it
                if clock.restarted and i >= start:
                    restarted = True
                    self.on_error(self.name, "stamps_reset", f"{self.path}: frame {i}'s stamp is {clock.jump:.3f}s "
                                                             f"before the frame before's (recordings joined?): a new "
                                                             f"recording from {clock.time:.6f}s")
                keep, report = gate.check(vframe)
                if report:
                    self.on_error(self.name, report, f"{self.path}: frame {i}" + (
                        f", {gate.report_dropped()} suspect frames dropped before it" if report == "skipped_to_keyframe"
                        else " flagged corrupt by the decoder"))
                if not keep:
                    continue
                if i < start:
                    continue
                if duplicate:
                    self.on_error(self.name, "duplicate_stamp", f"{self.path}: frame {i} has the stamp of the frame "
                                                                f"before ({vframe.pts}); timed at {clock.time:.6f}s")
                orientation = upright(vframe)
                shape = (vframe.width, vframe.height) if orientation & TRANSPOSE else (vframe.height, vframe.width)
                if min(shape) < MIN_FRAME_SIDE:
                    self.on_error(self.name, "too_small", f"{self.path}: frames of {shape[1]}x{shape[0]}, "
                                                          f"less than {MIN_FRAME_SIDE} pixels a side")
                    return
                if intrinsics is None or intrinsics[1] != shape:
                    intrinsics = (self._intrinsics(shape[1], shape[0]), shape)
                self.position = index
                # RGB only for the frames that become views; the tests look at the glance.
                rgb, look = frame_pixels(reformatter, vframe, lost, orientation, i)
                yield Frame(i, clock.time, rgb, intrinsics[0], *self._gt(i, shape),
                            discontinuity=gate.take_gap() | restarted, glance=look)
                restarted = False
            if ended:
                break
        if skipper is not None:  # frames after the last one out were left undecoded
            self.undecoded = skipper.finish(index)
            self.position = max(self.position, index + len(skipper.pending))
        if gate.dropped:
            self.on_error(self.name, "skipped_to_keyframe",
                          f"{self.path}: {gate.report_dropped()} suspect frames dropped, no keyframe followed")
        if segment is None or segment.last:
            self._check_complete(container, stream, index, clock.time + clock.start)

    def _check_complete(self, container, stream, decoded: int, last_time: float) -> None:
        """Silent truncation: some containers (Matroska, MPEG-TS) end cleanly where the file
        was cut. Compare with what the header promised (``last_time``: in the stream's own
        stamps' seconds, as the header's)."""
        # Frame counts in headers are unreliable (AVI counts dropped frames), durations less so.
        rate = float(stream.average_rate or 0) or 25.0
        end = promised_end(container, stream)
        if end is not None and decoded and last_time + 2.0 / rate < end - 0.5:
            self.on_error(self.name, "ended_early", f"{self.path}: stream ends at {last_time:.2f}s of {end:.2f}s")
        elif decoded == 0:
            self.on_error(self.name, "no_frames", str(self.path))

    def _intrinsics(self, width: int, height: int) -> np.ndarray:
        if self.gt is not None:
            K = np.asarray(self.gt.intrinsics, dtype=np.float64)
            gt_h, gt_w = np.asarray(self.gt.depth).shape[1:3]
            if (gt_w, gt_h) != (width, height):  # ground truth of a different resolution
                sx, sy = width / gt_w, height / gt_h
                K = K.copy()
                K[0] *= sx
                K[1] *= sy
                K[0, 2] = (self.gt.intrinsics[0][2] + 0.5) * sx - 0.5
                K[1, 2] = (self.gt.intrinsics[1][2] + 0.5) * sy - 0.5
            return K
        return fov_intrinsics(self.fov_deg, width, height)

    def _gt(self, index: int, shape) -> tuple[np.ndarray | None, np.ndarray | None]:
        if not self.ground_truth or self.gt is None or index >= len(self.gt.depth):
            return None, None
        if index in self.gt.bad_poses:  # reported when a view asks for the pose (most frames never become views)
            pose = functools.partial(_pose_lost, self, "bad_pose", self.gt.bad_poses[index])
        else:
            pose = np.asarray(self.gt.cam_to_world[index], dtype=np.float64)
        return np.asarray(self.gt.depth[index], dtype=np.float32), pose


class FrameSkipper:
    """Leaves undecoded the frames a caller does not want, where the codec allows it: a frame no
    other frame is predicted from (a non-reference frame: most B-frames of H.264 and HEVC) is
    skipped inside the decoder (``skip_frame = NONREF`` for its packet), so it costs neither
    decoding nor analysis. Whether a packet's frame is wanted is asked before it is decoded,
    by its display index: the frames accounted for so far plus the packets fed, not yet out,
    whose presentation stamps are lower. A decoded frame's index is the count of the stamps
    below its own (the skipped frames count), so indices stay those of decoding every frame.
    Skipping starts once the first ``TRUST_AFTER`` frames came out in the order of their stamps
    (some files carry stamps in decode order: box.mp4 of the shared videos); anything unexpected
    later (a packet or frame without a stamp, a frame whose stamp was not fed, stamps out of
    order) turns skipping off for the rest of the stream, and indices go on by one per decoded
    frame (``active`` False). Damage (``DamageGate``) stops skipping (:meth:`stop`): a damaged
    stream is decoded in full from there; the frames fed before keep the indices of their stamps
    (those left undecoded among them still count, as they would have come out without
    skipping), then indices go on by the count of frames out, as without skipping."""

    CODECS = frozenset({"h264", "hevc"})
    TRUST_AFTER = 8

    def __init__(self, codec_context, start: int, wanted: Callable[[int], bool]):
        self.codec_context, self.start, self.wanted = codec_context, start, wanted
        self.pending: list[int] = []
        """Stamps of the packets fed whose frames are not out yet (sorted)."""
        self.may_skip: set[int] = set()
        """Those of them fed with ``skip_frame = NONREF``."""
        self.active = True
        self.trusted = 0
        """Frames out in stamp order so far (skipping starts at ``TRUST_AFTER``)."""
        self.skipped = 0
        """Frames left undecoded from ``start`` on, so far."""
        self.last_pts: int | None = None
        self.skipping = True
        """False once :meth:`stop` was called: no packet is fed to be skipped any more."""

    @classmethod
    def for_stream(cls, stream, start: int, wanted: Callable[[int], bool] | None) -> "FrameSkipper | None":
        if wanted is None or stream.codec_context.name not in cls.CODECS:
            return None
        return cls(stream.codec_context, start, wanted)

    def fed(self, packet, index: int) -> None:
        """Before ``packet`` enters the decoder (``index``: the next display index to give)."""
        if not self.active or packet.size == 0:  # the demuxer's empty packet at the end: a flush
            return
        pts = packet.pts
        if pts is None:
            self._stop()
            return
        slot = bisect.bisect_left(self.pending, pts)
        if self.skipping and self.trusted >= self.TRUST_AFTER:
            at = index + slot
            skip = at < self.start or not self.wanted(at)
            self.codec_context.skip_frame = "NONREF" if skip else "DEFAULT"
            if skip:
                self.may_skip.add(pts)
        self.pending.insert(slot, pts)

    def index_of(self, vframe, index: int) -> int:
        """The display index of a decoded frame (``index``: the next one when none were skipped)."""
        if not self.active:
            return index
        pts = vframe.pts
        slot = bisect.bisect_left(self.pending, pts) if pts is not None else -1
        if (slot < 0 or slot >= len(self.pending) or self.pending[slot] != pts
                or (self.last_pts is not None and pts <= self.last_pts)
                or not all(p in self.may_skip for p in self.pending[:slot])):  # a frame passed over
            self._stop()
            return index
        self.skipped += max(0, index + slot - max(index, self.start))  # those before start do not count
        self.may_skip.difference_update(self.pending[: slot + 1])
        del self.pending[: slot + 1]
        self.last_pts = pts
        self.trusted += 1
        if not self.skipping and not self.may_skip:  # every frame left undecoded is accounted for
            self._stop()
        return index + slot

    def finish(self, index: int) -> int:
        """At the end of the stream (the decoder flushed): every stamp still pending was a
        frame left undecoded. The count of undecoded frames from ``start`` on."""
        self.skipped += max(0, index + len(self.pending) - max(index, self.start))
        return self.skipped

    def stop(self) -> None:
        """Skip no more (damage): every packet from here is decoded, and the frames in flight
        keep their stamps' indices until none of those fed to be skipped is pending; then
        indices go on by one per frame (``active`` False)."""
        self.skipping = False
        self.codec_context.skip_frame = "DEFAULT"
        if not self.may_skip:
            self._stop()

    def _stop(self) -> None:
        self.active = False
        self.pending.clear()
        self.may_skip.clear()
        self.codec_context.skip_frame = "DEFAULT"


class IntraDecoder:
    """Decodes a frame of an intra-only stream (each frame coded on its own: MJPEG, ProRes,
    DNxHD/HR, ... as FFmpeg's codec descriptor says) only when its pixels are first asked for,
    as an image folder's JPEGs are: the cut test looks at one frame in ``CUT_LOOK_EVERY`` besides
    the candidates (``streamer.windows``), so most frames are never decoded, while any frame can
    still be decoded when a test looks at it: the frames, stamps and decisions of decoding them
    all. Frames are decoded one at a time on the stream's codec context with slice threads (a
    frame-threaded decoder hands a frame back packets later). The first frame is decoded at
    once: its size and display matrix stand for the stream's (a later frame decoded at another
    size is lost as ``size_changed``). A frame that cannot be decoded when looked at is
    reported (``corrupt_packet``, ``corrupt_frame``) and taken as a gap
    (:class:`FrameLost`). A live feed's decoder has a codec context of its own
    (:meth:`for_live`): its frames are decoded after the reader may have closed their
    connection."""

    def __init__(self, path: Path | str, context=None):
        self.path = path
        self.context = context
        """The codec context frames are decoded on (None: their packet's stream's)."""
        self.first: tuple[int, int, int] | None = None
        """Width, height and orientation (:func:`upright`) of the first frame decoded (None: none
        yet; packets are decoded at once until one is)."""
        self.failures = 0
        """Frames in a row that could not be decoded when looked at."""

    @staticmethod
    def applies(stream) -> bool:
        return bool(getattr(stream.codec_context.codec, "intra_only", False))

    @classmethod
    def for_live(cls, stream, url: str) -> "IntraDecoder":
        """A decoder for a live feed's intra-only ``stream``, on a codec context of its own (one
        slice thread: it decodes in the consumer's thread, beside the feed's reader)."""
        import av

        context = av.CodecContext.create(stream.codec_context.name, "r")
        context.extradata = stream.codec_context.extradata
        context.thread_type, context.thread_count = "SLICE", 1
        return cls(url, context)

    def _decode(self, packet) -> list:
        return packet.decode() if self.context is None else self.context.decode(packet)

    def frames(self, packet) -> list:
        """What ``packet.decode()`` would give: a :class:`PacketFrame` for a packet with a frame
        (a decoded frame until the first one is known)."""
        if self.first is None:
            decoded = self._decode(packet)
            if decoded:
                self.first = (decoded[0].width, decoded[0].height, upright(decoded[0]))
            return decoded
        return [PacketFrame(self, packet)] if packet.size else []

    def decode(self, packet, index: int):
        import av

        try:
            decoded = self._decode(packet)
        except av.error.FFmpegError as err:
            self.failures += 1
            raise SourceError("corrupt_packet", f"{self.path} frame {index}: {err}") from None
        if len(decoded) != 1 or getattr(decoded[0], "is_corrupt", False):
            self.failures += 1
            raise SourceError("corrupt_frame", f"{self.path} frame {index}: flagged corrupt by the decoder")
        vframe, (width, height, _) = decoded[0], self.first
        if (vframe.width, vframe.height) != (width, height):
            self.failures += 1
            raise SourceError("size_changed", f"{self.path} frame {index}: {vframe.width}x{vframe.height}, the "
                                              f"stream began at {width}x{height}")
        self.failures = 0
        return vframe


class PacketFrame:
    """A frame of an intra-only stream not decoded yet (:class:`IntraDecoder`): what the source
    reads of a decoded frame before its pixels, taken from its packet and the stream's first
    frame; :meth:`decoded` decodes it, once."""

    __slots__ = ("decoder", "packet", "pts", "time", "key_frame", "value")

    is_corrupt = False

    def __init__(self, decoder: IntraDecoder, packet):
        self.decoder, self.packet = decoder, packet
        self.pts = packet.pts
        self.time = None if packet.pts is None else float(packet.pts * packet.time_base)
        self.key_frame = True
        self.value = None

    width = property(lambda self: self.decoder.first[0])
    height = property(lambda self: self.decoder.first[1])
    orientation = property(lambda self: self.decoder.first[2])

    def decoded(self, index: int):
        """The decoded frame (``index``: its index, for the report); raises :class:`SourceError`."""
        if self.value is None:
            try:
                self.value = self.decoder.decode(self.packet, index)
            except SourceError as err:
                self.value = err
            self.packet = None
        if isinstance(self.value, SourceError):
            raise self.value
        return self.value


def _pixels(vframe, index: int):
    """A decoded frame of ``vframe``: itself, or a :class:`PacketFrame`'s, decoded now."""
    return vframe.decoded(index) if isinstance(vframe, PacketFrame) else vframe


def read_frames(source, start: int, wanted: Callable[[int], bool] | None,
                count: Callable[[int], None], segment: Segment | None = None) -> Iterator[Frame]:
    """``source.frames(start, wanted)`` (of ``segment`` where given: a video's), calling
    ``count(n)`` with the frames read: before each frame yielded, 1 plus those left undecoded
    just before it; at the end, those left undecoded after the last (``VideoSource.undecoded``;
    other sources decode every frame)."""
    seen = 0
    for frame in source.frames(start, wanted=wanted, **({} if segment is None else {"segment": segment})):
        undecoded = getattr(source, "undecoded", 0)
        count(1 + undecoded - seen)
        seen = undecoded
        yield frame
    undecoded = getattr(source, "undecoded", 0)
    if undecoded > seen:
        count(undecoded - seen)


SCALE_THREADS = 1
"""libswscale threads for a kept view's RGB conversion. PyAV's default (0: one per core) cost
0.06-0.4 ms more CPU a view than one thread at 640x272-1296x720 on 2 cores, for the same pixels
(docs/BENCHMARKS.md, sixth pass of issue 18); a decode worker keeps to one thread."""


def upright(vframe) -> int:
    """The orientation that shows a decoded frame as players do (``reliev3r.imaging.orient``): by
    its display matrix (a phone held upright records landscape pixels and a rotation of -90
    degrees; a front camera's may mirror them); a :class:`PacketFrame`, as its stream's first."""
    if isinstance(vframe, PacketFrame):
        return vframe.orientation
    matrix = vframe.side_data.get(_display_matrix())
    return 0 if matrix is None else display_orientation(np.frombuffer(bytes(matrix), np.int32, count=9))


@functools.cache
def _display_matrix():
    from av.sidedata.sidedata import Type  # here: image folders are read without PyAV

    return Type.DISPLAYMATRIX


def frame_pixels(reformatter: VideoReformatter, vframe, report: Callable[[str, str], None], orientation: int = 0,
                 index: int = 0) -> tuple[Callable, Callable]:
    """(RGB, glance) of a decoded frame (or a :class:`PacketFrame`, ``index`` its index), each a
    function of no arguments for :class:`Frame`: a frame's pixels are converted only when a test
    looks at it (its glance, from the decoder's planes) or it becomes a view (its RGB, with
    ``reformatter``, one per consumer), shown under ``orientation`` (:func:`upright`). A packet frame that
    cannot be decoded then is reported through ``report(reason, detail)`` and lost
    (:class:`FrameLost`: a gap)."""
    rgb = functools.partial(_rgb_of, reformatter, vframe, orientation, index)
    look = functools.partial(_glance_of_frame, vframe, orientation, index)
    if isinstance(vframe, PacketFrame):
        return _Once(rgb, report), _Once(look, report)
    return rgb, look


def _rgb_of(reformatter: VideoReformatter, vframe, orientation: int, index: int) -> np.ndarray:
    """A frame in RGB (the same pixels as ``vframe.to_ndarray(format="rgb24")``), shown under
    ``orientation`` (:func:`upright`: as players show it); a :class:`PacketFrame` is decoded
    first (frame ``index``)."""
    rgb = reformatter.reformat(_pixels(vframe, index), format="rgb24", threads=SCALE_THREADS).to_ndarray()
    return imaging.shown_image(rgb, orientation)


def _glance_of_frame(vframe, orientation: int, index: int) -> Glance | None:
    """``glance_of_video_frame`` of a frame, a :class:`PacketFrame` decoded first."""
    return glance_of_video_frame(_pixels(vframe, index), orientation)


def _glance_of(small) -> Glance:
    """The glance of a reduced image, or of one decoded by calling ``small`` (a lazy JPEG)."""
    return glance_of_rgb(small() if callable(small) else small)


def _load_synthetic_gt(path: Path):
    """Ground truth the synthetic world stores beside its videos (None for other videos)."""
    try:
        from reliev3r import synthetic
    except ImportError:
        return None
    try:
        return synthetic.load_ground_truth(path)
    except Exception as err:  # a broken sidecar must not stop the video itself
        log.warning("ground truth unreadable", extra={"path": str(path), "detail": str(err)})
        return None


class ImageSequenceSource:
    """A folder of ordered frames (``*.jpg``/``*.png``), e.g. 7-Scenes ``frame-NNNNNN.color.jpg``
    with ``frame-NNNNNN.depth.png`` (uint16 mm) and ``frame-NNNNNN.pose.txt`` (cam_to_world).
    A ScanNet scene as SensReader exports it (``reliev3r.imaging.is_scannet_scene``) is read from
    its ``color/`` frames, with the intrinsics of its ``intrinsic/intrinsic_color.txt``, and its
    ground truth as eval reads it (``evaluation.datasets.scannet_sequence``): ``depth/<N>.png``
    of its depth camera brought to the colour frame's pixels (:meth:`_depth`) and
    ``pose/<N>.txt`` (:meth:`_pose`).
    Frames are shown as their Exif orientation says (OpenCV turns them); the folder's
    intrinsics file (``reliev3r.imaging.INTRINSICS_FILES``; else those its dataset publishes,
    ``reliev3r.imaging.published_intrinsics``), the depth maps and the poses, of the camera as
    it records, are turned with each frame (``reliev3r.imaging.image_orientation``, ``orient_intrinsics``,
    ``orient_pose``; a mirrored frame has no pose: :meth:`_pose`)."""

    def __init__(self, folder: Path, *, fov_deg: float = 60.0, on_error: ErrorSink = _log_error,
                 depth_scale: float = 1000.0, ground_truth: bool = True):
        """``ground_truth=False``: frames carry no depth or pose even where the folder has them
        (nothing is read: a view's depth PNG costs more than its JPEG)."""
        self.path = Path(folder)
        self.ground_truth = ground_truth
        self.name = source_name(self.path)
        self.fov_deg = fov_deg
        self.on_error = on_error
        self.depth_scale = depth_scale
        self.position = 0
        self._poses_lost: dict[str, str] = {}  # reason -> the detail of its first frame (:func:`_pose_lost`)
        self._has_poses: bool | None = None  # whether the frames' folder has pose files (:meth:`_pose`)
        self.files = imaging.frame_files(self.path)
        self.scannet = imaging.is_scannet_scene(self.path)
        self.depth_intrinsics = None  # a ScanNet scene's depth camera's, read where ground truth is
        self._depth_problems: dict[tuple, str | None] = {}  # (depth size, frame size) -> why no depth, or None
        if self.scannet and ground_truth:
            try:
                self.depth_intrinsics = read_intrinsics(self.path / imaging.SCANNET_FILES[2])
            except SourceError as err:  # its frames stream without depth
                on_error(self.name, err.reason, str(err))
        self._first: tuple[Path, tuple[int, int]] | None = None  # the first frame that reads, its size (recorded)
        self.intrinsics = None
        self.intrinsics_file = imaging.intrinsics_file(self.path)
        # 7-Scenes' own frames without a file: the dataset's intrinsics at a frame's size
        self.published = None if self.intrinsics_file else imaging.published_intrinsics(self.files)
        if self.intrinsics_file is not None:
            try:
                self.intrinsics = read_intrinsics(self.intrinsics_file)
            except SourceError as err:
                on_error(self.name, err.reason, str(err))

    def frames(self, start: int = 0, wanted: Callable[[int], bool] | None = None) -> Iterator[Frame]:
        """Frames in order; a bad image is reported and skipped, and the next good frame carries
        ``discontinuity`` (no window spans the hole). Every image is read and checked (``wanted``
        is not used: the cut test may look at any frame). A JPEG at least twice
        ``MOTION_WIDTH`` wide and without an Exif segment is decoded, at a reduced scale, only
        when a test first looks at it (``read_image_glance(lazy=True)``): the cut test leaves
        most frames between candidates unlooked-at, and those are never decoded. Such a JPEG
        that cannot be decoded then (its structure checked out: markers, size, end) is reported
        as ``bad_image`` when looked at, and the window builder takes it as a gap
        (:class:`FrameLost`); one never looked at is not reported. Where the folder's one
        intrinsics matrix (its file, 7-Scenes' published one) would serve a frame of another size
        as recorded than its first frame's, the frame is reported as ``size_mismatch``
        (``reliev3r.imaging.other_size``) and skipped as a bad image is."""
        if not self.files:
            self.on_error(self.name, "no_frames", f"{self.path}: no images")
            return
        gap = False
        for i, file in enumerate(self.files[start:], start):
            try:
                rgb, small, (h, w), turn = read_image_glance(file, lazy=True)
                reduced = None
                if callable(small):
                    small = _Once(small, functools.partial(self.on_error, self.name))
                    reduced = (reduced_factor(w), small, (h, w))
                elif small is not None and callable(rgb):
                    factor = round(w / small.shape[1]) if small.shape[1] else 0
                    reduced = (factor, small, (h, w)) if factor in (2, 4, 8) else None
            except SourceError as err:
                self.on_error(self.name, err.reason, str(err))
                gap = True
                continue
            size = imaging.recorded_size(turn, w, h)
            if self._first is None and start == 0:  # no frame before it read
                self._first = (file, size)
            K = None
            if self.intrinsics is not None:  # of the camera as it records: turned as OpenCV turned the frame
                K = shown_intrinsics(self.intrinsics, turn, w, h)
                if (problem := imaging.intrinsics_mismatch(K, w, h)) is not None:  # logged once a size
                    self.on_error(self.name, "intrinsics_mismatch", f"{self.intrinsics_file}: {problem} The frames "
                                                                    f"get a {self.fov_deg:g} degree field of view")
                    K = None
            elif self.published is not None:
                K = self.published(turn, w, h)
            if K is not None and (problem := imaging.other_size(
                    file, size, *self._first_size(), self.intrinsics_file or imaging.PUBLISHED)) is not None:
                self.on_error(self.name, "size_mismatch", problem)
                gap = True
                continue
            if K is None:
                K = fov_intrinsics(self.fov_deg, w, h)
            self.position = i + 1
            # ground truth is read when a view asks for it (most frames never become views)
            gt = ((functools.partial(self._depth, file, turn, size), functools.partial(self._pose, file, turn))
                  if self.ground_truth else (None, None))
            yield Frame(i, float(i), rgb, K, *gt,
                        discontinuity=gap, glance=None if small is None else functools.partial(_glance_of, small),
                        reduced=reduced)
            gap = False

    def _first_size(self) -> tuple[Path, tuple[int, int]]:
        """The folder's first frame that reads, and its size as recorded: what its one intrinsics
        matrix is taken to be of. Known from the first pass that starts at frame 0; read here for
        a pass that starts later (a resumed streamer)."""
        if self._first is None:
            for file in self.files:
                try:
                    _, _, (h, w), turn = read_image_glance(file, lazy=True)
                except SourceError:
                    continue
                self._first = (file, imaging.recorded_size(turn, w, h))
                break
        return self._first

    def _depth(self, file: Path, turn: int, size: tuple[int, int]) -> np.ndarray | None:
        """The depth map of the frame read from ``file`` (of ``size``, width and height as
        recorded), turned as OpenCV turned the frame (``turn``, :func:`read_image_glance`); None
        where there is none. A ScanNet scene's, ``depth/<N>.png`` of its depth camera, is brought
        to the colour frame's pixels as eval brings it (``reliev3r.imaging.depth_in_colour_frame``),
        where its intrinsics can be the depth maps' (``reliev3r.imaging.depth_intrinsics_problem``):
        else the frames stream without depth, reported once as ``depth_intrinsics_mismatch``."""
        depth_file = ground_truth_file(file, "gt_depth", self.path if self.scannet else None)
        if not depth_file.is_file() or (self.scannet and (self.depth_intrinsics is None or self.intrinsics is None)):
            return None  # a ScanNet scene's depth, without both intrinsics (reported): not on the frame's pixels
        raw = imaging.read_image(depth_file, cv2.IMREAD_UNCHANGED)  # not cv2.imread: any path
        if raw is None or raw.ndim != 2:
            return None
        depth = raw.astype(np.float32) / self.depth_scale
        depth[raw >= 65535] = 0.0  # 7-Scenes marks invalid depth with 65535 as well as 0
        if self.scannet:  # another camera's, both as they record: onto the colour frame's pixels
            if self._depth_problem(depth.shape[::-1], size) is not None:
                return None
            depth = imaging.depth_in_colour_frame(depth, self.depth_intrinsics, self.intrinsics, *size)
        # of the frame as recorded (OpenCV reads a depth PNG unturned): turned as OpenCV turned the frame
        return imaging.shown_image(depth, turn)

    def _depth_problem(self, depth_size: tuple[int, int], size: tuple[int, int]) -> str | None:
        """Why the ScanNet scene's depth intrinsics cannot be of its depth maps of ``depth_size``
        beside frames of ``size`` (``reliev3r.imaging.depth_intrinsics_problem``), or None:
        checked and reported once a pair of sizes."""
        if (depth_size, size) not in self._depth_problems:
            problem = imaging.depth_intrinsics_problem(self.depth_intrinsics, depth_size, self.intrinsics, size)
            self._depth_problems[depth_size, size] = problem
            if problem is not None:
                self.on_error(self.name, "depth_intrinsics_mismatch",
                              f"{self.path / imaging.SCANNET_FILES[2]}: {problem}. The frames stream without depth")
        return self._depth_problems[depth_size, size]

    def _pose(self, file: Path, turn: int) -> np.ndarray | None:
        """The ground-truth camera-to-world of the frame read from ``file``: its ``.pose.txt``, of
        the camera as it records, turned as OpenCV turned the frame (``turn``; the camera about its
        optical axis: ``reliev3r.imaging.orient_pose``). None where there is none; for a file that
        is no pose (``reliev3r.imaging.read_pose``: not 16 numbers, not finite, no rotation, a last
        row other than 0 0 0 1) or unreadable, reported as ``bad_pose``; and for a frame its
        orientation mirrors (no camera pose shows it), reported as ``mirrored_pose``; for a frame
        without one among frames with one (a folder of pose files), reported as ``no_pose``. A
        ScanNet scene's is ``pose/<N>.txt``, every frame's (``no_pose`` where it is not there); one
        whose numbers are not finite, as SensReader writes the pose of a frame its tracking lost, is
        none (``reliev3r.imaging.read_tracked_pose``), reported as ``lost_pose``. The frame streams
        without it (:func:`_pose_lost`)."""
        pose_file = ground_truth_file(file, "gt_cam_to_world", self.path if self.scannet else None)
        read = imaging.read_tracked_pose if self.scannet else imaging.read_pose
        if not pose_file.is_file():
            if self._has_poses is None:  # looked up once, when a frame without one is first asked for
                self._has_poses = self.scannet or any(file.parent.glob("*.pose.txt"))  # ScanNet: every frame's
            return _pose_lost(self, "no_pose", f"{pose_file}: not there") if self._has_poses else None
        try:
            pose = read(pose_file)
        except ValueError as err:  # named with its file
            return _pose_lost(self, "bad_pose", str(err))
        except OSError as err:
            return _pose_lost(self, "bad_pose", f"{pose_file}: unreadable ({err.strerror or err})")
        if pose is None:
            return _pose_lost(self, "lost_pose", f"{pose_file}: not finite, as SensReader writes the pose of a "
                                                 "frame its tracking lost")
        try:
            return imaging.orient_pose(pose, turn) if turn else pose
        except ValueError as err:  # mirrored
            return _pose_lost(self, "mirrored_pose", f"{pose_file}: its frame is {err}")


def read_image(file: Path) -> np.ndarray:
    """An RGB uint8 image; raise SourceError ``truncated_image`` for a JPEG without its end
    marker or a PNG without its end chunk (OpenCV would return the decoded part, the rest
    grey, and only warn), ``bad_image`` for what OpenCV cannot decode, or the reason the file
    cannot be read."""
    return _decode_image(file, _image_bytes(file))


def _image_bytes(file: Path) -> bytes:
    try:
        data = Path(file).read_bytes()
    except OSError as err:
        raise SourceError(path_problem(err), f"{file}: {err}") from None
    if truncated_image(data):
        raise SourceError("truncated_image", f"{file}: {len(data)} bytes, the image's end is missing")
    return data


def _decode_image(file: Path, data: bytes, flag: int = cv2.IMREAD_COLOR) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(data, np.uint8), flag) if data else None
    if bgr is None or bgr.size == 0:
        raise SourceError("bad_image", f"{file}: not a decodable image")
    if flag == cv2.IMREAD_COLOR and min(bgr.shape[:2]) < MIN_FRAME_SIDE:
        raise SourceError("too_small", f"{file}: {bgr.shape[1]}x{bgr.shape[0]}, "
                                       f"less than {MIN_FRAME_SIDE} pixels a side")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


JPEG_REDUCED = ((8, cv2.IMREAD_REDUCED_COLOR_8), (4, cv2.IMREAD_REDUCED_COLOR_4), (2, cv2.IMREAD_REDUCED_COLOR_2))
"""Scales libjpeg decodes at directly (in the DCT: 4-8x cheaper than the full image)."""


def reduced_factor(width: int) -> int | None:
    """The reduced scale (1/factor) a JPEG ``width`` pixels wide is glanced at: the smallest
    that keeps it ``MOTION_WIDTH`` wide (None: none does)."""
    return next((f for f, _ in JPEG_REDUCED if width // f >= MOTION_WIDTH), None)


def read_image_glance(file: Path, lazy: bool = False) -> tuple:
    """(RGB image or a function of no arguments that decodes it, a smaller RGB image of the
    same frame for the keyframe tests or None, (height, width), the orientation OpenCV turned
    it by: ``reliev3r.imaging.image_orientation`` of the bytes read). A JPEG at least twice
    ``MOTION_WIDTH`` wide is decoded at a reduced scale now and in full only when asked (for
    the frames that become views); other images in full now. ``lazy``: the reduced image of
    such a JPEG without an Exif segment (nothing can turn it) is a function of no arguments
    too, decoding it (1/``reduced_factor(width)`` of each side) when called; its bytes are
    checked now (markers, size, end). Raises SourceError as :func:`read_image` does (a lazy
    decode raises when called)."""
    data = _image_bytes(file)
    turn = imaging.image_orientation(data)
    layout = jpeg_layout(data)
    size = layout[:2] if layout is not None else None
    if size is not None and min(size) >= MIN_FRAME_SIDE:
        factor = reduced_factor(size[1])
        flag = dict(JPEG_REDUCED).get(factor)
        if flag is not None and lazy and not layout[2]:
            full = functools.partial(_decode_image, file, data)
            return full, functools.partial(_decode_image, file, data, flag), size, turn
        if flag is not None:
            small = _decode_image(file, data, flag)
            if (small.shape[0] > small.shape[1]) != (size[0] > size[1]):  # turned by its EXIF orientation
                size = size[::-1]
            return functools.partial(_decode_image, file, data), small, size, turn
    rgb = _decode_image(file, data)
    return rgb, None, rgb.shape[:2], turn


def jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(height, width) from a baseline or progressive JPEG's start-of-frame segment; None for
    anything else (or a JPEG whose markers do not parse)."""
    layout = jpeg_layout(data)
    return None if layout is None else layout[:2]


def jpeg_layout(data: bytes) -> tuple[int, int, bool] | None:
    """(height, width, whether an Exif segment comes before the start of frame: an orientation
    that may turn the decoded image) of a baseline or progressive JPEG; None as for
    :func:`jpeg_size`."""
    exif = False
    for marker, i, _ in imaging.jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):  # SOF0-SOF15
            if i + 9 > len(data):
                return None
            return int.from_bytes(data[i + 5:i + 7], "big"), int.from_bytes(data[i + 7:i + 9], "big"), exif
        exif = exif or (marker == 0xE1 and data[i + 4:i + 8] == b"Exif")  # APP1
    return None  # a start of scan before any frame header, or markers that do not parse


def truncated_image(data: bytes) -> bool:
    """A JPEG whose last scan has no end-of-image marker (FFD9) after it, or a PNG whose last
    image data chunk has no IEND chunk after it. Bytes after the end (some cameras append
    data) do not matter; an embedded thumbnail's end marker does not count, as it comes
    before the main image's scan."""
    if data[:2] == b"\xff\xd8":
        if data.endswith(b"\xff\xd9"):  # the usual end: after every scan, so one scan is enough (the
            return b"\xff\xda" not in data  # first, near the start; rfind reads the whole file back)
        scan = data.rfind(b"\xff\xda")  # start of the last scan: entropy-coded data never holds FF DA
        return scan < 0 or data.rfind(b"\xff\xd9") < scan
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return data.rfind(b"IEND") < data.rfind(b"IDAT")
    return False


def _frame_stem(file: Path) -> str:
    name = file.name
    for tag in (".color", ".rgb"):
        name = name.replace(tag + file.suffix, file.suffix)
    return name[: -len(file.suffix)]


def ground_truth_file(frame: Path, kind: str, scannet_scene: Path | None = None) -> Path:
    """Where the ground truth ``kind`` (``gt_depth`` or ``gt_cam_to_world``) of the frame read from
    ``frame`` is read from: beside it, ``<frame>.depth.png`` / ``<frame>.pose.txt`` (7-Scenes); in a
    ScanNet scene (``scannet_scene``, the scene's folder), ``depth/<N>.png`` / ``pose/<N>.txt``."""
    depth = kind == "gt_depth"
    if scannet_scene is not None:
        return scannet_scene / ("depth" if depth else "pose") / f"{frame.stem}{'.png' if depth else '.txt'}"
    return frame.with_name(f"{_frame_stem(frame)}{'.depth.png' if depth else '.pose.txt'}")


def discover(specs: list[str], *, fov_deg: float = 60.0, on_error: ErrorSink = _log_error,
             ground_truth: bool = True, decoder: str = "cpu") -> list[Source]:
    """Sources for config entries: files, folders (image sequence or folder of videos), globs.
    A path that exists is taken as it is, even with glob characters in its name
    (``clip [1080p].mp4``). Discovery never raises: a spec or an entry that cannot be used is
    reported under its source name with a reason (``missing``, ``dangling_symlink``,
    ``symlink_loop``, ``permission_denied``, ``not_a_file``, ``empty_folder``, ...) and skipped,
    and every other source is returned. A file or image folder reached again (specs that
    overlap, a link to one already found) is one source, the first found: each further path to
    it is reported as ``duplicate_source``, naming both specs, and skipped (streamed twice, its
    windows would be decoded, sent and labelled twice). ``ground_truth=False``: the sources'
    frames carry no ground truth (an image sequence does not read it). ``decoder``: the
    videos' (:data:`DECODERS`)."""
    video = functools.partial(VideoSource, fov_deg=fov_deg, on_error=on_error, ground_truth=ground_truth,
                              decoder=decoder)
    images = functools.partial(ImageSequenceSource, fov_deg=fov_deg, on_error=on_error, ground_truth=ground_truth)
    sources: list[Source] = []
    found: dict[str, tuple[str, Path]] = {}  # resolved path -> (the spec, the path) it was first found by
    for spec in specs:
        if "://" in spec or spec.startswith("/dev/video"):
            # Live schemes (streamer.live) never reach here; anything else is not a feed we read.
            on_error(spec[:60], "unsupported_url", f"{spec}: scheme not supported")
            continue
        try:
            path = Path(spec).expanduser()
            matched = spec_paths(spec)
        except Exception as err:  # an unknown ~user, a NUL byte, an unreadable folder on the way
            on_error(source_name(Path(spec)), path_problem(err), f"{spec}: {type(err).__name__}: {err}")
            continue
        if not matched:
            on_error(source_name(path), "missing", f"{spec}: no file matches")
            continue
        for p in matched:
            for source in _guarded(p, lambda p=p: _sources_at(p, video, images, on_error), on_error):
                first = found.get(key := resolved_path(source.path))
                if first is None:
                    found[key] = (spec, source.path)
                    sources.append(source)
                else:
                    on_error(source.name, "duplicate_source", f"{source.path} (spec {spec!r}) is {first[1]} (spec "
                                                              f"{first[0]!r}) again: streamed once")
    return sources


def _guarded(path: Path, make: Callable[[], list[Source]], on_error: ErrorSink) -> list[Source]:
    """``make()``, or [] after reporting why not: one bad path never stops the others (naming
    it cannot raise: :func:`source_name` never does)."""
    try:
        return make()
    except SourceError as err:
        reason, detail = err.reason, str(err)
    except Exception as err:
        reason, detail = path_problem(err), f"{path}: {type(err).__name__}: {err}"
    on_error(source_name(path), reason, detail)
    return []


def is_temporary(path: Path) -> bool:
    """A name that a copy, a sync or a download gives a file until it renames it into place:
    hidden (rsync's ``.name.XXXXXX``, Syncthing's ``.syncthing.name.tmp``, macOS's ``._name``),
    ending in ``~``, or with a :data:`TEMPORARY_SUFFIXES` suffix. A folder's or a glob's such
    files are no sources: each holds the first part of a file still arriving."""
    name = Path(path).name
    return name.startswith(".") or name.endswith("~") or Path(name).suffix.lower() in TEMPORARY_SUFFIXES


def unsettled(path: Path | None, settle_s: float) -> float:
    """Seconds until the file at ``path`` has gone ``settle_s`` without a write (its
    modification time), 0 where it has, or where it is no regular file or cannot be looked at
    (its source reports why when opened), or where its time lies ahead of this host's clock
    (a copy that kept a camera's wrong time: nothing to judge by), or ``path`` None."""
    try:
        st = os.stat(path)
    except (OSError, ValueError, TypeError):
        return 0.0
    age = time.time() - st.st_mtime
    return settle_s - age if stat.S_ISREG(st.st_mode) and 0 <= age < settle_s else 0.0


def file_state(path: Path | None) -> tuple[int, int, int, int] | None:
    """(device, inode, size, modification time in ns) of the regular file at ``path``; None for
    anything else (a folder, a path gone, ``path`` None)."""
    try:
        st = os.stat(path)
    except (OSError, ValueError, TypeError):
        return None
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns) if stat.S_ISREG(st.st_mode) else None


def same_content(before: tuple | None, after: tuple | None) -> bool:
    """Whether file identities (:func:`file_state`) ``before`` and ``after`` are of the same
    content: the same size and modification time, whatever the inode or device (a copy that
    kept its times, ``cp -p`` or ``rsync -a`` of unchanged footage; a folder moved to another
    disk)."""
    return before is not None and after is not None and before[2:] == after[2:]


def grew(before: tuple | None, after: tuple | None) -> bool:
    """Whether a file read with :func:`file_state` ``before`` is the same file, longer now
    (written on after it was opened: its frames so far are its first ones)."""
    return before is not None and after is not None and before[:2] == after[:2] and after[2] > before[2]


def spec_paths(spec: str) -> list[Path]:
    """The paths a file, folder or glob spec names (``~`` expanded): the path itself where it
    exists or has no glob characters (``clip [1080p].mp4``), else the glob's matches, sorted
    and without temporaries (:func:`is_temporary`: files still arriving), glob characters in a
    folder's own name taken literally where the glob matches nothing (``[2024] trip/*.mp4``);
    [] where a glob matches nothing. ``discover`` and ``reliev3r reconstruct --input`` read
    specs with it."""
    path = Path(spec).expanduser()
    if os.path.lexists(path) or not glob.has_magic(spec):
        return [path]
    found = glob.glob(str(path))
    if not found:  # glob characters in a folder's own name ("[2024] trip/*.mp4"): take the folder literally
        folder = next((q for q in path.parents if os.path.isdir(q)), None)
        if folder is not None and glob.has_magic(str(folder)):
            found = glob.glob(os.path.join(glob.escape(str(folder)), str(path.relative_to(folder))))
    return [Path(p) for p in sorted(found) if not is_temporary(Path(p))]


def _sources_at(p: Path, video: Callable[[Path], VideoSource], images: Callable[[Path], ImageSequenceSource],
                on_error: ErrorSink) -> list[Source]:
    """The sources at an existing path (``video``, ``images``: a video file's and an image
    folder's source, with the caller's options)."""
    if inspect_path(p) == "file":
        return [video(p)]
    entries = list(p.iterdir())
    if not entries:
        raise SourceError("empty_folder", f"{p}: nothing in it")
    videos = sorted(q for q in entries if q.suffix.lower() in VIDEO_SUFFIXES and not is_temporary(q))
    # the folder's images are one sequence, and each video beside them a source of its own
    sources: list[Source] = [images(p)] if imaging.frame_files(p) else []
    if not sources and not videos:
        raise SourceError("no_frames", f"{p}: no videos or images")
    for q in videos:
        sources.extend(_guarded(q, lambda q=q: _video_file(q, video), on_error))
    return sources


def _video_file(path: Path, video: Callable[[Path], VideoSource]) -> list[Source]:
    if inspect_path(path) != "file":
        raise SourceError("not_a_file", f"{path}: a folder")
    return [video(path)]


GROUND_TRUTH_NAMES = {"gt_depth": "depth", "gt_cam_to_world": "pose"}
"""The ground truth a window may carry (``streamer.windows.Window.lacking``'s names), in words."""


def ground_truth_absent(spec: str, needed: tuple[str, ...]) -> str | None:
    """Why no window of the sources ``spec`` names (an entry of ``streamer.sources``) can carry the
    ground truth ``needed`` (:data:`GROUND_TRUTH_NAMES`), certain from the spec and the files there
    now, or None where one may. None of it: a live feed or another URL; a video without the
    synthetic world's ``<name>.gt.npz`` beside it; an image folder without the files
    :class:`ImageSequenceSource` reads for it (``<frame>.depth.png``, ``<frame>.pose.txt`` beside
    a frame; a ScanNet scene's ``depth/<N>.png``, ``pose/<N>.txt``; not TUM RGB-D's ``depth/`` and
    ``groundtruth.txt``); a folder or a glob whose every source is one of these. None for a path
    not there (yet), a folder with nothing to stream yet, a glob that matches nothing (a watched
    folder may fill) and a path that cannot be looked at (:func:`discover` says why)."""
    if "://" in spec or spec.startswith("/dev/video"):  # as discover and streamer.live tell them
        return "a live feed, whose frames carry none"
    try:
        paths = spec_paths(spec)
        said = [_ground_truth_absent_at(p, needed) for p in paths]
    except Exception:  # an unknown ~user, an unreadable folder: discovery reports it
        return None
    if not said or None in said:
        return None
    if paths == [Path(spec).expanduser()]:
        return said[0]
    return f"{paths[0]}: {said[0]}" if len(said) == 1 else f"{len(said)} matches, none with it ({paths[0]}: {said[0]})"


def _ground_truth_absent_at(path: Path, needed: tuple[str, ...]) -> str | None:
    """:func:`ground_truth_absent` of the sources at ``path`` (as :func:`_sources_at` finds them)."""
    if path.is_file():
        return _video_ground_truth_absent(path)
    if not path.is_dir():
        return None
    videos = [q for q in path.iterdir() if q.suffix.lower() in VIDEO_SUFFIXES and not is_temporary(q) and q.is_file()]
    files = imaging.frame_files(path)
    if not files and not videos:
        return None  # nothing to stream yet
    images = _images_ground_truth_absent(path, files, needed) if files else ""
    if images is None or any(_video_ground_truth_absent(q) is None for q in videos):
        return None
    if not videos:
        return images
    said = (f"{len(videos)} video has no <name>.gt.npz beside it" if len(videos) == 1 else
            f"{len(videos)} videos have no <name>.gt.npz beside them")
    return f"{images}, and whose {said}" if images else f"a folder whose {said}"


def _video_ground_truth_absent(path: Path) -> str | None:
    from reliev3r.synthetic import GT_SUFFIX  # here: only a run that trains on ground truth asks

    gt = path.with_name(path.stem + GT_SUFFIX)
    return None if gt.is_file() else f"a video without the synthetic world's {gt.name} beside it"


def _images_ground_truth_absent(folder: Path, files: list[Path], needed: tuple[str, ...]) -> str | None:
    """Which of ``needed`` no frame of ``files`` has the file of, where :class:`ImageSequenceSource`
    reads it (its ``_depth`` and ``_pose``), or None."""
    scene = folder if imaging.is_scannet_scene(folder) else None
    missing = []
    for name in needed:
        if not any(ground_truth_file(f, name, scene).is_file() for f in files):
            anyone = ground_truth_file(files[0].with_name("<frame>" + files[0].suffix), name, scene)
            missing.append(f"{'depth map' if name == 'gt_depth' else 'pose'} ({anyone})")
    return f"an image folder with no {' nor '.join(missing)} of any frame" if missing else None


def world_folder(run_dir: Path) -> Path:
    """Where :func:`synthetic_sources` renders the synthetic world: ``<run.dir>/world``."""
    return Path(run_dir) / "world"


def synthetic_sources(run_dir: Path, synthetic_cfg, *, fov_deg: float = 60.0,
                      on_error: ErrorSink = _log_error, ground_truth: bool = True,
                      decoder: str = "cpu") -> list[Source]:
    """The embedded default: render the synthetic world once, then read its videos
    (``ground_truth`` and ``decoder`` as in :func:`discover`)."""
    from reliev3r import synthetic

    videos = synthetic.ensure_world(world_folder(run_dir), synthetic_cfg)
    return [VideoSource(Path(v), fov_deg=fov_deg, on_error=on_error, ground_truth=ground_truth, decoder=decoder)
            for v in videos]

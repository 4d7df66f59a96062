"""Decode throughput, side by side in one run: our streamer path (VideoSource -> glance ->
keyframe gates -> windows), plain PyAV, decord (if installed) and OpenCV, in frames per
CPU-second (frames/s per core: the process's CPU time, every thread counted, so a reader's own
threads neither help nor hurt it), on the shared videos, a 1080p H.264 file encoded here and the
7-Scenes image folder; the streamer with 1 and N decode workers (wall clock, N =
available cores); decord vs PyAV for random access; and ZeroMQ window throughput over
tcp://127.0.0.1 vs an in-process memcpy of the same bytes. The streamer's frames are the source
frames it covers: it leaves non-reference frames no keyframe test needs undecoded
(``streamer.sources.FrameSkipper``), the other readers decode and convert every frame.

    .venv/bin/python benchmarks/decode.py [--videos DIR] [--kitchen DIR] [--seconds-1080p 4]
                                          [--max-frames 300] [--repeats 3] [--only decode|workers|extras]
    .venv/bin/python benchmarks/decode.py --only windows --windows-out A.json [--extra DIR ...]
    .venv/bin/python benchmarks/decode.py --compare-windows A.json B.json
    .venv/bin/python benchmarks/decode.py --only streamer [--extra DIR ...]
    .venv/bin/python benchmarks/decode.py --only budget
    .venv/bin/python benchmarks/decode.py --only intra
    .venv/bin/python benchmarks/decode.py --only live
    .venv/bin/python benchmarks/decode.py --only gpu
    .venv/bin/python benchmarks/decode.py --only long [--long FILE] [--long-repeats 24]
    .venv/bin/python benchmarks/decode.py --only loop [--loop-workers 2] [--loop-interleave 2 4] [--loop-seconds 10]

``--only budget`` splits the decode bar of issue 18 (the streamer's frames per CPU-second,
analysis included, against the fastest plain reader's) into what decoding alone costs the
streamer's source (every frame, and only the reference frames: the most any reader could leave
undecoded) and what its analysis costs, against the time per frame the fastest reader (OpenCV
on one thread) spends in all; and times the same analysis fed by that reader (its BGR frames
to RGB, the glance made from them), the peer with the streamer's work. ``--only intra``
re-encodes the videos as Motion JPEG and ProRes (intra-only: a frame decoded only when looked
at) and times the streamer on them and on a 10-bit HEVC clip against the readers. ``--only
live`` times live feeds of the videos (MPEG-TS over TCP) against the same files read as archives.
``--only gpu`` times
``streamer.decoder: cuda`` (NVDEC) beside the CPU decoder and the fastest reader, CPU and wall
time per frame (where FFmpeg opens no CUDA decoder it says why). ``--only long`` makes
one long video of a clip repeated (packets copied) and times the window stream over it in
process, with decode workers on the whole file, and with the workers sharing it in segments.
``--only loop`` loops the window stream over the videos and the 7-Scenes folder at the sizes of
``configs/gpu.yaml``, with resumable progress and acknowledgements that come ``--loop-latency``
seconds after a window is taken, at most ``--loop-in-flight`` out (what the labelers do to the
streamer), against what its workers could make: one in-process pass's windows per CPU-second
times the workers (and the acknowledgements' own bound, in-flight / latency); run it under two
versions of ``streamer`` (``PYTHONPATH``, as ``--only streamer``) for a before/after.

``--only windows`` writes the keyframe decisions over whole files (the view indices of every
window, cuts, skips, LK calls and points tracked) of the shared videos, the 7-Scenes folder and
any ``--extra`` files or folders; run it under two versions of ``streamer`` (one of them from
an export of an older tree on ``PYTHONPATH``) and ``--compare-windows`` counts the windows and
views that differ. ``--only streamer`` times the streamer path alone (frames per CPU-second,
best of ``--repeats``), for before/after turns of two versions in separate processes.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from reliev3r import protocol  # noqa: E402
from reliev3r.protocol import Message  # noqa: E402
from reliev3r.imaging import frame_files  # noqa: E402
from streamer import workers  # noqa: E402
from streamer.config import StreamerConfig  # noqa: E402
from streamer.service import window_stream  # noqa: E402
from streamer.sources import Frame, ImageSequenceSource, VideoSource, discover, fov_intrinsics  # noqa: E402
from streamer.windows import Wanted, windows_of  # noqa: E402

cv2.setNumThreads(1)
try:
    import decord
except ImportError:
    decord = None

MAX_FRAMES = [300]
"""Frames read per file by every reader (the same frames for each)."""
REPEATS = [3]
"""Turns per file: every reader once per turn, its best turn reported."""
WINDOW_CFG = dict(views=4, frame_stride=4, window_step=8)
"""The streamer's default window shape and keyframe gates."""


def timed(fn) -> tuple[int, float]:
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t


def cpu_timed(fn) -> tuple[int, float, float]:
    """(frames, wall seconds, CPU seconds of this process, every thread)."""
    t, c = time.perf_counter(), time.process_time()
    n = fn()
    return n, time.perf_counter() - t, time.process_time() - c


def pyav(path, threads: int = 1):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        if threads == 1:
            s.thread_type, s.thread_count = "SLICE", 1
        else:
            s.thread_type = "AUTO"
        n = 0
        for f in c.decode(s):
            f.to_ndarray(format="rgb24")
            n += 1
            if n >= MAX_FRAMES[0]:
                break
        return n


def pyav_threads(path):
    return pyav(path, threads=0)


def opencv(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while n < MAX_FRAMES[0] and cap.read()[0]:
        n += 1
    return n


def opencv_1thread(path):
    """OpenCV with its decoder on one thread: its best rate per core (its own threads cost
    more CPU time than they save)."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    n = 0
    while n < MAX_FRAMES[0] and cap.read()[0]:
        n += 1
    return n


def decord_seq(path):
    vr = decord.VideoReader(str(path), num_threads=1)
    n = min(len(vr), MAX_FRAMES[0])
    return sum(1 for i in range(n) if vr[i] is not None)


def streamer_path(path, threads: int = 1, ground_truth: bool = True, decoder: str = "cpu"):
    """Decode + glance + cut test + keyframe gates + resize of kept views to windows: what the
    streamer (and each decode worker, with one decoder thread) does per frame. ``ground_truth``:
    an image folder's views read their depth and pose (only when a stage trains on them);
    ``decoder``: ``streamer.decoder``."""
    cfg = StreamerConfig(**WINDOW_CFG)
    src = VideoSource(path, decode_threads=threads, decoder=decoder) if Path(path).is_file() \
        else ImageSequenceSource(path, ground_truth=ground_truth)
    count = [0]
    wanted = Wanted()

    def frames():
        # the source frames covered (index + 1): non-reference frames no test needs are not
        # decoded (streamer.sources.FrameSkipper), so they are not yielded, yet they are read
        for f in src.frames(wanted=wanted):
            if f.index >= MAX_FRAMES[0]:
                return
            count[0] = f.index + 1
            yield f
            if count[0] >= MAX_FRAMES[0]:
                return

    for _ in windows_of(src.name, frames(), cfg, wanted=wanted):
        pass
    return count[0]


def decode_floor(path, skip: str = "DEFAULT", hwaccel=None) -> int:
    """Decoding alone, one thread, no pixel conversion: the streamer's source without its
    analysis (``skip="NONREF"``: every non-reference frame left undecoded, the most a reader
    that skips could save; ``hwaccel``: PyAV's, e.g. NVDEC, each frame copied back to the
    host). Counts the source frames read (packets), as the streamer's figure counts the frames
    it covers."""
    with av.open(str(path), **({"hwaccel": hwaccel} if hwaccel is not None else {})) as c:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "SLICE", 1
        s.codec_context.skip_frame = skip
        n = 0
        for packet in c.demux(s):
            n += packet.size > 0
            packet.decode()
            if n >= MAX_FRAMES[0]:
                break
        return n


def decode_with_motion_vectors(path) -> int:
    """:func:`decode_floor` with the codec's motion vectors exported (``flags2=+export_mvs``) and
    read into numpy for every frame, with the median motion of each frame's blocks: the least a
    keyframe gate that takes its motion from the codec would spend (no cut test, no glance)."""
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "SLICE", 1
        s.codec_context.options = {"flags2": "+export_mvs"}
        n = 0
        for packet in c.demux(s):
            n += packet.size > 0
            for frame in packet.decode():
                vectors = frame.side_data.get("MOTION_VECTORS")
                if vectors is not None:
                    mv = vectors.to_ndarray()
                    np.median(np.hypot(mv["motion_x"], mv["motion_y"]) / mv["motion_scale"])
            if n >= MAX_FRAMES[0]:
                break
        return n


def best_ms_per_frame(readers: dict, path: Path) -> dict[str, float]:
    """CPU ms per source frame of each reader on ``path``, the best of ``REPEATS`` turns, the
    readers taking turns (load from other jobs comes and goes)."""
    ms: dict[str, float] = {}
    for _ in range(REPEATS[0]):
        for name, fn in readers.items():
            n, _, cpu = cpu_timed(lambda: fn(path))
            ms[name] = min(ms.get(name, float("inf")), 1e3 * cpu / n)
    return ms


def motion_vector_cost(videos: list[Path]) -> None:
    """Per source frame (ms, best of ``REPEATS`` turns, readers in turn): the fastest plain
    reader, the streamer's decoding alone, the same with the codec's motion vectors exported
    and read, and what that leaves of the analysis budget (the fastest reader minus decoding)."""
    readers = {"opencv 1 thread": opencv_1thread, "decode all": decode_floor,
               "decode + motion vectors": decode_with_motion_vectors}
    print(f"\nms of CPU per source frame, first {MAX_FRAMES[0]} frames, best of {REPEATS[0]} turns")
    print(f"| file | {' | '.join(readers)} | analysis budget | motion vectors' cost | left of the budget |")
    print("|---|" + "---:|" * (len(readers) + 3))
    for v in videos:
        ms = best_ms_per_frame(readers, v)
        budget = ms["opencv 1 thread"] - ms["decode all"]
        cost = ms["decode + motion vectors"] - ms["decode all"]
        cells = " | ".join(f"{x:.3f}" for x in ms.values())
        print(f"| {v.name} | {cells} | {budget:.3f} | {cost:.3f} | {budget - cost:.3f} |", flush=True)


def opencv_analysed(path) -> int:
    """OpenCV on one thread feeding the streamer's window builder (every frame to RGB, its
    glance made from the RGB): the fastest plain reader with the streamer's analysis."""
    cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, [cv2.CAP_PROP_N_THREADS, 1])
    rate = cap.get(cv2.CAP_PROP_FPS) or 25.0
    read = [0]

    def frames():
        K = None
        for i in range(MAX_FRAMES[0]):
            ok, bgr = cap.read()
            if not ok:
                return
            read[0] += 1
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            if K is None:
                K = fov_intrinsics(60.0, rgb.shape[1], rgb.shape[0])
            yield Frame(i, i / rate, rgb, K)

    for _ in windows_of(Path(path).name, frames(), StreamerConfig(**WINDOW_CFG)):
        pass
    return read[0]


def analysis_budget(videos: list[Path]) -> None:
    """Per source frame (ms, best of ``REPEATS`` turns, readers in turn): the fastest plain
    reader, the streamer's decoding alone (every frame; reference frames only), the streamer
    path, and the streamer's analysis fed by the fastest reader."""
    readers = {"opencv 1 thread": opencv_1thread, "decode all": decode_floor,
               "decode ref only": lambda p: decode_floor(p, "NONREF"), "streamer": streamer_path,
               "opencv 1 thread + analysis": opencv_analysed}
    print(f"\nms of CPU per source frame, first {MAX_FRAMES[0]} frames, best of {REPEATS[0]} turns")
    print(f"| file | {' | '.join(readers)} | analysis budget (ms) | streamer's analysis (ms) "
          f"| streamer / fastest | streamer / fastest + analysis |")
    print("|---|" + "---|" * (len(readers) + 4))
    for v in videos:
        ms = best_ms_per_frame(readers, v)
        fastest, floor = ms["opencv 1 thread"], ms["decode all"]
        cells = " | ".join(f"{x:.3f}" for x in ms.values())
        print(f"| {v.name} | {cells} | {fastest - floor:.3f} | {ms['streamer'] - floor:.3f} | "
              f"**{fastest / ms['streamer']:.2f}x** | {ms['opencv 1 thread + analysis'] / ms['streamer']:.2f}x |",
              flush=True)


INTRA_CODECS = {"mjpeg": ("mjpeg", "yuvj420p", ".avi", {}),
                "prores": ("prores_ks", "yuv422p10le", ".mov", {"profile": "2"})}
"""Intra-only codecs (encoder, pixel format, container, options) of ``--only intra``: a camera's
or webcam's Motion JPEG, and ProRes 422 (10-bit), what editors and cinema cameras record."""
MJPEG_QUANTISER = 3
"""FFmpeg's MJPEG quality: its quantiser held at this (2-31, lower is better)."""


def transcode(path: Path, out: Path, encoder: str, pix_fmt: str, options: dict) -> Path:
    """The first ``MAX_FRAMES`` frames of ``path`` re-encoded with ``encoder``, at their size."""
    with av.open(str(path)) as src, av.open(str(out), "w") as dst:
        s_in = src.streams.video[0]
        s = dst.add_stream(encoder, rate=s_in.average_rate or 30, options=options)
        s.width, s.height, s.pix_fmt = s_in.codec_context.width, s_in.codec_context.height, pix_fmt
        if encoder == "mjpeg":
            s.codec_context.qmin = s.codec_context.qmax = MJPEG_QUANTISER
        for i, frame in enumerate(src.decode(s_in)):
            if i >= MAX_FRAMES[0]:
                break
            # through RGB: a decoded frame's own properties (range, stamps) make encoders refuse it
            for packet in s.encode(av.VideoFrame.from_ndarray(frame.to_ndarray(format="rgb24"), format="rgb24")):
                dst.mux(packet)
        for packet in s.encode():
            dst.mux(packet)
    return out


def intra_decoding(videos: list[Path], tmp: Path) -> None:
    """Intra-only videos (``streamer.sources.IntraDecoder``: a frame decoded only when a test
    looks at it) and a 10-bit HEVC clip (the glance from 10-bit planes), per source frame (CPU
    ms, best of ``REPEATS`` turns, readers in turn): the fastest plain reader (OpenCV, one
    thread), PyAV decoding every frame on one thread (no conversion: the floor of any reader
    that decodes them all), the streamer path, and the streamer path with every frame decoded
    as it is read (the intra decoder off: how other codecs are read). ``videos`` transcoded to
    each of :data:`INTRA_CODECS`."""
    from streamer import sources

    applies = sources.IntraDecoder.applies

    def every_frame(p):
        sources.IntraDecoder.applies = staticmethod(lambda stream: False)
        try:
            return streamer_path(p)
        finally:
            sources.IntraDecoder.applies = applies

    readers = {"opencv 1 thread": opencv_1thread, "pyav 1 thread, no conversion": decode_floor,
               "streamer": streamer_path, "streamer, every frame decoded": every_frame}
    clips = [transcode(v, tmp / f"{v.stem}.{kind}{suffix}", enc, fmt, opts)
             for kind, (enc, fmt, suffix, opts) in INTRA_CODECS.items() for v in videos]
    clips.append(encode_1080p(tmp / "synthetic_1080p_main10.mp4", 4.0, codec="libx265", pix_fmt="yuv420p10le"))
    print(f"\nms of CPU per source frame, first {MAX_FRAMES[0]} frames, best of {REPEATS[0]} turns")
    print(f"| file | {' | '.join(readers)} | **streamer / fastest** | streamer / every frame decoded |")
    print("|---|" + "---:|" * (len(readers) + 2))
    for clip in clips:
        ms = best_ms_per_frame(readers, clip)
        fastest = min(ms["opencv 1 thread"], ms["pyav 1 thread, no conversion"])
        cells = " | ".join(f"{x:.3f}" for x in ms.values())
        print(f"| {clip.name} | {cells} | **{fastest / ms['streamer']:.2f}x** | "
              f"{ms['streamer, every frame decoded'] / ms['streamer']:.2f}x |", flush=True)


def live_feed(data: bytes, http: bool = False) -> int:
    """Frames of a live feed (``streamer.live.LiveSource``; a server thread here sends ``data`` to
    one connection, then closes: over TCP, or as an HTTP server whose response is ``data``)
    through the streamer's window builder, until the feed has ended and every frame is taken (a
    queue that holds them all: none dropped)."""
    from streamer.live import LiveSource
    from tests.streamer_media import serve_once

    ended, stop = threading.Event(), threading.Event()
    url = serve_once(data, http=http)
    src = LiveSource(url, stop=stop, queue_frames=MAX_FRAMES[0] + 1, stall_timeout_s=60.0,
                     on_error=lambda s, r, d: r in ("feed_ended", "read_failed") and ended.set())
    count = [0]

    def frames():
        for frame in src.frames():  # until stop is set
            count[0] += 1
            yield frame

    def stop_when_taken():  # the feed over and its last frame taken (a short wait: it may be in hand)
        ended.wait()
        while src._queue:
            time.sleep(0.01)
        time.sleep(0.2)
        stop.set()

    threading.Thread(target=stop_when_taken, daemon=True).start()
    try:
        for _ in windows_of(src.name, frames(), StreamerConfig(**WINDOW_CFG)):
            pass
    finally:
        stop.set()
    return count[0]


def mjpeg_over_http(path: Path) -> bytes:
    """An HTTP response of Motion JPEG, as IP cameras serve it (multipart, one JPEG a part), of
    the first ``MAX_FRAMES`` frames of ``path``."""
    parts = [b"HTTP/1.0 200 OK\r\nContent-Type: multipart/x-mixed-replace;boundary=frame\r\n\r\n"]
    with av.open(str(path)) as c:
        for i, frame in enumerate(c.decode(video=0)):
            if i >= MAX_FRAMES[0]:
                break
            jpeg = cv2.imencode(".jpg", frame.to_ndarray(format="bgr24"), [cv2.IMWRITE_JPEG_QUALITY, 90])[1]
            parts.append(b"--frame\r\nContent-Type: image/jpeg\r\nContent-Length: %d\r\n\r\n" % jpeg.size
                         + jpeg.tobytes() + b"\r\n")
    return b"".join(parts)


def live_cost(videos: list[Path], tmp: Path) -> None:
    """CPU ms per frame of a live feed of each video (its first ``MAX_FRAMES`` frames in H.264 in
    MPEG-TS over TCP, what cameras stream; and in Motion JPEG over HTTP, what IP cameras serve)
    read by ``LiveSource`` and windowed, against the H.264 file read as an archive
    (``VideoSource``, the streamer path with FFmpeg's threads, as a live feed decodes); best of
    ``REPEATS`` turns, in turn. Run it under two versions of ``streamer`` (``PYTHONPATH``) for a
    before/after."""
    print(f"\nms of CPU per frame, first {MAX_FRAMES[0]} frames, best of {REPEATS[0]} turns")
    print("| file | live feed (TCP MPEG-TS) | archive (streamer path) | live / archive | live MJPEG over HTTP |")
    print("|---|---:|---:|---:|---:|")
    for v in videos:
        ts = transcode(v, tmp / f"{v.stem}.ts", "libx264", "yuv420p", {"preset": "veryfast", "crf": "23"})
        data, mjpeg = ts.read_bytes(), mjpeg_over_http(v)
        ms = best_ms_per_frame({"live": lambda p: live_feed(data), "archive": lambda p: streamer_path(p, threads=0),
                                "mjpeg": lambda p: live_feed(mjpeg, http=True)}, ts)
        print(f"| {v.name} | {ms['live']:.3f} | {ms['archive']:.3f} | {ms['live'] / ms['archive']:.2f}x | "
              f"{ms['mjpeg']:.3f} |", flush=True)


def gpu_decoding(videos: list[Path], tmp: Path, threads: list[str]) -> None:
    """``streamer.decoder: cuda`` against the CPU decoder and the fastest plain reader, per source
    frame (ms, best of ``REPEATS`` turns, readers in turn): the CPU time (what the decode bar
    counts: frames per CPU-second) and the wall time of the streamer path and of NVDEC's
    decoding alone (frames copied back, no analysis); ``videos`` and a 4K HEVC clip encoded in
    ``tmp`` (a phone's video). ``threads``: more FFmpeg thread settings (``TYPE/COUNT``, e.g.
    ``AUTO/0``) for NVDEC, each a streamer column of its own (``streamer.sources.GPU_DECODE_THREADS``)."""
    from av.codec.hwaccel import HWAccel

    from streamer import sources
    from streamer.sources import cuda_decoder_problem

    def streamer_with(setting: str):
        kind, count = setting.split("/")

        def read(p):
            shipped, sources.GPU_DECODE_THREADS = sources.GPU_DECODE_THREADS, (kind, int(count))
            try:
                return streamer_path(p, decoder="cuda")
            finally:
                sources.GPU_DECODE_THREADS = shipped
        return read

    problem = cuda_decoder_problem()
    if problem is not None:
        print(f"\nstreamer.decoder cuda: not measured, {problem}")
        return
    videos = videos + [encode_1080p(tmp / "synthetic_2160p_hevc.mp4", 2.0, scale=2, codec="libx265")]
    readers = {"opencv 1 thread": opencv_1thread, "decode all": decode_floor,
               "NVDEC decode": lambda p: decode_floor(p, hwaccel=HWAccel("cuda", allow_software_fallback=True)),
               "streamer": streamer_path, "streamer, decoder cuda": lambda p: streamer_path(p, decoder="cuda"),
               **{f"streamer, decoder cuda, threads {t}": streamer_with(t) for t in threads}}
    print(f"\nms per source frame, CPU (wall), first {MAX_FRAMES[0]} frames, best of {REPEATS[0]} turns")
    print(f"| file | {' | '.join(readers)} | **streamer cuda / fastest** (CPU) | streamer cuda / streamer (CPU) |")
    print("|---|" + "---:|" * (len(readers) + 2))
    for v in videos:
        cpu: dict[str, float] = {}
        wall: dict[str, float] = {}
        for _ in range(REPEATS[0]):
            for name, fn in readers.items():
                n, w, c = cpu_timed(lambda: fn(v))
                cpu[name] = min(cpu.get(name, float("inf")), 1e3 * c / n)
                wall[name] = min(wall.get(name, float("inf")), 1e3 * w / n)
        cells = " | ".join(f"{cpu[k]:.3f} ({wall[k]:.3f})" for k in readers)
        print(f"| {v.name} | {cells} | **{cpu['opencv 1 thread'] / cpu['streamer, decoder cuda']:.2f}x** | "
              f"{cpu['streamer'] / cpu['streamer, decoder cuda']:.2f}x |", flush=True)


def images_opencv(folder):
    """Plain reading of an image folder's colour frames to RGB (the baseline for image sources)."""
    n = 0
    for f in frame_files(Path(folder))[: MAX_FRAMES[0]]:
        cv2.cvtColor(cv2.imread(str(f), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)
        n += 1
    return n


def decode_table(videos: list[Path], kitchen: Path | None) -> None:
    readers = {"streamer": streamer_path, "pyav": pyav, "pyav threads": pyav_threads, "opencv": opencv,
               "opencv 1 thread": opencv_1thread}
    if decord is not None:
        readers["decord"] = decord_seq
    print(f"\nframes per CPU-second (frames/s per core), first {MAX_FRAMES[0]} frames of each file, best of "
          f"{REPEATS[0]} turns; "
          f"decord {'installed' if decord else 'absent'}")
    print(f"| file | {' | '.join(readers)} | streamer / plain PyAV | streamer / fastest other |")
    print("|---|" + "---|" * (len(readers) + 2))
    for v in videos:
        rates = {}
        for _ in range(REPEATS[0]):  # readers in turn, the best of each: load from other jobs comes and goes
            for name, fn in readers.items():
                if isinstance(rates.get(name), str):
                    continue
                try:
                    n, _, cpu = cpu_timed(lambda: fn(v))
                    rates[name] = max(rates.get(name, 0.0), n / cpu)
                except Exception as err:  # a reader that cannot open a file: say so, go on
                    rates[name] = f"err {type(err).__name__[:10]}"
        others = [r for k, r in rates.items() if k != "streamer" and not isinstance(r, str)]
        best = max(others) if others else float("nan")
        with av.open(str(v)) as c:
            s = c.streams.video[0]
            label = f"{v.name} ({s.width}x{s.height} {s.codec_context.name})"
        cells = [r if isinstance(r, str) else f"{r:.0f}" for r in rates.values()]
        vs_pyav = rates["streamer"] / rates["pyav"] if not isinstance(rates["pyav"], str) else float("nan")
        print(f"| {label} | {' | '.join(cells)} | {vs_pyav:.2f}x | **{rates['streamer'] / best:.2f}x** |", flush=True)
    if kitchen is not None and kitchen.is_dir():
        ours = bare = theirs = 0.0
        for _ in range(REPEATS[0]):  # in turn, the best of each
            n, _, cpu = cpu_timed(lambda: streamer_path(kitchen))
            k, _, cpu1 = cpu_timed(lambda: streamer_path(kitchen, ground_truth=False))
            m, _, cpu2 = cpu_timed(lambda: images_opencv(kitchen))
            ours, bare, theirs = max(ours, n / cpu), max(bare, k / cpu1), max(theirs, m / cpu2)
        print(f"| {kitchen.name} (image folder, 640x480 JPEG + depth PNG) | streamer {ours:.0f} | "
              f"OpenCV imread+RGB {theirs:.0f} | **{ours / theirs:.2f}x** |", flush=True)
        print(f"| {kitchen.name}, no ground truth (no stage trains on it) | streamer {bare:.0f} | "
              f"OpenCV imread+RGB {theirs:.0f} | **{bare / theirs:.2f}x** |", flush=True)


def stream_rate(specs: list[str], cfg: StreamerConfig, repeats: int) -> tuple[float, list]:
    """(frames read per wall-clock second, best of ``repeats``; the windows of the last turn) of
    the streamer's window stream over ``specs``; a worker pool is started first (spawn and
    imports), as a running streamer has it."""
    frames = [0]

    def run():
        return list(window_stream(lambda: discover(specs, on_error=lambda *a: None), cfg,
                                  on_frame=lambda s: frames.__setitem__(0, frames[0] + 1),
                                  on_error=lambda *a: None, log=logging.getLogger("bench")))

    if workers.worker_count(cfg) > 1:
        run()
    best, out = 0.0, []
    for _ in range(repeats):
        frames[0] = 0
        t = time.perf_counter()
        out = run()
        best = max(best, frames[0] / (time.perf_counter() - t))
    return best, out


def worker_scaling(specs: list[str], repeats: int = 2) -> None:
    """The streamer's window stream over every file: in process (decode_workers 1) vs decode
    workers, at the default interleave (4) and at interleave = cores; best of ``repeats``."""
    cores = workers.available_cores()
    setups = [(1, 4), (0, 4), (1, cores), (cores, cores)]
    print(f"\nwindow_stream over {len(specs)} files (whole files), wall clock, best of {repeats}; "
          f"{cores} cores available")
    print("| decode_workers | interleave | workers | frames/s | vs in process, same interleave | same windows |")
    print("|---|---|---|---|---|---|")
    ref, base = None, {}
    for count, interleave in setups:
        cfg = StreamerConfig(sources=specs, loop=False, decode_workers=count, interleave=interleave, **WINDOW_CFG)
        best, out = stream_rate(specs, cfg, repeats)
        ids = sorted(w.window_id for w in out)
        ref = ref if ref is not None else ids
        base.setdefault(interleave, best)
        print(f"| {count} | {interleave} | {workers.worker_count(cfg) if workers.worker_count(cfg) > 1 else 0} | "
              f"{best:.0f} | {best / base[interleave]:.2f}x | {ids == ref} |", flush=True)
    workers._close_pools()


def looped_stream(specs: list[str], count: int, interleaves: list[int], seconds: float, latency: float,
                  in_flight: int) -> None:
    """Windows per second of the looped window stream over ``specs`` with ``count`` decode
    workers at each interleave, acknowledged ``latency`` s after being taken with at most
    ``in_flight`` out, against the bound of the workers (``count`` x windows per CPU-second of
    one pass in this process, every source in turn) and of the acknowledgements."""
    import dataclasses
    import streamer
    from reliev3r.config import load
    from streamer.progress import Progress

    base = dataclasses.replace(load([Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"]).streamer,
                               sources=specs)
    one = dataclasses.replace(base, decode_workers=1, interleave=1, loop=False)
    cpu = time.process_time()

    def sources():
        return discover(specs, on_error=lambda *a: None, ground_truth=False)

    per_pass = len(list(window_stream(sources, one, on_frame=lambda s: None, on_error=lambda *a: None,
                                      log=logging.getLogger("bench"))))
    cpu = time.process_time() - cpu
    bound = min(count * per_pass / cpu, in_flight / latency if latency else float("inf"))
    print(f"\nlooped window stream of {Path(streamer.__file__).parent} over {len(specs)} sources ({per_pass} windows a "
          f"pass, {per_pass / cpu:.0f} windows per CPU-second in process), {count} decode workers, acknowledged "
          f"{latency:g} s after, <= {in_flight} out; {seconds:g} s each after 150 windows; bound {bound:.0f} windows/s")
    print("| interleave | windows/s | of the bound | passes |")
    print("|---|---:|---:|---:|")
    for interleave in interleaves:
        cfg = dataclasses.replace(base, decode_workers=count, interleave=interleave, loop=True)
        progress = Progress(None)
        stop = threading.Event()
        out: deque = deque()
        room = threading.Condition()

        def acknowledge() -> None:  # the labelers: each window acknowledged `latency` s after it was taken
            while not stop.is_set():
                with room:
                    room.wait_for(lambda: out or stop.is_set())
                    if stop.is_set():
                        return
                    taken, window_id = out[0]
                time.sleep(max(0.0, taken + latency - time.perf_counter()))
                with room:
                    out.popleft()
                    room.notify_all()
                progress.acked(window_id)

        acker = threading.Thread(target=acknowledge, daemon=True)
        acker.start()
        made, passes, t0 = 0, set(), None
        for window in window_stream(sources, cfg, on_frame=lambda s: None, on_error=lambda *a: None,
                                    log=logging.getLogger("bench"), progress=progress, stop=stop):
            with room:
                room.wait_for(lambda: len(out) < in_flight)
                out.append((time.perf_counter(), window.window_id))
                room.notify_all()
            made += 1
            if t0 is None and made == 150:  # workers started, first passes behind
                t0, made = time.perf_counter(), 0
            elif t0 is not None:
                passes.add(window.window_id.rsplit(":", 2)[1])
                if time.perf_counter() - t0 >= seconds:
                    break
        rate = made / (time.perf_counter() - t0)
        stop.set()
        with room:
            room.notify_all()
        acker.join()
        print(f"| {interleave} | {rate:.0f} | {rate / bound:.2f}x | {len(passes)} |", flush=True)
    workers._close_pools()


def repeated_clip(src: Path, repeats: int, out: Path) -> Path:
    """``src``'s video stream ``repeats`` times in a row in one file, packets copied (no
    re-encoding: the codec, its B-frames and GOPs are the source's), stamps continued."""
    with av.open(str(src)) as inp:
        stream = inp.streams.video[0]
        packets = [p for p in inp.demux(stream) if p.size]
        shown = sorted(p.pts for p in packets)
        span = shown[-1] - shown[0] + int(np.median(np.diff(shown)))  # one frame past the last
        with av.open(str(out), "w") as dst:
            ostream = dst.add_stream_from_template(stream)
            for r in range(repeats):
                for p in packets:
                    p.stream = ostream
                    if r:
                        p.pts += span
                        p.dts = None if p.dts is None else p.dts + span
                    dst.mux(p)
    return out


def long_source(src: Path, repeats: int, turns: int = 2) -> None:
    """One long video (``src`` repeated) through the window stream: in process, with decode
    workers on the whole file, and with the workers sharing it in segments
    (``streamer.segments``); wall clock on every core this process may use, best of ``turns``."""
    from streamer import segments

    clip = repeated_clip(src, repeats, Path(tempfile.mkdtemp()) / f"{src.stem}_x{repeats}{src.suffix}")
    cores = workers.available_cores()
    default = segments.SEGMENT_FRAMES
    parts = segments.plan(clip)
    print(f"\none long source: {src.name} x {repeats} ({parts[-1].stop if parts else '?'} frames), {len(parts)} "
          f"segments of >= {default} frames; {cores} cores; wall clock, best of {turns}")
    print("| decode | workers | frames/s | vs in process | windows |")
    print("|---|---|---|---|---|")
    base = None
    try:
        for label, count, length in [("in process", 1, default), ("workers, whole file", cores, 10**9),
                                     ("workers, in segments", cores, default)]:
            segments.SEGMENT_FRAMES = length
            cfg = StreamerConfig(sources=[str(clip)], loop=False, decode_workers=count, interleave=cores,
                                 **WINDOW_CFG)
            best, out = stream_rate([str(clip)], cfg, turns)
            base = base or best
            print(f"| {label} | {workers.worker_count(cfg) if count > 1 else 0} | {best:.0f} | {best / base:.2f}x | "
                  f"{len(out)} |", flush=True)
    finally:
        segments.SEGMENT_FRAMES = default
        workers._close_pools()


def random_access(path, n=30, seed=0):
    """Seconds per random frame: decord get_batch vs PyAV seek + decode forward."""
    rng = np.random.default_rng(seed)
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        total = s.frames or sum(1 for _ in c.decode(s))
    idx = sorted(rng.integers(0, total, n).tolist())
    out = {}
    if decord is not None:
        vr = decord.VideoReader(str(path), num_threads=1)
        _, dt = timed(lambda: len(vr.get_batch(idx).asnumpy()))
        out["decord"] = dt / n
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        rate = float(s.average_rate)

        def pyav_seek():
            for i in idx:
                target = int(i / rate / s.time_base)
                c.seek(target, stream=s, backward=True)
                for f in c.decode(s):
                    if f.pts is not None and f.pts >= target:
                        f.to_ndarray(format="rgb24")
                        break
            return n

        _, dt = timed(pyav_seek)
        out["pyav_seek"] = dt / n
    return out


def encode_1080p(path: Path, seconds: float, fps: int = 30, scale: int = 1, codec: str = "libx264",
                 pix_fmt: str = "yuv420p") -> Path:
    """A texture panning 8 px a frame at 1920x1080 (``scale`` 2: 3840x2160, a phone's 4K), H.264
    or, with ``codec="libx265"``, HEVC (what phones record; ``pix_fmt="yuv420p10le"``: Main 10,
    what they record in HDR)."""
    c = av.open(str(path), "w")
    preset = {"libx264": "veryfast", "libx265": "ultrafast"}[codec]
    s = c.add_stream(codec, rate=fps, options={"preset": preset, "crf": "23"})
    s.width, s.height, s.pix_fmt = 1920 * scale, 1080 * scale, pix_fmt
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (270, 480 + int(seconds * fps) * 2, 3), dtype=np.uint8),
                      None, fx=4 * scale, fy=4 * scale, interpolation=cv2.INTER_CUBIC)
    for i in range(int(seconds * fps)):
        img = np.ascontiguousarray(base[:, i * 8 * scale: i * 8 * scale + 1920 * scale])
        for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
            c.mux(p)
    for p in s.encode():
        c.mux(p)
    c.close()
    return path


def zmq_throughput(views=8, h=256, w=320, n=200) -> tuple[float, float]:
    """(GB/s over tcp://127.0.0.1 PUSH/PULL with the real protocol, GB/s memcpy)."""
    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    port = pull.bind_to_random_port("tcp://127.0.0.1")
    push.connect(f"tcp://127.0.0.1:{port}")
    frames = np.random.default_rng(0).integers(0, 255, (views, h, w, 3), dtype=np.uint8)
    msg = Message("window", {"window_id": "b", "source": "b", "frame_indices": list(range(views))},
                  {"frames": frames, "intrinsics": np.tile(np.eye(3, dtype=np.float32), (views, 1, 1))})
    wire = protocol.encode(msg)
    nbytes = msg.nbytes()

    def sender():
        for _ in range(n):
            push.send_multipart(wire, copy=False)

    got = []
    t = time.perf_counter()
    th = threading.Thread(target=sender)
    th.start()
    for _ in range(n):
        got.append(protocol.decode(pull.recv_multipart(copy=False)).arrays["frames"].shape)
    dt = time.perf_counter() - t
    th.join()
    ctx.destroy(linger=0)
    dst = np.empty_like(frames)
    t = time.perf_counter()
    for _ in range(n):
        np.copyto(dst, frames)
    dm = time.perf_counter() - t
    return nbytes * n / dt / 1e9, nbytes * n / dm / 1e9


def window_decisions(specs: list[Path], out: Path) -> None:
    """Whole-file keyframe decisions of the ``streamer`` imported, written to ``out`` (JSON)."""
    import json

    from streamer import windows as W

    real = cv2.calcOpticalFlowPyrLK
    lk = [0, 0]

    def counted(a, b, pts, *args, **kwargs):
        lk[0] += 1
        lk[1] += len(pts)
        return real(a, b, pts, *args, **kwargs)

    cv2.calcOpticalFlowPyrLK = counted
    result = {}
    print(f"windows of {W.__file__}")
    print("| file | windows | views | cuts | still | rotation | blur | LK calls | LK points |")
    print("|---|---|---|---|---|---|---|---|---|")
    try:
        for spec in specs:
            src = VideoSource(spec) if spec.is_file() else ImageSequenceSource(spec)
            builder = W.builder_for(src.name, StreamerConfig(**WINDOW_CFG))
            wanted = Wanted()
            wanted.builder = builder
            lk[:] = [0, 0]
            made = [w for f in src.frames(wanted=wanted) for w in builder.push(f)]
            made += builder.finish()
            views = [[v.index for v in w.views] for w in made]
            row = dict(windows=views, cuts=builder.cuts, still=builder.skipped_still,
                       rotation=builder.skipped_rotation, blur=builder.skipped_blur, lk_calls=lk[0], lk_points=lk[1])
            result[str(spec)] = row
            print(f"| {spec.name} | {len(views)} | {len({i for v in views for i in v})} | {row['cuts']} | "
                  f"{row['still']} | {row['rotation']} | {row['blur']} | {lk[0]} | {lk[1]} |", flush=True)
    finally:
        cv2.calcOpticalFlowPyrLK = real
    out.write_text(json.dumps(result))


def compare_windows(a: Path, b: Path) -> None:
    """Windows and views of ``b`` that differ from ``a`` (both from ``--only windows``)."""
    import json

    before, after = json.loads(a.read_text()), json.loads(b.read_text())
    print("| file | windows | of them changed | views | in one set only | cuts |")
    print("|---|---|---|---|---|---|")
    total = [0, 0, 0, 0]
    for name in sorted(before.keys() & after.keys()):
        x, y = before[name], after[name]
        wx, wy = {tuple(w) for w in x["windows"]}, {tuple(w) for w in y["windows"]}
        vx, vy = {i for w in wx for i in w}, {i for w in wy for i in w}
        row = [len(wx), len(wx - wy), len(vx), len(vx ^ vy)]
        total = [t + r for t, r in zip(total, row)]
        print(f"| {Path(name).parent.name}/{Path(name).name} | {len(wx)} / {len(wy)} | {row[1]} | "
              f"{len(vx)} / {len(vy)} | {row[3]} | {x['cuts']} / {y['cuts']} |")
    print(f"| all | {total[0]} | {total[1]} | {total[2]} | {total[3]} | |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    shared = Path(__file__).resolve().parents[2] / "shared" / "data"
    ap.add_argument("--videos", default=str(shared / "videos"))
    ap.add_argument("--kitchen", default=str(shared / "7scenes-redkitchen"))
    ap.add_argument("--seconds-1080p", type=float, default=4.0)
    ap.add_argument("--max-frames", type=int, default=300)
    ap.add_argument("--repeats", type=int, default=3, help="turns per file (best of); the readers take turns")
    ap.add_argument("--only", choices=["decode", "workers", "extras", "windows", "streamer", "budget", "mvs",
                                       "intra", "live", "long", "loop", "gpu"],
                    default=None)
    ap.add_argument("--windows-out", default="windows.json", help="--only windows: where the decisions go")
    ap.add_argument("--extra", action="append", default=[], help="--only windows|streamer: more files or folders")
    ap.add_argument("--long", default=str(shared / "videos" / "bikes.mp4"),
                    help="--only long: the clip repeated into one long video")
    ap.add_argument("--long-repeats", type=int, default=24)
    ap.add_argument("--loop-workers", type=int, default=2)
    ap.add_argument("--loop-interleave", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--loop-seconds", type=float, default=10.0)
    ap.add_argument("--loop-latency", type=float, default=0.2,
                    help="--only loop: seconds to a window's acknowledgement")
    ap.add_argument("--loop-in-flight", type=int, default=32, help="--only loop: windows out at most (max_in_flight)")
    ap.add_argument("--gpu-threads", nargs="*", default=[], metavar="TYPE/COUNT",
                    help="--only gpu: more FFmpeg thread settings for NVDEC, e.g. AUTO/0 AUTO/4")
    ap.add_argument("--compare-windows", nargs=2, metavar=("A", "B"), help="count the differing windows")
    args = ap.parse_args()
    MAX_FRAMES[0] = args.max_frames
    REPEATS[0] = args.repeats
    if args.compare_windows:
        compare_windows(*map(Path, args.compare_windows))
        return 0
    if args.only == "loop":
        specs = sorted(str(p) for p in Path(args.videos).glob("*.mp4")) + [args.kitchen]
        looped_stream(specs, args.loop_workers, args.loop_interleave, args.loop_seconds, args.loop_latency,
                      args.loop_in_flight)
        return 0
    if args.only in ("windows", "streamer"):
        specs = sorted(Path(args.videos).glob("*.mp4")) + sorted(Path(args.videos).glob("*.avi"))
        specs += [p for p in [Path(args.kitchen)] + [Path(e) for e in args.extra] if p.exists()]
        if args.only == "windows":
            window_decisions(specs, Path(args.windows_out))
            return 0
        from streamer import windows as W

        rates = []
        for spec in specs:
            best = 0.0
            for _ in range(REPEATS[0]):
                n, _, cpu = cpu_timed(lambda: streamer_path(spec))
                best = max(best, n / cpu)
            rates.append(f"{spec.name} {best:.0f}")
        print(f"streamer path of {W.__file__}, frames per CPU-second, first {MAX_FRAMES[0]} frames, best of "
              f"{REPEATS[0]}: " + ", ".join(rates), flush=True)
        return 0
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; {platform.processor() or platform.machine()}, "
          f"{workers.available_cores()} cores available; PyAV {av.__version__}, OpenCV {cv2.__version__}, "
          f"decord {decord.__version__ if decord else 'absent'}, numpy {np.__version__}")
    tmp = Path(tempfile.mkdtemp())
    videos = sorted(Path(args.videos).glob("*.mp4"))[:8] + sorted(Path(args.videos).glob("*.avi"))[:2]
    videos.append(encode_1080p(tmp / "synthetic_1080p.mp4", args.seconds_1080p))
    if args.only in (None, "decode"):
        decode_table(videos, Path(args.kitchen))
    if args.only in (None, "budget"):
        analysis_budget(videos)
    if args.only in (None, "intra"):
        intra_decoding(videos, tmp)
    if args.only in (None, "live"):
        live_cost(videos, tmp)
    if args.only in (None, "gpu"):
        gpu_decoding(videos, tmp, args.gpu_threads)
    if args.only in (None, "mvs"):
        motion_vector_cost(videos)
    if args.only in (None, "workers"):
        worker_scaling([str(v) for v in videos])
    if args.only in (None, "long"):
        long_source(Path(args.long), args.long_repeats)
    if args.only in (None, "extras"):
        for v in (videos[0], videos[-1]):
            ra = random_access(v)
            print(f"random access {v.name}: " + ", ".join(f"{k} {1e3 * s:.1f} ms/frame" for k, s in ra.items()))
        gbs, mem = zmq_throughput()
        print(f"zmq window throughput tcp://127.0.0.1: {gbs:.2f} GB/s; memcpy {mem:.2f} GB/s; ratio {gbs / mem:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

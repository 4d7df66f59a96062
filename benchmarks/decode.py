"""Decode throughput, side by side in one run: our streamer path (VideoSource -> windows),
plain PyAV, decord (if installed) and OpenCV, in frames/s on ONE core (threads pinned to 1),
on the shared videos and a 1080p H.264 file encoded here; decord vs PyAV for random access;
and ZeroMQ window throughput over tcp://127.0.0.1 vs an in-process memcpy of the same bytes.

    .venv/bin/python benchmarks/decode.py [--videos DIR] [--seconds-1080p 4]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import av  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
import zmq  # noqa: E402

from reliev3r import protocol  # noqa: E402
from reliev3r.protocol import Message  # noqa: E402
from streamer.config import StreamerConfig  # noqa: E402
from streamer.sources import VideoSource  # noqa: E402
from streamer.windows import windows_of  # noqa: E402

cv2.setNumThreads(1)
try:
    import decord
except ImportError:
    decord = None


def timed(fn) -> tuple[int, float]:
    t = time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t


def pyav(path):
    with av.open(str(path)) as c:
        s = c.streams.video[0]
        s.thread_type, s.thread_count = "SLICE", 1
        return sum(1 for f in c.decode(s) if f.to_ndarray(format="rgb24") is not None)


def opencv(path):
    cap = cv2.VideoCapture(str(path))
    n = 0
    while cap.read()[0]:
        n += 1
    return n


def decord_seq(path):
    vr = decord.VideoReader(str(path), num_threads=1)
    return sum(1 for i in range(len(vr)) if vr[i] is not None)


def streamer_path(path):
    """Decode + keyframe gates + resize to windows: what the streamer does per frame."""
    cfg = StreamerConfig(views=4, frame_stride=4, window_step=8)
    src = VideoSource(path)
    count = [0]

    def frames():
        for f in src.frames():
            count[0] += 1
            yield f

    for _ in windows_of(src.name, frames(), cfg):
        pass
    return count[0]


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


def encode_1080p(path: Path, seconds: float, fps: int = 30) -> Path:
    c = av.open(str(path), "w")
    s = c.add_stream("libx264", rate=fps, options={"preset": "veryfast", "crf": "23"})
    s.width, s.height, s.pix_fmt = 1920, 1080, "yuv420p"
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 255, (270, 480 + int(seconds * fps) * 2, 3), dtype=np.uint8),
                      None, fx=4, fy=4, interpolation=cv2.INTER_CUBIC)
    for i in range(int(seconds * fps)):
        img = np.ascontiguousarray(base[:, i * 8: i * 8 + 1920])
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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "videos"))
    ap.add_argument("--seconds-1080p", type=float, default=4.0)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp())
    videos = sorted(Path(args.videos).glob("*.mp4"))[:6] + sorted(Path(args.videos).glob("*.avi"))[:1]
    videos.append(encode_1080p(tmp / "synthetic_1080p.mp4", args.seconds_1080p))
    readers = {"streamer": streamer_path, "pyav": pyav, "opencv": opencv}
    if decord is not None:
        readers["decord"] = decord_seq
    print(f"frames/s on one core (decord {'installed' if decord else 'absent'}); ratios vs plain PyAV")
    print(f"{'video':24s} " + " ".join(f"{k:>16s}" for k in readers))
    for v in videos:
        row = []
        base = None
        for name, fn in readers.items():
            try:
                n, dt = timed(lambda: fn(v))
                fps = n / dt
            except Exception as err:  # a reader that cannot open a file: say so, go on
                row.append(f"{'err ' + type(err).__name__[:10]:>16s}")
                continue
            if name == "pyav":
                base = fps
            row.append((name, fps))
        base = base or 1.0
        cells = [c if isinstance(c, str) else f"{c[1]:8.0f} ({c[1] / base:4.2f}x)" for c in row]
        print(f"{v.name:24s} " + " ".join(f"{c:>16s}" for c in cells))
    for v in (videos[0], videos[-1]):
        ra = random_access(v)
        print(f"random access {v.name}: " + ", ".join(f"{k} {1e3 * s:.1f} ms/frame" for k, s in ra.items()))
    gbs, mem = zmq_throughput()
    print(f"zmq window throughput tcp://127.0.0.1: {gbs:.2f} GB/s; memcpy {mem:.2f} GB/s; ratio {gbs / mem:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

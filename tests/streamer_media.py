"""Test media for the streamer and labeler tests: small real videos encoded with PyAV."""

from __future__ import annotations

import collections
import os
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np

SHARED = Path(__file__).parents[1].parent / "shared" / "data"


def texture(width: int, height: int, seed: int = 0) -> np.ndarray:
    """A blotchy RGB texture with corners at many scales (SIFT and ORB find plenty)."""
    rng = np.random.default_rng(seed)
    img = np.zeros((height, width, 3), np.float32)
    for sigma in (1.5, 4.0, 10.0):
        noise = rng.uniform(0, 255, (height, width, 3)).astype(np.float32)
        img += cv2.GaussianBlur(noise, (0, 0), sigma)
    img -= img.min()
    return (img / img.max() * 255).astype(np.uint8)


def panning_frames(n: int, width: int = 160, height: int = 120, step: int = 3, seed: int = 0) -> np.ndarray:
    """[n, H, W, 3] crops of a texture sliding ``step`` pixels per frame (a panning camera)."""
    big = texture(width + step * n + 1, height, seed)
    return np.stack([big[:, i * step:i * step + width] for i in range(n)])


def encode(path: Path, frames: np.ndarray, *, codec: str = "libx264", fps: int = 10, gop: int | None = None,
           pix_fmt: str = "yuv420p", audio_s: float = 0.0) -> Path:
    """``gop``: keyframe interval (a live receiver joining mid-stream waits for a keyframe).
    Two encoder threads on any machine: libx264 picks its thread count from the cores, and its
    output (which packets a lossy copy drops, what a decoder conceals) depends on it.
    ``audio_s``: an AAC track of silence that long besides (muxed after the video)."""
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps, options={"threads": "2", **({"g": str(gop)} if gop else {})})
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = pix_fmt
    rate, samples = 16000, 1024
    audio = container.add_stream("aac", rate=rate) if audio_s else None
    for rgb in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    if audio is not None:
        for i in range(int(audio_s * rate) // samples):
            chunk = av.AudioFrame.from_ndarray(np.zeros((1, samples), np.float32), format="fltp", layout="mono")
            chunk.sample_rate, chunk.pts, chunk.time_base = rate, i * samples, Fraction(1, rate)
            for packet in audio.encode(chunk):
                container.mux(packet)
        for packet in audio.encode():
            container.mux(packet)
    container.close()
    return path


def encode_stamped(path: Path, frames: np.ndarray, stamps: list[int], *, fps: int = 10) -> Path:
    """A Matroska file of ``frames`` (H.264 without B-frames) whose packets carry ``stamps`` (in
    frames of ``1 / fps``) as their presentation stamps, as a broken muxer writes them (the same
    stamp twice, say): the decoder hands each frame out with its packet's stamp."""
    container = av.open(str(path), "w", format="matroska")
    stream = container.add_stream("libx264", rate=fps, options={"threads": "2", "bf": "0"})
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    packets = [p for rgb in frames for p in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb),
                                                                                      format="rgb24"))]
    packets += stream.encode()
    assert len(packets) == len(stamps)
    for packet, stamp in zip(packets, stamps):
        packet.pts = packet.dts = round(stamp / fps / packet.time_base)
        container.mux(packet)
    container.close()
    return path


def restamped(src: Path, dst: Path, shift_s: float) -> Path:
    """A copy of MPEG-TS file ``src`` (its video alone) whose packets' stamps, presentation and
    decode, are ``shift_s`` seconds later."""
    with av.open(str(src)) as source, av.open(str(dst), "w", format="mpegts") as out:
        video = source.streams.video[0]
        stream = out.add_stream_from_template(video)
        shift = round(shift_s / video.time_base)
        for packet in source.demux(video):
            if packet.dts is None:
                continue  # the demuxer's empty packet at the end
            packet.pts, packet.dts, packet.stream = packet.pts + shift, packet.dts + shift, stream
            out.mux(packet)
    return dst


def damage_mdat(path: Path, nbytes: int = 300, seed: int = 0) -> Path:
    """Overwrite ``nbytes`` in the middle of an MP4's media data (mdat) with random bytes: the
    container still opens, the codec meets corrupt packets mid-stream."""
    data = bytearray(path.read_bytes())
    at = data.find(b"mdat")
    mid = at + 4 + int.from_bytes(data[at - 4:at], "big") // 2
    data[mid:mid + nbytes] = np.random.default_rng(seed).integers(0, 256, nbytes, dtype=np.uint8).tobytes()
    path.write_bytes(bytes(data))
    return path


def drop_ts_packets(path: Path, out: Path, *, at: float = 0.49, count: int = 6) -> Path:
    """An MPEG-TS copy of ``path`` that lost ``count`` consecutive 188-byte transport packets
    ``at`` a fraction of the way in (what a lossy network does): continuity counters jump, the
    decoder loses reference data and conceals it."""
    data = path.read_bytes()
    n = len(data) // 188
    first = int(n * at)
    out.write_bytes(b"".join(data[i * 188:(i + 1) * 188] for i in range(n) if not first <= i < first + count))
    return out


def join_ts(first: Path, second: Path, out: Path, *, counters: bool = False) -> Path:
    """Two MPEG-TS recordings joined end to end (``cat``: the second's stamps start again).
    ``counters``: the second's continuity counters carried on from the first's, so the demuxer
    sees no lost packet at the join (a segmenter's output; ``cat`` leaves them, and the demuxer
    flags the join as damage)."""
    a, b = bytearray(first.read_bytes()), bytearray(second.read_bytes())
    if counters:
        last: dict[int, int] = {}
        for i in range(0, len(a) - 187, 188):
            if a[i + 3] & 0x10:  # a payload: the counter counts it
                last[((a[i + 1] & 0x1F) << 8) | a[i + 2]] = a[i + 3] & 0x0F
        shift: dict[int, int] = {}
        for i in range(0, len(b) - 187, 188):
            if b[i + 3] & 0x10:
                pid = ((b[i + 1] & 0x1F) << 8) | b[i + 2]
                shift.setdefault(pid, (last.get(pid, 15) + 1 - (b[i + 3] & 0x0F)) % 16)
                b[i + 3] = (b[i + 3] & 0xF0) | ((b[i + 3] + shift[pid]) & 0x0F)
    out.write_bytes(bytes(a + b))
    return out


def rotate_mp4(path: Path) -> Path:
    """Give an MP4's video track the display matrix of a phone held upright (FFmpeg reports
    a rotation of -90 degrees: players turn the picture 90 degrees clockwise)."""
    return set_display_matrix(path, (0, 0x10000, 0, -0x10000, 0, 0, 0, 0, 0x40000000))


def set_display_matrix(path: Path, matrix: tuple[int, ...]) -> Path:
    """Write ``matrix`` (9 values, ``(a, b, u, c, d, v, x, y, w)``: 16.16 fixed point, ``u, v, w``
    2.30) as the display matrix of an MP4's first track."""
    import struct

    data = bytearray(path.read_bytes())
    at = data.find(b"tkhd")
    assert data[at + 4] == 0  # version 0: the matrix sits 40 bytes after the version byte
    data[at + 44:at + 80] = struct.pack(">9i", *matrix)
    path.write_bytes(bytes(data))
    return path


def exif_tagged(data: bytes, orientation: int, *, big_endian: bool = False) -> bytes:
    """A JPEG's or PNG's bytes with an Exif orientation tag (1-8: how to turn the stored image to
    show it) put in, as a camera writes it: a JPEG's APP1 ``Exif`` segment after the start of
    image, a PNG's ``eXIf`` chunk before its image data. Other tags in IFD0 before it (as
    phones write make and model), little- or big-endian TIFF."""
    import zlib

    order = "big" if big_endian else "little"
    u16, u32 = (lambda v: v.to_bytes(2, order)), (lambda v: v.to_bytes(4, order))
    entries = [u16(0x010F) + u16(2) + u32(4) + b"cam\0",  # make: 4 ASCII bytes, inline
               u16(0x0112) + u16(3) + u32(1) + u16(orientation) + b"\0\0"]
    tiff = (b"MM\x00*" if big_endian else b"II*\x00") + u32(8) + u16(len(entries)) + b"".join(entries) + u32(0)
    if data[:2] == b"\xff\xd8":
        return data[:2] + b"\xff\xe1" + (2 + 6 + len(tiff)).to_bytes(2, "big") + b"Exif\x00\x00" + tiff + data[2:]
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at = data.index(b"IDAT") - 4
    chunk = len(tiff).to_bytes(4, "big") + b"eXIf" + tiff + zlib.crc32(b"eXIf" + tiff).to_bytes(4, "big")
    return data[:at] + chunk + data[at:]


def count_reads(monkeypatch) -> collections.Counter:
    """Opens of each file (by resolved path) from here on, through Python's ``open``: what
    ``Path.read_bytes`` and ``numpy.fromfile`` (``reliev3r.imaging.read_image``) open a path with."""
    import builtins
    import io

    counts: collections.Counter = collections.Counter()
    real = builtins.open

    def counted(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)):
            counts[Path(os.fsdecode(file)).resolve()] += 1
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counted)
    monkeypatch.setattr(io, "open", counted)
    return counts


def serve_once(data: bytes, *, http: bool = False) -> str:
    """The URL of a live feed that sends ``data`` to its one connection, then is gone (a server
    on a thread of its own): ``tcp://``, or with ``http`` an HTTP server (``data`` its response,
    sent once the request is read)."""
    import socket
    import threading

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]

    def serve():
        conn, _ = server.accept()
        with conn:
            if http:
                conn.recv(65536)  # the request
            conn.sendall(data)
        server.close()

    threading.Thread(target=serve, daemon=True).start()
    return f"http://127.0.0.1:{port}/video.mjpg" if http else f"tcp://127.0.0.1:{port}"


RTSP_SERVER = """
import sys
import gi
gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer

Gst.init(None)
server = GstRtspServer.RTSPServer()
server.set_address("127.0.0.1")
server.set_service(sys.argv[1])
factory = GstRtspServer.RTSPMediaFactory()
factory.set_launch("( videotestsrc is-live=true pattern=ball ! video/x-raw,width=160,height=120,framerate=15/1 "
                   "! x264enc tune=zerolatency speed-preset=ultrafast key-int-max=15 ! rtph264pay name=pay0 pt=96 )")
factory.set_shared(True)
server.get_mount_points().add_factory("/feed", factory)
server.attach(None)
print("ready", flush=True)
GLib.MainLoop().run()
"""
"""A real RTSP server (Debian's GStreamer RTSP server through python3-gi): run it with the
system ``/usr/bin/python3 -c RTSP_SERVER PORT``; it serves ``rtsp://127.0.0.1:PORT/feed``."""


def rtsp_server_available() -> str | None:
    """None when the RTSP server can run here, else why not."""
    import subprocess

    if not Path("/usr/bin/python3").exists():
        return "no /usr/bin/python3 for GStreamer's python3-gi"
    probe = ("import gi; gi.require_version('GstRtspServer', '1.0'); from gi.repository import Gst, GstRtspServer; "
             "Gst.init(None); assert Gst.ElementFactory.find('x264enc') and Gst.ElementFactory.find('videotestsrc')")
    if subprocess.run(["/usr/bin/python3", "-c", probe], capture_output=True).returncode != 0:
        return ("GStreamer RTSP server missing (apt-get install gir1.2-gst-rtsp-server-1.0 python3-gi "
                "gstreamer1.0-plugins-good gstreamer1.0-plugins-ugly)")
    return None


EVERY_SECOND_FRAME = dict(views=2, height=16, width=16, frame_stride=1, window_step=2, loop=False,
                          keyframe_min_motion=0, keyframe_min_flow=0, blur_ratio=0, scene_cut_motion=0,
                          scene_cut_hist=0)
"""``StreamerConfig`` fields of a window every 2 frames of a small clip, every gate open: the
windows of a file are those of its frames alone (files read again, grown, replaced)."""


def still(path: Path) -> Path:
    """``path`` as a file its writer finished with an hour ago (taken as it is found, not as
    one still being written: ``streamer.settle_s``)."""
    import time

    os.utime(path, (time.time() - 3600, time.time() - 3600))
    return path


def arriving(tmp_path: Path) -> tuple[bytes, Path]:
    """An upload folder holding the first third of a 40-frame clip (``a-arriving.ts``, still)
    beside a whole 30-frame one (``b-other.ts``): the whole clip's bytes, and the arriving file."""
    whole = encode(tmp_path / "whole.ts", panning_frames(40, 64, 48)).read_bytes()
    folder = tmp_path / "uploads"
    folder.mkdir()
    (folder / "a-arriving.ts").write_bytes(whole[: len(whole) // 3])
    still(encode(folder / "b-other.ts", panning_frames(30, 64, 48, seed=1)))
    return whole, still(folder / "a-arriving.ts")


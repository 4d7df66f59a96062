"""The wire format every stage speaks: ZeroMQ multipart messages, no pickle.

A message is ``[MAGIC, header, buffer_0, ..., buffer_{n-1}]``:

* ``MAGIC`` is ``b"R3W"`` followed by one byte, the protocol version.
* ``header`` is msgpack: ``{"kind": str, "meta": {...}, "arrays": [[name, dtype, shape], ...]}``.
  ``meta`` holds small plain values (ids, timestamps, teacher names and versions).
* one raw, C-contiguous buffer per entry of ``arrays``, in that order.

On receipt :func:`decode` checks the frame count, magic and version, the kind, that every
dtype is in :data:`DTYPES`, that shapes are lists of at most :data:`MAX_NDIM` non-negative
ints, each array's name, dtype and ndim against its kind's schema (:data:`SCHEMAS`) before
the array is built, that each buffer's size equals ``prod(shape) * itemsize``, the total size
against ``max_bytes``, the arrays and meta keys each kind requires, and for windows, inserts
and batches the values no loss could use: non-finite intrinsics, poses or matches, intrinsics
that are no camera's (``fx``, ``fy`` <= 0, a last row other than [0, 0, 1]), match indices out
of range and match pixels beyond :data:`MATCH_MARGIN_PX` of their frames. Anything else raises
:class:`ProtocolError` with a short ``reason`` that callers count in metrics; decode raises
nothing else on any input (a shape numpy refuses to build is ``bad_shape``).

Kinds and their payloads (V views, H x W pixels, K matches, B windows in a batch):

================  ====================================================================
``ready``         labeler -> streamer: meta ``credits`` (windows it can take now).
``window``        streamer -> labeler: ``frames`` uint8 [V,H,W,3] RGB, ``intrinsics``
                  float32 [V,3,3] (pixels of ``frames``); optional ``gt_depth`` float32
                  [V,H,W] (z-depth, 0 = unknown), ``gt_cam_to_world`` float32 [V,4,4].
                  meta ``window_id``, ``source``, ``frame_indices``, ``timestamps``.
``done``          labeler -> streamer: meta ``window_id``, ``status`` ("stored",
                  "duplicate", "dropped"), ``reason``.
``insert``        labeler -> replay: a ``window`` plus ``teacher_depth`` float32 [V,H,W]
                  and ``teacher_valid`` uint8 [V,H,W] (absent when the teacher is
                  ``none``), ``matches`` float32 [K,7] rows (i, j, x_i, y_i, x_j, y_j,
                  score: :data:`MATCH_COLUMNS`, by name through :class:`Matches`),
                  optional ``match_triangulation`` float32 [K,3] rows (z_i, z_j,
                  weight in [0, 1]) aligned with ``matches`` (two-view triangulation, unit
                  baseline per pair; zeros = not triangulated); meta adds ``teacher``
                  {"depth": {name, version, space}, "matches": {name, version}}.
``insert_ack``    replay -> labeler: meta ``window_id``, ``status``, ``reason``.
``sample``        learner -> replay: meta ``batch_size``, ``rank`` (below :data:`MAX_RANKS`); optional ``max_bytes``
                  (version 3: the most bytes of arrays the requester's reply may carry,
                  its ``decode`` limit; without it the replay assumes
                  :data:`DEFAULT_MAX_BYTES`).
``batch``         replay -> learner: the ``insert`` arrays stacked over B windows, with
                  ``matches`` float32 [K,8] rows (b, i, j, x_i, y_i, x_j, y_j, score:
                  :data:`BATCH_MATCH_COLUMNS`) and, when any window has it,
                  ``match_triangulation`` [K,3] aligned with them;
                  meta ``window_ids``, ``probabilities``, ``times_sampled``, ``teachers``
                  (each window's ``teacher``: windows of one batch may come from teachers
                  of different spaces) and ``teacher`` (the first window's).
``priorities``    learner -> replay: meta ``window_ids``, ``losses`` (per-window loss).
``stats``         request (empty meta) and reply (meta: counters) for any service.
``heartbeat``     every process -> supervisor: meta ``stage``, ``pid``, ``status``.
``error``         reply to a request that was rejected: meta ``reason``.
================  ====================================================================

Pixel coordinates follow ``reliev3r.geometry`` (pixel centres at integer coordinates).

Compressed frames (cross-host links): a ``window`` or ``insert`` may carry
``frames_encoded`` uint8 [N] (the V images' JPEG or PNG files back to back) instead of
``frames``, with meta ``frame_codec`` ("jpeg" | "png"), ``frame_sizes`` (V byte counts) and
``frame_shape`` ([V, H, W, 3]). :func:`decode` restores ``frames`` before any other check,
so receivers never see the difference; :func:`compress_frames` makes such a message.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

import msgpack
import numpy as np

VERSION = 3
"""Version 2 added the optional ``match_triangulation`` array, version 3 the optional
``max_bytes`` of a ``sample`` request; messages of versions 1 and 2 are valid version 3
messages (they lack them), so all three are accepted on receipt."""
ACCEPTED_VERSIONS = frozenset({1, 2, 3})
MAGIC = b"R3W" + bytes([VERSION])
DEFAULT_MAX_BYTES = 512 << 20
DTYPES = frozenset({"uint8", "uint16", "int32", "int64", "float16", "float32", "float64", "bool"})
MAX_NDIM = 8
"""More dimensions than any array of :data:`SCHEMAS` has (a batch's frames: 5), and far fewer
than numpy's limit (64), so a shape is refused before numpy could raise on it."""
MAX_HEADER_BYTES = 1 << 20
MAX_SAMPLE_WINDOWS = 4096
"""The most windows one ``sample`` request may ask for (``learner.batch_size``, each rank's)."""
MAX_RANKS = 4096
"""A ``sample`` request's ``rank`` is below it: the replay keeps (and saves) a random stream for
each rank that asks, so a client naming rank after rank would grow that without bound."""


class ProtocolError(ValueError):
    """A message that breaks the wire format. ``reason`` is a short, countable label."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Schema:
    required_arrays: dict[str, tuple[str, int]] = field(default_factory=dict)
    """name -> (dtype, ndim) that must be present."""
    optional_arrays: dict[str, tuple[str, int]] = field(default_factory=dict)
    required_meta: tuple[str, ...] = ()


_WINDOW_ARRAYS = {"frames": ("uint8", 4), "intrinsics": ("float32", 3)}
_WINDOW_OPTIONAL = {"gt_depth": ("float32", 3), "gt_cam_to_world": ("float32", 3)}
_LABEL_OPTIONAL = {**_WINDOW_OPTIONAL, "teacher_depth": ("float32", 3), "teacher_valid": ("uint8", 3)}

SCHEMAS: dict[str, Schema] = {
    "ready": Schema(required_meta=("credits",)),
    "window": Schema(_WINDOW_ARRAYS, _WINDOW_OPTIONAL, ("window_id", "source", "frame_indices")),
    "done": Schema(required_meta=("window_id", "status")),
    "insert": Schema({**_WINDOW_ARRAYS, "matches": ("float32", 2)},
                     {**_LABEL_OPTIONAL, "match_triangulation": ("float32", 2)},
                     ("window_id", "source", "frame_indices", "teacher")),
    "insert_ack": Schema(required_meta=("window_id", "status")),
    "sample": Schema(required_meta=("batch_size",)),
    "batch": Schema({"frames": ("uint8", 5), "intrinsics": ("float32", 4), "matches": ("float32", 2)},
                    {"gt_depth": ("float32", 4), "gt_cam_to_world": ("float32", 4),
                     "teacher_depth": ("float32", 4), "teacher_valid": ("uint8", 4),
                     "match_triangulation": ("float32", 2)},
                    ("window_ids",)),
    "priorities": Schema(required_meta=("window_ids", "losses")),
    "stats": Schema(),
    "heartbeat": Schema(required_meta=("stage", "pid")),
    "error": Schema(required_meta=("reason",)),
}


MATCH_MARGIN_PX = 2.0
"""How far beyond its frame's edge a match may lie, in pixels. Pixel centres sit at integer
coordinates, so a frame of W x H pixels covers [-0.5, W - 0.5] x [-0.5, H - 0.5]; the matchers
(``labelers.matches``) place their keypoints on or inside the outermost pixel centres (OpenCV's
SIFT and ORB keep a border, XFeat's lie on pixel centres of its grid scaled to the frame), and
a match a little outside is still a ray through the camera. A coordinate far outside (1e30)
is no match: it makes every loss on its window non-finite."""

TEACHER_SPACES = ("depth", "disparity")
"""What ``teacher.depth.space`` may name: the space of ``teacher_depth`` (larger = farther, or
larger = nearer). Absent, it is ``"depth"``."""


MATCH_COLUMNS = ("i", "j", "x_i", "y_i", "x_j", "y_j", "score")
"""Columns of a window's ``matches`` [K,7]: the two views' indices, the match's pixel in each
(``x_i, y_i`` in view i, ``x_j, y_j`` in view j) and the matcher's score."""
BATCH_MATCH_COLUMNS = ("b", *MATCH_COLUMNS)
"""Columns of a batch's ``matches`` [K,8]: the window's index in the batch, then
:data:`MATCH_COLUMNS`."""


@dataclass(frozen=True, slots=True)
class Matches:
    """``matches`` rows by column name, without a copy (numpy array or torch tensor): a
    window's [K,7] (:data:`MATCH_COLUMNS`) or, with ``batched``, a batch's [K,8]
    (:data:`BATCH_MATCH_COLUMNS`). A batch's rows without their last column, [K,7]
    (b, i, j, x_i, y_i, x_j, y_j), as the learner's match terms take them, read the same way
    (all but :attr:`score`). Indices are returned as stored (floats)."""

    rows: Any
    batched: bool = False

    @property
    def window(self) -> Any:
        """[K] the window's index in the batch (``batched`` only)."""
        if not self.batched:
            raise ValueError("a window's matches have no batch column")
        return self.rows[:, 0]

    @property
    def view_i(self) -> Any:
        return self.rows[:, int(self.batched)]

    @property
    def view_j(self) -> Any:
        return self.rows[:, int(self.batched) + 1]

    @property
    def xy_i(self) -> Any:
        """[K,2] the match's pixel (x, y) in view i."""
        o = int(self.batched) + 2
        return self.rows[:, o:o + 2]

    @property
    def xy_j(self) -> Any:
        """[K,2] the match's pixel (x, y) in view j."""
        o = int(self.batched) + 4
        return self.rows[:, o:o + 2]

    @property
    def score(self) -> Any:
        return self.rows[:, int(self.batched) + 6]

    @property
    def geometry(self) -> Any:
        """The rows without :attr:`score`: a batch's [K,7] (b, i, j, x_i, y_i, x_j, y_j), what
        the learner's match terms take (the score goes beside them as their weights)."""
        return self.rows[:, :int(self.batched) + 6]


@dataclass(slots=True)
class Message:
    kind: str
    meta: dict[str, Any] = field(default_factory=dict)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())


def encode(msg: Message) -> list[bytes | memoryview]:
    """Frames for ``socket.send_multipart(frames, copy=False)``; arrays are not copied
    when already C-contiguous."""
    if msg.kind not in SCHEMAS:
        raise ProtocolError("unknown_kind", msg.kind)
    specs, buffers = [], []
    for name, arr in msg.arrays.items():
        arr = np.asarray(arr)
        if arr.dtype.name not in DTYPES:
            raise ProtocolError("bad_dtype", f"{name}: {arr.dtype}")
        arr = np.ascontiguousarray(arr)
        specs.append([name, arr.dtype.name, list(arr.shape)])
        buffers.append(memoryview(arr).cast("B") if arr.size else b"")
    header = msgpack.packb({"kind": msg.kind, "meta": msg.meta, "arrays": specs}, use_bin_type=True)
    return [MAGIC, header, *buffers]


def decode(frames: Iterable[bytes | memoryview | Any], *, max_bytes: int = DEFAULT_MAX_BYTES,
           kinds: Iterable[str] | None = None) -> Message:
    """Validate and decode a multipart message; raise :class:`ProtocolError` on anything off.

    ``kinds`` restricts which kinds this receiver accepts. Arrays are read-only views on the
    received buffers (no copy); copy them to modify.
    """
    frames = [f.buffer if hasattr(f, "buffer") else f for f in frames]  # zmq.Frame -> memoryview
    if len(frames) < 2:
        raise ProtocolError("too_few_frames", str(len(frames)))
    magic = bytes(frames[0])
    if magic[:3] != MAGIC[:3] or len(magic) != 4:
        raise ProtocolError("bad_magic")
    if magic[3] not in ACCEPTED_VERSIONS:
        raise ProtocolError("bad_version", f"got {magic[3]}, speak {sorted(ACCEPTED_VERSIONS)}")
    if len(frames[1]) > MAX_HEADER_BYTES:
        raise ProtocolError("header_too_large", str(len(frames[1])))
    try:
        header = msgpack.unpackb(frames[1], raw=False, strict_map_key=True)
    except Exception as err:  # msgpack raises several unrelated types on garbage
        raise ProtocolError("bad_header", type(err).__name__) from None
    if not isinstance(header, dict) or set(header) != {"kind", "meta", "arrays"}:
        raise ProtocolError("bad_header", "expected keys kind, meta, arrays")
    kind, meta, specs = header["kind"], header["meta"], header["arrays"]
    if not isinstance(kind, str) or kind not in SCHEMAS:
        raise ProtocolError("unknown_kind", repr(kind)[:40])
    if kinds is not None and kind not in kinds:
        raise ProtocolError("unexpected_kind", kind)
    if not isinstance(meta, dict) or not isinstance(specs, list):
        raise ProtocolError("bad_header", "meta must be a map and arrays a list")
    if len(frames) != 2 + len(specs):
        raise ProtocolError("frame_count", f"header lists {len(specs)} arrays, got {len(frames) - 2} buffers")
    arrays: dict[str, np.ndarray] = {}
    total = 0
    known = _known_arrays(kind)
    for spec, buf in zip(specs, frames[2:]):
        if not (isinstance(spec, list) and len(spec) == 3 and isinstance(spec[0], str)
                and isinstance(spec[1], str) and isinstance(spec[2], list)):
            raise ProtocolError("bad_array_spec", repr(spec)[:60])
        name, dtype, shape = spec
        if dtype not in DTYPES:
            raise ProtocolError("bad_dtype", f"{name}: {dtype}")
        if name in arrays:
            raise ProtocolError("duplicate_array", name)
        if len(shape) > MAX_NDIM or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 1 << 40
                                            for d in shape):
            raise ProtocolError("bad_shape", f"{name}: {shape}"[:80])
        if name not in known:
            raise ProtocolError("unknown_array", f"{kind}.{name}")
        if (dtype, len(shape)) != known[name]:
            want_dtype, want_ndim = known[name]
            raise ProtocolError("bad_array", f"{kind}.{name}: want {want_dtype} ndim {want_ndim}, got {dtype}{shape}")
        itemsize = np.dtype(dtype).itemsize
        expected = math.prod(shape) * itemsize
        total += expected
        if total > max_bytes:
            raise ProtocolError("too_large", f"over {max_bytes} bytes")
        if len(buf) != expected:
            raise ProtocolError("size_mismatch", f"{name}: {len(buf)} bytes for {dtype}{shape}")
        try:
            # An empty array may still name sides whose product overflows numpy's size
            # ([0, 2**39, 2**39]): numpy refuses to build it, and that refusal is ours to name.
            arrays[name] = np.frombuffer(buf, dtype=dtype).reshape(shape) if expected else np.zeros(shape, dtype)
        except ValueError:
            raise ProtocolError("bad_shape", f"{name}: {shape}") from None
    if "frames_encoded" in arrays and kind in ("window", "insert"):
        arrays["frames"] = _decompress_frames(arrays.pop("frames_encoded"), meta, max_bytes)
    _check_schema(kind, meta, arrays)
    return Message(kind, meta, arrays)


def _known_arrays(kind: str) -> dict[str, tuple[str, int]]:
    """name -> (dtype, ndim) of every array a ``kind`` may carry on the wire (its schema's, and
    ``frames_encoded`` for the kinds whose frames may travel compressed)."""
    schema = SCHEMAS[kind]
    known = {**schema.required_arrays, **schema.optional_arrays}
    if kind in ("window", "insert"):
        known["frames_encoded"] = ("uint8", 1)
    return known


def _check_schema(kind: str, meta: dict, arrays: dict[str, np.ndarray]) -> None:
    """The required meta keys and arrays, then the shapes that tie the arrays together (each
    array's name, dtype and ndim were checked before it was built)."""
    schema = SCHEMAS[kind]
    for key in schema.required_meta:
        if key not in meta:
            raise ProtocolError("missing_meta", f"{kind}.{key}")
    for name in schema.required_arrays:
        if name not in arrays:
            raise ProtocolError("missing_array", f"{kind}.{name}")
    if kind in ("window", "insert"):
        _check_window_shapes(arrays, batched=False)
    elif kind == "batch":
        _check_window_shapes(arrays, batched=True)


def _check_window_shapes(arrays: dict[str, np.ndarray], *, batched: bool) -> None:
    frames = arrays["frames"]
    lead = frames.shape[: 2 if batched else 1]
    h, w, c = frames.shape[-3:]
    if c != 3 or h < 1 or w < 1 or (lead[-1] < 1):
        raise ProtocolError("bad_shape", f"frames {list(frames.shape)}")
    expect = {"intrinsics": (*lead, 3, 3), "gt_depth": (*lead, h, w), "gt_cam_to_world": (*lead, 4, 4),
              "teacher_depth": (*lead, h, w), "teacher_valid": (*lead, h, w)}
    for name, shape in expect.items():
        if name in arrays and arrays[name].shape != shape:
            raise ProtocolError("bad_shape", f"{name} {list(arrays[name].shape)}, want {list(shape)}")
    matches = arrays.get("matches")
    if matches is not None:
        cols = len(BATCH_MATCH_COLUMNS if batched else MATCH_COLUMNS)
        if matches.shape[1] != cols:
            raise ProtocolError("bad_shape", f"matches {list(matches.shape)}, want [K,{cols}]")
        if matches.size and not np.isfinite(matches).all():
            raise ProtocolError("non_finite", "matches")
        views = lead[-1]
        named = Matches(matches, batched)
        idx = np.stack((named.view_i, named.view_j), 1)
        if matches.size and ((idx < 0).any() or (idx >= views).any() or (idx != np.round(idx)).any()):
            raise ProtocolError("bad_index", "matches view index out of range or not whole")
        if batched and matches.size and ((named.window < 0).any() or (named.window >= lead[0]).any()
                                         or (named.window != np.round(named.window)).any()):
            raise ProtocolError("bad_index", "matches batch index out of range or not whole")
        if matches.size and ((named.score < 0).any() or (named.score > 1).any()):
            raise ProtocolError("bad_score", "match scores must lie in [0, 1] (they weigh the match terms)")
        if matches.size:
            xy = np.concatenate((named.xy_i, named.xy_j))
            low, high = -0.5 - MATCH_MARGIN_PX, np.array([w - 0.5, h - 0.5], np.float32) + MATCH_MARGIN_PX
            if (xy < low).any() or (xy > high).any():
                raise ProtocolError("match_outside_frame", f"matches beyond {MATCH_MARGIN_PX} px of the {w}x{h} frames")
        tri = arrays.get("match_triangulation")
        if tri is not None:
            if tri.shape != (matches.shape[0], 3):
                raise ProtocolError("bad_shape", f"match_triangulation {list(tri.shape)}, want [{matches.shape[0]},3]")
            if tri.size and not np.isfinite(tri).all():
                raise ProtocolError("non_finite", "match_triangulation must be finite")
            if tri.size and ((tri < 0).any() or (tri[:, 2] > 1).any()):
                raise ProtocolError("bad_triangulation", "match_triangulation depths must be >= 0, weights in [0, 1]")
    elif "match_triangulation" in arrays:
        raise ProtocolError("missing_array", "match_triangulation without matches")
    for name in ("intrinsics", "gt_cam_to_world"):
        if name in arrays and not np.isfinite(arrays[name]).all():
            raise ProtocolError("non_finite", name)
    k = arrays["intrinsics"]
    if k.size and ((k[..., 0, 0] <= 0).any() or (k[..., 1, 1] <= 0).any() or (k[..., 2, :] != (0, 0, 1)).any()):
        raise ProtocolError("bad_intrinsics", "each view's fx and fy must be > 0 and its last row [0, 0, 1]")


CODECS = {"jpeg": ".jpg", "png": ".png"}


def compress_frames(msg: Message, codec: str = "jpeg", quality: int = 90) -> Message:
    """A copy of a ``window``/``insert`` message whose ``frames`` travel as JPEG or PNG
    (about 10x fewer bytes for JPEG at quality 90: for links between hosts)."""
    import cv2  # only senders that compress need OpenCV

    if codec not in CODECS:
        raise ValueError(f"codec must be one of {sorted(CODECS)}, got {codec!r}")
    frames = np.asarray(msg.arrays["frames"])
    params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)] if codec == "jpeg" else [cv2.IMWRITE_PNG_COMPRESSION, 1]
    blobs = []
    for rgb in frames:
        ok, buf = cv2.imencode(CODECS[codec], np.ascontiguousarray(rgb[..., ::-1]), params)
        if not ok:
            raise ProtocolError("encode_failed", codec)
        blobs.append(buf.reshape(-1))
    arrays = {k: v for k, v in msg.arrays.items() if k != "frames"}
    arrays["frames_encoded"] = np.concatenate(blobs)
    meta = {**msg.meta, "frame_codec": codec, "frame_sizes": [int(b.size) for b in blobs],
            "frame_shape": list(frames.shape)}
    return Message(msg.kind, meta, arrays)


def _decompress_frames(data: np.ndarray, meta: dict, max_bytes: int) -> np.ndarray:
    import cv2

    codec, sizes, shape = meta.get("frame_codec"), meta.get("frame_sizes"), meta.get("frame_shape")
    if codec not in CODECS:
        raise ProtocolError("bad_codec", repr(codec)[:20])
    if not (isinstance(shape, list) and len(shape) == 4 and shape[3] == 3
            and all(isinstance(d, int) and d > 0 for d in shape)):
        raise ProtocolError("bad_shape", f"frame_shape {shape!r}"[:80])
    if math.prod(shape) > max_bytes:
        raise ProtocolError("too_large", "decoded frames")
    if not (isinstance(sizes, list) and len(sizes) == shape[0] and all(isinstance(s, int) and s > 0 for s in sizes)
            and sum(sizes) == data.size):
        raise ProtocolError("size_mismatch", "frame_sizes do not add up to frames_encoded")
    frames = np.empty(shape, np.uint8)
    offset = 0
    for v, size in enumerate(sizes):
        bgr = cv2.imdecode(data[offset: offset + size], cv2.IMREAD_COLOR)
        offset += size
        if bgr is None or bgr.shape != tuple(shape[1:]):
            raise ProtocolError("bad_image", f"view {v} does not decode to {shape[1:]}")
        frames[v] = bgr[..., ::-1]
    return frames


def error_reply(reason: str, detail: str = "") -> Message:
    """An ``error`` reply; ``detail`` (a malformed message's decoder reason) only when given."""
    return Message("error", {"reason": reason, **({"detail": detail} if detail else {})})


def now() -> float:
    return time.time()


def self_test() -> None:
    """Round-trip one message of each array-carrying kind; run at every process start-up."""
    rng = np.random.default_rng(0)
    v, h, w = 2, 4, 6
    window = {"frames": rng.integers(0, 255, (v, h, w, 3), dtype=np.uint8),
              "intrinsics": np.tile(np.eye(3, dtype=np.float32), (v, 1, 1))}
    meta = {"window_id": "selftest", "source": "selftest", "frame_indices": [0, 1],
            "teacher": {"depth": {"name": "none"}}}
    insert = {**window, "matches": np.zeros((3, 7), np.float32),
              "teacher_depth": np.ones((v, h, w), np.float32), "teacher_valid": np.ones((v, h, w), np.uint8)}
    for msg in (Message("window", meta, window), Message("insert", meta, insert)):
        back = decode([bytes(f) for f in encode(msg)])
        assert back.kind == msg.kind and back.meta == msg.meta
        for name, arr in msg.arrays.items():
            assert np.array_equal(back.arrays[name], arr), name

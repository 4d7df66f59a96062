"""Bounded-memory pieces of ``reliev3r reconstruct`` (:mod:`reliev3r.reconstruct`): the window
chain one window at a time, a PLY written as points come, a float spool of depth maps, a
bounded sample of depth values for the colour range and an exact-size uniform subsample of a
row file read in chunks.

What stays in memory while a video is reconstructed, whatever its length:

* the frames of one window (``views`` decoded frames) and the model's output for it;
* the chain's depth and poses of the last window's frames (what the next window can share);
* at most :data:`DEPTH_SAMPLE_CAP` depth values (the colour range's percentiles; exact while
  the whole video's valid depths fit, a uniform reservoir sample beyond);
* per frame, its pose, intrinsics and timestamp, for the trajectory plot, the ATE and the
  COLMAP images, in growing float64 arrays (:class:`FrameLog`, 208 bytes a frame), and the
  trajectory plot's arrays at the end;
* with ``--colmap``, the kept points (at most ``max_points``) while ``points3D`` is written.

Everything else (points, depth, pixel observations) goes to disk as each window is chained.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

DEPTH_SAMPLE_CAP = 1 << 20
"""Depth values kept for the colour range's 2nd/98th percentiles (4 MiB of float32)."""
CHUNK_ROWS = 1 << 18
"""Rows read at a time when a row file is subsampled."""


def ply_dtype(confidence: bool = True) -> np.dtype:
    fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4"), ("red", "u1"), ("green", "u1"), ("blue", "u1")]
    if confidence:
        fields.append(("confidence", "<f4"))
    return np.dtype(fields)


def ply_header(count: int, dtype: np.dtype, pad: int = 0) -> bytes:
    """The binary PLY header of ``count`` vertices of ``dtype``; ``pad`` > 0 adds a comment
    line of that many characters (a header rewritten in place keeps its length with it)."""
    ply_types = {"<f4": "float", "|u1": "uchar"}
    header = ["ply", "format binary_little_endian 1.0", "comment reliev3r reconstruct"]
    if pad:
        header.append("comment" + " " * (pad - len("comment")))
    header.append(f"element vertex {count}")
    header += [f"property {ply_types[dtype[name].str]} {name}" for name in dtype.names] + ["end_header"]
    return ("\n".join(header) + "\n").encode("ascii")


class PlyStream:
    """A binary PLY written as its vertices come: the header says 0 vertices and carries a
    padding comment until :meth:`close` rewrites it in place with the count (same length)."""

    COUNT_DIGITS = 20

    def __init__(self, path: Path, confidence: bool = True) -> None:
        self.path, self.dtype, self.count = Path(path), ply_dtype(confidence), 0
        self._file = open(self.path, "wb")
        self.header_len = len(self._header(0))
        self._file.write(self._header(0))

    def _header(self, count: int) -> bytes:
        # The padding comment shrinks by as many characters as the count grows.
        return ply_header(count, self.dtype, pad=8 + self.COUNT_DIGITS - len(str(count)))

    def append(self, points: np.ndarray, colors: np.ndarray, confidence: np.ndarray | None = None) -> None:
        rec = np.empty(len(points), self.dtype)
        rec["x"], rec["y"], rec["z"] = points[:, 0], points[:, 1], points[:, 2]
        rec["red"], rec["green"], rec["blue"] = colors[:, 0], colors[:, 1], colors[:, 2]
        if "confidence" in self.dtype.names:
            rec["confidence"] = confidence
        self._file.write(rec.tobytes())
        self.count += len(rec)

    def flush(self) -> None:
        self._file.flush()

    def abandon(self) -> None:
        """Close the file as it is (a run that stops): the header still says 0 vertices."""
        self._file.close()

    def close(self) -> int:
        header = self._header(self.count)
        assert len(header) == self.header_len
        self._file.seek(0)
        self._file.write(header)
        self._file.close()
        return self.count


def sampled_rows(count: int, k: int, seed: int = 0, chunk: int = CHUNK_ROWS) -> Iterator[tuple[int, np.ndarray]]:
    """An exact-size uniform sample without replacement of ``k`` of ``count`` rows, chunk by
    chunk: yields (chunk start, sorted row indices inside the chunk). Each chunk's share is
    hypergeometric given the rows still to pick, so memory is O(chunk) whatever ``count``."""
    rng = np.random.default_rng(seed)
    left, need = count, min(k, count)
    for start in range(0, count, chunk):
        size = min(chunk, count - start)
        take = int(rng.hypergeometric(size, left - size, need)) if left > size else need
        yield start, np.sort(rng.choice(size, take, replace=False)) if take < size else np.arange(size)
        left, need = left - size, need - take


def copy_sampled(src: Path, offset: int, dtype: np.dtype, count: int, k: int, dst, seed: int = 0) -> int:
    """Write the rows of ``src`` (``count`` records of ``dtype`` from byte ``offset``) picked by
    :func:`sampled_rows` to the open binary file ``dst``; returns the rows written."""
    written = 0
    with open(src, "rb") as f:
        for start, pick in sampled_rows(count, k, seed):
            f.seek(offset + start * dtype.itemsize)
            rows = np.fromfile(f, dtype, count=min(CHUNK_ROWS, count - start))
            dst.write(rows[pick].tobytes())
            written += len(pick)
    return written


def subsample_ply(path: Path, header_len: int, count: int, k: int, confidence: bool = True, seed: int = 0) -> int:
    """Replace the PLY at ``path`` (``count`` vertices after ``header_len`` header bytes) by a
    uniform subsample of ``k`` of its vertices, in file order."""
    dtype = ply_dtype(confidence)
    tmp = path.with_name(path.name + ".all")
    os.replace(path, tmp)
    with open(path, "wb") as dst:
        dst.write(ply_header(min(k, count), dtype))
        n = copy_sampled(tmp, header_len, dtype, count, k, dst, seed)
    tmp.unlink()
    return n


class RowSpool:
    """Fixed-shape records appended to a temporary file and read back in order (or subsampled)."""

    def __init__(self, folder: Path, dtype, shape: tuple[int, ...] = ()) -> None:
        self.dtype, self.shape, self.count = np.dtype(dtype), tuple(shape), 0
        fd, name = tempfile.mkstemp(prefix=".spool-", dir=folder)
        self.path = Path(name)
        self._file = os.fdopen(fd, "w+b")

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize * int(np.prod(self.shape, dtype=np.int64))

    def append(self, rows: np.ndarray) -> None:
        rows = np.ascontiguousarray(rows, self.dtype).reshape(-1, *self.shape)
        self._file.write(rows.tobytes())
        self.count += len(rows)

    def __iter__(self) -> Iterator[np.ndarray]:
        self._file.flush()
        self._file.seek(0)
        size = int(np.prod(self.shape, dtype=np.int64))
        for _ in range(self.count):
            yield np.fromfile(self._file, self.dtype, count=size).reshape(self.shape)

    def sampled(self, k: int, seed: int = 0) -> np.ndarray:
        """The rows :func:`sampled_rows` picks (all of them when ``k`` >= count), in memory."""
        self._file.flush()
        flat = np.dtype((self.dtype, self.shape)) if self.shape else self.dtype
        out = []
        with open(self.path, "rb") as f:
            for start, pick in sampled_rows(self.count, k, seed):
                f.seek(start * self.itemsize)
                out.append(np.fromfile(f, flat, count=min(CHUNK_ROWS, self.count - start))[pick])
        return np.concatenate(out) if out else np.zeros((0, *self.shape), self.dtype)

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


class FrameLog:
    """Per-frame values of one shape appended to a float64 array that doubles when full: no
    Python object per frame (a frame's pose is 128 bytes, not a numpy view of its window)."""

    def __init__(self, shape: tuple[int, ...] = (), capacity: int = 1024) -> None:
        self._a, self._n = np.empty((capacity, *shape)), 0

    def append(self, value) -> None:
        if self._n == len(self._a):
            self._a = np.concatenate([self._a, np.empty_like(self._a)])
        self._a[self._n] = value
        self._n += 1

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, k: int) -> np.ndarray:
        if not -self._n <= k < self._n:
            raise IndexError(k)
        return self._a[k % self._n]

    def array(self) -> np.ndarray:
        return self._a[:self._n]


class ValueSample:
    """Up to ``cap`` values of a stream: all of them while they fit, then a uniform reservoir
    sample (Algorithm R, vectorised per batch)."""

    def __init__(self, cap: int | None = None, seed: int = 0) -> None:
        self.cap = DEPTH_SAMPLE_CAP if cap is None else cap
        self.seen, self._rng = 0, np.random.default_rng(seed)
        self._parts: list[np.ndarray] = []
        self._buf: np.ndarray | None = None

    def add(self, values: np.ndarray) -> None:
        values = np.asarray(values).ravel()
        if self._buf is None:
            if self.seen + len(values) <= self.cap:
                self._parts.append(values.copy())
                self.seen += len(values)
                return
            head = self.cap - self.seen
            self._buf = np.concatenate([*self._parts, values[:head]])
            self._parts, self.seen, values = [], self.cap, values[head:]
        slot = self._rng.integers(0, self.seen + 1 + np.arange(len(values)))
        hit = slot < self.cap
        self._buf[slot[hit]] = values[hit]
        self.seen += len(values)

    def values(self) -> np.ndarray:
        if self._buf is not None:
            return self._buf
        return np.concatenate(self._parts) if self._parts else np.zeros(0, np.float32)


class StreamingChain:
    """:func:`reliev3r.reconstruct.chain_windows`, one window at a time: windows come sorted by
    start, each overlapping what came before; :meth:`add` returns the frames the window sees
    first, in the chain's gauge. Only the frames of the last window are held (a later window
    starts at or after its start, so it can share no older frame)."""

    def __init__(self) -> None:
        self.poses: dict[int, np.ndarray] = {}
        self.depth: dict[int, np.ndarray] = {}
        self.next_fresh = 0
        self.windows = 0

    def add(self, r) -> list[tuple[int, int, np.ndarray, np.ndarray, np.ndarray]]:
        """(frame index, index in the window, cam_to_world [4,4] float64, depth and confidence
        [H,W] float32) of each frame the window ``r`` (a ``WindowResult``) sees first."""
        from reliev3r.reconstruct import align_to_chain

        idx = np.arange(r.start, r.start + len(r.depth))
        shared = idx < self.next_fresh
        if self.windows == 0:
            s, G = 1.0, np.eye(4)
        else:
            if not shared.any():
                raise ValueError(f"window at frame {r.start} shares no frame with the chain")
            s, G = align_to_chain(np.stack([self.poses[i] for i in idx[shared]]),
                                  np.stack([self.depth[i] for i in idx[shared]]), r.cam_to_world[shared],
                                  r.depth[shared])
        new = r.cam_to_world.astype(np.float64).copy()
        new[:, :3, 3] *= s
        new = G @ new
        fresh = []
        for j in np.flatnonzero(~shared):
            k = int(idx[j])
            self.poses[k], self.depth[k] = new[j], r.depth[j] * s
            fresh.append((k, int(j), new[j], self.depth[k], r.confidence[j]))
        for k in [k for k in self.poses if k < r.start]:
            del self.poses[k], self.depth[k]
        self.next_fresh = max(self.next_fresh, int(idx[-1]) + 1)
        self.windows += 1
        return fresh

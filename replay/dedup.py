"""Near-duplicate windows: a cheap embedding and a nearest-neighbour index.

The embedding of a window is, per frame, an 8x8 grayscale thumbnail (area-averaged), minus
its mean, divided by its norm; the V thumbnails are concatenated and scaled by 1/sqrt(V), so
the vector has unit length and the squared L2 distance of two windows is
``2 - 2 * mean_v cos(thumb_v, thumb'_v)``: 0 for the same frames, invariant to global
brightness and contrast, near 0 for a static camera (sensor noise barely changes an 8x8
average), and growing with camera motion. A window whose nearest stored embedding lies
within ``threshold`` is a near-duplicate.

The index is faiss (``IndexIDMap2`` over ``IndexFlatL2``, exact search) when faiss imports,
else a numpy brute-force index with the same interface.
"""

from __future__ import annotations

import cv2
import numpy as np

THUMB = 8

try:  # optional: faiss-cpu (or faiss-gpu) speeds up search over large stores
    import faiss
except ImportError:  # pragma: no cover - depends on the environment
    faiss = None


def embed(frames: np.ndarray, size: int = THUMB) -> np.ndarray:
    """Unit-length float32 embedding of a window's frames uint8 [V,H,W,3]."""
    views = []
    for frame in frames:
        gray = cv2.cvtColor(np.ascontiguousarray(frame), cv2.COLOR_RGB2GRAY)
        thumb = cv2.resize(gray, (size, size), interpolation=cv2.INTER_AREA).astype(np.float32).ravel()
        thumb -= thumb.mean()
        norm = np.linalg.norm(thumb)
        # A flat frame has no shape to compare: leave it zero, it matches other flat frames.
        views.append(thumb / norm if norm > 1e-3 else thumb)
    return (np.concatenate(views) / np.sqrt(len(views))).astype(np.float32)


class NumpyIndex:
    """Exact nearest neighbour by brute force; the fallback when faiss is absent."""

    def __init__(self, dim: int):
        self.dim = dim
        self._ids: list[int] = []
        self._vecs = np.zeros((0, dim), np.float32)

    def __len__(self) -> int:
        return len(self._ids)

    def add(self, key: int, vec: np.ndarray) -> None:
        self._ids.append(int(key))
        self._vecs = np.concatenate([self._vecs, vec.reshape(1, self.dim).astype(np.float32)])

    def remove(self, key: int) -> None:
        if key in self._ids:
            i = self._ids.index(key)
            self._ids.pop(i)
            self._vecs = np.delete(self._vecs, i, axis=0)

    def nearest(self, vec: np.ndarray) -> tuple[int, float]:
        """(key, squared L2 distance) of the nearest stored vector; (-1, inf) when empty."""
        if not self._ids:
            return -1, float("inf")
        d = ((self._vecs - vec.reshape(1, self.dim)) ** 2).sum(axis=1)
        i = int(d.argmin())
        return self._ids[i], float(d[i])


class FaissIndex:
    """The same interface over faiss (exact L2 search, removable ids)."""

    def __init__(self, dim: int):
        self.dim = dim
        self.index = faiss.IndexIDMap2(faiss.IndexFlatL2(dim))

    def __len__(self) -> int:
        return int(self.index.ntotal)

    def add(self, key: int, vec: np.ndarray) -> None:
        self.index.add_with_ids(vec.reshape(1, self.dim).astype(np.float32), np.array([key], np.int64))

    def remove(self, key: int) -> None:
        self.index.remove_ids(np.array([key], np.int64))

    def nearest(self, vec: np.ndarray) -> tuple[int, float]:
        if self.index.ntotal == 0:
            return -1, float("inf")
        dist, ids = self.index.search(vec.reshape(1, self.dim).astype(np.float32), 1)
        return int(ids[0, 0]), float(dist[0, 0])


class Dedup:
    """Embeds windows and answers "is this a near-duplicate of a stored one?"."""

    def __init__(self, threshold: float, *, backend: str = "auto"):
        if threshold < 0:
            raise ValueError("threshold must be >= 0")
        if backend not in ("auto", "faiss", "numpy"):
            raise ValueError(f"backend: unknown {backend!r}")
        if backend == "faiss" and faiss is None:
            raise ValueError("backend: faiss requested but not importable (pip install faiss-cpu)")
        self.threshold = threshold
        self.backend = "faiss" if backend == "faiss" or (backend == "auto" and faiss is not None) else "numpy"
        self._index: FaissIndex | NumpyIndex | None = None

    def __len__(self) -> int:
        return 0 if self._index is None else len(self._index)

    def embed(self, frames: np.ndarray) -> np.ndarray:
        return embed(frames)

    def nearest(self, vec: np.ndarray) -> tuple[int, float]:
        if self._index is None or self._index.dim != vec.size:
            return -1, float("inf")
        return self._index.nearest(vec)

    def is_duplicate(self, vec: np.ndarray) -> bool:
        return self.nearest(vec)[1] <= self.threshold

    def add(self, key: int, vec: np.ndarray) -> None:
        if self._index is None:
            self._index = (FaissIndex if self.backend == "faiss" else NumpyIndex)(vec.size)
        if vec.size == self._index.dim:
            self._index.add(key, vec)

    def remove(self, key: int) -> None:
        if self._index is not None:
            self._index.remove(key)

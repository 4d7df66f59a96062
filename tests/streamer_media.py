"""Test media for the streamer and labeler tests: small real videos encoded with PyAV."""

from __future__ import annotations

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


def encode(path: Path, frames: np.ndarray, *, codec: str = "libx264", fps: int = 10) -> Path:
    container = av.open(str(path), "w")
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = frames.shape[1:3]
    stream.pix_fmt = "yuv420p"
    for rgb in frames:
        for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path

"""Frames -> windows: resize and centre-crop to the window size (intrinsics scaled exactly),
pick views every ``frame_stride`` frames behind a motion gate, group V views per window.

Resizing follows ``reliev3r.geometry``'s convention (pixel centres at integers): scaling an
image by ``s`` maps x to ``(x + 0.5) * s - 0.5``; cropping shifts the principal point.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Iterable, Iterator

import cv2
import numpy as np

from reliev3r.protocol import Message
from streamer.sources import Frame

THUMB_SIZE = (32, 24)
"""Width, height of the grey thumbnails the motion gate compares."""


@dataclass(slots=True)
class View:
    index: int
    timestamp: float
    rgb: np.ndarray
    intrinsics: np.ndarray
    gt_depth: np.ndarray | None
    gt_cam_to_world: np.ndarray | None


@dataclass(slots=True)
class Window:
    window_id: str
    source: str
    views: list[View]

    def to_message(self) -> Message:
        arrays = {"frames": np.stack([v.rgb for v in self.views]),
                  "intrinsics": np.stack([v.intrinsics for v in self.views]).astype(np.float32)}
        # Ground truth travels only when every view has it (the schema has no per-view mask).
        if all(v.gt_depth is not None for v in self.views):
            arrays["gt_depth"] = np.stack([v.gt_depth for v in self.views]).astype(np.float32)
        if all(v.gt_cam_to_world is not None for v in self.views):
            arrays["gt_cam_to_world"] = np.stack([v.gt_cam_to_world for v in self.views]).astype(np.float32)
        meta = {"window_id": self.window_id, "source": self.source,
                "frame_indices": [v.index for v in self.views],
                "timestamps": [float(v.timestamp) for v in self.views]}
        return Message("window", meta, arrays)


def resize_crop_geometry(src_w: int, src_h: int, dst_w: int, dst_h: int) -> tuple[int, int, int, int]:
    """(resized_w, resized_h, left, top): resize keeping aspect so the target is covered, then
    crop the centre."""
    scale = max(dst_w / src_w, dst_h / src_h)
    rw, rh = max(dst_w, round(src_w * scale)), max(dst_h, round(src_h * scale))
    return rw, rh, (rw - dst_w) // 2, (rh - dst_h) // 2


def scale_crop_intrinsics(K: np.ndarray, src_w: int, src_h: int, rw: int, rh: int,
                          left: int, top: int) -> np.ndarray:
    """Exactly what geometry.resize_intrinsics then crop_intrinsics do, in numpy."""
    sx, sy = rw / src_w, rh / src_h
    out = np.array(K, dtype=np.float64, copy=True)
    out[0, 0] *= sx
    out[0, 1] *= sx
    out[1, 1] *= sy
    out[0, 2] = (out[0, 2] + 0.5) * sx - 0.5 - left
    out[1, 2] = (out[1, 2] + 0.5) * sy - 0.5 - top
    return out


def resize_view(frame: Frame, width: int, height: int) -> View:
    src_h, src_w = frame.rgb.shape[:2]
    rw, rh, left, top = resize_crop_geometry(src_w, src_h, width, height)
    interp = cv2.INTER_AREA if rw <= src_w else cv2.INTER_LINEAR
    rgb = cv2.resize(frame.rgb, (rw, rh), interpolation=interp)[top:top + height, left:left + width]
    K = scale_crop_intrinsics(frame.intrinsics, src_w, src_h, rw, rh, left, top)
    depth = None
    if frame.gt_depth is not None:
        # Depth may come at another resolution of the same view: map it to the resized frame
        # grid, then crop. Nearest (centre-exact) keeps depth edges sharp; no invented depths.
        d = cv2.resize(frame.gt_depth.astype(np.float32), (rw, rh), interpolation=cv2.INTER_NEAREST_EXACT)
        depth = np.ascontiguousarray(d[top:top + height, left:left + width])
        depth[~np.isfinite(depth) | (depth < 0)] = 0.0
    return View(frame.index, frame.timestamp, np.ascontiguousarray(rgb), K, depth, frame.gt_cam_to_world)


def thumbnail(rgb: np.ndarray) -> np.ndarray:
    grey = cv2.cvtColor(rgb, cv2.COLOR_RGB2GRAY)
    return cv2.resize(grey, THUMB_SIZE, interpolation=cv2.INTER_AREA).astype(np.float32)


class WindowBuilder:
    """Turns one source's frames into windows.

    Candidate views are frames ``frame_stride`` apart. The motion gate skips a candidate whose
    thumbnail differs from the last kept view by less than ``min_motion`` grey levels (mean
    absolute difference): a still camera adds no parallax, only duplicates. A difference above
    ``scene_cut`` starts afresh (a hard cut: views across it share nothing). A window is V
    consecutive kept views; the next window starts at the first kept view at least
    ``window_step`` frames after the previous window's first frame.
    """

    def __init__(self, source: str, *, views: int, height: int, width: int, frame_stride: int,
                 window_step: int, min_motion: float = 0.0, scene_cut: float = 0.0, pass_index: int = 0):
        self.source, self.views, self.height, self.width = source, views, height, width
        self.frame_stride, self.window_step = frame_stride, window_step
        self.min_motion, self.scene_cut, self.pass_index = min_motion, scene_cut, pass_index
        self.buffer: deque[View] = deque()
        self.last_thumb: np.ndarray | None = None
        self.next_candidate = 0
        self.skipped_still = 0
        self.cuts = 0

    def push(self, frame: Frame) -> Window | None:
        if frame.index < self.next_candidate:
            return None
        thumb = thumbnail(frame.rgb)
        if self.last_thumb is not None:
            motion = float(np.abs(thumb - self.last_thumb).mean())
            if self.scene_cut > 0 and motion > self.scene_cut:
                self.buffer.clear()
                self.cuts += 1
            elif motion < self.min_motion:
                self.skipped_still += 1
                self.next_candidate = frame.index + 1  # try the very next frame, not a stride on
                return None
        self.last_thumb = thumb
        self.next_candidate = frame.index + self.frame_stride
        self.buffer.append(resize_view(frame, self.width, self.height))
        if len(self.buffer) < self.views:
            return None
        views = list(self.buffer)[: self.views]
        first = views[0].index
        while self.buffer and self.buffer[0].index < first + self.window_step:
            self.buffer.popleft()
        return Window(f"{self.source}:{self.pass_index}:{first}", self.source, views)


def windows_of(source, frames: Iterable[Frame], cfg, *, pass_index: int = 0) -> Iterator[Window]:
    """Windows of one source under ``StreamerConfig`` ``cfg``."""
    builder = WindowBuilder(source, views=cfg.views, height=cfg.height, width=cfg.width,
                            frame_stride=cfg.frame_stride, window_step=cfg.window_step,
                            min_motion=cfg.keyframe_min_motion, scene_cut=cfg.scene_cut_motion,
                            pass_index=pass_index)
    for frame in frames:
        window = builder.push(frame)
        if window is not None:
            yield window
